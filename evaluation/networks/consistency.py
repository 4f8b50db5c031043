"""Trust map: how well each network prediction explains the CBED it was made from (forward-model consistency).

A network reconstruction is a guess per scan position. Its predicted exit wave ``psi_n`` can be propagated
back to the detector, ``|F psi_n|^2``, and compared with the measured pattern ``y_n`` the network saw --
the same pattern, on the network grid, in the counts of the input file (after the resampling and scan
rotation of :mod:`evaluation.networks.geometry`, before any network pre-processing). Where the two
disagree the network was shown something its training did not cover (e.g. another semi-angle or step
than it assumes; tests/test_consistency.py) and its phase there deserves less trust. The map is computed in
the reconstruction's batched loop, one value per (effective) scan position, and stored as
``Reconstruction.consistency`` (Rx, Ry), dataset ``consistency`` of ``deepstem.recon/1`` and a panel
beside the phase in the PNG (``<method>.consistency=false`` switches it off).

The exit wave each network implies:

* AIRPI: the predicted exit wave itself (:func:`models.airpi.output_to_wave`).
* Chang U-Net: ``P exp(i phi)`` on the training simulation grid
  (:class:`datagen.stock_images.ChangForwardModel`: ``pixels * bin_factor`` pixels of ``1 / (2 k_det)``,
  the scan's defocus and Cs), with the predicted phase inside the illuminated disc placed at the label
  window and ``phi = 0`` outside it. The network's phase has its mean over the disc removed (the labels
  are), so ``phi = 0`` outside assumes the object's phase there equals its mean inside: the oracle's
  floor is not zero (the ~10 % of the probe intensity outside the disc sees the wrong phase). The
  intensity is binned by ``bin_factor`` like the training patterns.
* PtychoNN: ``psi_in * A exp(i phi)`` with ``psi_in`` the probe of the reconstruction's weights (the POA
  object times the probe; the network is trained on vacuum ``(1, 0)`` outside the 0.1-max mask).

The measure, per pattern of ``M`` pixels (``y`` measured counts times ``counts_per_unit``, ``p`` the
predicted intensity)::

    mu_i = max(p_i * sum(y) / sum(p), MU_FLOOR)          # the prediction scaled to the measured total
    d_i  = 2 [y_i log(y_i / mu_i) - (y_i - mu_i)]          # Poisson deviance of pixel i (0 log 0 = 0)
    C    = sum_i d_i / sum_i E[d(Y, mu_i)],  Y ~ Poisson(mu_i)

The denominator is the deviance that Poisson noise alone produces on average if ``mu`` is the truth
(:func:`expected_poisson_deviance`; ``1 + 1/(6 mu)`` for bright pixels, much less than 1 for the dark
pixels outside the disc, which a plain mean over pixels would count as ``1`` each). So, where the data are
electron counts:

* ``C ~ 1``: the prediction explains the pattern to within shot noise (the floor for counts data);
* ``C >> 1``: the pattern holds structure the prediction does not -- the network was outside what it
  knows, or the forward model above does not hold (e.g. dynamical scattering the network smoothed over);
* ``C < 1`` is possible only by chance or for data that are not Poisson (noise-free simulations, or
  patterns resampled from detector pixels finer than the network pixels: fractional counts, correlated
  neighbours).

For noise-free data the floor is the network's own error (0 for a perfect predictor under AIRPI's forward
model) and ``C`` is the mismatch in units of the shot noise at the dose the counts imply: data in other
units (fraction of the beam, gain-normalised detectors) need ``counts_per_unit`` (electrons per unit of
the data, option ``<method>.consistency_counts_per_unit``), else the value is "as if one unit were one
electron" -- still monotone in the mismatch, usable as a map, but not on the absolute scale. Patterns
without counts give NaN.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from models.inputs import probe_intensity

__all__ = [
    "MU_FLOOR",
    "ConsistencyMap",
    "diffraction_intensity",
    "expected_poisson_deviance",
    "normalised_poisson_deviance",
    "poisson_deviance_terms",
]

#: smallest predicted count per pixel (electrons): a pixel the prediction leaves dark but that holds a
#: count costs ``2 [log(1 / MU_FLOOR) - 1] ~ 25.6`` instead of infinity
MU_FLOOR = 1e-6

# E[d(Y, mu)] tabulated on log10(mu) in [_LOG_LOW, _LOG_HIGH], _PER_DECADE points a decade; above: the
# asymptotic 1 + 1/(6 mu) + 1/(6 mu^2) (McCullagh & Nelder 1989, sec. 6.2), below: 2 mu log(1/mu)
_LOG_LOW, _LOG_HIGH, _PER_DECADE = -6.0, 3.0, 100


def diffraction_intensity(exit_wave: Tensor) -> Tensor:
    """Detector intensity ``|F psi|^2`` (B, K, K) of real-space exit waves, zero frequency at ``K // 2``.

    Orthonormal FFT (the total equals ``sum |psi|^2``), the convention of the kernel shards and of
    :func:`models.inputs.probe_intensity` (which this is).
    """
    return probe_intensity(exit_wave)


def poisson_deviance_terms(y: Tensor, mu: Tensor) -> Tensor:
    """Per-pixel Poisson deviance ``2 [y log(y / mu) - (y - mu)]`` (``0 log 0 = 0``), elementwise.

    ``y`` measured counts (>= 0), ``mu`` expected counts (> 0), same shape; the result is >= 0 and 0 only
    where ``y == mu``.
    """
    return 2.0 * (torch.xlogy(y, y / mu) - (y - mu))


@functools.lru_cache(maxsize=1)
def _expected_table() -> np.ndarray:
    """E[d(Y, mu)] for Y ~ Poisson(mu) on the log grid of :data:`_LOG_LOW` .. :data:`_LOG_HIGH` (float64),
    summed over ``y`` within ``mu +- (12 sqrt(mu) + 40)`` (a sum over every ``y`` from 0 agrees to 1e-12).

    Rows of similar window width are summed as one dense array (~0.2 M terms in all, ~10 ms), in torch:
    importing scipy.special for it took 0.15 s, a quarter of PtychoNN's whole reconstruction of a 48 x 48
    scan (session 14)."""
    log_mu = torch.linspace(_LOG_LOW, _LOG_HIGH, round((_LOG_HIGH - _LOG_LOW) * _PER_DECADE) + 1,
                            dtype=torch.float64)  # fmt: skip
    mu = 10.0**log_mu
    reach = 12.0 * mu.sqrt() + 40.0
    start = (mu - reach).clamp_min(0.0).floor()
    width = (((mu + reach).ceil() - start + 1) / 64).ceil().long() * 64  # grouped to multiples of 64
    table = torch.empty_like(mu)
    for w in width.unique().tolist():
        rows = (width == w).nonzero()[:, 0]
        y = start[rows, None] + torch.arange(w, dtype=torch.float64)[None, :]
        m = mu[rows, None]
        pmf = torch.exp(torch.xlogy(y, m) - m - torch.lgamma(y + 1.0))
        table[rows] = (pmf * poisson_deviance_terms(y, m)).sum(1)
    return table.numpy()


def expected_poisson_deviance(mu: Tensor) -> Tensor:
    """``E[2 (Y log(Y / mu) - (Y - mu))]`` for ``Y ~ Poisson(mu)``, elementwise (``mu`` > 0 in counts).

    Exact sums tabulated on ``10^-6 .. 10^3`` counts (100 points a decade, linear in ``log10 mu``, relative
    error below 1e-4); ``1 + 1/(6 mu) + 1/(6 mu^2)`` above, ``2 mu log(1 / mu)`` below. Tends to 1 for
    bright pixels (one degree of freedom each) and to 0 for dark ones.
    """
    table = torch.as_tensor(_expected_table(), dtype=mu.dtype, device=mu.device)
    mu = mu.clamp_min(1e-30)
    position = (torch.log10(mu) - _LOG_LOW) * _PER_DECADE
    index = position.floor().clamp(0, table.numel() - 2)
    frac = (position - index).clamp(0, 1)
    i = index.long()
    inside = table[i] * (1 - frac) + table[i + 1] * frac
    high = 1.0 + 1.0 / (6.0 * mu) + 1.0 / (6.0 * mu * mu)
    low = 2.0 * mu * torch.log(1.0 / mu)
    value = torch.where(position > table.numel() - 1, high, inside)
    return torch.where(position < 0, low, value)


def normalised_poisson_deviance(
    measured: Tensor, predicted: Tensor, counts_per_unit: float | None = None
) -> Tensor:
    """Forward-model consistency ``C`` (B,) of predicted intensities with measured patterns (B, ..., K, K).

    ``C = sum_i d_i / sum_i E[d(Y, mu_i)]`` with ``mu`` the prediction scaled to the measured total (the
    module docstring): about 1 where the prediction explains electron-count data to within shot noise.
    ``counts_per_unit`` (electrons per unit of ``measured``; None = 1) scales the data first. Negative
    measured values (background-subtracted data) count as 0; a pattern without counts gives NaN.
    Float32 on the input's device.
    """
    scale = 1.0 if counts_per_unit is None else float(counts_per_unit)
    y = measured.float().flatten(1).clamp_min(0.0) * scale
    p = predicted.float().flatten(1).clamp_min(0.0)
    total = y.sum(1, keepdim=True)
    mu = (p * (total / p.sum(1, keepdim=True).clamp_min(1e-30))).clamp_min(MU_FLOOR)
    numerator = poisson_deviance_terms(y, mu).sum(1)
    denominator = expected_poisson_deviance(mu).sum(1)
    value = numerator / denominator
    return torch.where(total[:, 0] > 0, value, torch.full_like(value, float("nan")))


class ConsistencyMap:
    """The (Rx, Ry) map of :func:`normalised_poisson_deviance`, filled batch by batch on the device.

    ``add(e, c, measured, predicted)`` evaluates a batch at effective positions ``(e, c)`` (no host
    synchronisation); :meth:`array` returns the float32 map (NaN where no position was added).
    """

    def __init__(self, shape: tuple[int, int], device: torch.device, counts_per_unit: float | None = None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.counts_per_unit = counts_per_unit
        self.values = torch.full((self.shape[0] * self.shape[1],), float("nan"), device=device)

    def add(self, e: np.ndarray, c: np.ndarray, measured: Tensor, predicted: Tensor) -> Tensor:
        """Evaluate and store one batch; returns its values (B,)."""
        values = normalised_poisson_deviance(measured, predicted, self.counts_per_unit)
        self.put(e, c, values)
        return values

    def put(self, e: np.ndarray, c: np.ndarray, values: Tensor) -> None:
        """Store values (B,) computed elsewhere at effective positions ``(e, c)``."""
        flat = torch.as_tensor(np.asarray(e) * self.shape[1] + np.asarray(c), device=self.values.device)
        self.values.index_copy_(0, flat.long(), values.to(self.values.dtype))

    def array(self) -> np.ndarray:
        """The map (Rx, Ry), float32."""
        return self.values.reshape(self.shape).cpu().numpy().astype(np.float32)


def map_and_summary(trust: ConsistencyMap | np.ndarray | None) -> tuple[np.ndarray | None, dict[str, float]]:
    """``(map, info entries)`` of a reconstruction's trust map: the float32 (Rx, Ry) map (from a
    :class:`ConsistencyMap` or an array) and ``{"consistency_median": ...}`` (NaN positions ignored);
    ``(None, {})`` when the map is off."""
    if trust is None:
        return None, {}
    values = trust.array() if isinstance(trust, ConsistencyMap) else np.asarray(trust, dtype=np.float32)
    return values, {"consistency_median": float(np.nanmedian(values))}
