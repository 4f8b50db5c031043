"""Registration, apodisation and cropping shared by every image metric (FRC, xc, PSNR, SSIM).

Conventions: images are 2D arrays indexed ``[x, y]``. A shift ``s = (sx, sy)`` in pixels follows
:func:`physics.fourier_shift`: ``fourier_shift(reference, s)`` moves content towards higher indices, so
:func:`estimate_shift` returns the ``s`` for which ``moving ~= fourier_shift(reference, s)``.
"""

from __future__ import annotations

import math

import numpy as np

from physics import fourier_shift

__all__ = ["align", "apodise", "crop_common", "estimate_shift", "tukey_window"]


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


def apodise(image: np.ndarray, window: str | None = "tukey", alpha: float = 0.5) -> np.ndarray:
    """Subtract the mean and multiply by a window (``"tukey"`` with ``alpha``, ``"hann"`` or ``None``)."""
    array = _as_image(image, "image")
    array = array - array.mean()
    if window is None or window == "none":
        return array
    if window == "hann":
        return array * tukey_window(array.shape, 1.0)
    if window == "tukey":
        return array * tukey_window(array.shape, alpha)
    raise ValueError(f"apodise: window must be 'tukey', 'hann' or None, got {window!r}")


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
) -> np.ndarray:
    """Sub-pixel shift ``s`` (pixels, ``[sx, sy]``) with ``moving ~= fourier_shift(reference, s)``.

    Cross-correlation of the apodised images by FFT, integer peak, then refinement by a matrix DFT of the
    correlation on a grid ``1 / upsample`` pixel fine within +-1.5 pixels of the peak (Guizar-Sicairos et
    al. 2008), precision about ``1 / upsample`` pixel; repeated on the re-shifted image (``iterations``)
    to remove the bias of the fixed window.
    """
    a = _as_image(reference, "reference")
    b = _as_image(moving, "moving")
    if a.shape != b.shape:
        raise ValueError(f"estimate_shift: shapes differ {a.shape} vs {b.shape}")
    fa = np.conj(np.fft.fft2(apodise(a, window)))
    shift = _correlation_peak(np.fft.fft2(apodise(b, window)) * fa, upsample)
    # the window stays put while the content moves, which biases the peak towards zero: undo the
    # estimate and measure the residual until it stops changing
    for _ in range(iterations):
        residual = _correlation_peak(np.fft.fft2(apodise(fourier_shift(b, -shift), window)) * fa, upsample)
        shift = shift + residual
        if np.max(np.abs(residual)) < 0.5 / max(upsample, 1):
            break
    return shift


def _correlation_peak(product: np.ndarray, upsample: int) -> np.ndarray:
    correlation = np.fft.ifft2(product).real
    peak = np.array(np.unravel_index(np.argmax(correlation), correlation.shape), dtype=np.float64)
    shape = np.array(product.shape)
    peak = np.where(peak > shape // 2, peak - shape, peak)
    if upsample <= 1:
        return peak
    fine, sx, sy = _upsampled_correlation(product, peak, int(upsample), 1.5)
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
    ``moving`` relative to ``reference`` (see :func:`estimate_shift`). Both inputs must have one shape.
    """
    a = _as_image(reference, "reference")
    b = _as_image(moving, "moving")
    shift = estimate_shift(a, b, upsample=upsample)
    if max_shift_px is not None and np.max(np.abs(shift)) > max_shift_px:
        raise ValueError(f"align: estimated shift {shift} exceeds max_shift_px={max_shift_px}")
    aligned = fourier_shift(b, -shift)
    a_c, b_c = crop_common((a, aligned), shift)
    return a_c, b_c, shift
