"""experiment=airpi_generalist_cpu (issue #13) and its scoring suite compose into runnable configs: the
fine-tune starts from the shipped specialist's weights, keeps the best epoch by validation xc, and the suite
scores a scan of a structure (hBN) that the generalist datagen excludes."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def test_generalist_fine_tune_config():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=airpi_generalist_cpu"])
    assert (ROOT / cfg.init_from).is_file() and cfg.init_from == "pretrained/airpi_reference.ckpt"
    assert cfg.callbacks.model_checkpoint.monitor == "val/xc_object_phase"
    assert cfg.callbacks.model_checkpoint.mode == "max"
    assert cfg.model.fine_tune and cfg.data.num_workers == 0
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import EMAWeightAveraging

    assert isinstance(instantiate(cfg.callbacks.weight_averaging), EMAWeightAveraging)  # validated on EMA


def test_generalist_suite_scores_an_excluded_structure():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["suite=airpi_generalist"])
    scan = cfg.suite.scans.hbn_twisted_scherzer.generate
    # the generalist datagen command (conf/simulation/kernel_generalist.yaml) excludes bundled hBN
    datagen = (ROOT / "conf/simulation/kernel_generalist.yaml").read_text()
    assert scan.specimen.material == "hBN" and "BN-hexagonal]" in datagen
    assert scan.settings.semiangle_mrad == 17.1 and scan.settings.defocus_A == "scherzer"
    assert cfg.suite.methods.airpi_generalist.ckpt == "pretrained/airpi_generalist.ckpt"  # the shipped model
    assert set(cfg.suite.methods) == {"airpi_generalist", "airpi_specialist", "airpi_slim", "ssb", "icom"}
    assert min(cfg.suite.doses_e_per_A2) == 5.0e2 and float("inf") in cfg.suite.doses_e_per_A2


def test_generalist_suite_spans_the_generalist_ranges_on_excluded_structures():
    """Every scan of the held-out suite is of a structure the generalist shards exclude and lies inside the
    shipped generalist's recorded training ranges (no optics warning), and together they reach both
    energies, both aberration settings and the detector-reach ends the issue names."""
    from datagen.scan4d import ScanSettings
    from models.checkpoints import load_checkpoint

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["suite=airpi_generalist"])
    checkpoint = load_checkpoint(ROOT / "pretrained/airpi_generalist.ckpt")
    ranges = checkpoint["deepstem"]["trained_for"]
    excluded = {"hbn": "BN-hexagonal", "graphene": "mp-48", "mos2": "MoS2"}
    datagen = (ROOT / "conf/simulation/kernel_generalist.yaml").read_text()
    energies, aberrated, reach = set(), set(), []
    for name, scan in cfg.suite.scans.items():
        material = scan.generate.specimen.material.lower()
        assert excluded[material] in datagen, name
        settings = ScanSettings(**OmegaConf.to_container(scan.generate.settings, resolve=True))
        ratio = settings.semiangle_mrad / settings.detector_max_angle_mrad
        lo, hi = ranges["alpha_over_gmax"]
        assert lo <= ratio <= hi + 1e-3, (name, ratio)
        assert ranges["scan_step_A"][0] <= settings.scan_step_A <= ranges["scan_step_A"][1], name
        energies.add(settings.energy_eV)
        aberrated.add(settings.Cs_A > 0)
        reach.append(1 / ratio)
    assert energies == {2.0e5, 3.0e5} and aberrated == {True, False}
    assert min(reach) < 1.8 and max(reach) >= 3.0
