"""``experiment=ptychonn_epie`` (issue #15): PtychoNN trained on one scan's own ePIE reconstruction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from tests.test_train import ROOT, compose_train

TINY = ["data.patch_px=16", "data.batch_size=8", "model.net.channels=[4,8,16]", "threads=1",
        "callbacks.prediction_images=null", "callbacks.progress_bar=null"]  # fmt: skip


def test_experiment_composes_with_the_paper_split_and_a_time_cap(tmp_path):
    cfg = compose_train(["experiment=ptychonn_epie", "data.scan_path=S.h5", "data.recon_path=S_epie.h5"])
    assert cfg.data._target_.endswith("EpieLabelsDataModule") and cfg.model._target_.endswith(
        "PtychoNNLightning"
    )
    assert abs(cfg.data.train_fraction - 100 / 161) < 1e-3
    assert cfg.trainer.max_time == "00:00:14:00" and cfg.logger.csv is not None
    # the remedies against the constant-phase collapse (docs/results_ptychonn.md) are on
    assert (
        cfg.model.standardise_inputs
        and cfg.model.standardise_labels
        and cfg.model.input_px == cfg.data.patch_px
    )
    assert cfg.model.loss.kind == "l2" and cfg.model.loss.w_xc > 0 and cfg.data.label_weight == "probe"
    for name in ("model_checkpoint", "last_checkpoint"):
        assert OmegaConf.to_container(cfg.callbacks[name])["dirpath"] == "${paths.output_dir}/checkpoints"


def test_experiment_trains_a_few_steps_on_a_tiny_scan(tmp_path):
    from tests.test_datamodules import _epie_fixture
    from training.cli import train

    _, scan_path, recon_path = _epie_fixture(tmp_path)
    cfg = compose_train(["experiment=ptychonn_epie", f"data.scan_path={scan_path}",
                         f"data.recon_path={recon_path}", f"paths.output_dir={tmp_path}/run", *TINY,
                         "trainer.max_epochs=1", "+trainer.limit_train_batches=2"])  # fmt: skip
    metrics = train(cfg)
    assert np.isfinite(metrics["val/loss"]) and np.isfinite(metrics["test/loss"])
    assert np.isfinite(metrics["val/xc_phase_weighted"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    from evaluation.networks.checkpoints import load_network

    model = load_network(last, "ptychonn")  # the fitted standardisation came along
    assert bool(model.norm.fitted) and float(model.norm.phase_std) not in (0.0, 1.0)


def test_train_py_honours_hydra_run_dir(tmp_path):
    """The command line of the docs: checkpoints and the CSV log land in ``hydra.run.dir``."""
    from tests.test_datamodules import _epie_fixture

    _, scan_path, recon_path = _epie_fixture(tmp_path)
    run_dir = tmp_path / "my run"
    command = [sys.executable, str(ROOT / "train.py"), "experiment=ptychonn_epie",
               f"data.scan_path={scan_path}", f"data.recon_path={recon_path}", f"hydra.run.dir='{run_dir}'",
               *TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "test=false"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(list((run_dir / "checkpoints").glob("epoch_*.ckpt"))) == 1
    assert list((run_dir / "csv").rglob("metrics.csv"))
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert not (tmp_path / "outputs").exists() and not (Path(ROOT) / "outputs" / "ptychonn_epie").exists()


def test_study_script_scores_the_held_out_lines(tmp_path, capsys):
    """The truth written as both reconstructions scores xc ~ 1 on the held-out lines."""
    from datagen import store
    from evaluation.io import save_4dstem
    from scripts.ptychonn_epie_study import main
    from tests.scan4d_helpers import simulate_scan

    sim = simulate_scan(scan_px=24, cbed_px=32)
    calibration = {"energy_eV": sim.energy_eV, "semiangle_mrad": sim.semiangle_mrad,
                   "scan_step_A": sim.scan_step_A, "k_pixel_invA": sim.k_pixel_invA}  # fmt: skip
    scan = save_4dstem(tmp_path / "scan.h5", sim.data, **calibration, truth_phase=sim.phase,
                       truth_pixel_size_A=sim.object_pixel_A)  # fmt: skip
    attrs = {"pixel_size_A": [sim.object_pixel_A] * 2, "origin_A": [0.0, 0.0], "method": "truth"}
    recon = store.write(
        tmp_path / "recon.h5", store.RECON, {"phase": sim.phase.astype(np.float32)}, attrs=attrs
    )
    report = main(
        ["--scan", str(scan), "--epie", str(recon), "--ptychonn", str(recon), "--epie-wall-s", "2.0"]
    )
    assert report["train_lines"] == 15 and report["held_out"]["lines"] == 9
    assert report["held_out"]["ptychonn"]["xc"] > 0.95 and abs(report["xc_ratio"] - 1) < 1e-9
    assert "| held_out | 15-23 |" in capsys.readouterr().out
