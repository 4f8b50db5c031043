"""Phase unwrapping of reconstructions (evaluation.unwrap) and its use by the complex-wave stitchers.

A strong phase object (heavy columns of a thick crystal carry more than pi) must come back as its phase,
not as ``angle()`` with holes at the columns: the SrTiO3 reference scan (truth up to 6 rad) scored AIRPI at
xc 0.47 at 1e5 e/A^2 because of wraps, 0.93 once unwrapped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_stitching import K, airpi_oracle, as_scan, gmax_of, sim, truth_on  # noqa: F401  (fixture)

from evaluation.metrics import xc
from evaluation.networks import airpi_reconstruct
from evaluation.unwrap import count_wraps, unwrap_phase_image


def columns(n: int = 96, peak_rad: float = 6.0) -> np.ndarray:
    """Smooth Gaussian columns (sigma 3 px) on a 4 x 4 lattice, peak ``peak_rad``, background 0.2 rad."""
    x = np.arange(n)
    image = np.full((n, n), 0.2)
    for cx in range(12, n, 24):
        for cy in range(12, n, 24):
            image += (peak_rad - 0.2) * np.exp(-((x[:, None] - cx) ** 2 + (x[None, :] - cy) ** 2) / 18.0)
    return image


def test_wrapped_columns_come_back_exactly():
    truth = columns()
    wrapped = np.angle(np.exp(1j * truth))
    assert count_wraps(wrapped) > 0
    unwrapped, wraps = unwrap_phase_image(wrapped.astype(np.float32))
    assert wraps == count_wraps(wrapped)
    assert unwrapped.dtype == np.float32
    # the background (the median) keeps its value, so no 2 pi offset either
    np.testing.assert_allclose(unwrapped, truth, atol=1e-5)


def test_an_image_without_wraps_is_returned_unchanged():
    weak = columns(peak_rad=2.5) - 1.0  # inside (-pi, pi], neighbour steps < pi
    out, wraps = unwrap_phase_image(weak)
    assert wraps == 0
    np.testing.assert_array_equal(out, weak)


def test_invalid_pixels_keep_their_value_and_do_not_steer_the_unwrapping():
    truth = columns()
    wrapped = np.angle(np.exp(1j * truth))
    valid = np.ones(truth.shape, bool)
    valid[:, :6] = False
    wrapped[:, :6] = np.random.default_rng(0).uniform(-np.pi, np.pi, (truth.shape[0], 6))  # noise outside
    out, _ = unwrap_phase_image(wrapped, valid)
    np.testing.assert_array_equal(out[:, :6], wrapped[:, :6])
    np.testing.assert_allclose(out[:, 6:], truth[:, 6:], atol=1e-5)


def test_unwrap_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError, match="valid has shape"):
        unwrap_phase_image(np.zeros((8, 8)), np.ones((8, 7), bool))


def test_airpi_stitching_of_a_strong_phase_object_returns_its_phase(sim):  # noqa: F811
    strong = dataclasses.replace(sim, phase=sim.phase * (5.0 / sim.phase.max()))  # columns up to 5 rad
    options = {"pixels": K, "gmax_invA": gmax_of(sim), "oversampling": 2, "progress": False}
    recon = airpi_reconstruct(as_scan(strong), airpi_oracle(strong), **options)
    truth = truth_on(strong, recon)
    assert recon.info["phase_wraps_removed"] > 0
    np.testing.assert_allclose(recon.phase, truth, atol=1e-4)
    wrapped = airpi_reconstruct(as_scan(strong), airpi_oracle(strong), unwrap_phase=False, **options)
    assert wrapped.info["phase_wraps_removed"] == 0 and wrapped.phase.max() <= np.pi + 1e-6
    assert xc(truth, wrapped.phase) < 0.9  # what the suite scored before
