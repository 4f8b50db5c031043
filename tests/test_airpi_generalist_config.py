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
    assert OmegaConf.is_missing(cfg.suite.methods.airpi_generalist, "ckpt")  # the run's checkpoint is given
    assert set(cfg.suite.methods) == {"airpi_generalist", "airpi_specialist", "ssb", "icom"}
