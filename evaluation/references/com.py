"""Centre of mass (COM), iCOM/iDPC by Fourier integration, scan rotation by curl minimisation, riCOM.

For a phase object the COM of each CBED (1/A) is ``grad(phi) / (2 pi)`` convolved with the probe
intensity, so ``2 pi COM`` is a gradient field (rad/A) whose integral is the phase (thesis eq. 3.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.references._common import (
    Reconstruction,
    check_scan_array,
    iter_scan_rows,
    pair,
    rotate_vectors,
)

__all__ = [
    "centre_of_mass",
    "estimate_scan_rotation",
    "icom",
    "icom_from_com",
    "integrate_gradient",
    "ricom",
    "ricom_from_com",
    "ricom_kernel",
]


def centre_of_mass(data: Any, k_pixel_invA: float | Sequence[float], progress: bool = True) -> np.ndarray:
    """COM of every CBED in the detector frame, 1/A, shape ``(Rx, Ry, 2)``, relative to the scan mean.

    Subtracting the mean over the scan removes the offset of the pattern on the detector (as riCOM does
    when no vacuum reference is given, thesis 3.3); the mean phase gradient is lost, which only tilts the
    integrated image.
    """
    rx, ry, kx, ky = check_scan_array(data, minimum_scan=1)
    k_pixel = pair(k_pixel_invA, "k_pixel_invA")
    ix = np.arange(kx, dtype=np.float64) * k_pixel[0]
    iy = np.arange(ky, dtype=np.float64) * k_pixel[1]
    com = np.empty((rx, ry, 2))
    for rows, block in iter_scan_rows(data, desc="centre of mass", progress=progress):
        total = block.sum(axis=(2, 3), dtype=np.float64)
        if np.any(total <= 0):
            raise ValueError("some diffraction patterns hold no counts; the centre of mass is undefined")
        com[rows, :, 0] = np.einsum("abij,i->ab", block, ix, dtype=np.float64) / total
        com[rows, :, 1] = np.einsum("abij,j->ab", block, iy, dtype=np.float64) / total
    return com - com.mean(axis=(0, 1))


def fftconvolve(image: np.ndarray, kernel: np.ndarray, mode: str = "same") -> np.ndarray:
    """Linear 2D convolution by FFT (zero padding), cropped to ``image``'s shape and centred ("same")."""
    if mode != "same":
        raise ValueError("fftconvolve: only mode='same' is implemented")
    shape = (image.shape[0] + kernel.shape[0] - 1, image.shape[1] + kernel.shape[1] - 1)
    full = np.fft.irfft2(np.fft.rfft2(image, shape) * np.fft.rfft2(kernel, shape), shape)
    x0, y0 = (kernel.shape[0] - 1) // 2, (kernel.shape[1] - 1) // 2
    return full[x0 : x0 + image.shape[0], y0 : y0 + image.shape[1]]


def _curl_divergence(field: np.ndarray, step_A: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = field[..., 0], field[..., 1]
    curl = np.gradient(gy, step_A[0], axis=0) - np.gradient(gx, step_A[1], axis=1)
    divergence = np.gradient(gx, step_A[0], axis=0) + np.gradient(gy, step_A[1], axis=1)
    return curl, divergence


def _best_rotation(field: np.ndarray, step_A: tuple[float, float]) -> tuple[float, float]:
    """Angle (deg, modulo 180) minimising the curl of the rotated field, and the residual curl fraction.

    Rotating by theta gives ``curl' = cos(theta) curl + sin(theta) div``, so ``sum curl'^2`` is a quadratic
    form in ``(cos, sin)``: its minimum is the eigenvector of the smallest eigenvalue, exactly.
    """
    curl, divergence = _curl_divergence(field, step_A)
    inner = (slice(1, -1), slice(1, -1))
    c, d = curl[inner].ravel(), divergence[inner].ravel()
    form = np.array([[c @ c, c @ d], [c @ d, d @ d]])
    values, vectors = np.linalg.eigh(form)
    cos_t, sin_t = vectors[:, 0]
    angle = float(np.rad2deg(np.arctan2(sin_t, cos_t))) % 180.0
    return angle, float(values[0] / max(values[1], 1e-300))


def integrate_gradient(
    gradient: np.ndarray, step_A: float | Sequence[float], boundary: str = "mirror"
) -> np.ndarray:
    """Integrate a gradient field (rad/A, ``(Rx, Ry, 2)``) by Fourier integration (REFERENCE.md 6).

    ``phi = Re IFFT[(kx Gx + ky Gy) / (2 pi i |k|^2)]`` with the ``k = 0`` term set to 0 (zero-mean phase).
    The FFT makes the field periodic; a scan field is not, so with ``boundary="mirror"`` (the default) the
    field is first extended to ``(2 Rx, 2 Ry)`` by mirroring about its edges, ``Gx`` anti-symmetrically
    and ``Gy`` symmetrically across the x edges (and the other way round across the y edges): that is the
    gradient of the mirror-symmetric extension of the phase, which is periodic and continuous, so the
    integration sees no seam (the Neumann-boundary Poisson solution); the result is cropped back.
    ``boundary="periodic"`` integrates the field as it is (periodic boundary conditions).
    """
    if boundary not in ("mirror", "periodic"):
        raise ValueError(f"integrate_gradient: boundary must be 'mirror' or 'periodic', got {boundary!r}")
    step = pair(step_A, "step_A")
    rx, ry = gradient.shape[:2]
    gx, gy = np.asarray(gradient[..., 0], np.float64), np.asarray(gradient[..., 1], np.float64)
    if boundary == "mirror":
        gx, gy = np.concatenate([gx, -gx[::-1]], axis=0), np.concatenate([gy, gy[::-1]], axis=0)
        gx, gy = np.concatenate([gx, gx[:, ::-1]], axis=1), np.concatenate([gy, -gy[:, ::-1]], axis=1)
    nx, ny = gx.shape
    kx = np.fft.fftfreq(nx, step[0])[:, None]
    ky = np.fft.fftfreq(ny, step[1])[None, :]
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    spectrum = (kx * np.fft.fft2(gx) + ky * np.fft.fft2(gy)) / (2j * np.pi * k2)
    spectrum[0, 0] = 0.0
    phase = np.fft.ifft2(spectrum).real[:rx, :ry]
    return phase - phase.mean()


def estimate_scan_rotation(
    com_det: np.ndarray, scan_step_A: float | Sequence[float], check_transpose: bool = True
) -> tuple[float, bool]:
    """Scan rotation (deg) and transpose flag that make the COM field curl-free.

    The curl fixes the angle modulo 180 deg; the remaining 180 deg ambiguity is resolved by requiring
    the integrated phase to have positive skewness (atoms are positive phase peaks on a lower background,
    true for specimens that are not mostly filled). With ``check_transpose`` both detector orientations
    are tried and the one with the smaller residual curl wins.
    """
    step = pair(scan_step_A, "scan_step_A")
    candidates = []
    for transpose in (False, True) if check_transpose else (False,):
        field = com_det[..., ::-1] if transpose else com_det
        angle, residual = _best_rotation(field, step)
        candidates.append((residual, angle, transpose))
    residual, angle, transpose = min(candidates)
    best = []
    for candidate in (angle, angle + 180.0):
        phase = integrate_gradient(2 * np.pi * rotate_vectors(com_det, candidate, transpose), step)
        centred = phase - phase.mean()
        skew = float(np.mean(centred**3) / max(np.mean(centred**2) ** 1.5, 1e-300))
        best.append((skew, candidate))
    angle = max(best)[1]
    return ((angle + 180.0) % 360.0) - 180.0, transpose


def icom(
    data: Any,
    scan_step_A: float | Sequence[float],
    k_pixel_invA: float | Sequence[float],
    scan_rotation_deg: float = 0.0,
    transpose: bool = False,
    estimate_rotation: bool = False,
    boundary: str = "mirror",
    progress: bool = True,
) -> Reconstruction:
    """Integrated centre of mass (iCOM, equal to iDPC for a pixelated detector), in radians.

    ``boundary`` is passed to :func:`integrate_gradient`: ``"mirror"`` (default) extends the COM field
    mirror-symmetrically before the Fourier integration, so the non-periodic scan field is not wrapped;
    ``"periodic"`` integrates it as it is.

    With ``estimate_rotation`` the scan rotation and transpose are found by curl minimisation
    (:func:`estimate_scan_rotation`) instead of taken from the arguments; ``info`` reports what was used.
    The image is on the scan grid: pixel = scan step, origin = first probe position.
    """
    check_scan_array(data)
    com_det = centre_of_mass(data, k_pixel_invA, progress=progress)
    return icom_from_com(com_det, scan_step_A, scan_rotation_deg, transpose, estimate_rotation, boundary)


def icom_from_com(
    com_det: np.ndarray,
    scan_step_A: float | Sequence[float],
    scan_rotation_deg: float = 0.0,
    transpose: bool = False,
    estimate_rotation: bool = False,
    boundary: str = "mirror",
) -> Reconstruction:
    """iCOM from a COM field already measured (``(Rx, Ry, 2)``, 1/A, detector frame, zero mean over the
    scan as :func:`centre_of_mass` returns it): the rotation and integration of :func:`icom`, shared by
    every engine that measures the COM (``engine=libertem``: :mod:`evaluation.engines.libertem`)."""
    step = pair(scan_step_A, "scan_step_A")
    if estimate_rotation:
        scan_rotation_deg, transpose = estimate_scan_rotation(com_det, step)
    gradient = 2 * np.pi * rotate_vectors(com_det, scan_rotation_deg, transpose)
    phase = integrate_gradient(gradient, step, boundary)
    return Reconstruction(
        phase=phase.astype(np.float32),
        pixel_size_A=step,
        origin_A=(0.0, 0.0),
        method="icom",
        info={
            "scan_rotation_deg": float(scan_rotation_deg),
            "transpose": bool(transpose),
            "boundary": boundary,
        },
    )


def ricom_kernel(
    kernel_size: int,
    scan_step_A: float | Sequence[float] = 1.0,
    band_pass_invA: Sequence[float] | None = None,
) -> np.ndarray:
    """riCOM kernel (thesis eq. 3.4): vectors ``(r_p - r) / |r_p - r|^2 * step_x step_y / (2 pi)``.

    Shape ``(n, n, 2)``, indexed by the position ``r`` relative to ``r_p`` (the centre pixel, weight 0), so
    riCOM is the cross-correlation ``I(r_p) = sum_r k(r - r_p) . G(r)`` of the kernel with the field.
    Applied to ``2 pi COM`` (rad/A) it gives
    the phase in radians for an infinite kernel (the 2D Green's function of the Laplacian). An optional
    band-pass ``(k_min, k_max)`` in 1/A is folded into the kernel (eq. 3.8-3.9): the kernel is convolved
    with the real-space filter of the annulus and kept at ``n x n``.
    """
    n = int(kernel_size)
    if n < 3 or n % 2 == 0:
        raise ValueError(f"ricom: kernel_size must be odd and >= 3, got {kernel_size}")
    step = pair(scan_step_A, "scan_step_A")
    offsets = np.arange(n) - n // 2
    dx = -offsets[:, None] * step[0] * np.ones((1, n))  # r_p - r with r = r_p + offset
    dy = -offsets[None, :] * step[1] * np.ones((n, 1))
    r2 = dx**2 + dy**2
    r2[n // 2, n // 2] = np.inf
    kernel = np.stack([dx / r2, dy / r2], axis=-1) * step[0] * step[1] / (2 * np.pi)
    if band_pass_invA is not None:
        k_min, k_max = (float(v) for v in band_pass_invA)
        if not 0 <= k_min < k_max:
            raise ValueError(
                f"ricom: band_pass_invA must be (k_min, k_max) with 0 <= k_min < k_max, got {band_pass_invA}"
            )
        m = 2 * n - 1
        fx = np.fft.fftfreq(m, step[0])[:, None]
        fy = np.fft.fftfreq(m, step[1])[None, :]
        k = np.hypot(fx, fy)
        band = ((k >= k_min) & (k <= k_max)).astype(np.float64)
        filt = np.fft.fftshift(np.fft.ifft2(band).real)
        kernel = np.stack([fftconvolve(kernel[..., c], filt, mode="same") for c in range(2)], axis=-1)
    return kernel


def ricom(
    data: Any,
    scan_step_A: float | Sequence[float],
    k_pixel_invA: float | Sequence[float],
    kernel_size: int = 21,
    band_pass_invA: Sequence[float] | None = None,
    scan_rotation_deg: float = 0.0,
    transpose: bool = False,
    progress: bool = True,
) -> Reconstruction:
    """Real-time iCOM (riCOM, thesis ch. 3): the COM field cross-correlated with :func:`ricom_kernel`.

    ``riCOM(r_p) = sum_r k_n(r - r_p) . 2 pi COM(r)`` (cross-correlation with the kernel array), which
    is what a live implementation accumulates one CBED at a time; positions outside the scan contribute
    nothing (zero padding). Low frequencies are suppressed as ``1 - cos((n - 1)/2 * 2 pi k / N)``
    (eq. 3.6-3.7).
    """
    check_scan_array(data)
    com_det = centre_of_mass(data, k_pixel_invA, progress)
    return ricom_from_com(com_det, scan_step_A, kernel_size, band_pass_invA, scan_rotation_deg, transpose)


def ricom_from_com(
    com_det: np.ndarray,
    scan_step_A: float | Sequence[float],
    kernel_size: int = 21,
    band_pass_invA: Sequence[float] | None = None,
    scan_rotation_deg: float = 0.0,
    transpose: bool = False,
) -> Reconstruction:
    """riCOM from a COM field already measured (``(Rx, Ry, 2)``, 1/A, detector frame, as
    :func:`centre_of_mass` returns it): the kernel cross-correlation of :func:`ricom`, shared by every
    engine."""
    step = pair(scan_step_A, "scan_step_A")
    kernel = ricom_kernel(kernel_size, step, band_pass_invA)
    gradient = 2 * np.pi * rotate_vectors(com_det, scan_rotation_deg, transpose)
    # cross-correlation = convolution with the point-reflected kernel
    image = sum(fftconvolve(gradient[..., c], kernel[::-1, ::-1, c], mode="same") for c in range(2))
    return Reconstruction(
        phase=np.asarray(image, dtype=np.float32),
        pixel_size_A=step,
        origin_A=(0.0, 0.0),
        method="ricom",
        info={"kernel_size": int(kernel_size), "scan_rotation_deg": float(scan_rotation_deg)},
    )
