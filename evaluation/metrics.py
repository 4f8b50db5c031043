"""Image similarity metrics: Pearson cross-correlation xc, PSNR and SSIM.

All take 2D images indexed ``[x, y]``; with ``register=True`` the test image is first registered onto the
reference (sub-pixel) and both are cropped to their common field, with the same code the FRC uses
(:mod:`evaluation.align`).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from evaluation.align import align, is_periodic, periodic_smooth_decomposition

__all__ = ["fourier_resample", "psnr", "resample_to_grid", "ssim", "xc"]


def _band_weights(n: int, pixel_A: float, limit_invA: float) -> np.ndarray:
    """Weights of the DFT bins of ``n`` samples at ``pixel_A`` for the band ``|f| <= limit_invA``: 1 inside,
    1/2 for a pair of bins exactly on the limit (a cosine there splits between them), 0 outside; the lone
    Nyquist bin of an even ``n`` stands for both signs."""
    f = np.fft.fftfreq(n, pixel_A)
    tolerance = 1e-9 * max(limit_invA, 1.0)
    weight = np.where(np.abs(f) < limit_invA - tolerance, 1.0, 0.0)
    edge = np.abs(np.abs(f) - limit_invA) <= tolerance
    weight[edge] = 0.5
    if n % 2 == 0 and edge[n // 2]:
        weight[n // 2] = 1.0  # the caller evaluates it as a cosine
    return weight


def fourier_resample(
    image: np.ndarray,
    pixel_size_A: float | tuple[float, float],
    origin_A: tuple[float, float],
    shape: tuple[int, int],
    target_pixel_size_A: float | tuple[float, float],
    target_origin_A: tuple[float, float] = (0.0, 0.0),
    band_limit_invA: float | None = None,
) -> np.ndarray:
    """Band-limited (Fourier) interpolation of ``image`` onto another grid.

    Pixel ``(i, j)`` of ``image`` is centred at ``origin_A + (i, j) * pixel_size_A``, pixel ``(m, n)`` of
    the result (``shape``) at ``target_origin_A + (m, n) * target_pixel_size_A``. The image is split into
    its periodic and smooth components (:func:`evaluation.align.periodic_smooth_decomposition`, so its
    edges cause no ringing; an image already periodic on its grid, :func:`evaluation.align.is_periodic`,
    is its own periodic component); the periodic one is evaluated exactly at the target points from its DFT
    restricted to the square band ``|fx|, |fy| <= min(source Nyquist, target Nyquist, band_limit_invA)``
    (sinc interpolation when upsampling, an ideal low-pass when downsampling: the same band limit for every
    image put on one grid), the smooth one (a harmonic function of the edge jumps, nearly free of high
    frequencies) by cubic splines. Points outside the image's field ``[origin, origin + (N - 1) pixel]``
    are NaN.
    """
    source = np.asarray(image, dtype=np.float64)
    if source.ndim != 2 or min(source.shape) < 2:
        raise ValueError(f"fourier_resample: need a 2D image of at least 2 x 2 pixels, got {source.shape}")
    pixel = np.broadcast_to(np.asarray(pixel_size_A, dtype=np.float64), (2,))
    target = np.broadcast_to(np.asarray(target_pixel_size_A, dtype=np.float64), (2,))
    if not (np.all(pixel > 0) and np.all(target > 0)):
        raise ValueError("fourier_resample: pixel sizes must be positive")
    if is_periodic(source):
        periodic, smooth = source, None
    else:
        periodic, smooth = periodic_smooth_decomposition(source)
    spectrum = np.fft.fft2(periodic)
    coordinates = []
    matrices = []
    for axis in range(2):
        n = source.shape[axis]
        limit = min(0.5 / pixel[axis], 0.5 / target[axis])
        if band_limit_invA is not None:
            limit = min(limit, float(band_limit_invA))
        weight = _band_weights(n, float(pixel[axis]), limit)
        x = (target_origin_A[axis] + np.arange(shape[axis]) * target[axis] - origin_A[axis]) / pixel[axis]
        coordinates.append(x)
        matrix = np.exp(2j * np.pi * np.outer(x, np.fft.fftfreq(n)))
        if n % 2 == 0:  # the lone Nyquist bin stands for +-n/2: cos, so the interpolant is real and separable
            matrix[:, n // 2] = np.cos(np.pi * x)
        matrices.append(matrix * weight[None, :])
    values = (matrices[0] @ spectrum @ matrices[1].T).real / source.size
    if smooth is not None:
        grid = np.meshgrid(*coordinates, indexing="ij")
        values += map_coordinates(smooth, grid, order=3, mode="nearest")
    outside = [(x < -1e-6) | (x > n - 1 + 1e-6) for x, n in zip(coordinates, source.shape, strict=True)]
    values[outside[0], :] = np.nan
    values[:, outside[1]] = np.nan
    return values


def resample_to_grid(
    image: np.ndarray,
    pixel_size_A: float | tuple[float, float],
    origin_A: tuple[float, float],
    shape: tuple[int, int],
    target_pixel_size_A: float | tuple[float, float],
    target_origin_A: tuple[float, float] = (0.0, 0.0),
    periodic: bool = False,
) -> np.ndarray:
    """Sample ``image`` (pixel ``(i, j)`` at ``origin_A + (i, j) * pixel_size_A``) on another grid.

    Used to put a ground truth on a reconstruction's grid. When the target is coarser the image is first
    smoothed by a Gaussian of half a target pixel (sigma) to avoid aliasing; then linear interpolation.
    Points outside the image are NaN unless ``periodic``.
    """
    source = np.asarray(image, dtype=np.float64)
    pixel = np.broadcast_to(np.asarray(pixel_size_A, dtype=np.float64), (2,))
    target = np.broadcast_to(np.asarray(target_pixel_size_A, dtype=np.float64), (2,))
    sigma = np.maximum(0.5 * target / pixel, 0.0)
    sigma = np.where(target > pixel, sigma, 0.0)
    if np.any(sigma > 0):
        source = gaussian_filter(source, sigma, mode="wrap" if periodic else "nearest")
    x = (target_origin_A[0] + np.arange(shape[0]) * target[0] - origin_A[0]) / pixel[0]
    y = (target_origin_A[1] + np.arange(shape[1]) * target[1] - origin_A[1]) / pixel[1]
    coordinates = np.meshgrid(x, y, indexing="ij")
    return map_coordinates(
        source, coordinates, order=1, mode="grid-wrap" if periodic else "constant", cval=np.nan
    )


def _pair(reference: np.ndarray, test: np.ndarray, register: bool) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("images contain NaN or inf")
    if register:
        if a.ndim != 2:
            raise ValueError("register=True needs 2D images")
        a, b, _ = align(a, b)
    return a, b


def xc(reference: np.ndarray, test: np.ndarray, register: bool = False) -> float:
    """Pearson cross-correlation (paper 002 eq. 14): ``sum (a - <a>)(b - <b>) / sqrt(sum.. sum..)``.

    1 for images equal up to an offset and a positive scale, -1 for a negated image, in [-1, 1].
    """
    a, b = _pair(reference, test, register)
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
    if denominator == 0:
        raise ValueError("xc: an image is constant, the correlation is undefined")
    return float(np.sum(a * b) / denominator)


def psnr(
    reference: np.ndarray, test: np.ndarray, data_range: float | None = None, register: bool = False
) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(R^2 / MSE)``, ``R`` = ``data_range`` (default the
    reference's max - min). Infinite for identical images."""
    a, b = _pair(reference, test, register)
    value_range = float(np.ptp(a)) if data_range is None else float(data_range)
    if not value_range > 0:
        raise ValueError("psnr: data_range must be positive (the reference is constant)")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(value_range**2 / mse))


def ssim(
    reference: np.ndarray,
    test: np.ndarray,
    data_range: float | None = None,
    sigma_px: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    register: bool = False,
    full: bool = False,
) -> float | tuple[float, np.ndarray]:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004) with a Gaussian window.

    Local means, variances and covariance are Gaussian-weighted (``sigma_px``, truncated at 3.5 sigma);
    ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2`` with ``R = data_range`` (default the reference's max - min). The
    mean SSIM is taken over pixels at least 3.5 sigma from the border (where the window is whole). With
    ``full=True`` the SSIM map is returned too.
    """
    a, b = _pair(reference, test, register)
    value_range = float(np.ptp(a)) if data_range is None else float(data_range)
    if not value_range > 0:
        raise ValueError("ssim: data_range must be positive (the reference is constant)")
    c1 = (k1 * value_range) ** 2
    c2 = (k2 * value_range) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma_px, mode="reflect", truncate=3.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    margin = int(np.ceil(3.5 * sigma_px))
    inner = ssim_map[margin:-margin, margin:-margin] if min(a.shape) > 2 * margin + 1 else ssim_map
    value = float(inner.mean())
    return (value, ssim_map) if full else value
