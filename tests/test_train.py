"""`train.py` through the real configs: every model with its data, pairing errors, W&B offline, resume."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback

from datagen import store
from physics.runtime import EXIT_ERROR, resolve_threads
from tests.test_datasets import write_shard
from training.cli import ConfigError, check_pairing, train

ROOT = Path(__file__).resolve().parents[1]
SMALL_BANK = ["data.image_bank.photographs=[camera]", "data.image_bank.faces=2", "data.image_bank.textures=2",
              "data.image_bank.size_px=64"]  # fmt: skip


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "kernel").mkdir()
    for i in range(3):
        write_shard(
            root / "kernel" / f"shard-{i:05d}-of-00003.h5", 12 * i, 12, [f"mp-{i}{j}" for j in range(2)]
        )
    (root / "haadf").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        images = {"image": rng.random((6, 32, 32), dtype=np.float32), "pixel_size_A": np.full(6, 0.2)}
        store.write(root / "haadf" / f"shard-{i:05d}-of-00002.h5", store.IMAGE, images)
    return root


def common(tmp_path, data_root) -> list[str]:
    return [
        f"paths.output_dir={tmp_path}",
        f"paths.data_dir={data_root}",
        "logger=csv",
        "+trainer.fast_dev_run=true",
    ]


@pytest.mark.parametrize(
    "model, data, extra",
    [
        ("airpi", "multislice", ["model.net.filters=8", "data.batch_size=4", "data.num_workers=0"]),
        ("ptychonn", "multislice", ["data.batch_size=4", "data.num_workers=0"]),
        ("chang_unet", "stock_images", ["data.batch_size=4", *SMALL_BANK]),
        ("cgrdn", "haadf", ["data.batch_size=2", "data.num_workers=0"]),
    ],
)
def test_every_model_runs_fast_dev_run_with_its_data(model, data, extra, tmp_path, data_root):
    cfg = compose_train([f"model={model}", f"data={data}", *common(tmp_path, data_root), *extra])
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.yaml").is_file()
    assert list((tmp_path / "figures").glob("val_epoch_*.png"))  # predictions vs labels figure


def test_wrong_pairings_get_one_clear_error(tmp_path, data_root):
    with pytest.raises(
        ConfigError, match="model=chang_unet trains on data=stock_images, not data=multislice"
    ):
        check_pairing(compose_train(["model=chang_unet", "data=multislice", *common(tmp_path, data_root)]))
    with pytest.raises(ConfigError, match=r"data\.view=airpi does not fit model=ptychonn"):
        check_pairing(compose_train(["model=ptychonn", "data=multislice", "data.view=airpi"]))
    cfg = compose_train(["model=ptychonn", "data=multislice"])
    check_pairing(cfg)
    assert cfg.data.view == "ptychonn"
    command = [sys.executable, str(ROOT / "train.py"), "model=cgrdn", "data=stock_images"]
    result = subprocess.run(
        [*command, f"hydra.run.dir={tmp_path}/r"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert result.returncode == EXIT_ERROR
    assert result.stderr.strip().splitlines()[-1] == (
        "deepstem: error: model=cgrdn trains on data=haadf, not data=stock_images"
    )


def test_wandb_offline_run_holds_metrics_and_images_but_no_secret(tmp_path, data_root, monkeypatch):
    secret = "mp-secret-0123456789abcdef"
    monkeypatch.setenv("MP_API_KEY", secret)
    overrides = [f"paths.output_dir={tmp_path}", f"paths.data_dir={data_root}", "logger=wandb",
                 "model.net.filters=8", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false",
                 f"+notes={secret}"]  # fmt: skip
    train(compose_train(overrides))
    import wandb

    wandb.teardown()  # the wandb service writes the run file; in-process, wait for it as process exit would
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for metric in (b"train/loss", b"val/xc_object_phase", b"val/predictions"):  # logged, not config text
        assert metric in record
    assert list(runs[0].glob("files/media/images/**/*.png"))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret leaked into {path}"


class StopAtStep(Callback):
    """Stands in for a SIGKILL: the run dies after ``step`` optimiser steps, leaving only the
    checkpoints written before (an exception saves nothing more; nothing runs after a SIGKILL)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("killed")


def _trained_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint carries about the network: weights, buffers and optimiser state."""
    checkpoint = torch.load(path, weights_only=False)
    tensors = {f"state_dict.{k}": v for k, v in checkpoint["state_dict"].items()}
    for i, optimizer in enumerate(checkpoint["optimizer_states"]):
        for param, values in optimizer["state"].items():
            tensors.update({f"optimizer{i}.{param}.{k}": v for k, v in values.items() if torch.is_tensor(v)})
    return tensors


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_for_bit_after_an_epoch_and_mid_epoch(tmp_path, data_root, workers):
    """2 epochs straight == 1 epoch + resume from last.ckpt == killed in epoch 2 + resume from the last
    step checkpoint, for AIRPI (dropout after every convolution) with and without loader workers."""
    step_checkpoint = ["+callbacks.step_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                       "+callbacks.step_checkpoint.dirpath=${paths.output_dir}/checkpoints",
                       "+callbacks.step_checkpoint.filename=step", "+callbacks.step_checkpoint.monitor=null",
                       "+callbacks.step_checkpoint.every_n_train_steps=4",
                       "+callbacks.step_checkpoint.enable_version_counter=false"]  # fmt: skip
    base = [f"paths.data_dir={data_root}", "logger=csv", f"data.num_workers={workers}", "model=airpi",
            "model.net.filters=8", "data=multislice", "data.batch_size=4", "test=false",
            "callbacks.prediction_images=null", "callbacks.progress_bar=null",
            "trainer.enable_model_summary=false", "trainer.max_epochs=2", *step_checkpoint]  # fmt: skip
    straight = train(compose_train([*base, f"paths.output_dir={tmp_path}/a"]))
    killed = [*base, f"paths.output_dir={tmp_path}/b", "+callbacks.kill._target_=tests.test_train.StopAtStep",
              "+callbacks.kill.step=9"]  # fmt: skip
    with pytest.raises(RuntimeError, match="killed"):  # 6 steps per epoch: killed in the second epoch
        train(compose_train(killed))
    checkpoints = tmp_path / "b" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6  # end of epoch 1
    assert torch.load(checkpoints / "step.ckpt", weights_only=False)["global_step"] == 8  # mid epoch 2
    expected = _trained_state(tmp_path / "a" / "checkpoints" / "last.ckpt")
    for name in ("last", "step"):
        out = tmp_path / f"from_{name}"
        resume = [*base, f"paths.output_dir={out}", f"ckpt_path={checkpoints}/{name}.ckpt"]
        resumed = train(compose_train(resume))
        state = _trained_state(out / "checkpoints" / "last.ckpt")
        assert state.keys() == expected.keys()
        different = [key for key in expected if not torch.equal(expected[key], state[key])]
        assert not different, f"resumed from {name}.ckpt: {len(different)} of {len(expected)} tensors differ"
        assert straight["val/loss"] == resumed["val/loss"]


def test_weight_average_is_validated_saved_and_strippable_for_resume(tmp_path, data_root):
    """With callbacks.weight_averaging (EMA) checkpoints hold the average as ``state_dict`` and the trained
    weights beside it; export_checkpoint --strip-weight-average keeps the trained ones and the optimiser
    (a smaller resumable file), and a run resumes from it."""
    from tests.script_modules import load_script

    base = [f"paths.data_dir={data_root}", "logger=csv", "data.num_workers=0", "model=airpi",
            "model.net.filters=8", "data=multislice", "data.batch_size=4", "test=false",
            "callbacks.prediction_images=null", "callbacks.progress_bar=null",
            "trainer.enable_model_summary=false", "callbacks.weight_averaging="
            "{_target_:lightning.pytorch.callbacks.EMAWeightAveraging,decay:0.5}"]  # fmt: skip
    train(compose_train([*base, f"paths.output_dir={tmp_path}/a", "trainer.max_epochs=1"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    averaged, trained = saved["state_dict"], saved["current_model_state"]
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)  # the average is not the weights
    stripped = tmp_path / "stripped.ckpt"
    assert load_script("export_checkpoint").main([str(last), str(stripped), "--strip-weight-average"]) == 0
    slim = torch.load(stripped, weights_only=False)
    assert "current_model_state" not in slim and "averaging_state" not in slim
    assert all(torch.equal(slim["state_dict"][k], trained[k]) for k in trained)
    assert slim["optimizer_states"][0]["state"].keys() == saved["optimizer_states"][0]["state"].keys()
    assert stripped.stat().st_size < last.stat().st_size
    resumed = [*base, f"paths.output_dir={tmp_path}/b", "trainer.max_epochs=2", f"ckpt_path={stripped}"]
    train(compose_train(resumed))
    after = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert after["global_step"] == 2 * saved["global_step"] and after["epoch"] == 1


def _nan_data(tmp_path, data_root) -> Path:
    """A copy of the kernel shards with a NaN in CBED 3 of sample 5 of every shard (some in training)."""
    import shutil

    import h5py

    root = tmp_path / "bad"
    shutil.copytree(data_root / "kernel", root / "kernel")
    for path in sorted((root / "kernel").glob("shard-*.h5")):
        with h5py.File(path, "a") as f:
            f["cbed"][5, 3, 2, 2] = np.nan
    return root


NAN_MESSAGE = r"\S+shard-0000\d-of-00003\.h5: sample 5 has NaN or inf values in 'cbed'$"


def test_nan_in_the_data_stops_the_run_before_training(tmp_path, data_root):
    from training.datasets import DataError

    bad = _nan_data(tmp_path, data_root)
    cfg = compose_train([f"paths.output_dir={tmp_path}/run", f"paths.data_dir={bad}", "logger=csv",
                         "model=ptychonn", "data.batch_size=4", "data.num_workers=0",
                         "trainer.max_epochs=2"])  # fmt: skip
    with pytest.raises(DataError, match="^" + NAN_MESSAGE):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, no checkpoint written


def test_read_error_during_fit_is_one_line_naming_shard_and_sample(tmp_path, data_root):
    bad = _nan_data(tmp_path, data_root)
    command = [sys.executable, str(ROOT / "train.py"), "model=ptychonn", f"paths.data_dir={bad}",
               "logger=csv", "data.batch_size=4", "data.num_workers=1", "data.check_data=false",
               "trainer.max_epochs=1", "test=false", f"paths.output_dir={tmp_path}/run",
               f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_ERROR, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch("deepstem: error: " + NAN_MESSAGE, last), last
    assert "Traceback" not in result.stderr


def test_init_from_loads_weights_and_rejects_another_model(tmp_path, data_root):
    base = [f"paths.data_dir={data_root}", "logger=csv", "data.num_workers=0", "data.batch_size=4",
            "test=false", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1"]  # fmt: skip
    train(compose_train([*base, "model=ptychonn", f"paths.output_dir={tmp_path}/p"]))
    checkpoint = tmp_path / "p" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="holds weights of another model"):
        train(compose_train([*base, "model=airpi", "model.net.filters=8", f"paths.output_dir={tmp_path}/a",
                             f"init_from={checkpoint}"]))  # fmt: skip
    metrics = train(compose_train([*base, "model=ptychonn", f"paths.output_dir={tmp_path}/q",
                                   f"init_from={checkpoint}", "test=true"]))  # fmt: skip
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["test/loss"])


def test_threads_are_resolved_from_the_loader_workers_and_set(tmp_path, data_root, capsys):
    base = [*common(tmp_path, data_root), "model.net.filters=8", "data.batch_size=4"]
    before = torch.get_num_threads()
    try:
        train(compose_train([*base, "data.num_workers=0", "threads=1"]))
        assert torch.get_num_threads() == 1
        assert "1 intra-op thread" in capsys.readouterr().out
        train(compose_train([*base, "data.num_workers=1", "threads=auto"]))
        assert torch.get_num_threads() == resolve_threads("auto", 1)  # one core left to the loader worker
        with pytest.raises(ConfigError, match=r"^threads"):
            train(compose_train([*base, "threads=many"]))
    finally:
        torch.set_num_threads(before)


def test_limit_val_batches_0_trains_without_the_plateau_monitor(tmp_path, data_root):
    overrides = [f"paths.output_dir={tmp_path}", f"paths.data_dir={data_root}", "logger=csv",
                 "model.net.filters=8", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=2",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=0", "test=false"]  # fmt: skip
    metrics = train(compose_train(overrides))
    assert np.isfinite(metrics["train/loss"]) and "val/loss" not in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_run_cut_short_by_max_time_says_so(tmp_path, data_root, capsys):
    overrides = [f"paths.output_dir={tmp_path}", f"paths.data_dir={data_root}", "logger=csv",
                 "model.net.filters=8", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=500",
                 "trainer.max_time=00:00:00:01", "trainer.limit_val_batches=0", "test=false",
                 "callbacks.prediction_images=null", "trainer.enable_model_summary=false"]  # fmt: skip
    from training.cli import fit

    _, summary = fit(compose_train(overrides))
    assert summary.stopped_by == "the 1 s cap (trainer.max_time)"
    assert 0 < summary.epochs < 500 and summary.max_epochs == 500
    out = capsys.readouterr().out
    assert f"stopped by the 1 s cap (trainer.max_time) after {summary.epochs:.1f} of 500 epochs" in out, out


@pytest.mark.slow
def test_optuna_sweep_runs_trials_and_reports_the_metric(tmp_path, data_root):
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna", "model=ptychonn",
               f"paths.data_dir={data_root}", "logger=csv", "data.num_workers=0", "trainer.max_epochs=1",
               "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={tmp_path}/sweep"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    optimization = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_value" in optimization and "model.lr" in optimization


def test_ptychonn_trains_on_a_scan_with_epie_labels(tmp_path):
    from tests.test_datamodules import _epie_fixture

    _, scan_path, recon_path = _epie_fixture(tmp_path)
    cfg = compose_train(["model=ptychonn", "data=epie_labels", f"data.scan_path={scan_path}",
                         f"data.recon_path={recon_path}", "data.patch_px=16", "data.batch_size=8",
                         f"paths.output_dir={tmp_path}/run", "logger=csv",
                         "+trainer.fast_dev_run=true"])  # fmt: skip
    metrics = train(cfg)
    assert np.isfinite(metrics["val/loss"])


@pytest.mark.parametrize("workers", [0, 1])
def test_epie_label_resume_is_bit_for_bit_after_an_epoch_and_mid_epoch(tmp_path, workers):
    """PtychoNN on a scan with ePIE labels and training dose noise: 2 epochs straight == 1 epoch + resume
    from last.ckpt == killed in epoch 2 + resume from the step checkpoint (batch order and noise stream)."""
    from tests.test_datamodules import _epie_fixture

    _, scan_path, recon_path = _epie_fixture(tmp_path)
    step_checkpoint = ["+callbacks.step_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                       "+callbacks.step_checkpoint.dirpath=${paths.output_dir}/checkpoints",
                       "+callbacks.step_checkpoint.filename=step", "+callbacks.step_checkpoint.monitor=null",
                       "+callbacks.step_checkpoint.every_n_train_steps=4",
                       "+callbacks.step_checkpoint.enable_version_counter=false"]  # fmt: skip
    # 12 scan lines: 4 train (48 patterns, 6 batches of 8), 2 validate, 6 test
    base = ["model=ptychonn", "model.net.channels=[4,8,16]", "data=epie_labels",
            f"data.scan_path={scan_path}", f"data.recon_path={recon_path}", "data.patch_px=16",
            "data.batch_size=8", "data.train_fraction=0.5", "data.val_fraction=0.34",
            "data.dose_e_range=[1e3,1e5]", f"data.num_workers={workers}", "threads=1", "logger=csv",
            "test=false", "callbacks.prediction_images=null", "callbacks.progress_bar=null",
            "trainer.enable_model_summary=false", "trainer.max_epochs=2", *step_checkpoint]  # fmt: skip
    straight = train(compose_train([*base, f"paths.output_dir={tmp_path}/a"]))
    killed = [*base, f"paths.output_dir={tmp_path}/b", "+callbacks.kill._target_=tests.test_train.StopAtStep",
              "+callbacks.kill.step=9"]  # fmt: skip
    with pytest.raises(RuntimeError, match="killed"):
        train(compose_train(killed))
    checkpoints = tmp_path / "b" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6  # end of epoch 1
    assert torch.load(checkpoints / "step.ckpt", weights_only=False)["global_step"] == 8  # mid epoch 2
    expected = _trained_state(tmp_path / "a" / "checkpoints" / "last.ckpt")
    for name in ("last", "step"):
        out = tmp_path / f"from_{name}"
        resume = [*base, f"paths.output_dir={out}", f"ckpt_path={checkpoints}/{name}.ckpt"]
        resumed = train(compose_train(resume))
        state = _trained_state(out / "checkpoints" / "last.ckpt")
        assert state.keys() == expected.keys()
        different = [key for key in expected if not torch.equal(expected[key], state[key])]
        assert not different, f"resumed from {name}.ckpt: {len(different)} of {len(expected)} tensors differ"
        assert straight["val/loss"] == resumed["val/loss"]


def test_scan_reconstruction_callback_logs_xc_against_the_truth(tmp_path, data_root):
    from evaluation.io import save_4dstem
    from tests.scan4d_helpers import simulate_scan

    sim = simulate_scan(scan_px=8, cbed_px=32)
    calibration = {"energy_eV": sim.energy_eV, "semiangle_mrad": sim.semiangle_mrad,
                   "scan_step_A": sim.scan_step_A, "k_pixel_invA": sim.k_pixel_invA}  # fmt: skip
    scan = save_4dstem(tmp_path / "scan.h5", sim.data, **calibration, truth_phase=sim.phase,
                       truth_pixel_size_A=sim.object_pixel_A)  # fmt: skip
    overrides = [f"paths.output_dir={tmp_path}/run", f"paths.data_dir={data_root}", "logger=csv",
                 "model.net.filters=8", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false",
                 f"callbacks.scan_reconstruction.scan_path={scan}",
                 "callbacks.scan_reconstruction.every_n_epochs=1"]  # fmt: skip
    metrics = train(compose_train(overrides))
    assert -1 <= metrics["val/scan_xc"] <= 1 and metrics["val/scan_frc_0143_A"] > 0
    assert metrics["val/scan_frc_05_A"] >= metrics["val/scan_frc_0143_A"]  # 0.5 is the stricter crossing
    assert (tmp_path / "run" / "figures" / "scan_epoch_000.png").is_file()


@pytest.mark.parametrize("native, expected", [(False, "32-true"), (True, "bf16-mixed")])
def test_trainer_precision_auto_reaches_the_trainer_config_and_summary(
    native, expected, monkeypatch, tmp_path, data_root, capsys
):
    """trainer.precision=auto (conf/trainer/cpu.yaml): 32-true without bf16 units, bf16-mixed with them (here
    monkeypatched; bf16 autocast runs emulated on any x86 CPU); the Trainer, config.yaml and the summary
    line say which, and a bf16 run puts the network in channels_last."""
    import yaml
    from lightning.pytorch import Trainer

    from physics import runtime

    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: native)
    used = {}

    class Spy(Callback):
        def on_fit_start(self, trainer: Trainer, pl_module) -> None:
            used["precision"] = trainer.precision
            convs = [m for m in pl_module.net.modules() if isinstance(m, torch.nn.Conv2d)]
            convs = [m for m in convs if m.in_channels > 1]
            conv = convs[0]  # C_in > 1: NCHW and NHWC strides differ (size-1 dims make them ambiguous)
            used["nhwc"] = conv.weight.is_contiguous(memory_format=torch.channels_last)

    original = Trainer.__init__

    def with_spy(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), Spy()], **kwargs)

    monkeypatch.setattr(Trainer, "__init__", with_spy)
    cfg = compose_train(["model=chang_unet", "data=stock_images", *common(tmp_path, data_root),
                         "data.batch_size=4", *SMALL_BANK])  # fmt: skip
    assert cfg.trainer.precision == "auto"  # the shipped default
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert used == {"precision": expected, "nhwc": native}
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == expected and saved["model"]["channels_last"] is native
    assert f"precision {expected}" in capsys.readouterr().out
