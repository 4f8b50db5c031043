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


@pytest.mark.parametrize("script", ["train.py"])
def test_unfinished_entry_points_exit_non_zero_without_output(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode != 0
    assert "not available yet" in result.stderr
    assert not list(tmp_path.glob("**/*.h5"))
