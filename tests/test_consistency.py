"""The trust map (issue 17.4): forward-model consistency of network predictions with their CBEDs.

The normalised Poisson deviance is checked against hand-computed values and against Poisson draws (where
it must be ~1 at any dose); with the ORACLE predictors of ``test_stitching`` (the true exit wave, phase or
object) it sits at its floor (0 for noise-free data under AIRPI's and PtychoNN's exact forward model, ~1
at shot noise), and it rises when the scan is not what the predictor assumes (another semi-angle, another
step) or the predictor is not the truth (zero phase, an untrained network). The CLI writes it as dataset
``consistency`` and as a PNG panel.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from scan4d_helpers import simulate_scan
from scipy.stats import poisson
from test_stitching import K, airpi_oracle, as_scan, gmax_of, window

from datagen import store
from evaluation.cli import reconstruct_main, write_reconstruction
from evaluation.io import save_4dstem
from evaluation.networks import (
    ScanGeometry,
    airpi_reconstruct,
    chang_reconstruct,
    model_predictor,
    ptychonn_reconstruct,
)
from evaluation.networks.chang import _chang_probe_and_mask
from evaluation.networks.consistency import (
    MU_FLOOR,
    expected_poisson_deviance,
    normalised_poisson_deviance,
    poisson_deviance_terms,
)
from evaluation.references import Reconstruction
from models.lightning import AIRPILightning
from physics import probe

DOSE = 1e4  # electrons per CBED of the Poisson scans and the counts_per_unit of the noise-free ones


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sim():
    return simulate_scan(scan_px=16, cbed_px=K)  # noise-free, fraction of the beam per pixel


@pytest.fixture(scope="module")
def noisy():
    return simulate_scan(scan_px=16, cbed_px=K, dose_per_cbed=DOSE)  # the same object, Poisson counts


def _poisson_expectation(mu: float) -> float:
    """E[2 (Y log(Y / mu) - (Y - mu))], Y ~ Poisson(mu), summed directly (independent of the module)."""
    y = np.arange(0, int(mu + 20 * math.sqrt(mu) + 60))
    terms = np.where(y > 0, y * np.log(np.where(y > 0, y, 1) / mu), 0.0) - (y - mu)
    return float(np.sum(poisson.pmf(y, mu) * 2 * terms))


# ----------------------------------------------------------------------------------------------------------
# the formula
# ----------------------------------------------------------------------------------------------------------


def test_deviance_terms_by_hand():
    y = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    mu = torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    # 2 [0 - (0 - 1)] = 2; 0; 2 [2 log 2 - 1]; 0
    expected = torch.tensor([2.0, 0.0, 4 * math.log(2) - 2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(poisson_deviance_terms(y, mu), expected)


def test_normalised_deviance_by_hand():
    """Prediction (2, 2, 2, 6) scaled to the measured total 6 is mu = (1, 1, 1, 3); C = 4 log 2 / sum E[d]."""
    measured = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    predicted = torch.tensor([[[2.0, 2.0], [2.0, 6.0]]])
    denominator = 3 * _poisson_expectation(1.0) + _poisson_expectation(3.0)
    value = normalised_poisson_deviance(measured, predicted)
    assert value.shape == (1,)
    assert float(value[0]) == pytest.approx(4 * math.log(2) / denominator, rel=1e-3)
    # counts_per_unit scales the data before the deviance: data in units of 1/100 electron
    scaled = normalised_poisson_deviance(measured / 100, predicted, counts_per_unit=100.0)
    torch.testing.assert_close(scaled, value)


@pytest.mark.parametrize("mu", [1e-5, 3e-3, 0.05, 0.5, 1.0, 3.0, 25.0, 400.0, 5e3])
def test_expected_deviance_is_the_poisson_mean(mu):
    assert float(expected_poisson_deviance(torch.tensor([mu], dtype=torch.float64))[0]) == pytest.approx(
        _poisson_expectation(mu), rel=2e-4
    )


def test_poisson_data_from_the_prediction_give_one_at_any_dose():
    """Draws from the predicted pattern itself (dark rim + bright disc, like a CBED): C ~ 1."""
    k = torch.arange(32, dtype=torch.float64) - 16
    radius = torch.hypot(k[:, None], k[None, :])
    shape = torch.where(radius < 6, 1.0, 0.002 * torch.exp(-radius / 8))
    generator = torch.Generator().manual_seed(0)
    for dose in (30.0, 1e3, 1e5):
        mu = (shape / shape.sum() * dose).expand(400, 32, 32)
        draws = torch.poisson(mu, generator=generator)
        values = normalised_poisson_deviance(draws, shape.expand(400, 32, 32))
        assert float(values.mean()) == pytest.approx(1.0, abs=0.03), dose
        # a plain mean over pixels would not: the dark pixels contribute far less than 1 each
        plain = poisson_deviance_terms(draws, mu.clamp_min(MU_FLOOR)).mean((1, 2))
        assert float(plain.mean()) < 0.9


def test_empty_patterns_are_nan_and_dark_predictions_finite():
    measured = torch.zeros(2, 4, 4)
    measured[1, 0, 0] = 5.0
    predicted = torch.zeros(2, 4, 4)
    predicted[:, 1, 1] = 1.0  # nothing predicted where the counts fell
    values = normalised_poisson_deviance(measured, predicted)
    assert math.isnan(float(values[0]))
    assert math.isfinite(float(values[1])) and float(values[1]) > 10


# ----------------------------------------------------------------------------------------------------------
# AIRPI: the predicted exit wave
# ----------------------------------------------------------------------------------------------------------


def _airpi(scan, predictor, *, sim, **options):
    """AIRPI on the K-pixel network grid of the oracle tests (``gmax`` of the simulation ``sim``)."""
    return airpi_reconstruct(scan, predictor, pixels=K, gmax_invA=gmax_of(sim), progress=False, **options)


def test_airpi_oracle_sits_at_the_floor(sim, noisy):
    exact = _airpi(as_scan(sim), airpi_oracle(sim), sim=sim, consistency_counts_per_unit=DOSE)
    assert exact.consistency.shape == (16, 16) and exact.consistency.dtype == np.float32
    assert float(exact.consistency.max()) < 1e-3  # the exact forward model: float32 round-off only
    assert exact.info["consistency_median"] == pytest.approx(float(np.median(exact.consistency)))
    shot = _airpi(as_scan(noisy), airpi_oracle(sim), sim=sim)
    assert 0.9 < float(np.median(shot.consistency)) < 1.1  # shot noise at 1e4 electrons per CBED


def test_airpi_consistency_rises_for_a_scan_outside_the_oracle(sim, noisy):
    floor = float(np.median(_airpi(as_scan(noisy), airpi_oracle(sim), sim=sim).consistency))
    # CBEDs taken at 25 mrad, labelled and predicted at 20 mrad
    wide = simulate_scan(scan_px=16, cbed_px=K, semiangle_mrad=25.0, dose_per_cbed=DOSE)
    wrong_angle = _airpi(as_scan(noisy, data=wide.data), airpi_oracle(sim), sim=sim)
    assert float(np.median(wrong_angle.consistency)) > 20 * floor
    # the calibration says 1.5 x the true step: the oracle predicts the object at the wrong places
    wrong_step = replace(as_scan(sim), scan_step_A=(1.5 * sim.scan_step_A,) * 2)
    right = _airpi(as_scan(sim), airpi_oracle(sim), sim=sim, consistency_counts_per_unit=DOSE)
    moved = _airpi(wrong_step, airpi_oracle(sim), sim=sim, consistency_counts_per_unit=DOSE)
    assert float(np.median(moved.consistency)) > 0.1 > 100 * float(np.median(right.consistency))
    assert float(moved.consistency[0, 0]) < 1e-3  # position (0, 0) is where both steps agree


def test_airpi_untrained_network_is_far_from_the_oracle(noisy, sim):
    torch.manual_seed(0)
    model = AIRPILightning(net={"filters": 4, "depth": 1, "block_convs": 1}).eval()
    untrained = _airpi(as_scan(noisy), model_predictor(model, "airpi", "32", False), sim=sim)
    assert float(np.median(untrained.consistency)) > 10.0  # the oracle: ~1 (above)


def test_airpi_consistency_follows_data_repetition_and_can_be_switched_off(sim):
    repeated = _airpi(
        as_scan(sim), airpi_oracle(sim), sim=sim, data_repetition=True, consistency_counts_per_unit=DOSE
    )
    assert repeated.consistency.shape == (8, 8)  # the effective positions at twice the step
    assert np.all(np.isfinite(repeated.consistency))
    off = _airpi(as_scan(sim), airpi_oracle(sim), sim=sim, consistency=False)
    assert off.consistency is None and "consistency_median" not in off.info


# ----------------------------------------------------------------------------------------------------------
# Chang U-Net: P exp(i phi) on the training grid; PtychoNN: psi_in A exp(i phi)
# ----------------------------------------------------------------------------------------------------------


def _chang_oracle(s, pixel_A: float, mask: np.ndarray):
    def oracle(inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        patches = []
        for x, y in positions.numpy():
            phase = window(s, x, y, pixel_A, 32)
            patches.append(np.where(mask, phase - phase[mask].mean(), 0.0))  # as the labels
        return torch.from_numpy(np.stack(patches).astype(np.float32))

    return oracle


def test_chang_oracle_is_below_wrong_inputs_and_a_flat_prediction(sim, noisy):
    geometry = ScanGeometry.from_scan(as_scan(sim))
    ratio = gmax_of(sim) / geometry.alpha_invA
    _, pixel_A, mask = _chang_probe_and_mask(geometry, 32, 2, ratio, 0.9)
    oracle = _chang_oracle(sim, pixel_A, mask)

    def run(scan, predictor):
        result = chang_reconstruct(scan, predictor, collection_ratio=ratio, progress=False)
        assert result.consistency.shape == (16, 16)
        return float(np.median(result.consistency))

    floor = run(as_scan(noisy), oracle)
    # the floor is not 1: phi = 0 outside the disc, and binned 64-pixel intensities are not this
    # simulation's 32-point FFT; a flat prediction and a scan at another semi-angle are well above it
    assert run(as_scan(noisy), lambda i, p: torch.zeros(len(i), 32, 32)) > 4 * floor
    wide = simulate_scan(scan_px=16, cbed_px=K, semiangle_mrad=25.0, dose_per_cbed=DOSE)
    assert run(as_scan(noisy, data=wide.data), oracle) > 4 * floor


def test_ptychonn_oracle_sits_at_the_floor_and_rises_for_a_flat_prediction(sim, noisy):
    gmax = gmax_of(sim)
    psi = probe(sim.energy_eV, sim.semiangle_mrad, K, gmax_invA=gmax)
    inside = np.abs(psi) ** 2 > 0.1 * (np.abs(psi) ** 2).max()

    def oracle(masked: bool):
        def predict(inputs: torch.Tensor, positions: torch.Tensor):
            phases = [window(sim, x, y, 1 / (2 * gmax), K) for x, y in positions.numpy()]
            phase = torch.from_numpy(np.stack(phases).astype(np.float32))
            if masked:  # the training label: vacuum (1, 0) outside the 0.1-max mask
                phase = torch.where(torch.from_numpy(inside), phase, 0.0)
            return torch.ones_like(phase), phase

        return predict

    def run(scan, predictor, **options):
        result = ptychonn_reconstruct(scan, predictor, pixels=K, gmax_invA=gmax, progress=False, **options)
        return float(np.median(result.consistency))

    assert run(as_scan(sim), oracle(False), consistency_counts_per_unit=DOSE) < 1e-3  # exact forward model
    shot = run(as_scan(noisy), oracle(True))
    assert 0.8 < shot < 1.2  # the mask's vacuum costs a little above the shot noise
    flat = run(as_scan(noisy), lambda i, p: (torch.ones(len(i), K, K), torch.zeros(len(i), K, K)))
    assert flat > 5 * shot


# ----------------------------------------------------------------------------------------------------------
# output: dataset and PNG panel
# ----------------------------------------------------------------------------------------------------------


def test_write_reconstruction_stores_the_map_and_draws_a_panel(sim, tmp_path):
    result = _airpi(as_scan(sim), airpi_oracle(sim), sim=sim, consistency_counts_per_unit=DOSE)
    h5, png = write_reconstruction(tmp_path / "with.h5", result, 100.0)
    with store.open_checked(h5, store.RECON) as handle:
        np.testing.assert_array_equal(handle["consistency"][()], result.consistency)
        assert handle.attrs["info_consistency_median"] == pytest.approx(result.info["consistency_median"])
    plain = Reconstruction(result.phase, result.pixel_size_A, result.origin_A, "airpi")
    h5_plain, png_plain = write_reconstruction(tmp_path / "without.h5", plain, 100.0)
    with store.open_checked(h5_plain, store.RECON) as handle:
        assert "consistency" not in handle
    with Image.open(png) as a, Image.open(png_plain) as b:
        assert a.size[0] > 1.6 * b.size[0]  # a second panel beside the phase


def _config(folder, *overrides: str):
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(
            config_name="reconstruct", overrides=[f"input={folder}/scan.h5", "progress=false", *overrides]
        )


def test_reconstruct_cli_writes_consistency_unless_switched_off(tmp_path, capsys):
    s = simulate_scan(scan_px=12, cbed_px=48, dose_per_cbed=DOSE)
    save_4dstem(
        tmp_path / "scan.h5", s.data, energy_eV=s.energy_eV, semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A, k_pixel_invA=s.k_pixel_invA,
    )  # fmt: skip
    torch.manual_seed(0)
    module = AIRPILightning(net={"filters": 4, "depth": 1, "block_convs": 1})
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        tmp_path / "airpi.ckpt",
    )
    common = ("method=airpi", f"ckpt={tmp_path}/airpi.ckpt", "airpi.pixels=32", "precision=32")
    on = tmp_path / "on.h5"
    assert reconstruct_main(_config(tmp_path, *common, f"output={on}")) == 0, capsys.readouterr().err
    with store.open_checked(on, store.RECON) as handle:
        trust = handle["consistency"][()]
    assert trust.shape == (12, 12) and np.all(np.isfinite(trust)) and float(trust.min()) > 1.0  # untrained
    off = tmp_path / "off.h5"
    cfg = _config(tmp_path, *common, f"output={off}", "airpi.consistency=false")
    assert reconstruct_main(cfg) == 0, capsys.readouterr().err
    with store.open_checked(off, store.RECON) as handle:
        assert "consistency" not in handle
