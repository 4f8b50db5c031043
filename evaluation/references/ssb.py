"""Single side-band (SSB) ptychography for weak phase objects, with optional aberration compensation.

With ``G(Q, k) = FFT_{r_p}[I(r_p, k)]`` and the probe's aperture function ``A(k) = |A| exp(-i chi(k))``, a
weak phase object ``T = 1 + i phi`` gives (``Q != 0``, ``A`` normalised to ``|A| = 1`` in the disc)

    G(Q, k) = i Phi(Q) gamma(Q, k),   gamma = A*(k) A(k - Q) - A(k) A*(k + Q),

``Phi`` the DFT of the phase on the scan grid. The estimate sums ``G conj(gamma) / |gamma|`` over the
detector: without aberrations ``gamma`` is +1 on the double-overlap "trotter" of ``k`` and ``k - Q`` that
does not overlap ``k + Q``, -1 on the mirrored one and 0 on the triple overlap, so this is the classical
trotter integration; with aberrations the phase of ``gamma`` is compensated (Pennycook et al. 2015,
Yang et al. 2016). Transfer is limited to ``|Q| < 2 alpha``.

Memory is ``O(N)`` in scan positions: the scan transform needs the bright-field pixels of every pattern at
once. With ``M`` bright-field pixels, the ``Rx x Ry`` scan padded to ``Nx x Ny``, the peak is
``M (4 Rx Ry + 4 Nx Ry + 4 Nx Ny)`` bytes while the float32 stack is extended and ``12 M Nx Ny`` while it
is transformed (float32 in, complex64 out), plus ``Q`` chunks of ``~130 q_chunk M`` bytes
(:func:`ssb_memory_bytes`; e.g. 128 x 128 positions padded to 160 x 160, 64 x 64 pixels to 2 alpha,
``M = 857``: 0.26 GB by this count, 0.20 GB peak resident measured; 0.90 GB measured before the transform
ran in single precision).
:func:`ssb` refuses with one line, before it allocates, when that exceeds ``memory_limit_GB`` (default: the
memory available now); binning the detector divides ``M``, cropping the scan ``N``.

Boundaries: the FFT over scan positions treats the scan field as periodic, which a real field is not
(the jump between opposite edges leaks into every ``Q`` and rings at the edges). With
``boundary="smooth"`` (the default) the bright-field data are first extended by ``pad_fraction`` of the
field per axis, rounded up to an FFT-friendly size, with a raised-cosine blend from the last scan row /
column into the first (:func:`evaluation.references._common.smooth_periodic_extension`; in the weak
phase approximation the data are linear in the phase, so this is the data of an object that blends
smoothly between the two edges), and the reconstruction is cropped back to the scan field.
``boundary="periodic"`` transforms the field as it is (right for a periodic test object).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
from tqdm.auto import tqdm

from evaluation.references._common import (
    Reconstruction,
    check_memory,
    check_scan_array,
    detector_frequencies,
    iter_scan_rows,
    mean_pattern,
    pair,
    pattern_centre,
    smooth_periodic_extension,
)
from physics import aberration_phase, aperture, fft_friendly_size, wavelength

__all__ = [
    "SSBGeometry",
    "check_ssb_memory",
    "ssb",
    "ssb_from_spectrum",
    "ssb_geometry",
    "ssb_intensity_scale",
    "ssb_memory_bytes",
]


def _aperture_function(
    k: np.ndarray, energy_eV: float, semiangle_mrad: float, aberrations: dict[str, float]
) -> np.ndarray:
    magnitude = np.hypot(k[..., 0], k[..., 1])
    azimuth = np.arctan2(k[..., 1], k[..., 0])
    amplitude = aperture(magnitude, energy_eV, semiangle_mrad)
    if not aberrations:
        return amplitude.astype(np.complex128)
    return amplitude * np.exp(-1j * aberration_phase(magnitude, azimuth, energy_eV, aberrations))


def _check_boundary(boundary: str, pad_fraction: float) -> None:
    if boundary not in ("smooth", "periodic"):
        raise ValueError(f"ssb: boundary must be 'smooth' or 'periodic', got {boundary!r}")
    if not pad_fraction >= 0:
        raise ValueError(f"ssb: pad_fraction must be >= 0, got {pad_fraction!r}")


@dataclass(frozen=True)
class SSBGeometry:
    """Where SSB's bright-field pixels lie and how large its scan transform is (one scan).

    ``in_disc``: the detector pixels ``(Kx, Ky)`` inside the bright-field disc (bool); ``k_bf``: their
    scan-frame spatial frequencies (1/A), ``(M, 2)``, in ``in_disc``'s C order; ``fft_shape``: ``(Nx, Ny)``,
    the padded scan field the transform runs over (``(Rx, Ry)`` for ``boundary="periodic"``).
    """

    scan_shape: tuple[int, int]
    fft_shape: tuple[int, int]
    centre_px: np.ndarray
    in_disc: np.ndarray
    k_bf: np.ndarray
    energy_eV: float
    semiangle_mrad: float
    scan_step_A: tuple[float, float]
    boundary: str


def ssb_geometry(
    shape: Sequence[int],
    centre_px: np.ndarray,
    energy_eV: float,
    semiangle_mrad: float,
    scan_step_A: float | Sequence[float],
    k_pixel_invA: float | Sequence[float],
    scan_rotation_deg: float = 0.0,
    transpose: bool = False,
    boundary: str = "smooth",
    pad_fraction: float = 0.25,
) -> SSBGeometry:
    """The :class:`SSBGeometry` of a scan of ``shape`` ``(Rx, Ry, Kx, Ky)`` whose mean pattern has its
    centre of mass at ``centre_px`` (detector pixels); ValueError naming the parameter for bad settings."""
    _check_boundary(boundary, pad_fraction)
    rx, ry, kx, ky = (int(n) for n in shape)
    k_pixel = pair(k_pixel_invA, "k_pixel_invA")
    alpha_invA = float(semiangle_mrad) * 1e-3 / wavelength(energy_eV)
    k = detector_frequencies((kx, ky), k_pixel, centre_px, scan_rotation_deg, transpose)
    in_disc = np.hypot(k[..., 0], k[..., 1]) <= alpha_invA + 0.5 * max(k_pixel)
    if in_disc.sum() < 8:
        raise ValueError(
            f"ssb: the bright-field disc covers {int(in_disc.sum())} detector pixels; check semiangle_mrad "
            "and k_pixel_invA"
        )
    if boundary == "smooth":
        nx, ny = (fft_friendly_size(int(np.ceil(n * (1.0 + pad_fraction)))) for n in (rx, ry))
    else:
        nx, ny = rx, ry
    return SSBGeometry(
        scan_shape=(rx, ry), fft_shape=(nx, ny), centre_px=np.asarray(centre_px), in_disc=in_disc,
        k_bf=k[in_disc], energy_eV=float(energy_eV), semiangle_mrad=float(semiangle_mrad),
        scan_step_A=pair(scan_step_A, "scan_step_A"), boundary=boundary,
    )  # fmt: skip


def ssb_memory_bytes(geometry: SSBGeometry, q_chunk: int = 256) -> int:
    """Peak memory (bytes) of :func:`ssb` on a scan of this geometry (module docstring): the bright-field
    stack, its smooth extension and its complex64 scan transform, plus the ``Q`` chunks' temporaries."""
    (rx, ry), (nx, ny) = geometry.scan_shape, geometry.fft_shape
    m = int(geometry.k_bf.shape[0])
    extension = 4 * (rx * ry + nx * ry + nx * ny) if (nx, ny) != (rx, ry) else 4 * rx * ry
    transform = 12 * nx * ny
    chunks = 8 * nx * ny + 130 * min(int(q_chunk), nx * ny)  # the spectrum + gamma, |gamma|, weights, ...
    return int(m * max(extension, transform, chunks))


def check_ssb_memory(need_bytes: float, geometry: SSBGeometry, memory_limit_GB: float | None) -> None:
    """Refuse (:class:`~evaluation.references._common.InsufficientMemoryError`, one line naming the scan, the
    need and what to change) when ``need_bytes`` exceeds ``memory_limit_GB`` (None: the memory available
    now). Both engines call it with their own count."""
    (rx, ry), (nx, ny) = geometry.scan_shape, geometry.fft_shape
    check_memory(
        need_bytes,
        f"a {rx} x {ry} scan (transformed as {nx} x {ny}) with {int(geometry.in_disc.sum())} bright-field "
        "pixels",
        memory_limit_GB,
        "ssb",
        "the need is O(N) in scan positions: bin the detector (fewer bright-field pixels), crop the scan, or "
        "set ssb.memory_limit_GB",
    )


def ssb_intensity_scale(mean_bright_field: np.ndarray, geometry: SSBGeometry) -> float:
    """The factor that normalises the aperture function to ``|A| = 1``: the mean bright-field intensity per
    disc pixel, from the position-averaged bright-field pixels ``(M,)`` (same units as the data)."""
    abf = _aperture_function(geometry.k_bf, geometry.energy_eV, geometry.semiangle_mrad, {})
    scale = float(mean_bright_field @ np.abs(abf) ** 2 / max(np.sum(np.abs(abf) ** 4), 1e-300))
    if not scale > 0:
        raise ValueError("ssb: the bright-field disc holds no counts")
    return scale


def ssb_from_spectrum(
    spectrum: np.ndarray,
    geometry: SSBGeometry,
    defocus_A: float = 0.0,
    Cs_A: float = 0.0,
    aberrations: dict[str, float] | None = None,
    aberration_compensation: bool = True,
    normalize: bool = False,
    q_chunk: int = 256,
    progress: bool = True,
) -> Reconstruction:
    """SSB's part after the scan transform: the phase (rad) from ``spectrum`` ``(Nx * Ny, M)``, the FFT over
    the (padded) scan positions of the bright-field pixels divided by :func:`ssb_intensity_scale`
    (``G(Q, k)``, ``Q`` in C order of :attr:`SSBGeometry.fft_shape` with ``np.fft.fftfreq`` frequencies).
    Both engines call it; the options are :func:`ssb`'s."""
    rx, ry = geometry.scan_shape
    nx, ny = geometry.fft_shape
    step = geometry.scan_step_A
    energy_eV, semiangle_mrad, k_bf = geometry.energy_eV, geometry.semiangle_mrad, geometry.k_bf
    if spectrum.shape != (nx * ny, k_bf.shape[0]):
        raise ValueError(f"ssb: spectrum must have shape {(nx * ny, k_bf.shape[0])}, got {spectrum.shape}")
    coefficients: dict[str, float] = {}
    if aberration_compensation:
        coefficients = dict(aberrations or {})
        if defocus_A:
            coefficients["C10"] = -float(defocus_A)
        if Cs_A:
            coefficients["C30"] = float(Cs_A)
    a_k = _aperture_function(k_bf, energy_eV, semiangle_mrad, coefficients)
    qx, qy = np.meshgrid(np.fft.fftfreq(nx, step[0]), np.fft.fftfreq(ny, step[1]), indexing="ij")
    q = np.stack([qx.ravel(), qy.ravel()], axis=-1)
    phi_q = np.zeros(nx * ny, dtype=np.complex128)
    transfer = np.zeros(nx * ny)
    num_disc = float(np.sum(np.abs(a_k) > 0))
    starts = range(0, nx * ny, q_chunk)
    for start in tqdm(starts, desc="SSB", disable=not progress or len(starts) < 2, leave=False):
        chunk = slice(start, min(nx * ny, start + q_chunk))
        kq = q[chunk, None, :]
        gamma = np.conj(a_k) * _aperture_function(
            k_bf - kq, energy_eV, semiangle_mrad, coefficients
        ) - a_k * np.conj(_aperture_function(k_bf + kq, energy_eV, semiangle_mrad, coefficients))
        magnitude = np.abs(gamma)
        weight = np.divide(np.conj(gamma), magnitude, out=np.zeros_like(gamma), where=magnitude > 1e-6)
        phi_q[chunk] = np.sum(spectrum[chunk] * weight, axis=1) / 1j
        transfer[chunk] = magnitude.sum(axis=1)
    phi_q[0] = 0.0
    if normalize:
        usable = transfer > 0.02 * num_disc
        phi_q = np.where(usable, phi_q / np.where(usable, transfer, 1.0), 0.0)
    else:
        phi_q = phi_q / num_disc
    phase = np.fft.ifft2(phi_q.reshape(nx, ny)).real[:rx, :ry]
    return Reconstruction(
        phase=phase.astype(np.float32),
        pixel_size_A=step,
        origin_A=(0.0, 0.0),
        method="ssb",
        info={
            "centre_px": geometry.centre_px.tolist(),
            "bright_field_pixels": int(geometry.in_disc.sum()),
            "normalize": normalize,
            "boundary": geometry.boundary,
            "fft_shape": f"{nx}x{ny}",
        },
    )


def ssb(
    data: Any,
    energy_eV: float,
    semiangle_mrad: float,
    scan_step_A: float | Sequence[float],
    k_pixel_invA: float | Sequence[float],
    scan_rotation_deg: float = 0.0,
    transpose: bool = False,
    defocus_A: float = 0.0,
    Cs_A: float = 0.0,
    aberrations: dict[str, float] | None = None,
    aberration_compensation: bool = True,
    normalize: bool = False,
    q_chunk: int = 256,
    boundary: str = "smooth",
    pad_fraction: float = 0.25,
    memory_limit_GB: float | None = None,
    progress: bool = True,
) -> Reconstruction:
    """SSB phase (rad) on the scan grid (pixel = scan step, origin = first probe position).

    ``aberration_compensation`` uses ``defocus_A``, ``Cs_A`` and ``aberrations`` (polar coefficients,
    see :func:`physics.aberration_phase`) in ``gamma``; without it only the aperture discs enter.
    ``normalize=False`` gives the classical SSB transfer (trotter area / disc area); ``True`` divides
    each ``Q`` by ``sum |gamma|`` (flat transfer inside ``2 alpha``, where the trotter area is at least 2 %
    of the disc), which is quantitative without noise but amplifies noise at the band edges.
    ``boundary`` is ``"smooth"`` (pad the scan field by ``pad_fraction`` per axis with a smooth periodic
    extension, then crop back) or ``"periodic"`` (no padding); see the module docstring.
    Steps: :func:`ssb_geometry`, the bright-field pixels of every pattern, :func:`ssb_intensity_scale`,
    the scan FFT, :func:`ssb_from_spectrum` (``engine=libertem`` computes the transform in a LiberTEM UDF
    and shares the other steps).
    """
    _check_boundary(boundary, pad_fraction)
    rx, ry = check_scan_array(data)[:2]
    centre = pattern_centre(mean_pattern(data, progress=progress))
    geometry = ssb_geometry(
        data.shape, centre, energy_eV, semiangle_mrad, scan_step_A, k_pixel_invA, scan_rotation_deg,
        transpose, boundary, pad_fraction,
    )  # fmt: skip
    in_disc = geometry.in_disc
    nx, ny = geometry.fft_shape
    check_ssb_memory(ssb_memory_bytes(geometry, q_chunk), geometry, memory_limit_GB)
    bf = np.empty((rx, ry, geometry.k_bf.shape[0]), dtype=np.float32)
    for rows, block in iter_scan_rows(data, desc="SSB read", progress=progress):
        bf[rows] = block[..., in_disc]
    # the aperture function normalised to |A| = 1: divide by the mean bright-field intensity per pixel
    bf /= ssb_intensity_scale(bf.mean(axis=(0, 1), dtype=np.float64), geometry)
    if boundary == "smooth":
        bf = smooth_periodic_extension(bf, (nx, ny))
    spectrum = scipy.fft.fft2(bf, axes=(0, 1)).reshape(nx * ny, -1)  # float32 in: complex64 out
    del bf
    return ssb_from_spectrum(
        spectrum, geometry, defocus_A, Cs_A, aberrations, aberration_compensation, normalize, q_chunk,
        progress,
    )  # fmt: skip
