"""The shipped reference model (pretrained/airpi_reference.ckpt, made by experiment=cpu_reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scan4d_helpers import simulate_scan

from evaluation.cli import PRETRAINED, default_checkpoint, run_method
from evaluation.io import Scan4D
from evaluation.networks import identify_checkpoint, load_network, optics_mismatch, training_ranges

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "airpi_reference.ckpt"


def test_shipped_model_is_small_safe_to_load_and_documented():
    assert SHIPPED.is_file() and default_checkpoint("airpi") == SHIPPED
    assert PRETRAINED["airpi"] == SHIPPED.name  # the default, and the one a tie goes to
    assert SHIPPED.stat().st_size < 20e6
    checkpoint = torch.load(SHIPPED, map_location="cpu", weights_only=True)  # no pickled objects
    assert identify_checkpoint(checkpoint) == "airpi" and "optimizer_states" not in checkpoint
    info = checkpoint["deepstem"]
    assert training_ranges(checkpoint) == {
        "energy_eV": (300000.0, 300000.0),
        "semiangle_mrad": (20.0, 20.0),
        "Cs_A": (0.0, 0.0),
        "defocus_A": (0.0, 0.0),
        "alpha_over_gmax": (0.5, 0.5),
        "scan_step_A": (0.24, 0.36),
        "dose_e_per_cbed": (10.0, 1e9),
    }
    assert "task_name: cpu_reference" in info["config_yaml"]
    for secret in ("api_key: ", "MP_API_KEY=", "WANDB_API_KEY="):
        assert secret not in info["config_yaml"]
    card = (ROOT / "pretrained" / "README.md").read_text()
    assert "experiment=cpu_reference" in card and "docs/results.md" in card


def test_shipped_model_reconstructs_a_scan_and_flags_other_optics():
    """On a weak phase object at the optics it was trained for (but a 0.49 A step, beyond its 0.36 A), the
    stitched phase is finite and on the object's grid, at the model's alpha / gmax; at 80 kV the energy
    mismatch is reported."""
    torch.set_num_threads(1)
    model = load_network(SHIPPED, "airpi", "cpu")
    sim = simulate_scan(scan_px=8, cbed_px=64, energy_eV=300e3, semiangle_mrad=20.0, gmax_over_alpha=2.0)
    scan = Scan4D(
        data=sim.data,
        energy_eV=sim.energy_eV,
        semiangle_mrad=sim.semiangle_mrad,
        scan_step_A=(sim.scan_step_A, sim.scan_step_A),
        k_pixel_invA=(sim.k_pixel_invA, sim.k_pixel_invA),
    )
    assert [m.split("=")[0] for m in optics_mismatch(model, scan)] == ["scan_step_A"]
    recon = run_method(scan, "airpi", {"batch_size": 16}, progress=False, model=model, device="cpu")
    assert np.isfinite(recon.phase).all() and recon.phase.shape[0] >= 8
    assert recon.info["alpha_over_gmax"] == pytest.approx(0.5)  # gmax = 2 alpha, the training grid
    assert recon.info["alpha_over_gmax_from"] == "model"
    assert recon.pixel_size_A[0] == pytest.approx(sim.scan_step_A, rel=1e-6)
    other = Scan4D(
        data=sim.data, energy_eV=80e3, semiangle_mrad=20.0, scan_step_A=(0.3, 0.3), k_pixel_invA=(0.1, 0.1)
    )
    assert [m.split("=")[0] for m in optics_mismatch(model, other)] == ["energy_eV"]


def test_the_reference_experiment_ships_its_best_epoch_by_validation_xc():
    """Issue #13: the shipped model was the last epoch (val xc 0.490), not the best (0.540)."""
    from test_quickstart import compose_train

    cfg = compose_train(["experiment=cpu_reference"])
    assert cfg.callbacks.model_checkpoint.monitor == "val/xc_object_phase"  # logged by AIRPILightning
    assert cfg.callbacks.model_checkpoint.mode == "max"
    assert cfg.evaluate.checkpoint == "best"
