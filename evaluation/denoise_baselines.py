"""Conventional baselines for (HA)ADF-STEM image restoration (issue #16): an oracle Gaussian filter and BM3D
on the (generalised) Anscombe variance-stabilised image.

Noise model (:mod:`training.distortions`, thesis eq. 2.1 and 2.12-2.13): a pixel of clean intensity ``I``
(image units, e.g. fraction of incident electrons) receives ``k ~ Poisson(alpha I)`` electrons, ``alpha =
dose * dx * dy``; the scintillator/PMT adds Gaussian noise of variance ``k s^2`` (``s`` =
:attr:`training.distortions.PMTParameters.single_electron_std`, 0.133 at 300 kV) and an optional dark noise
``sigma_e`` (single-electron units); the image is the result divided by ``alpha``. In electron units
``z = alpha x`` this is, to second order, the Poisson-Gaussian model ``z = g p + n`` with gain ``g = 1 +
s^2``, ``p ~ Poisson(alpha I / g)`` and ``n ~ N(mu, sigma_e^2)`` (mean and variance match:
``E z = alpha I``, ``Var z = g E z + sigma_e^2``); :func:`pmt_gain` gives ``g``.

Generalised Anscombe transform (Murtagh, Starck & Bijaoui 1995; Makitalo & Foi 2013), in the normalised
variables ``y = z / g``, ``sigma = sigma_e / g``, ``mu' = mu / g``::

    f(y) = 2 sqrt(max(y + 3/8 + sigma^2 - mu', 0))

which has unit noise variance for every mean (to leading order); ``g = 1, sigma = 0`` is the Anscombe
transform of Poisson counts. Inverses (:func:`inverse_anscombe`):

* ``"exact"`` (default): the exact unbiased inverse (Makitalo & Foi 2011/2013), the ``lambda`` with
  ``E[f(y) | lambda] = D``; ``E[f]`` is tabulated on a grid of ``lambda`` (Poisson probabilities summed over
  ``k``, the Gaussian part by Gauss-Hermite quadrature, or a fine trapezoid rule near the clipping at 0)
  and inverted by monotone interpolation; above ``lambda = 1e4`` the asymptotic form
  ``D^2 / 4 - 1/8 - sigma^2`` is used (its error there is below 1e-6 of ``lambda``). ``D`` below the
  table's start (``lambda = 0``) maps to 0.
* ``"closed_form"``: Makitalo & Foi's closed-form approximation of the exact unbiased inverse,
  ``D^2/4 + sqrt(3/2)/4 D^-1 - 11/8 D^-2 + 5/8 sqrt(3/2) D^-3 - 1/8 - sigma^2`` (clipped at 0).
* ``"algebraic"``: ``D^2 / 4 - 3/8 - sigma^2`` (biased at low counts; for comparison only).

Every inverse returns the Poisson mean ``lambda`` (normalised units), without the Gaussian mean ``mu``.

BM3D (Dabov et al. 2007; the PyPI ``bm3d`` package of Makinen, Azzari & Foi, installed with the
``restore`` extra; its licence, and bm4d's, allow non-commercial use only) denoises the stabilised
image with a white-noise standard deviation ``noise_std``: 1 for uncorrelated noise; a linear blur ``h``
applied after the noise (the fast-scan response) leaves the per-pixel standard deviation
``sqrt(sum h^2)`` (:func:`blurred_noise_std`), correlated along the blur (BM3D's correlated-noise PSD
input does not run with NumPy 2 in bm3d 4.0.3, so the white-noise level is used).

The oracle Gaussian filter chooses the filter width per image by the best PSNR against the clean image:
it needs the clean image, so it is an upper bound for a Gaussian filter of one fixed width per image, not a
method a user can run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import poisson

from evaluation.restoration_metrics import psnr_db

__all__ = [
    "ORACLE_SIGMAS_PX",
    "OracleGaussian",
    "anscombe",
    "blurred_noise_std",
    "bm3d_anscombe",
    "inverse_anscombe",
    "oracle_gaussian",
    "pmt_gain",
]

ORACLE_SIGMAS_PX: tuple[float, ...] = (0.0, *np.geomspace(0.3, 16.0, 34).tolist())
"""Gaussian filter widths (standard deviations, pixels) tried by :func:`oracle_gaussian`; 0 = no filter."""

_ASYMPTOTIC_LAMBDA = 1.0e4
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(100)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def pmt_gain(single_electron_std: float) -> float:
    """Poisson-Gaussian gain ``g = 1 + s^2`` of a detector whose response to ``k`` electrons has variance
    ``k s^2`` (``s`` relative to the mean single-electron response; module docstring)."""
    if single_electron_std < 0:
        raise ValueError(f"single_electron_std must be non-negative, got {single_electron_std}")
    return 1.0 + single_electron_std**2


def anscombe(y: np.ndarray, sigma: float = 0.0, mu: float = 0.0) -> np.ndarray:
    """Generalised Anscombe transform ``2 sqrt(max(y + 3/8 + sigma^2 - mu, 0))`` of normalised counts ``y``
    (electrons / gain; ``sigma``, ``mu``: Gaussian noise std and mean in the same units)."""
    y = np.asarray(y, dtype=np.float64)
    return 2.0 * np.sqrt(np.maximum(y + 0.375 + sigma**2 - mu, 0.0))


def _gaussian_smoothed_anscombe(k: np.ndarray, sigma: float) -> np.ndarray:
    """``E_n[f(k + n)]`` for ``n ~ N(0, sigma^2)`` at integer counts ``k``: Gauss-Hermite quadrature where
    the clipping of :func:`anscombe` is more than 8 sigma away, else a fine trapezoid rule (the clipped
    square root has a kink there, which quadrature does not resolve)."""
    if sigma <= 0:
        return anscombe(k)
    out = (anscombe(k[:, None] + sigma * _GH_NODES[None, :], sigma) * _GH_WEIGHTS[None, :]).sum(axis=1)
    near = k + 0.375 + sigma**2 < 8.0 * sigma
    if np.any(near):
        t = np.linspace(-8.0, 8.0, 4001)
        w = np.exp(-0.5 * t**2)
        w /= np.trapezoid(w, t)
        values = anscombe(k[near][:, None] + sigma * t[None, :], sigma)
        out[near] = np.trapezoid(values * w[None, :], t, axis=1)
    return out


def _expected_anscombe(lam: np.ndarray, sigma: float) -> np.ndarray:
    """``E[f(p + n)]`` for ``p ~ Poisson(lam)``, ``n ~ N(0, sigma^2)`` (``mu = 0``; see module docstring)."""
    k_max = int(lam.max() + 12.0 * math.sqrt(lam.max()) + 12.0)
    k_all = np.arange(k_max + 1, dtype=np.float64)
    smoothed = _gaussian_smoothed_anscombe(k_all, sigma)
    out = np.empty_like(lam)
    for i, value in enumerate(lam):
        spread = 12.0 * math.sqrt(value) + 12.0
        first, last = max(0, int(value - spread)), int(value + spread) + 1
        pmf = poisson.pmf(k_all[first:last], value)
        out[i] = float(np.sum(pmf * smoothed[first:last]) / np.sum(pmf))
    return out


@lru_cache(maxsize=16)
def _exact_table(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    lam = np.concatenate([[0.0], np.geomspace(1e-4, _ASYMPTOTIC_LAMBDA, 600)])
    expected = _expected_anscombe(lam, sigma)
    expected = np.maximum.accumulate(expected)  # monotone (it is, up to rounding)
    return expected, lam


def inverse_anscombe(D: np.ndarray, sigma: float = 0.0, method: str = "exact") -> np.ndarray:
    """Inverse of :func:`anscombe`: the Poisson mean ``lambda >= 0`` (normalised counts, without the
    Gaussian part's mean ``mu``) of a stabilised value ``D``.

    ``method``: ``"exact"`` (exact unbiased inverse), ``"closed_form"`` (its closed-form approximation) or
    ``"algebraic"`` (module docstring); ``sigma`` as given to :func:`anscombe`.
    """
    D = np.asarray(D, dtype=np.float64)
    if method == "algebraic":
        return np.maximum(D**2 / 4.0 - 0.375 - sigma**2, 0.0)
    if method == "closed_form":
        safe = np.maximum(D, 1e-3)
        c = math.sqrt(1.5)
        value = safe**2 / 4.0 + c / 4.0 / safe - 11.0 / 8.0 / safe**2 + 5.0 * c / 8.0 / safe**3 - 0.125
        return np.maximum(value - sigma**2, 0.0)
    if method != "exact":
        raise ValueError(f"method must be 'exact', 'closed_form' or 'algebraic', got {method!r}")
    expected, lam = _exact_table(float(sigma))
    result = np.interp(D, expected, lam, left=0.0)
    high = D > expected[-1]
    result[high] = D[high] ** 2 / 4.0 - 0.125 - sigma**2
    return np.maximum(result, 0.0)


def blurred_noise_std(kernel: np.ndarray) -> float:
    """Per-pixel standard deviation ``sqrt(sum h^2)`` of unit white noise after the linear filter ``h``."""
    return float(np.sqrt(np.sum(np.asarray(kernel, dtype=np.float64) ** 2)))


def bm3d_anscombe(
    image: np.ndarray,
    electrons_per_unit: float,
    gain: float = 1.0,
    read_noise_e: float = 0.0,
    noise_std: float = 1.0,
    inverse: str = "exact",
    profile: str = "np",
) -> np.ndarray:
    """BM3D of a shot-noise-limited image on its generalised-Anscombe stabilised version.

    ``image`` in image units (electron counts divided by ``electrons_per_unit`` = ``alpha = dose dx dy``),
    ``gain`` and ``read_noise_e`` (electrons) the Poisson-Gaussian detector model (module docstring;
    :func:`pmt_gain`), ``noise_std`` the stabilised noise level BM3D is told (1 for white noise,
    :func:`blurred_noise_std` after a blur), ``inverse`` as :func:`inverse_anscombe`. Returns float64 in
    the image's units. Needs the ``bm3d`` package (``pip install deepstem[restore]``).
    """
    try:
        import bm3d
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("BM3D needs the 'bm3d' package: pip install 'deepstem[restore]'") from err
    if electrons_per_unit <= 0 or gain <= 0 or noise_std <= 0:
        raise ValueError("electrons_per_unit, gain and noise_std must be positive")
    sigma = read_noise_e / gain
    y = np.asarray(image, dtype=np.float64) * electrons_per_unit / gain
    stabilised = anscombe(y, sigma)
    denoised = np.asarray(
        bm3d.bm3d(stabilised, sigma_psd=float(noise_std), profile=profile), dtype=np.float64
    )
    denoised = denoised.reshape(stabilised.shape)
    return inverse_anscombe(denoised, sigma, method=inverse) * gain / electrons_per_unit


@dataclass(frozen=True)
class OracleGaussian:
    """Result of :func:`oracle_gaussian`: the filtered image, the chosen ``sigma_px`` and its PSNR (dB)."""

    image: np.ndarray
    sigma_px: float
    psnr_db: float


def oracle_gaussian(
    image: np.ndarray, clean: np.ndarray, sigmas_px: Sequence[float] = ORACLE_SIGMAS_PX
) -> OracleGaussian:
    """Oracle Gaussian filter: the width of ``sigmas_px`` (pixels; 0 = unfiltered) whose filtered image
    has the best PSNR against ``clean`` (:func:`evaluation.restoration_metrics.psnr_db`); reflecting
    borders. An oracle: it needs the clean image (module docstring)."""
    image = np.asarray(image, dtype=np.float64)
    best: OracleGaussian | None = None
    for sigma_px in sigmas_px:
        filtered = gaussian_filter(image, float(sigma_px), mode="reflect") if sigma_px > 0 else image
        score = psnr_db(clean, filtered)
        if best is None or score > best.psnr_db:
            best = OracleGaussian(filtered, float(sigma_px), score)
    if best is None:
        raise ValueError("oracle_gaussian: no filter widths given")
    return best
