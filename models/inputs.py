"""The network input contract, shared by training and inference (paper 002, REFERENCE.md 2).

What a network sees must be built the same way from a training batch (:mod:`training.augment`, after its
random augmentations) and from a measured scan (:mod:`evaluation.networks`), so the deterministic part of
the pipeline lives here, below both: the probe's diffraction intensity, the rotation of patterns about
the centre pixel, and AIRPI's pre-processing ``x^0.1 -> zeta step weights -> standardisation -> probe
amplitude and phase channels`` (:func:`preprocess`), giving the ``(B, 11, K, K)`` float32 network input.

Conventions (kernel shards, ARCHITECTURE.md contract 1): patterns ``(B, 9, K, K)`` hold the 3x3 kernel
row-major (index 4 = centre, 1/3/5/7 = neighbours along x or y, 0/2/6/8 = diagonal neighbours), zero
frequency at pixel ``(K // 2, K // 2)`` (``fftshift`` order), axes ``[kx, ky]``; probes ``(B, K, K)``
complex real-space, normalised to ``sum |psi|^2 = 1``; scan steps in Angstrom. All functions take and
return tensors on the input's device and draw no random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CENTRE",
    "CORNERS",
    "EDGES",
    "PROBE_PHASE_SNAP_RAD",
    "airpi_input",
    "compress_intensity",
    "preprocess",
    "probe_channels",
    "probe_intensity",
    "rotate_patterns",
    "standardise",
    "zeta_weights",
]

CENTRE, EDGES, CORNERS = (4,), (1, 3, 5, 7), (0, 2, 6, 8)
"""Row-major positions in the 3x3 kernel: centre, x/y neighbours (weight zeta_xy), diagonals (zeta_d)."""


# ----------------------------------------------------------------------------------------------------------
# The detector without a specimen
# ----------------------------------------------------------------------------------------------------------


def probe_intensity(probe: Tensor) -> Tensor:
    """Centred diffraction intensity ``|FFT(psi_in)|^2`` of real-space probes (B, K, K), real dtype.

    Orthonormal FFT, so the total equals ``sum |psi_in|^2`` (1 for a normalised probe); zero frequency at
    ``(K // 2, K // 2)`` as in the CBEDs. This is what the detector records without a specimen.
    """
    spectrum = torch.fft.fftshift(torch.fft.fft2(probe, norm="ortho"), dim=(-2, -1))
    return spectrum.real**2 + spectrum.imag**2


# ----------------------------------------------------------------------------------------------------------
# Rotation of patterns about the centre pixel (scan rotation at inference, misalignment in training)
# ----------------------------------------------------------------------------------------------------------


def rotate_patterns(cbed: Tensor, angle_deg: Tensor, *, preserve_intensity: bool = True) -> Tensor:
    """Rotate all patterns of each sample by ``angle_deg`` (B,) about the centre pixel ``(K//2, K//2)``.

    Positive angles rotate content counter-clockwise in the ``(kx, ky)`` plane (``kx`` = axis -2,
    ``ky`` = axis -1): content at ``k`` moves to ``R(angle) k``. Bilinear interpolation (zeros outside);
    with ``preserve_intensity`` each pattern is rescaled to its original total intensity.
    ``cbed`` is (B, C, K, K) or (B, K, K).
    """
    squeeze = cbed.ndim == 3
    x = cbed[:, None] if squeeze else cbed
    h, w = x.shape[-2:]
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    theta = torch.deg2rad(angle_deg.to(x.device, dtype))
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    cx, cy = float(h // 2), float(w // 2)
    gx = torch.arange(h, device=x.device, dtype=dtype)[:, None] - cx  # output pixel, relative to centre
    gy = torch.arange(w, device=x.device, dtype=dtype)[None, :] - cy
    src_x = cx + cos * gx + sin * gy  # R(-angle) applied to the output position
    src_y = cy - sin * gx + cos * gy
    grid = torch.stack([2.0 * src_y / (w - 1) - 1.0, 2.0 * src_x / (h - 1) - 1.0], dim=-1)
    out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if preserve_intensity:
        before = x.sum(dim=(-2, -1), keepdim=True).to(dtype)
        after = out.sum(dim=(-2, -1), keepdim=True)
        out = out * torch.where(after > 0, before / after.clamp_min(torch.finfo(dtype).tiny), 1.0)
    out = out.to(cbed.dtype)
    return out[:, 0] if squeeze else out


# ----------------------------------------------------------------------------------------------------------
# AIRPI pre-processing (paper 002 section "CNN architecture", eq. 10)
# ----------------------------------------------------------------------------------------------------------


def compress_intensity(x: Tensor, exponent: float = 0.1) -> Tensor:
    """Dynamic-range compression ``x -> x^0.1`` (negative values from readout noise clamped to 0)."""
    return x.clamp_min(0) ** exponent


def zeta_weights(
    step_A: Tensor | float, scale: float = 50.0, *, device: torch.device | str | None = None
) -> Tensor:
    """Per-pattern step weights of paper 002 eq. 10 as a (B, 9) tensor (row-major 3x3 kernel).

    Centre (index 4): 1; x/y neighbours (1, 3, 5, 7): ``zeta_xy = 1 / (50 ds)``; diagonal neighbours
    (0, 2, 6, 8): ``zeta_d = 1 / (50 sqrt(2 ds^2)) = 1 / (50 sqrt(2) ds)``, ``ds`` = scan step in A.
    """
    ds = torch.as_tensor(step_A, dtype=torch.float32, device=device)
    ds = ds.reshape(-1)
    if bool((ds <= 0).any()):
        raise ValueError("scan steps must be positive (Angstrom)")
    weights = torch.ones(ds.shape[0], 9, dtype=torch.float32, device=ds.device)
    weights[:, list(EDGES)] = (1.0 / (scale * ds))[:, None]
    weights[:, list(CORNERS)] = (1.0 / (scale * math.sqrt(2.0) * ds))[:, None]
    return weights


def standardise(x: Tensor, dims: Sequence[int] = (1, 2, 3), eps: float = 1e-6) -> Tensor:
    """``(x - mean) / max(std, eps)`` per sample, mean and (population) std taken over ``dims``.

    AIRPI uses ``dims = (1, 2, 3)``: all 9 patterns of a sample together, so the relative weighting of
    the patterns by ``zeta`` survives.
    """
    dims = tuple(dims)
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=0)
    return (x - mean) / std.clamp_min(eps)


PROBE_PHASE_SNAP_RAD = 1e-4


def probe_channels(probe: Tensor) -> Tensor:
    """(B, 2, K, K) float32: real-space probe amplitude ``|psi_in|`` and phase ``angle(psi_in)`` (rad).

    The phase lies in ``(-pi + 1e-4, pi + 1e-4]``: values within ``PROBE_PHASE_SNAP_RAD`` of ``-pi`` are
    moved to ``+pi``. An aberration-free probe is real (an Airy pattern with negative rings), and
    ``angle()`` of its negative pixels lands on ``+pi`` or ``-pi`` by the sign of a ~1e-17 round-off in the
    imaginary part (2,034 of 4,096 pixels at 300 kV, 20 mrad, 64 px): salt-and-pepper noise in the
    network's input channel 10 and in the global phase residual, and a penalty ``relu(|phi| - pi)`` pushing
    with a random sign. Snapped, every negative ring reads ``+pi``; the complex probe ``|psi| e^{i phase}``
    is unchanged.
    """
    phase = probe.angle()
    phase = torch.where(phase <= -math.pi + PROBE_PHASE_SNAP_RAD, phase + 2 * math.pi, phase)
    return torch.stack([probe.abs(), phase], dim=1).to(torch.float32)


def airpi_input(patterns: Tensor, probe: Tensor) -> Tensor:
    """Concatenate pre-processed patterns (B, 9, K, K) and probe channels: (B, 11, K, K) float32."""
    return torch.cat([patterns.to(torch.float32), probe_channels(probe)], dim=1)


def preprocess(
    counts: Tensor,
    step_A: Tensor | float,
    probe: Tensor,
    *,
    exponent: float = 0.1,
    zeta_scale: float = 50.0,
    standardise_input: bool = True,
) -> Tensor:
    """AIRPI pre-processing of (noisy) kernels: ``x^0.1`` -> ``zeta`` weights -> standardisation -> probe.

    ``counts`` (B, 9, K, K) (any intensity scale: the standardisation removes it), ``step_A`` (B,) scan
    steps in A, ``probe`` (B, K, K) complex real-space probes. Channels 0-8: the weighted, standardised
    patterns (row-major kernel); channel 9: ``|psi_in|``; channel 10: phase of ``psi_in`` in rad.
    Returns (B, 11, K, K) float32.
    """
    if counts.ndim != 4 or counts.shape[1] != 9:
        raise ValueError(f"expected (B, 9, K, K) kernels, got shape {tuple(counts.shape)}")
    x = compress_intensity(counts.to(torch.float32), exponent)
    x = x * zeta_weights(step_A, zeta_scale, device=x.device)[:, :, None, None]
    if standardise_input:
        x = standardise(x, dims=(1, 2, 3))
    return airpi_input(x, probe)
