"""The four root configs compose, and the entry points of open capabilities refuse honestly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

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
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: ") and f"{tmp_path}/none/kernel" in last and "datagen.py" in last
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("**/*.ckpt"))
