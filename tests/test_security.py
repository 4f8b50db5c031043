"""Security: no checkpoint can run code when loaded, and no secret typed on the command line reaches a file.

A crafted checkpoint here unpickles to ``open(marker, "w")``: with the full unpickler that creates the
marker file (harmless, inside tmp_path); deepstem must refuse the file with one line naming it instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from datagen import store
from models.checkpoints import CheckpointError, check_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "airpi_reference.ckpt"
SECRET = "SECRETVALUE-0123456789"


class _CreatesMarker:
    """Unpickles to ``open(marker, "w")``: a checkpoint that runs code, with a harmless, visible effect."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A Lightning-looking checkpoint whose unpickling would create ``folder/marker``."""
    path, marker = folder / "crafted.ckpt", folder / "marker"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _CreatesMarker(marker)}}, path)
    assert not marker.exists()
    return path, marker


def _env(**extra: str) -> dict[str, str]:
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes torch.load default to the full unpickler wherever a caller
    # leaves weights_only unset (Lightning's resume does): deepstem must not depend on torch's default.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", **extra}


def _run(script: str, cwd: Path, *overrides: str, env: dict[str, str] | None = None):
    quiet = [] if script == "train.py" else ["progress=false"]
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides, f"hydra.run.dir={cwd}/run", *quiet],
        capture_output=True, text=True, cwd=cwd, timeout=300, env=env or _env(),
    )  # fmt: skip


def _assert_refused(result: subprocess.CompletedProcess, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the crafted checkpoint ran code"
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("deepstem: error: "), result.stderr[-2000:]
    assert str(path) in lines[-1] and "refused" in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def _write_kernel_shard(path: Path, first: int, n: int, k: int = 8) -> None:
    """A small schema-complete kernel shard (CBEDs are fractions of the beam, as the store requires)."""
    rng = np.random.default_rng(first)
    index = np.arange(first, first + n)
    cbed = rng.random((n, 9, k, k), dtype=np.float32) / (2 * k * k)
    metadata = {
        "energy_eV": np.full(n, 200e3), "semiangle_mrad": np.full(n, 20.0), "gmax_invA": np.full(n, 2.0),
        "step_A": np.full(n, 0.1), "Cs_A": np.full(n, 1e4), "defocus_A": np.full(n, 19.4),
        "thickness_A": np.full(n, 10.0), "rotation_deg": np.zeros(n), "zone_axis": np.tile([0, 0, 1], (n, 1)),
        "num_phonons": np.full(n, 2), "seed": index,
    }  # fmt: skip
    with store.create(path, store.KERNEL) as f:
        f.create_dataset("cbed", data=cbed, chunks=(4, 9, k, k))
        f.create_dataset("wave", data=(rng.random((n, k, k)) * (1 + 1j)).astype(np.complex64))
        f.create_dataset("probe", data=np.ones((n, k, k), np.complex64))
        for key, value in metadata.items():
            f.create_dataset(key, data=value)
        for key, values in (("source_id", [f"mp-{first + i % 2}" for i in range(n)]), ("formula", ["X"] * n)):
            f.create_dataset(key, data=np.array(values, dtype=object), dtype=h5py.string_dtype())


@pytest.fixture(scope="module")
def kernel_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "kernel").mkdir()
    for i in range(3):
        _write_kernel_shard(root / "kernel" / f"shard-{i:05d}-of-00003.h5", 12 * i, 12)
    return root


def _train_overrides(data: Path) -> list[str]:
    return [f"paths.data_dir={data}", "logger=csv", "model=ptychonn", "data.num_workers=0",
            "data.batch_size=4", "test=false", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "callbacks.prediction_images=null",
            "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# 1. checkpoints


def test_safe_loader_refuses_a_checkpoint_that_runs_code(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="refused") as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(CheckpointError, match="refused"):
        check_checkpoint(path)
    assert not marker.exists()
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.ckpt: not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")


def test_evaluation_load_network_refuses_it(tmp_path):
    from evaluation.networks import load_network

    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="refused"):
        load_network(path, "airpi")
    assert not marker.exists()


def test_reconstruct_py_refuses_it(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    result = _run("reconstruct.py", tmp_path, f"input={tmp_path}/scan.h5", "method=airpi", f"ckpt={path}")
    _assert_refused(result, path, marker)


def test_evaluate_py_refuses_it(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    (tmp_path / "scan.h5").write_bytes(b"")  # the checkpoints are loaded before any scan is read
    result = _run(
        "evaluate.py", tmp_path, "suite=tiny", f"suite.scans.tiny.path={tmp_path}/scan.h5",
        "+suite.methods.net.method=airpi", f"+suite.methods.net.ckpt={path}",
    )  # fmt: skip
    _assert_refused(result, path, marker)


@pytest.mark.parametrize("key", ["init_from", "ckpt_path"])
def test_train_py_refuses_it(key, tmp_path, kernel_data):
    path, marker = crafted_checkpoint(tmp_path)
    result = _run("train.py", tmp_path, *_train_overrides(kernel_data), f"{key}={path}")
    _assert_refused(result, path, marker)


def test_own_checkpoints_still_load(tmp_path, kernel_data):
    """The shipped export and a checkpoint of a real (short) training run, through every loader."""
    from hydra import compose, initialize_config_dir

    from evaluation.networks import load_network
    from training.cli import checked_resume_path, train

    assert load_network(SHIPPED, "airpi").deepstem_info  # the export's provenance section
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[*_train_overrides(kernel_data), f"paths.output_dir={tmp_path}/a"]
        )
    train(cfg)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert {"state_dict", "optimizer_states", "callbacks", "loops"} <= set(load_checkpoint(last))
    assert checked_resume_path(last) == str(last)
    load_network(last, "ptychonn")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        resumed = compose(
            config_name="train",
            overrides=[*_train_overrides(kernel_data), f"paths.output_dir={tmp_path}/b",
                       "trainer.max_epochs=2", f"ckpt_path={last}", f"init_from={last}"],
        )  # fmt: skip
    train(resumed)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")["epoch"] == 1


# ------------------------------------------------------------------------------------------------------
# 4. secrets typed on the command line


def _assert_no_secret(folder: Path, *secrets: str) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"{secret} leaked into {path}"
    return files


def test_redact_overrides_keeps_valid_overrides():
    from datagen.provenance import redact_overrides, secret_override_values

    typed = ["+source.api_key=abc123", "+a.token='x y z'", "model=airpi", f"+notes={SECRET}", "~b.password"]
    extra = secret_override_values(typed)
    assert redact_overrides(typed, extra) == [
        "+source.api_key='<redacted>'", "+a.token='<redacted>'", "model=airpi", f"+notes={SECRET}",
        "~b.password",
    ]  # fmt: skip
    assert redact_overrides([f"+notes=a{SECRET}b"], [SECRET]) == ["+notes='<redacted>'"]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(redact_overrides(typed, extra))
    assert parsed[0].value() == "<redacted>"


def test_train_py_writes_no_typed_secret_anywhere(tmp_path, kernel_data):
    """.hydra/*.yaml, deepstem's config.yaml, logs and the W&B offline run (its "args" included)."""
    env = _env(MP_API_KEY="ENVSECRET-abcdef", WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    overrides = [o for o in _train_overrides(kernel_data) if o != "logger=csv"]
    result = _run(
        "train.py", tmp_path, *overrides, "logger=wandb", f"+extra.api_key={SECRET}",
        f"+wandb_token={SECRET}2", "+notes=ENVSECRET-abcdef", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    files = _assert_no_secret(run, SECRET, "ENVSECRET-abcdef")
    names = {p.name for p in files}
    assert {"config.yaml", "hydra.yaml", "overrides.yaml"} <= names
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "+extra.api_key='<redacted>'" in (run / ".hydra" / "overrides.yaml").read_text()


def test_datagen_py_rejected_key_is_not_stored(tmp_path):
    result = _run("datagen.py", tmp_path, "source=materials_project", f"+source.api_key={SECRET}")
    assert result.returncode != 0 and "MP_API_KEY" in result.stderr
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").is_file()
    _assert_no_secret(tmp_path / "run", SECRET)


def test_multirun_outputs_hold_no_secret(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "reconstruct.py"), "-m", f"hydra.sweep.dir={tmp_path}/multi",
         f"input={tmp_path}/absent.h5", "method=icom", "progress=false", f"+x.api_key={SECRET},{SECRET}2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=_env(),
    )  # fmt: skip
    assert (tmp_path / "multi" / "multirun.yaml").is_file(), result.stderr[-3000:]
    assert (tmp_path / "multi" / "0" / ".hydra" / "overrides.yaml").is_file()
    _assert_no_secret(tmp_path / "multi", SECRET)
    assert SECRET not in result.stdout + result.stderr
