"""The dose model Poisson(D * I) in the evaluation suite's noisy scans (physics.dose, issue 12 §2)."""

from __future__ import annotations

import math

import numpy as np

from evaluation.suite import PoissonScan


def test_suite_noise_keeps_the_in_detector_fraction_of_each_position() -> None:
    """Patterns holding 40 % and 95 % of the beam get 0.4 D and 0.95 D counts on average, not D."""
    rng = np.random.default_rng(0)
    rx, ry, k, dose = 6, 50, 12, 2000.0
    shape = rng.random((rx, ry, k, k)) + 0.05
    fraction = np.where(np.arange(rx)[:, None] % 2 == 0, 0.4, 0.95) * np.ones((rx, ry))
    data = (shape / shape.sum(axis=(-2, -1), keepdims=True) * fraction[..., None, None]).astype(np.float32)
    totals = PoissonScan(data, dose, (0,))[:].astype(np.float64).sum(axis=(-2, -1))  # (Rx, Ry)
    for row in range(rx):
        expected = dose * float(data[row].astype(np.float64).sum(axis=(-2, -1)).mean())
        assert abs(totals[row].mean() - expected) < 5 * math.sqrt(expected / ry)
    assert totals[0].mean() < 0.5 * dose
    # the per-pixel mean is D * I
    pixel_mean = np.mean([PoissonScan(data[:1, :1], dose, (s,))[0, 0] for s in range(400)], axis=0)
    np.testing.assert_allclose(
        pixel_mean, dose * data[0, 0], atol=5 * math.sqrt(dose * data[0, 0].max() / 400)
    )
