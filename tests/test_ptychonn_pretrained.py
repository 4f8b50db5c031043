"""The shipped PtychoNN (pretrained/ptychonn_cpu.ckpt, made by experiment=ptychonn_cpu;
docs/results_ptychonn.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scan4d_helpers import as_scan4d, simulate_scan, truth_on
from shipped_helpers import check_shipped

from evaluation.cli import choose_checkpoint
from evaluation.io import Scan4D
from evaluation.metrics import xc
from evaluation.networks import load_network, optics_mismatch, reconstruct_with_network

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "ptychonn_cpu.ckpt"


pytestmark = pytest.mark.usefixtures("repository_pretrained")


def test_shipped_ptychonn_is_small_safe_to_load_documented_and_the_default():
    checkpoint = check_shipped("ptychonn_cpu.ckpt", "ptychonn", "ptychonn_cpu")
    ranges = checkpoint["deepstem"]["trained_for"]  # written by the ModelProvenance callback in training
    assert ranges["energy_eV"] == [200e3, 300e3] and 0.29 < ranges["alpha_over_gmax"][0] < 0.31
    choice = choose_checkpoint("ptychonn")
    assert choice is not None and choice[0] == SHIPPED


def _scan(energy_eV: float) -> tuple[Scan4D, object]:
    sim = simulate_scan(scan_px=16, cbed_px=64, energy_eV=energy_eV, semiangle_mrad=20.0, gmax_over_alpha=2.0)
    return as_scan4d(sim), sim


def test_shipped_ptychonn_reconstructs_a_weak_phase_scan_and_warns_outside_its_optics():
    torch.set_num_threads(1)
    scan, sim = _scan(300e3)
    model = load_network(SHIPPED, "ptychonn")
    assert optics_mismatch(model, scan) == []
    recon = reconstruct_with_network(scan, "ptychonn", model, device="cpu", progress=False)
    truth = truth_on(sim, recon)
    score = xc(recon.phase, truth)
    # an untrained network of the same layout on the same scan, for scale
    untrained = load_network(SHIPPED, "ptychonn")
    for p in untrained.parameters():
        torch.nn.init.normal_(p, std=0.05)
    # fp32: random weights give a near-flat phase that bf16 (auto on a CPU with bf16 units) rounds to constant
    untrained_recon = reconstruct_with_network(
        scan, "ptychonn", untrained, device="cpu", progress=False, precision="32"
    )
    baseline = xc(untrained_recon.phase, truth)
    assert score > 0.5 and score > baseline + 0.3, (score, baseline)
    # 80 kV lies outside its 200-300 kV: named
    messages = optics_mismatch(model, _scan(80e3)[0])
    assert any("energy_eV" in m for m in messages)
