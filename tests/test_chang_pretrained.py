"""The shipped Chang U-Net (pretrained/chang_hbn.ckpt, made by experiment=chang_hbn; docs/results_chang.md)
and its default use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from scan4d_helpers import as_scan4d, simulate_scan, truth_on
from shipped_helpers import check_shipped

from evaluation.cli import choose_checkpoint
from evaluation.io import Scan4D
from evaluation.metrics import xc
from evaluation.networks import load_network, optics_mismatch, reconstruct_with_network

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "chang_hbn.ckpt"


pytestmark = pytest.mark.usefixtures("repository_pretrained")


def test_shipped_chang_is_small_safe_to_load_documented_and_the_default():
    info = check_shipped("chang_hbn.ckpt", "chang_unet", "chang_hbn")["deepstem"]
    assert "aperture_edge_mrad:" in info["config_yaml"]
    assert info["trained_for"]["energy_eV"] == [300e3, 300e3] and info["trained_for"]["defocus_A"] == [
        80.0,
        200.0,
    ]
    assert info["geometry"]["diffraction_px"] == 32 and info["geometry"]["collection_ratio"] == 2
    choice = choose_checkpoint("chang_unet")
    assert choice is not None and choice[0] == SHIPPED


def _scan(defocus_A: float, energy_eV: float = 300e3, semiangle_mrad: float = 17.1) -> tuple[Scan4D, object]:
    sim = simulate_scan(scan_px=12, cbed_px=64, energy_eV=energy_eV, semiangle_mrad=semiangle_mrad,
                        gmax_over_alpha=2.0, defocus_A=defocus_A)  # fmt: skip
    return as_scan4d(sim, defocus_A=defocus_A, Cs_A=1.0e4), sim


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
    # measured 0.57 against -0.06 (bf16; 0.37 before the batch-norm re-estimate of session 12)
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
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import EMAWeightAveraging

    # the recipe validates and saves an EMA of the weights (chang_hbn's, session 14)
    assert isinstance(instantiate(train.callbacks.weight_averaging), EMAWeightAveraging)
    dense = suite.scans.graphene_step0132
    steps = {
        name: dense.generate.settings.scan_step_A * scan.get("scan_stride", 1)
        for name, scan in suite.scans.items()
        if scan.path == dense.path
    }
    assert sorted(round(v, 3) for v in steps.values()) == [0.132, 0.264, 0.396, 0.528]
    low, high = sorted(-c10 for c10 in forward.C10_A)
    assert dense.generate.specimen.material == "graphene" and low <= dense.generate.settings.defocus_A <= high


def _forward_model(experiment: str):
    from datagen.stock_images import ChangForwardModel

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        forward = compose(config_name="train", overrides=[f"experiment={experiment}"]).data.forward_model
    model = ChangForwardModel(
        energy_eV=forward.energy_eV, semiangle_mrad=forward.semiangle_mrad, Cs_A=forward.Cs_A, bank=_bank()
    )
    return model, sorted(-c10 for c10 in forward.C10_A)


def _bank():
    from datagen.stock_images import StockImageBank

    if not hasattr(_bank, "bank"):
        _bank.bank = StockImageBank.build()
    return _bank.bank


def _footprint(model, defocus_A: float) -> tuple[int, float]:
    """(pixels of the label mask, fraction of the probe intensity inside the label window) of a probe
    with only defocus (and the model's Cs)."""
    import numpy as np

    aberrations = {key: np.zeros(1) for key in ("C10", "C12", "phi12", "C21", "phi21", "C23", "phi23")}
    aberrations["C10"] = np.array([-defocus_A])
    probe = model.probes(aberrations)
    intensity = probe.abs() ** 2
    inside = (model.label_window(intensity).sum() / intensity.sum()).item()
    return int(model.illuminated_mask(probe).sum()), inside


def test_chang_graphene_defocus_range_has_the_hbn_recipes_footprint_in_pixels():
    """On the label grid (pixel lambda / 4 alpha) a defocus df lights a disc of radius 4 df alpha^2 / lambda
    pixels: chang_graphene's defocus range (80 kV / 31.5 mrad) must give chang_hbn's footprints (300 kV /
    17.1 mrad), both inside the 32 px label window; the 80-200 A of session 11's failed graphene run
    overfills it (measured: 757 lit pixels, 0.876 of the intensity inside at 200 A; 401, 0.965 at 125 A)."""
    hbn, hbn_range = _forward_model("chang_hbn")
    graphene, graphene_range = _forward_model("chang_graphene")
    for hbn_df, graphene_df in zip(hbn_range, graphene_range, strict=True):
        hbn_px, hbn_inside = _footprint(hbn, hbn_df)
        graphene_px, graphene_inside = _footprint(graphene, graphene_df)
        # measured 121 / 101 px at the near end (near the diffraction limit: Cs and the Airy rings differ),
        # 429 / 401 px at the far end
        assert abs(graphene_px - hbn_px) <= 0.2 * hbn_px, (hbn_df, graphene_df, hbn_px, graphene_px)
        assert min(hbn_inside, graphene_inside) > 0.95
    overfilled_px, overfilled_inside = _footprint(graphene, 200.0)
    assert overfilled_inside < 0.9 and overfilled_px > 1.5 * _footprint(hbn, 200.0)[0]
