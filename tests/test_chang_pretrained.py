"""The shipped Chang U-Net (pretrained/chang_hbn.ckpt, made by experiment=chang_hbn; docs/results_chang.md)
and its default use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan, truth_on

from evaluation.cli import choose_checkpoint
from evaluation.io import Scan4D
from evaluation.metrics import xc
from evaluation.networks import identify_checkpoint, load_network, optics_mismatch, reconstruct_with_network

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "chang_hbn.ckpt"


@pytest.fixture(autouse=True)
def _shipped_folder(monkeypatch):
    monkeypatch.delenv("DEEPSTEM_PRETRAINED_DIR", raising=False)


def test_shipped_chang_is_small_safe_to_load_documented_and_the_default():
    assert SHIPPED.is_file() and SHIPPED.stat().st_size <= 20e6
    checkpoint = torch.load(SHIPPED, map_location="cpu", weights_only=True)  # no pickled objects
    assert identify_checkpoint(checkpoint) == "chang_unet" and "optimizer_states" not in checkpoint
    info = checkpoint["deepstem"]
    assert "task_name: chang_hbn" in info["config_yaml"] and "aperture_edge_mrad:" in info["config_yaml"]
    assert info["trained_for"]["energy_eV"] == [300e3, 300e3] and info["trained_for"]["defocus_A"] == [
        80.0,
        200.0,
    ]
    assert info["geometry"]["diffraction_px"] == 32 and info["geometry"]["collection_ratio"] == 2
    choice = choose_checkpoint("chang_unet")
    assert choice is not None and choice[0] == SHIPPED
    card = (ROOT / "pretrained" / "README.md").read_text()
    assert "chang_hbn.ckpt" in card and "experiment=chang_hbn" in card


def _scan(defocus_A: float) -> tuple[Scan4D, object]:
    sim = simulate_scan(scan_px=12, cbed_px=64, energy_eV=300e3, semiangle_mrad=17.1, gmax_over_alpha=2.0,
                        defocus_A=defocus_A)  # fmt: skip
    scan = Scan4D(data=sim.data, energy_eV=sim.energy_eV, semiangle_mrad=sim.semiangle_mrad,
                  scan_step_A=(sim.scan_step_A,) * 2, k_pixel_invA=(sim.k_pixel_invA,) * 2,
                  defocus_A=defocus_A, Cs_A=1.0e4)  # fmt: skip
    return scan, sim


def test_shipped_chang_reconstructs_a_defocused_scan_better_than_an_untrained_network():
    torch.set_num_threads(1)
    scan, sim = _scan(120.0)
    model = load_network(SHIPPED, "chang_unet")
    assert optics_mismatch(model, scan) == []
    recon = reconstruct_with_network(scan, "chang_unet", model, device="cpu", progress=False)
    score = xc(recon.phase, truth_on(sim, recon))
    untrained = load_network(SHIPPED, "chang_unet")
    for p in untrained.parameters():
        torch.nn.init.normal_(p, std=0.02)
    plain = reconstruct_with_network(
        scan, "chang_unet", untrained, device="cpu", progress=False, precision="32"
    )
    baseline = xc(plain.phase, truth_on(sim, plain))
    # measured 0.37 against -0.06 (bf16, 2026-12-03)
    assert score > 0.25 and score > baseline + 0.2, (score, baseline)
    # a focused probe lies outside its 80-200 A defocus: named
    assert any("defocus_A" in m for m in optics_mismatch(model, _scan(10.0)[0]))


def test_chang_graphene_experiment_and_sparse_suite_compose():
    """experiment=chang_graphene is chang_hbn's recipe at 80 kV / 31.5 mrad (soft rim kept), and its suite
    scores one held-out file at paper 001's four steps (0.132 .. 0.528 A) through scan_stride."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train = compose(config_name="train", overrides=["experiment=chang_graphene"])
        suite = compose(config_name="evaluate", overrides=["suite=chang_graphene"]).suite
    forward = train.data.forward_model
    assert (forward.energy_eV, forward.semiangle_mrad) == (80e3, 31.5)
    assert list(forward.aperture_edge_mrad) == [0.0, 3.0] and train.task_name == "chang_graphene"
    dense = suite.scans.graphene_step0132
    steps = {
        name: dense.generate.settings.scan_step_A * scan.get("scan_stride", 1)
        for name, scan in suite.scans.items()
        if scan.path == dense.path
    }
    assert sorted(round(v, 3) for v in steps.values()) == [0.132, 0.264, 0.396, 0.528]
    assert dense.generate.specimen.material == "graphene" and 80 <= dense.generate.settings.defocus_A <= 200
