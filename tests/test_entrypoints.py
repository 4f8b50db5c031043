"""The four root configs compose, and the entry points of open capabilities refuse honestly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from physics.runtime import EXIT_ERROR
from tests.entrypoint_helpers import run_entry_point
from tests.test_datasets import write_shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["datagen", "train", "reconstruct", "evaluate"])
def test_root_config_composes(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=name)
    assert cfg, f"conf/{name}.yaml is empty"
    assert (ROOT / f"{name}.py").is_file()


def test_train_without_data_exits_with_one_line_naming_the_folder(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"hydra.run.dir={tmp_path}/run",
            f"paths.data_dir={tmp_path}/none",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == EXIT_ERROR
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("deepstem: error: ") and f"{tmp_path}/none/kernel" in last and "datagen.py" in last
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.fixture(scope="module")
def kernel_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "kernel").mkdir()
    for i in range(3):
        write_shard(
            root / "kernel" / f"shard-{i:05d}-of-00003.h5", 12 * i, 12, [f"mp-{i}{j}" for j in range(2)]
        )
    return root


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=-3", "data.batch_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("model.lr=0", "model.lr"),
        ("init_from=absent.ckpt", "init_from"),
        ("model.teacher_ckpt=absent.ckpt", "model.teacher_ckpt"),
        ("threads=0", "threads"),
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches"),
    ],
)
def test_bad_train_config_is_one_line_exit_2_before_anything_is_built(tmp_path, kernel_data, override, key):
    """Checked before model, data, loggers: no traceback, no W&B folder, no config.yaml, no checkpoint."""
    result = run_entry_point("train.py", tmp_path, override, f"paths.data_dir={kernel_data}", progress=None)
    assert result.returncode == EXIT_ERROR, result.stderr[-2000:]
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"deepstem: error: {key}"), lines
    assert not list(tmp_path.rglob("wandb"))
    for name in ("config.yaml", "checkpoints", "metrics.yaml", "figures", "csv"):  # Hydra: .hydra/, log
        assert not (tmp_path / "run" / name).exists(), name


def test_reconstruct_and_evaluate_errors_use_the_one_convention(tmp_path):
    result = run_entry_point("reconstruct.py", tmp_path, "method=ssb")
    assert result.returncode == EXIT_ERROR
    assert _error_lines(result) == [
        "deepstem: error: no input: give input=SCAN (deepstem .h5, EMD 1.0, .mib, Velox .emd, .npy + YAML, "
        "or through LiberTEM's readers .raw + YAML, EMPAD .xml, ...)"
    ]
    result = run_entry_point("reconstruct.py", tmp_path, "input=scan.h5", "threads=-2")
    assert result.returncode == EXIT_ERROR
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("deepstem: error: threads"), lines
    path = "suite.scans.tiny.path=x.h5"
    result = run_entry_point("evaluate.py", tmp_path, "suite=tiny", path, "threads=zero")
    assert result.returncode == EXIT_ERROR
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("deepstem: error: threads"), lines


def test_evaluate_without_the_scan_path_names_the_key_to_set(tmp_path):
    result = run_entry_point("evaluate.py", tmp_path, "suite=tiny")
    assert result.returncode == EXIT_ERROR
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deepstem: error: suite.scans.tiny.path") and "???" not in lines[0], lines
    assert "suite.scans.tiny.path=" in lines[0]  # how to set it
    assert not list(tmp_path.rglob("metrics.json"))


def test_short_run_without_validation_logs_once_and_says_where_its_outputs_are(tmp_path, kernel_data):
    """trainer.limit_train_batches / limit_val_batches=0 (ReduceLROnPlateau on val/loss must not crash),
    Lightning's INFO lines once, and the summary: outputs, checkpoints, the `wandb sync` command."""
    result = run_entry_point(
        "train.py", tmp_path,
        f"paths.data_dir={kernel_data}", "model.net.filters=8", "data.batch_size=4", "data.num_workers=0",
        "trainer.max_epochs=2", "trainer.limit_train_batches=1", "trainer.limit_val_batches=0",
        "trainer.limit_test_batches=1", "trainer.enable_model_summary=false",
        "callbacks.progress_bar.refresh_rate=0", "logger=wandb", "threads=1",
        progress=None,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("`Trainer.fit` stopped: `max_epochs=2` reached.") == 1, output[-3000:]
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    summary = result.stdout
    assert f"outputs in {run}" in summary, summary
    assert str(last) in summary
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert f"wandb sync {offline[0]}" in summary, summary
    assert "2 of 2 epochs" in summary and "1 intra-op thread" in summary, summary
