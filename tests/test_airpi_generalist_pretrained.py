"""The shipped generalist AIRPI (pretrained/airpi_generalist.ckpt, issue #13 section 4): small, safe to load,
documented, its recorded ranges cover the issue's optics, and ``method=airpi`` without ``ckpt`` picks it
for scans the specialist was not trained for while the specialist keeps its own optics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation.cli import PRETRAINED, choose_checkpoint
from evaluation.networks import load_network, optics_mismatch, training_ranges
from physics import scherzer_defocus
from tests.shipped_helpers import check_shipped
from tests.test_training_ranges import _calibration as _scan  # a calibration-only scan stand-in

ROOT = Path(__file__).resolve().parents[1]
GENERALIST = ROOT / "pretrained" / "airpi_generalist.ckpt"


pytestmark = pytest.mark.usefixtures("repository_pretrained")


def test_generalist_is_small_weights_only_and_documented():
    check_shipped("airpi_generalist.ckpt", "airpi", "airpi_generalist_cpu")
    assert PRETRAINED["airpi"] == "airpi_reference.ckpt"  # ties still go to the specialist


def test_generalist_ranges_cover_the_issue_optics():
    ranges = training_ranges(torch.load(GENERALIST, map_location="cpu", weights_only=True))
    assert ranges["energy_eV"] == pytest.approx((200e3, 300e3))
    low, high = ranges["semiangle_mrad"]
    assert low <= 15.01 and high >= 29.99
    assert ranges["Cs_A"] == pytest.approx((0.0, 1.0e4))
    assert ranges["scan_step_A"][0] <= 0.1001 and ranges["scan_step_A"][1] >= 0.349
    low, high = ranges["alpha_over_gmax"]
    assert low <= 0.301 and high >= 0.589  # detectors reaching 1.7 .. 3.3 alpha
    for energy in (200e3, 300e3):  # Scherzer defocus at Cs 0.001 mm lies inside at both energies
        scan = _scan(energy_eV=energy, Cs_A=1.0e4, defocus_A=scherzer_defocus(1.0e4, energy))
        assert optics_mismatch(torch.load(GENERALIST, weights_only=True), scan) == []


def test_method_airpi_without_ckpt_picks_the_model_whose_ranges_cover_the_scan():
    hbn = _scan(
        semiangle_mrad=17.1, Cs_A=1.0e4, defocus_A=scherzer_defocus(1.0e4, 300e3), scan_step_A=(0.25, 0.25)
    )
    path, reason = choose_checkpoint("airpi", hbn)
    assert path == GENERALIST and "its training ranges cover the scan" in reason
    path, _ = choose_checkpoint("airpi", _scan(energy_eV=200e3, semiangle_mrad=25.0, scan_step_A=(0.2, 0.2)))
    assert path == GENERALIST
    path, reason = choose_checkpoint("airpi", _scan())  # both cover 300 kV / 20 mrad: the default specialist
    assert path.name == "airpi_reference.ckpt" and "tie, the default" in reason


def test_generalist_loads_and_runs_on_a_kernel():
    model = load_network(GENERALIST, "airpi")
    x = torch.randn(2, 11, 64, 64)
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (2, 2, 64, 64) and torch.isfinite(out).all()
