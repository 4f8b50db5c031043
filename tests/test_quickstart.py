"""`python train.py experiment=quickstart`: datagen -> training -> evaluation suite in one run.

The chain runs in miniature through the real configs (conf/experiment/quickstart.yaml,
conf/suite/quickstart.yaml, conf/datagen.yaml) with tiny overrides; the orchestration pieces of
training/pipeline.py are tested on their own.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from training import pipeline
from training.cli import ConfigError, run

ROOT = Path(__file__).resolve().parents[1]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_quickstart_config_chains_datagen_training_and_the_suite():
    cfg = compose_train(["experiment=quickstart"])
    assert cfg.model._target_.endswith("AIRPILightning")
    assert cfg.data._target_.endswith("MultisliceDataModule")
    assert list(cfg.logger) == ["csv"]
    assert cfg.evaluate.checkpoint == "last"  # the final weights are evaluated (last_checkpoint)
    assert cfg.data.data_dir.startswith("data/quickstart/")
    assert "simulation=kernel" in cfg.datagen.overrides
    assert cfg.evaluate.progress  # the evaluation shows its progress
    suite = pipeline.load_suite(cfg.evaluate.suite)
    methods = {label: entry.method for label, entry in suite.methods.items()}
    assert methods == {"ssb": "ssb", "icom": "icom", "airpi_shipped": "airpi", "airpi_finetuned": "airpi"}
    assert suite.methods.airpi_finetuned.ckpt is None  # filled with the run's checkpoint
    assert (ROOT / suite.methods.airpi_shipped.ckpt).is_file()  # the shipped model, scored as it is
    assert any(math.isinf(float(d)) for d in suite.doses_e_per_A2) and 1e3 <= min(suite.doses_e_per_A2) <= 1e5
    # the default train config does neither
    plain = compose_train([])
    assert plain.datagen is None and plain.evaluate is None


SHIPPED = ROOT / "pretrained" / "airpi_reference.ckpt"


def test_quickstart_fine_tunes_the_shipped_model_on_data_of_its_optics():
    """init_from is the shipped checkpoint (same network), at a fine-tuning learning rate, on kernels of the
    optics it was trained for, without the test specimen; the suite scores it next to the shipped one."""
    cfg = compose_train(["experiment=quickstart"])
    shipped = OmegaConf.load(ROOT / "pretrained" / "airpi_reference.config.yaml")
    assert (ROOT / cfg.init_from).resolve() == SHIPPED.resolve() and SHIPPED.is_file()
    assert 0 < cfg.model.lr <= shipped.model.lr / 5  # fine-tuning, not training from scratch
    assert OmegaConf.to_container(cfg.model.net) == OmegaConf.to_container(shipped.model.net)
    # loss options added after the shipped model was trained: the value it trained with (their default)
    added_since = {"normalization": "paper"}
    assert OmegaConf.to_container(cfg.model.loss) == {
        **added_since,
        **OmegaConf.to_container(shipped.model.loss),
    }
    assert cfg.model.fine_tune == shipped.model.fine_tune
    assert OmegaConf.to_container(cfg.data.augmentation) == OmegaConf.to_container(shipped.data.augmentation)
    ours = OmegaConf.to_container(pipeline.compose_datagen(list(cfg.datagen.overrides)), resolve=True)
    theirs = OmegaConf.to_container(pipeline.compose_datagen(list(shipped.datagen.overrides)), resolve=True)
    for key in ("energy_eV", "semiangle_mrad", "ratio_alpha_gmax", "step_rayleigh", "Cs_A", "defocus_A"):
        assert ours["simulation"][key] == theirs["simulation"][key], key
    assert set(ours["source"]["exclude_ids"]) >= {"MoS2", "SrTiO3"}  # the scored specimen is not in the data
    suite = pipeline.load_suite(cfg.evaluate.suite)
    assert (ROOT / suite.methods.airpi_shipped.ckpt).resolve() == SHIPPED.resolve()
    # the network loads into the configured model (init_from would refuse another architecture)
    from hydra.utils import instantiate

    from training.cli import load_weights

    load_weights(instantiate(cfg.model), SHIPPED)


def test_compose_datagen_gives_the_datagen_root_config_with_overrides(tmp_path):
    cfg = pipeline.compose_datagen(["simulation=kernel", "simulation.num_samples=7", f"out_dir={tmp_path}"])
    assert cfg.simulation.name == "kernel" and cfg.simulation.num_samples == 7
    assert cfg.simulation.pixels == 64  # inherited from kernel_paper through kernel.yaml's defaults
    assert cfg.source.name == "bundled" and cfg.out_dir == str(tmp_path)
    # inside an initialised Hydra (as in `python train.py`) the same config comes back
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        inside = pipeline.compose_datagen(
            ["simulation=kernel", "simulation.num_samples=7", f"out_dir={tmp_path}"]
        )
    assert OmegaConf.to_container(inside) == OmegaConf.to_container(cfg)


def test_prepare_data_skips_a_folder_with_shards_and_rejects_bad_settings(tmp_path, monkeypatch):
    import datagen.cli

    def fail(cfg):
        raise AssertionError("datagen must not run")

    monkeypatch.setattr(datagen.cli, "run", fail)
    folder = tmp_path / "kernel"
    folder.mkdir()
    (folder / ".shard-00000-of-00001.partial").mkdir()  # unfinished: does not count
    assert pipeline.finished_shards(folder) == []
    (folder / "shard-00000-of-00001.h5").write_bytes(b"")
    assert pipeline.finished_shards(folder) == [folder / "shard-00000-of-00001.h5"]
    base = ["experiment=quickstart", f"data.data_dir={folder}"]
    assert pipeline.prepare_data(compose_train(base)) is None
    assert pipeline.prepare_data(compose_train([*base, "datagen=null"])) is None
    with pytest.raises(ConfigError, match="one folder"):
        pipeline.prepare_data(compose_train(["experiment=quickstart", f"data.data_dir={tmp_path}/*"]))
    with pytest.raises(ConfigError, match="out_dir"):
        pipeline.prepare_data(
            compose_train(
                [
                    "experiment=quickstart",
                    f"data.data_dir={tmp_path}/empty",
                    "datagen.overrides=['simulation=kernel','out_dir=elsewhere']",
                ]
            )
        )


def test_trained_checkpoint_prefers_the_best_over_last(tmp_path):
    cfg = compose_train(["experiment=quickstart", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no checkpoint"):
        pipeline.trained_checkpoint(cfg)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    assert pipeline.trained_checkpoint(cfg) == folder / "last.ckpt"
    (folder / "epoch_003.ckpt").write_bytes(b"")
    os.utime(folder / "last.ckpt", (1e9 + 10, 1e9 + 10))
    os.utime(folder / "epoch_003.ckpt", (1e9, 1e9))
    assert pipeline.trained_checkpoint(cfg) == folder / "epoch_003.ckpt"
    # the best as recorded by ModelCheckpoint in last.ckpt wins over the newest file
    (folder / "epoch_001.ckpt").write_bytes(b"")
    os.utime(folder / "epoch_001.ckpt", (1e9 - 10, 1e9 - 10))
    state = {"best_model_path": str(folder / "epoch_001.ckpt"), "best_model_score": 0.5}
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": state}}, folder / "last.ckpt")
    assert pipeline.trained_checkpoint(cfg) == folder / "epoch_001.ckpt"
    assert pipeline.trained_checkpoint(cfg, "last") == folder / "last.ckpt"
    with pytest.raises(ConfigError, match="best, last or a path"):
        pipeline.trained_checkpoint(cfg, "newest")


def test_load_suite_applies_overrides_and_names_unknown_suites():
    suite = pipeline.load_suite("quickstart", ["scans.mos2_twisted.generate.settings.scan_gpts=[10,10]"])
    assert list(suite.scans.mos2_twisted.generate.settings.scan_gpts) == [10, 10]
    assert suite.scans.mos2_twisted.generate.material == "MoS2"
    inline = pipeline.load_suite({"methods": {"ssb": {"method": "ssb"}}})
    assert inline.methods.ssb.method == "ssb"
    with pytest.raises(ConfigError, match=r"no conf/suite/nonexistent\.yaml"):
        pipeline.load_suite("nonexistent")


def test_miniature_quickstart_generates_trains_and_scores(tmp_path, capsys):
    """The whole chain through `run(cfg)`: shards, fine-tuned checkpoint, suite outputs, finite xc."""
    data_dir, run_dir, scan = tmp_path / "data" / "kernel", tmp_path / "run", tmp_path / "scan.h5"
    settings = "scans.mos2_twisted.generate.settings"
    overrides = [
        "experiment=quickstart",
        f"data.data_dir={data_dir}",
        f"paths.output_dir={run_dir}",
        "datagen.overrides=['simulation=kernel','simulation.num_samples=4','progress=false']",
        "data.batch_size=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.prediction_images=null",
        "evaluate.dir=bench",
        "evaluate.suite_overrides=["
        f"'scans.mos2_twisted.path={scan}','scans.mos2_twisted.generate.size_A=10.0',"
        f"'{settings}.scan_gpts=[14,14]','{settings}.detector_px=32','{settings}.sampling_A=0.08',"
        f"'{settings}.num_phonons=1']",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
        run(cfg)  # inside an initialised Hydra, as under `python train.py`
    shards = pipeline.finished_shards(data_dir)
    assert len(shards) == 1 and (data_dir / "index.json").is_file()
    ckpt = pipeline.trained_checkpoint(cfg, cfg.evaluate.checkpoint)
    assert ckpt.is_file() and ckpt.parent == run_dir / "checkpoints"
    assert scan.is_file()
    bench = run_dir / "bench"
    content = json.loads((bench / "metrics.json").read_text())
    rows = content["rows"]
    assert {r["method"] for r in rows} == {"ssb", "icom", "airpi_finetuned", "airpi_shipped"}
    assert {r["dose_e_per_A2"] for r in rows} == {"inf", 1e4}
    assert all(np.isfinite(r["xc"]) and -1 <= r["xc"] <= 1 for r in rows)
    assert next(r for r in rows if r["method"] == "airpi_finetuned")["ckpt"] == str(ckpt)
    # SSB recovers a noise-free weak phase object well even on a tiny scan
    assert next(r for r in rows if r["method"] == "ssb" and r["dose_e_per_A2"] == "inf")["xc"] > 0.5
    table = (bench / "results.md").read_text()
    for method in ("ssb", "icom", "airpi_finetuned", "airpi_shipped"):
        assert f"| {method} |" in table
    # what the fine-tuned row is: from which weights, how long it trained, and whether a cap cut it short
    note = "airpi_finetuned: pretrained/airpi_reference.ckpt fine-tuned in this run for 1 of 1 epochs"
    assert note in table, table
    assert content["training"]["epochs"] == 1 and content["training"]["stopped_by"] is None
    out = capsys.readouterr().out
    assert table in out  # the table is printed
    assert "train: checkpoints:" in out and "train: outputs in" in out
    assert (bench / "figures" / "recon_mos2_twisted.png").is_file()
    # a rerun finds the shards and does not generate again
    assert pipeline.prepare_data(cfg) is None
