"""Fourier ring correlation (FRC) and the resolution read from it.

``FRC(r) = Re sum_ring F1 conj(F2) / sqrt(sum_ring |F1|^2 sum_ring |F2|^2)`` over rings one Fourier pixel
wide, after registering the two images (sub-pixel), cropping them to their common field, cropping to a
square (rings need one frequency pixel in both directions) and treating the edges (mean removed; see
:func:`fourier_ring_correlation`'s ``window``). Frequencies are in 1/Angstrom, resolutions in Angstrom.

Edges: a window smears every ring into its neighbours, and what it smears is correlated in both images, so
against a noise-free truth a window makes a reconstruction look sharper than it is (a hard band limit at
1.5 1/A, 0.1 A pixels, noise 1e-3: Tukey 0.5 crosses 0.5 at 0.49 A, Hann at 0.61 A, the truth is
0.667 A). The default ``"auto"`` therefore leaves images that are periodic on their grid untouched (their
DFT has no edge leakage) and tapers only images whose seam jumps (:func:`evaluation.align.seam_ratio`)
with a Hann window, whose sidelobes fall as ``1 / k^3`` (tests/test_frc.py bounds its leakage).

Thresholds: 0.143 and half-bit are criteria for the FRC between two independent half-data
reconstructions. Against the true object the equivalent of 0.143 is ``C_ref = sqrt(2 * 0.143 / (1 +
0.143)) ~ 0.5`` (Rosenthal & Henderson 2003): :data:`TRUTH_THRESHOLD`.
"""

from __future__ import annotations

import math

import numpy as np

from evaluation.align import align, apodise, is_periodic

__all__ = [
    "HALF_MAP_THRESHOLD",
    "TRUTH_THRESHOLD",
    "fourier_ring_correlation",
    "half_bit_threshold",
    "resolution",
    "truth_equivalent_threshold",
]

#: the 1/7 criterion for the FRC between two independent half-data reconstructions
HALF_MAP_THRESHOLD = 0.143


def truth_equivalent_threshold(half_map_threshold: float = HALF_MAP_THRESHOLD) -> float:
    """The FRC against the true object that corresponds to a half-map threshold ``c``:
    ``sqrt(2 c / (1 + c))`` (Rosenthal & Henderson 2003, C_ref); 0.5 for ``c = 0.143``."""
    c = float(half_map_threshold)
    return math.sqrt(2.0 * c / (1.0 + c))


#: the criterion used for resolutions against the truth (0.5)
TRUTH_THRESHOLD = round(truth_equivalent_threshold(), 2)


def fourier_ring_correlation(
    a: np.ndarray,
    b: np.ndarray,
    pixel_size_A: float,
    *,
    register: bool = True,
    window: str | None = "auto",
    tukey_alpha: float = 0.5,
    upsample: int = 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FRC of two images of one field with square pixels of ``pixel_size_A``.

    Parameters
    ----------
    a, b
        2D images indexed ``[x, y]`` of the same shape.
    register
        Register ``b`` onto ``a`` with sub-pixel cross-correlation and crop both to the common field.
    window, tukey_alpha
        Edge treatment after the mean is removed: ``"auto"`` (default: none when both images are periodic
        on their grid, :func:`evaluation.align.is_periodic`, else ``"hann"``), ``"periodic"`` (the
        periodic component of Moisan's periodic-plus-smooth decomposition), ``"tukey"`` (taper fraction
        ``tukey_alpha``), ``"hann"`` or ``None``.

    Returns
    -------
    freq_invA, frc, ring_pixels
        Ring centre frequencies ``r / (N pixel_size_A)`` for rings ``r = 1 .. N // 2`` (the zero ring is
        left out), the FRC per ring and the number of Fourier pixels in each ring.
    """
    if not float(pixel_size_A) > 0:
        raise ValueError(f"fourier_ring_correlation: pixel_size_A must be positive, got {pixel_size_A}")
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"fourier_ring_correlation: need two 2D images of one shape, got {a.shape}, {b.shape}"
        )
    if register:
        a, b, _ = align(a, b, upsample=upsample)
    n = min(a.shape)
    if n < 8:
        raise ValueError(f"fourier_ring_correlation: common field {a.shape} is too small (need >= 8 pixels)")
    ox, oy = (a.shape[0] - n) // 2, (a.shape[1] - n) // 2
    a = a[ox : ox + n, oy : oy + n]
    b = b[ox : ox + n, oy : oy + n]
    if window == "auto":
        window = None if is_periodic(a, b) else "hann"
    fa = np.fft.fft2(apodise(a, window, tukey_alpha))
    fb = np.fft.fft2(apodise(b, window, tukey_alpha))
    f = np.fft.fftfreq(n)
    ring = np.rint(np.hypot(f[:, None], f[None, :]) * n).astype(np.int64).ravel()
    num_rings = n // 2 + 1
    cross = np.bincount(ring, (fa * np.conj(fb)).real.ravel(), minlength=num_rings)[:num_rings]
    pa = np.bincount(ring, (np.abs(fa) ** 2).ravel(), minlength=num_rings)[:num_rings]
    pb = np.bincount(ring, (np.abs(fb) ** 2).ravel(), minlength=num_rings)[:num_rings]
    counts = np.bincount(ring, minlength=num_rings)[:num_rings]
    denominator = np.sqrt(pa * pb)
    frc = np.divide(cross, denominator, out=np.zeros_like(cross), where=denominator > 0)
    rings = np.arange(num_rings)
    freq_invA = rings / (n * float(pixel_size_A))
    return freq_invA[1:], frc[1:], counts[1:]


def half_bit_threshold(ring_pixels: np.ndarray) -> np.ndarray:
    """Half-bit threshold of van Heel & Schatz (2005) for rings of ``ring_pixels`` Fourier pixels."""
    root = np.sqrt(np.maximum(np.asarray(ring_pixels, dtype=np.float64), 1.0))
    return (0.2071 + 1.9102 / root) / (1.2071 + 0.9102 / root)


def resolution(
    freq_invA: np.ndarray,
    frc: np.ndarray,
    threshold: float | str = 0.143,
    ring_pixels: np.ndarray | None = None,
) -> float:
    """Resolution in Angstrom: ``1 / f`` at the first frequency where the FRC falls below ``threshold``.

    ``threshold`` is a number (0.5, 0.143, ...) or ``"half-bit"``; the half-bit curve needs the ring pixel
    counts (``ring_pixels``; when omitted they are taken as ``2 pi r`` for rings of one pixel, the exact
    count up to rounding). The crossing is linearly interpolated between the two rings around it. When the
    FRC never falls below the threshold the result is the Nyquist limit ``1 / max(freq)``.
    """
    freq = np.asarray(freq_invA, dtype=np.float64)
    curve = np.asarray(frc, dtype=np.float64)
    if freq.shape != curve.shape or freq.ndim != 1 or freq.size < 2:
        raise ValueError("resolution: freq and frc must be 1D arrays of one length >= 2")
    if isinstance(threshold, str):
        if threshold.lower().replace("_", "-") not in ("half-bit", "halfbit"):
            raise ValueError(f"resolution: threshold must be a number or 'half-bit', got {threshold!r}")
        if ring_pixels is None:
            ring_index = freq / (freq[1] - freq[0])
            ring_pixels = 2.0 * np.pi * ring_index
        limit = half_bit_threshold(ring_pixels)
    else:
        limit = np.full_like(curve, float(threshold))
    difference = curve - limit
    below = np.flatnonzero(difference < 0)
    if below.size == 0:
        return float(1.0 / freq[-1])
    i = int(below[0])
    if i == 0:
        return float(1.0 / freq[0])
    fraction = difference[i - 1] / (difference[i - 1] - difference[i])
    crossing = freq[i - 1] + fraction * (freq[i] - freq[i - 1])
    return float(1.0 / crossing)
