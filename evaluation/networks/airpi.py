"""AIRPI reconstruction of a scan (paper 002 eq. 4-8): the predicted exit waves placed by Fourier phase ramps.

Each effective position's 3x3 kernel of CBEDs (resampled onto the network grid,
:mod:`evaluation.networks.geometry`) goes through the training pre-processing
:func:`models.inputs.preprocess`; the predicted exit wave and the probe are evaluated on the object pixels
by one Fourier matrix product each (sub-pixel placement and resampling together), ``T_n = sgn(psi_out
conj(psi_in)) * w_n`` with ``w_n = |psi_in|^2 / sum |psi_in|^2`` where ``|psi_in|^2 > 0.1 max`` (0
elsewhere), ``T = sum_n T_n``, image ``angle(T)``. The trust map
(:mod:`evaluation.networks.consistency`) compares ``|F psi_out|^2`` with each centre CBED in the same loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from evaluation.networks.consistency import ConsistencyMap, diffraction_intensity, map_and_summary
from evaluation.networks.geometry import (
    PAPER_RATIO_ALPHA_GMAX,
    Predictor,
    ScanGeometry,
    _batches,
    _check_patterns,
    _default_block_rows,
    _detector_centre,
    _inference_bar,
    _mask_half_width,
    _network_grid,
    _object_pixel,
    _ObjectGrid,
    _PatternStream,
    resolve_device,
)
from evaluation.references import Reconstruction
from evaluation.unwrap import unwrap_phase_image
from models.inputs import preprocess
from physics import probe

__all__ = ["airpi_reconstruct"]


def _fourier_evaluation(n: int, coordinates: torch.Tensor) -> torch.Tensor:
    """Matrix ``(..., M, n)`` evaluating the band-limited periodic interpolant of ``n`` samples at fractional
    sample ``coordinates`` (..., M): ``psi(u) = (1/n) sum_k fft(psi)_k exp(2 pi i f_k u)``, i.e. a Fourier
    shift (phase ramp) and resampling in one matrix."""
    f = torch.fft.fftfreq(n, dtype=torch.float64, device=coordinates.device)
    samples = torch.arange(n, dtype=torch.float64, device=coordinates.device)
    synthesis = coordinates.to(torch.float64)[..., :, None] * f  # (..., M, n)
    e = torch.polar(torch.ones_like(synthesis), 2.0 * math.pi * synthesis) / n
    analysis = torch.polar(
        torch.ones(n, n, dtype=torch.float64, device=f.device), -2.0 * math.pi * f[:, None] * samples
    )
    return (e @ analysis).to(torch.complex64)


def _placement_matrices(pixels: int, offsets: torch.Tensor, frac: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, M, K) Fourier evaluation matrices for footprint ``offsets`` (M,) and remainders ``frac`` (B,)."""
    coordinates = pixels // 2 + (offsets[None, :] - frac[:, None]) * scale
    if bool(torch.all(frac == frac[0])):
        return _fourier_evaluation(pixels, coordinates[:1]).expand(frac.shape[0], -1, -1)
    return _fourier_evaluation(pixels, coordinates)


def _on_stride(index: np.ndarray, size: int, stride: int) -> np.ndarray:
    """Which of the positions ``index`` along an axis of ``size`` the network runs at: every ``stride``-th
    and the last."""
    return (index % stride == 0) | (index == size - 1)


def airpi_reconstruct(
    scan: Any,
    predictor: Predictor,
    *,
    pixels: int = 64,
    gmax_invA: float | None = None,
    ratio_alpha_gmax: tuple[float, float] | None = PAPER_RATIO_ALPHA_GMAX,
    oversampling: int = 1,
    pixel_size_A: float | None = None,
    data_repetition: bool = False,
    repetition_box: int = 5,
    repetition_stride: int = 2,
    weight_threshold: float = 0.1,
    inference_stride: int = 1,
    zeta_scale: float = 50.0,
    crop_to_scan: bool = True,
    unwrap_phase: bool = True,
    detector_centre_px: Any = None,
    batch_size: int = 256,
    block_rows: int | None = None,
    consistency: bool = True,
    consistency_counts_per_unit: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stream_factory: Callable[..., _PatternStream] = _PatternStream,
) -> Reconstruction:
    """AIRPI reconstruction of a scan (paper 002 eq. 4-8); see :mod:`evaluation.networks`.

    ``predictor(inputs (B, 11, K, K), positions_A (B, 2))`` returns the complex real-space exit wave
    (B, K, K) on the network grid (pixel ``1 / (2 gmax)``, probe centred at pixel ``K // 2``).
    ``pixel_size_A`` (instead of ``oversampling``) puts the object on any grid: positions then fall between
    object pixels and the Fourier placement is sub-pixel. Returns the phase ``angle(T)`` (rad), unwrapped
    where it passes ``+-pi`` (``unwrap_phase``, :mod:`evaluation.unwrap`: heavy columns of thick crystals
    carry more than ``pi``; ``info['phase_wraps_removed']``); ``info['patterns_per_s']`` counts effective
    positions per second of the whole pass. Without ``gmax_invA``, ``gmax`` is the largest the detector
    covers within ``alpha / gmax`` in ``ratio_alpha_gmax`` (None: paper 002's (0.1, 0.95); a model's own
    range is applied by :func:`evaluation.networks.reconstruct_with_network`); ``info['alpha_over_gmax']``
    is the ratio used.

    ``inference_stride`` n > 1: the network runs at every n-th position along x and y (and at the last row
    and column, so the field's edge stays covered), 1 / n^2 of the passes; the positions in between still
    enter as the neighbours of the 3x3 kernels, so at n = 3 every CBED is seen (once), at n = 2 most twice.
    The stitched footprints (``weight_threshold`` of the probe intensity) must still tile the field: a
    faster, coarser mode (a live preview, a first look), measured against n = 1 in docs/benchmarks.md;
    ``info['network_passes']`` counts the passes, the trust map is NaN at the skipped positions.

    ``consistency``: the trust map ``Reconstruction.consistency`` (Rx, Ry): the predicted exit wave's
    ``|F psi_out|^2`` against the centre CBED the network saw (the box sum with ``data_repetition``), as
    the normalised Poisson deviance of :func:`evaluation.networks.consistency.normalised_poisson_deviance`
    (``consistency_counts_per_unit`` electrons per unit of the data; None: the data are counts);
    ``info['consistency_median']`` its median.
    ``stream_factory`` makes the pattern stream (the signature of
    :class:`evaluation.networks.geometry._PatternStream`, the default); ``engine=libertem`` passes one over
    patterns its workers resampled (:mod:`evaluation.engines.libertem`).
    """
    dev = resolve_device(device)
    stride_ok = not isinstance(inference_stride, bool) and int(inference_stride) == inference_stride
    if not stride_ok or inference_stride < 1:
        raise ValueError(f"airpi.inference_stride must be a positive integer, got {inference_stride!r}")
    inference_stride = int(inference_stride)
    geometry = ScanGeometry.from_scan(scan, data_repetition, repetition_box, repetition_stride)
    _check_patterns(geometry)
    start_time = time.perf_counter()
    centre = _detector_centre(geometry, detector_centre_px, progress, block_rows)
    gmax = _network_grid(geometry, centre, pixels, gmax_invA, ratio_alpha_gmax)
    stream = stream_factory(geometry, pixels, gmax, centre, dev)
    d = 1.0 / (2.0 * gmax)  # patch pixel, A
    psi_in = probe(
        geometry.energy_eV, geometry.semiangle_mrad, pixels, gmax_invA=gmax,
        defocus_A=geometry.defocus_A, Cs_A=geometry.Cs_A,
    )  # fmt: skip
    intensity = np.abs(psi_in) ** 2
    native_mask = intensity > weight_threshold * intensity.max()
    pixel_A = _object_pixel(geometry, oversampling, pixel_size_A, allow_fractional=True)
    grid = _ObjectGrid(pixel_A, geometry.step_A, _mask_half_width(native_mask, pixels // 2, d, pixel_A),
                       geometry.positions_shape)  # fmt: skip
    accumulator = torch.zeros((grid.shape[0] * grid.shape[1], 2), dtype=torch.float32, device=dev)
    probe_t = torch.from_numpy(psi_in).to(dev)
    offsets = [torch.arange(-h, h + 1, dtype=torch.float64, device=dev) for h in grid.half]
    step = float(np.mean(geometry.step_A))
    _, ry = geometry.positions_shape
    rows_per_block = block_rows or _default_block_rows(ry, pixels)
    placements: dict[tuple, tuple] = {}
    count = passes = 0
    trust = (
        ConsistencyMap(geometry.positions_shape, dev, consistency_counts_per_unit) if consistency else None
    )
    bar = _inference_bar(geometry, progress, "AIRPI")
    for e, c, kernels in stream.kernels(rows_per_block, False, "AIRPI"):  # the bar counts patterns
        block_positions = len(e)
        if inference_stride > 1:
            keep = _on_stride(e, geometry.positions_shape[0], inference_stride) & _on_stride(
                c, geometry.positions_shape[1], inference_stride
            )
            e, c, kernels = e[keep], c[keep], kernels[torch.as_tensor(np.flatnonzero(keep), device=dev)]
        for part in _batches(len(e), batch_size):
            counts = kernels[part]
            b = counts.shape[0]
            probes = probe_t.expand(b, pixels, pixels)
            inputs = preprocess(counts, torch.full((b,), step, device=dev), probes, zeta_scale=zeta_scale)
            positions = np.stack([e[part] * geometry.step_A[0], c[part] * geometry.step_A[1]], -1)
            wave = predictor(inputs, torch.as_tensor(positions, device=dev)).to(torch.complex64)
            if trust is not None:  # the centre CBED of the kernel against |F psi_out|^2
                trust.add(e[part], c[part], counts[:, 4], diffraction_intensity(wave))
            mx, my, frac = grid.placement(e[part], c[part])
            uniform = bool(np.all(frac == frac[:1]))
            key = tuple(np.round(frac[0], 9)) if uniform else None
            if key is None or key not in placements:
                frac_t = torch.as_tensor(frac[:1] if uniform else frac, dtype=torch.float64, device=dev)
                # object pixels of the footprint in patch coordinates (native pixels): Fourier placement
                ax = _placement_matrices(pixels, offsets[0], frac_t[:, 0], pixel_A[0] / d)
                ay = _placement_matrices(pixels, offsets[1], frac_t[:, 1], pixel_A[1] / d)
                in_obj = ax @ probe_t @ ay.transpose(-2, -1)
                weight = in_obj.abs() ** 2
                peak = weight.flatten(1).amax(1)[:, None, None]
                norm = weight.flatten(1).sum(1).clamp_min(1e-30)[:, None, None]
                weight = torch.where(
                    weight > weight_threshold * peak, weight / norm, torch.zeros_like(weight)
                )
                placement = (ax, ay.transpose(-2, -1), in_obj.conj(), weight)
                if key is not None:
                    placements[key] = placement  # the same for every batch with these remainders
            else:
                placement = placements[key]
            ax, ay_t, in_conj, weight = placement
            patch = torch.sgn((ax @ wave @ ay_t) * in_conj) * weight
            index = grid.flat_indices(mx, my, dev).reshape(-1)
            accumulator.index_add_(0, index, torch.view_as_real(patch.reshape(-1)))
            passes += b
        count += block_positions
        bar.update(block_positions)
    bar.close()
    elapsed = time.perf_counter() - start_time
    total = torch.view_as_complex(accumulator).reshape(grid.shape).cpu().numpy()
    image, origin = grid.crop(np.angle(total).astype(np.float32), crop_to_scan)
    covered, _ = grid.crop(np.abs(total) > 0, crop_to_scan)
    image, wraps = unwrap_phase_image(image, covered) if unwrap_phase else (image, 0)
    trust_map, extra = map_and_summary(trust)
    return Reconstruction(
        phase=image,
        pixel_size_A=pixel_A,
        origin_A=origin,
        method="airpi",
        info={
            "gmax_invA": gmax,
            "alpha_over_gmax": geometry.alpha_invA / gmax,
            "network_pixels": int(pixels),
            "oversampling": int(oversampling) if pixel_size_A is None else 0,
            "data_repetition": bool(data_repetition),
            "effective_step_A": float(geometry.step_A[0]),
            "phase_wraps_removed": int(wraps),
            "detector_centre_px": centre.tolist(),
            "patterns_per_s": count / max(elapsed, 1e-9),
            "inference_stride": inference_stride,
            "network_passes": int(passes),
            **extra,
        },
        consistency=trust_map,
    )
