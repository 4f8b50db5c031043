"""The shipped half-width AIRPI (pretrained/airpi_generalist_slim.ckpt, issue #17): distilled from the shipped
generalist, a quarter of its parameters, the same recorded ranges, an explicit ``ckpt=`` choice that the
automatic pick never takes over the generalist, and on a kernel it answers like its teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scan4d_helpers import as_scan4d, simulate_scan, truth_on

from evaluation.cli import choose_checkpoint, run_method
from evaluation.metrics import xc
from evaluation.networks import load_network, training_ranges
from tests.shipped_helpers import check_shipped
from tests.test_training_ranges import _calibration as _scan

ROOT = Path(__file__).resolve().parents[1]
SLIM = ROOT / "pretrained" / "airpi_generalist_slim.ckpt"
GENERALIST = ROOT / "pretrained" / "airpi_generalist.ckpt"

pytestmark = pytest.mark.usefixtures("repository_pretrained")


def test_slim_is_small_weights_only_documented_and_a_quarter_of_the_teacher():
    checkpoint = check_shipped("airpi_generalist_slim.ckpt", "airpi", "airpi_slim_distill")
    hparams = checkpoint["hyper_parameters"]
    assert hparams["net"]["filters"] == 16 and hparams["teacher_ckpt"].endswith("airpi_generalist.ckpt")
    slim, teacher = load_network(SLIM, "airpi"), load_network(GENERALIST, "airpi")
    count = {name: sum(p.numel() for p in m.net.parameters()) for name, m in (("s", slim), ("t", teacher))}
    assert 0.2 < count["s"] / count["t"] < 0.3  # half the width: a quarter of the weights and FLOPs
    assert training_ranges(slim) == training_ranges(teacher)


def test_the_automatic_pick_keeps_the_full_width_models():
    for scan in (
        _scan(energy_eV=200e3, semiangle_mrad=25.0, scan_step_A=(0.2, 0.2)),  # generalist only
        _scan(),  # 300 kV / 20 mrad: the specialist, the default
    ):
        path, _ = choose_checkpoint("airpi", scan)
        assert path != SLIM


def test_slim_reconstructs_a_scan_where_an_untrained_net_does_not():
    """A weak phase object scanned at optics inside both models' ranges (300 kV, 20 mrad, Cs 0, 0.33 A step,
    detector 3 alpha): the student's stitched phase matches the truth (registered xc, on its pixels)
    where an untrained network of the same shape does not."""
    torch.set_num_threads(1)
    sim = simulate_scan(scan_px=16, cbed_px=64, energy_eV=300e3, semiangle_mrad=20.0, gmax_over_alpha=3.0)
    scan = as_scan4d(sim)
    slim = load_network(SLIM, "airpi")
    torch.manual_seed(0)
    fresh = type(slim)(**{**slim.hparams, "teacher_ckpt": None}).eval()
    fresh.deepstem_info = slim.deepstem_info
    scores = {}
    for name, model in (("slim", slim), ("fresh", fresh)):
        recon = run_method(scan, "airpi", {"batch_size": 16}, progress=False, model=model, device="cpu")
        scores[name] = xc(truth_on(sim, recon), recon.phase, register=True)
    assert scores["slim"] > 0.45 and scores["slim"] > scores["fresh"] + 0.3, scores
