"""Scores of a restored 2D (HA)ADF-STEM image against its clean image (issue #16, thesis ch. 2 section 2.3).

* :func:`psnr_db` and :func:`ssim_index`: PSNR and SSIM of ``test`` against ``clean`` (scikit-image's
  implementations). **Data-range convention**: ``R = max(clean) - min(clean)`` of each clean image, in the
  clean image's units (for simulated HAADF images: the fraction of incident electrons reaching the
  detector); the distorted and restored images must be in the same units (the distortion models of
  :mod:`training.distortions` return counts / ``alpha``, which is those units). ``PSNR = 10 log10(R^2 /
  MSE)``; SSIM as Wang et al. (2004): Gaussian window of ``sigma = 1.5`` px, ``K1 = 0.01``, ``K2 = 0.03``,
  population (not sample) covariances, mean over the pixels whose window is whole.
* :func:`find_columns`, :func:`fit_column` and :func:`column_position_error`: the atomic-column position
  error of thesis section 2.3. Columns are the local maxima of the clean image (at least
  ``min_distance_A`` apart, higher than ``median + threshold * (P99 - median)`` with ``P99`` the image's
  99th percentile -- so a few very bright columns do not hide the others -- and a whole fit window away from
  the border); at each one an axis-aligned 2D Gaussian plus a constant,
  ``b + A exp(-(r - r0)^2 / (2 s_r^2) - (c - c0)^2 / (2 s_c^2))``, is fitted by least squares
  (:func:`scipy.optimize.least_squares`, Levenberg-Marquardt with the analytic Jacobian) to the pixels
  within ``window_radius_A`` of the peak, in the clean image and in the restored image (started from the
  clean fit). The error of a column is the distance
  between the two fitted centres, in Angstrom. A fit fails when it does not converge, its amplitude is not
  positive, a width is below 0.25 px or above twice the window, or its centre leaves the window; failed
  columns are counted (``failed``) and left out of the mean and rms.

Image axes are ``[row, column]``; positions are returned as ``(row, column)`` in pixels unless named ``_A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from skimage.feature import peak_local_max
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = [
    "ColumnError",
    "column_position_error",
    "data_range",
    "find_columns",
    "fit_column",
    "fit_columns",
    "psnr_db",
    "ssim_index",
]


def data_range(clean: np.ndarray) -> float:
    """The PSNR / SSIM data range of a clean image: ``max - min`` (module docstring); raises ValueError
    for a constant image."""
    value = float(np.ptp(np.asarray(clean, dtype=np.float64)))
    if not value > 0:
        raise ValueError("the clean image is constant: PSNR and SSIM are undefined")
    return value


def _check_pair(clean: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(clean, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two 2D images of one shape, got {a.shape} and {b.shape}")
    return a, b


def psnr_db(clean: np.ndarray, test: np.ndarray) -> float:
    """PSNR of ``test`` against ``clean`` in dB, data range ``max(clean) - min(clean)`` (inf if equal)."""
    a, b = _check_pair(clean, test)
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(a, b, data_range=data_range(a)))


def ssim_index(clean: np.ndarray, test: np.ndarray) -> float:
    """Mean SSIM of ``test`` against ``clean`` (Gaussian window sigma 1.5 px; data range of ``clean``)."""
    a, b = _check_pair(clean, test)
    return float(
        structural_similarity(
            a, b, data_range=data_range(a), gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )


def find_columns(
    clean: np.ndarray,
    pixel_size_A: float,
    min_distance_A: float = 1.0,
    threshold: float = 0.2,
    window_radius_A: float = 0.6,
) -> np.ndarray:
    """Atomic columns of a clean image: ``(N, 2)`` integer ``(row, column)`` peak pixels.

    Local maxima at least ``min_distance_A`` apart (Angstrom), higher than ``median + threshold * (P99 -
    median)`` of the image (``P99``: its 99th percentile), and at least one fit window (``window_radius_A``)
    plus one pixel from the border.
    """
    image = np.asarray(clean, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {image.shape}")
    if pixel_size_A <= 0:
        raise ValueError(f"pixel_size_A must be positive, got {pixel_size_A}")
    distance_px = max(1, round(min_distance_A / pixel_size_A))
    border_px = _radius_px(window_radius_A, pixel_size_A) + 1
    median = float(np.median(image))
    level = median + threshold * (float(np.percentile(image, 99.0)) - median)
    peaks = peak_local_max(image, min_distance=distance_px, threshold_abs=level, exclude_border=border_px)
    return np.asarray(peaks, dtype=np.int64).reshape(-1, 2)


def _radius_px(window_radius_A: float, pixel_size_A: float) -> int:
    return max(2, math.ceil(window_radius_A / pixel_size_A))


def _gaussian(params: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    background, amplitude, r0, c0, s_r, s_c = params
    return background + amplitude * np.exp(-0.5 * (((rows - r0) / s_r) ** 2 + ((cols - c0) / s_c) ** 2))


def _gaussian_jacobian(params: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    _, amplitude, r0, c0, s_r, s_c = params
    u, v = (rows - r0) / s_r, (cols - c0) / s_c
    e = np.exp(-0.5 * (u**2 + v**2))
    ae = amplitude * e
    return np.stack(
        [np.ones_like(e), e, ae * u / s_r, ae * v / s_c, ae * u**2 / s_r, ae * v**2 / s_c], axis=1
    )


def fit_column(
    image: np.ndarray, peak_rc: tuple[int, int], radius_px: int, start: np.ndarray | None = None
) -> np.ndarray | None:
    """Least-squares fit of an axis-aligned 2D Gaussian plus a constant to the pixels of ``image`` within
    ``radius_px`` of the integer pixel ``peak_rc`` (which must lie ``radius_px`` from the border).

    Returns the parameters ``[background, amplitude, row0, col0, sigma_row, sigma_col]`` (positions and
    widths in pixels of the whole image), or None when the fit fails (module docstring). ``start``: initial
    parameters (default: from the window's minimum, maximum and the peak pixel, widths ``radius_px / 2``).
    """
    r, c = int(peak_rc[0]), int(peak_rc[1])
    patch = np.asarray(image, dtype=np.float64)[
        r - radius_px : r + radius_px + 1, c - radius_px : c + radius_px + 1
    ]
    if patch.shape != (2 * radius_px + 1, 2 * radius_px + 1):
        raise ValueError(f"the fit window at {peak_rc} leaves the image")
    dr, dc = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    inside = dr**2 + dc**2 <= radius_px**2
    rows, cols, values = (dr[inside] + r).astype(float), (dc[inside] + c).astype(float), patch[inside]
    scale = float(np.ptp(values)) or 1.0
    if start is None:
        start = np.array([values.min(), values.max() - values.min(), r, c, radius_px / 2, radius_px / 2])
    x0 = np.array(start, dtype=np.float64)
    x0[1] = max(x0[1], 1e-6 * scale)
    x0[2] = np.clip(x0[2], r - radius_px + 0.01, r + radius_px - 0.01)
    x0[3] = np.clip(x0[3], c - radius_px + 0.01, c + radius_px - 0.01)
    x0[4:] = np.clip(np.abs(x0[4:]), 0.3, 4.0 * radius_px)
    try:
        result = least_squares(
            lambda p: (_gaussian(p, rows, cols) - values) / scale,
            x0,
            jac=lambda p: _gaussian_jacobian(p, rows, cols) / scale,
            method="lm",
            max_nfev=200,
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    p = result.x.copy()
    p[4:] = np.abs(p[4:])
    centre_offset = math.hypot(p[2] - r, p[3] - c)
    widths_ok = bool(np.all((p[4:] >= 0.25) & (p[4:] <= 4.0 * radius_px)))
    if (
        not result.success
        or not np.all(np.isfinite(p))
        or p[1] <= 0
        or centre_offset >= radius_px
        or not widths_ok
    ):
        return None
    return p


def fit_columns(
    image: np.ndarray, columns_rc: np.ndarray, pixel_size_A: float, window_radius_A: float = 0.6
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``(peak, parameters or None)`` of :func:`fit_column` at every column peak (fit window of radius
    ``window_radius_A``)."""
    radius_px = _radius_px(window_radius_A, pixel_size_A)
    peaks = np.asarray(columns_rc, dtype=np.int64).reshape(-1, 2)
    return [(peak, fit_column(image, (int(peak[0]), int(peak[1])), radius_px)) for peak in peaks]


@dataclass(frozen=True)
class ColumnError:
    """Column position error of one image: ``mean_A`` and ``rms_A`` over the ``fitted`` columns whose fit
    succeeded in both images; ``failed`` columns (fit failed in the restored image) are left out; ``nan``
    when none was fitted."""

    mean_A: float
    rms_A: float
    fitted: int
    failed: int


def column_position_error(
    clean: np.ndarray,
    restored: np.ndarray,
    pixel_size_A: float,
    columns_rc: np.ndarray | None = None,
    window_radius_A: float = 0.6,
    min_distance_A: float = 1.0,
    threshold: float = 0.2,
    reference_fits: list[tuple[np.ndarray, np.ndarray | None]] | None = None,
) -> ColumnError:
    """Atomic-column position error of ``restored`` against ``clean`` (thesis section 2.3; module docstring).

    ``columns_rc``: the columns' integer peaks (default :func:`find_columns` on ``clean``). Columns whose
    clean fit fails are not counted at all. Distances in Angstrom (square pixels of ``pixel_size_A``).
    ``reference_fits``: the clean fits from :func:`fit_columns` (same ``window_radius_A``), to score many
    restorations of one clean image without refitting it.
    """
    a, b = _check_pair(clean, restored)
    radius_px = _radius_px(window_radius_A, pixel_size_A)
    if reference_fits is None:
        if columns_rc is None:
            columns_rc = find_columns(a, pixel_size_A, min_distance_A, threshold, window_radius_A)
        reference_fits = fit_columns(a, columns_rc, pixel_size_A, window_radius_A)
    errors: list[float] = []
    failed = 0
    for peak, reference in reference_fits:
        if reference is None:
            continue
        found = fit_column(b, (int(peak[0]), int(peak[1])), radius_px, start=reference)
        if found is None:
            failed += 1
            continue
        errors.append(math.hypot(found[2] - reference[2], found[3] - reference[3]) * pixel_size_A)
    if not errors:
        return ColumnError(math.nan, math.nan, 0, failed)
    e = np.asarray(errors)
    return ColumnError(float(e.mean()), float(np.sqrt(np.mean(e**2))), len(errors), failed)
