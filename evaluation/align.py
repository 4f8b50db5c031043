"""Registration, apodisation and cropping shared by every image metric (FRC, xc, PSNR, SSIM).

Conventions: images are 2D arrays indexed ``[x, y]``. A shift ``s = (sx, sy)`` in pixels follows
:func:`physics.fourier_shift`: ``fourier_shift(reference, s)`` moves content towards higher indices, so
:func:`estimate_shift` returns the ``s`` for which ``moving ~= fourier_shift(reference, s)``.
"""

from __future__ import annotations

import math

import numpy as np

from physics import fourier_shift

__all__ = [
    "align",
    "apodise",
    "crop_common",
    "estimate_shift",
    "is_periodic",
    "periodic_smooth_decomposition",
    "seam_ratio",
    "tukey_window",
]

#: an image whose jumps across its periodic seam are at most this many times its neighbour differences
#: is treated as periodic (see :func:`seam_ratio`)
SEAM_RATIO_PERIODIC = 2.0


def _as_image(image: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2D image, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


def tukey_window(shape: tuple[int, int], alpha: float = 0.5) -> np.ndarray:
    """Separable Tukey (tapered cosine) window; ``alpha = 1`` is the Hann window, ``0`` rectangular."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"tukey_window: alpha must be in [0, 1], got {alpha}")

    def one(n: int) -> np.ndarray:
        if alpha == 0.0 or n < 3:
            return np.ones(n)
        x = np.arange(n) / (n - 1)
        w = np.ones(n)
        edge = alpha / 2.0
        lo = x < edge
        hi = x > 1.0 - edge
        w[lo] = 0.5 * (1.0 + np.cos(np.pi * (2.0 * x[lo] / alpha - 1.0)))
        w[hi] = 0.5 * (1.0 + np.cos(np.pi * (2.0 * x[hi] / alpha - 2.0 / alpha + 1.0)))
        return w

    return np.outer(one(shape[0]), one(shape[1]))


def periodic_smooth_decomposition(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Periodic-plus-smooth decomposition ``image = p + s`` (Moisan 2011, J. Math. Imaging Vis. 39, 161).

    ``s`` is the smooth image whose discrete Laplacian equals the boundary image ``v`` of the jumps across
    the periodic seam (``v[0, :] = u[-1, :] - u[0, :]``, ``v[-1, :] = -v[0, :]``, the same along the
    second axis), solved in Fourier space: ``s^(q, r) = v^(q, r) / (2 cos(2 pi q / M) + 2 cos(2 pi r / N)
    - 4)`` with ``s^(0, 0) = 0``. The periodic component ``p = u - s`` has the same mean as ``u`` and no
    jumps across the seam, so its DFT shows no cross of edge leakage, without a window that would smear the
    spectrum. Returns ``(p, s)``.
    """
    u = _as_image(image, "image")
    m, n = u.shape
    boundary = np.zeros_like(u)
    rows = u[-1, :] - u[0, :]
    boundary[0, :] += rows
    boundary[-1, :] -= rows
    cols = u[:, -1] - u[:, 0]
    boundary[:, 0] += cols
    boundary[:, -1] -= cols
    q = np.arange(m)[:, None]
    r = np.arange(n)[None, :]
    denominator = 2.0 * np.cos(2.0 * np.pi * q / m) + 2.0 * np.cos(2.0 * np.pi * r / n) - 4.0
    denominator[0, 0] = 1.0
    spectrum = np.fft.fft2(boundary) / denominator
    spectrum[0, 0] = 0.0
    smooth = np.fft.ifft2(spectrum).real
    return u - smooth, smooth


def seam_ratio(image: np.ndarray) -> float:
    """How much the periodic seam jumps: ``max over both axes of rms(u[-1] - u[0]) / rms(diff(u))``.

    About 1 for an image that is periodic on its grid (the seam is one more neighbour difference), several
    for a crop of a smooth field; 0 for a constant image.
    """
    u = _as_image(image, "image")
    ratio = 0.0
    for axis in (0, 1):
        v = np.moveaxis(u, axis, 0)
        if v.shape[0] < 3:
            continue
        inner = float(np.sqrt(np.mean(np.diff(v, axis=0) ** 2)))
        jump = float(np.sqrt(np.mean((v[-1] - v[0]) ** 2)))
        if inner > 0:
            ratio = max(ratio, jump / inner)
        elif jump > 0:
            return math.inf
    return ratio


def is_periodic(*images: np.ndarray, limit: float = SEAM_RATIO_PERIODIC) -> bool:
    """True when every image's :func:`seam_ratio` is at most ``limit`` (the DFT needs no edge treatment)."""
    return all(seam_ratio(image) <= limit for image in images)


def apodise(image: np.ndarray, window: str | None = "tukey", alpha: float = 0.5) -> np.ndarray:
    """Subtract the mean and treat the edges: ``"tukey"`` (taper fraction ``alpha``), ``"hann"``,
    ``"periodic"`` (the periodic component of :func:`periodic_smooth_decomposition`, no window) or ``None``.
    """
    array = _as_image(image, "image")
    if window == "periodic":
        periodic, _ = periodic_smooth_decomposition(array)
        return periodic - periodic.mean()
    array = array - array.mean()
    if window is None or window == "none":
        return array
    if window == "hann":
        return array * tukey_window(array.shape, 1.0)
    if window == "tukey":
        return array * tukey_window(array.shape, alpha)
    raise ValueError(f"apodise: window must be 'tukey', 'hann', 'periodic' or None, got {window!r}")


def _upsampled_correlation(
    product: np.ndarray, centre: np.ndarray, upsample: int, half_width: float
) -> tuple:
    """Cross-correlation ``sum_f P(f) exp(2 pi i f.s)`` on a fine grid of shifts around ``centre``."""
    nx, ny = product.shape
    offsets = np.arange(-half_width, half_width + 1e-9, 1.0 / upsample)
    sx = centre[0] + offsets
    sy = centre[1] + offsets
    ex = np.exp(2j * np.pi * np.outer(sx, np.fft.fftfreq(nx)))
    ey = np.exp(2j * np.pi * np.outer(np.fft.fftfreq(ny), sy))
    return (ex @ product @ ey).real, sx, sy


def estimate_shift(
    reference: np.ndarray,
    moving: np.ndarray,
    upsample: int = 20,
    window: str | None = "tukey",
    iterations: int = 4,
    max_shift_px: float | None = None,
) -> np.ndarray:
    """Sub-pixel shift ``s`` (pixels, ``[sx, sy]``) with ``moving ~= fourier_shift(reference, s)``.

    Cross-correlation of the apodised images by FFT, integer peak, then refinement by a matrix DFT of the
    correlation on a grid ``1 / upsample`` pixel fine within +-1.5 pixels of the peak (Guizar-Sicairos et
    al. 2008), precision about ``1 / upsample`` pixel; repeated on the re-shifted image (``iterations``)
    to remove the bias of the fixed window. With ``max_shift_px`` the peak is searched only among shifts
    with ``|sx|, |sy| <= max_shift_px`` and the result is clipped to that box (a result on its edge means
    the bound was hit: the best match may lie further out).
    """
    a = _as_image(reference, "reference")
    b = _as_image(moving, "moving")
    if a.shape != b.shape:
        raise ValueError(f"estimate_shift: shapes differ {a.shape} vs {b.shape}")
    bound = None if max_shift_px is None else float(max_shift_px)
    if bound is not None and not bound >= 0:
        raise ValueError(f"estimate_shift: max_shift_px must be >= 0, got {max_shift_px}")
    fa = np.conj(np.fft.fft2(apodise(a, window)))
    shift = _correlation_peak(np.fft.fft2(apodise(b, window)) * fa, upsample, bound)
    # the window stays put while the content moves, which biases the peak towards zero: undo the
    # estimate and measure the residual until it stops changing
    for _ in range(iterations):
        moved = np.fft.fft2(apodise(fourier_shift(b, -shift), window))
        residual = _correlation_peak(moved * fa, upsample, 1.5)
        shift = shift + residual
        if bound is not None:
            shift = np.clip(shift, -bound, bound)
        if np.max(np.abs(residual)) < 0.5 / max(upsample, 1):
            break
    return shift


def _correlation_peak(product: np.ndarray, upsample: int, bound: float | None = None) -> np.ndarray:
    correlation = np.fft.ifft2(product).real
    shape = np.array(product.shape)
    if bound is not None:  # only shifts within +-bound (wrapped indices: index i is shift i or i - n)
        lags = [np.where(np.arange(n) > n // 2, np.arange(n) - n, np.arange(n)) for n in shape]
        allowed = (np.abs(lags[0])[:, None] <= np.floor(bound + 0.5)) & (
            np.abs(lags[1])[None, :] <= np.floor(bound + 0.5)
        )
        correlation = np.where(allowed, correlation, -np.inf)
    peak = np.array(np.unravel_index(np.argmax(correlation), correlation.shape), dtype=np.float64)
    peak = np.where(peak > shape // 2, peak - shape, peak)
    if upsample <= 1:
        return peak if bound is None else np.clip(peak, -bound, bound)
    fine, sx, sy = _upsampled_correlation(product, peak, int(upsample), 1.5)
    if bound is not None:
        fine = np.where((np.abs(sx)[:, None] <= bound + 1e-9) & (np.abs(sy)[None, :] <= bound + 1e-9),
                        fine, -np.inf)  # fmt: skip
    i, j = np.unravel_index(np.argmax(fine), fine.shape)
    return np.array([sx[i], sy[j]])


def crop_common(images: tuple[np.ndarray, ...], shift_px: np.ndarray) -> tuple[np.ndarray, ...]:
    """Crop images (already aligned by undoing ``shift_px``) to the field both saw originally.

    A shift of ``s`` pixels wraps ``ceil(|s|)`` rows around (Fourier shift), which are discarded on the
    side they came from.
    """
    nx, ny = images[0].shape
    slices = []
    for n, s in zip((nx, ny), shift_px, strict=True):
        m = math.ceil(abs(float(s)) - 1e-6)
        # undoing a positive shift pulls content from higher indices: the top m rows wrap around
        slices.append(slice(0, n - m) if s > 0 else slice(m, n))
    if any(sl.stop <= sl.start for sl in slices):
        raise ValueError(f"crop_common: shift {shift_px} leaves no common field")
    return tuple(image[slices[0], slices[1]] for image in images)


def align(
    reference: np.ndarray, moving: np.ndarray, upsample: int = 20, max_shift_px: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Register ``moving`` onto ``reference`` (sub-pixel) and crop both to their common field.

    Returns ``(reference_cropped, moving_aligned_cropped, shift_px)`` where ``shift_px`` is the shift of
    ``moving`` relative to ``reference`` (see :func:`estimate_shift`), searched within ``|sx|, |sy| <=
    max_shift_px`` when that is given. Both inputs must have one shape.
    """
    a = _as_image(reference, "reference")
    b = _as_image(moving, "moving")
    shift = estimate_shift(a, b, upsample=upsample, max_shift_px=max_shift_px)
    aligned = fourier_shift(b, -shift)
    a_c, b_c = crop_common((a, aligned), shift)
    return a_c, b_c, shift
