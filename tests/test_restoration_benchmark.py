"""scripts/restoration_benchmark.py end to end on one tiny image, with a tiny (untrained) CGRDN checkpoint."""

from __future__ import annotations

import json
from types import ModuleType

import lightning
import numpy as np
import pytest
import torch

from models.lightning import CGRDNLightning
from tests.script_modules import load_script

TINY_CGRDN = {
    "net": {"features": 4, "growth": 2, "rdb_layers": 1, "rdbs_per_grdb": 1, "grdbs": 1},
    "discriminator": {"channels": [4, 4, 4, 4]},
}


def _script() -> ModuleType:
    return load_script("restoration_benchmark")


def test_benchmark_scores_every_method_at_every_dose(tmp_path):
    pytest.importorskip("bm3d")
    torch.manual_seed(0)
    model = CGRDNLightning(**TINY_CGRDN)
    ckpt = tmp_path / "cgrdn.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        ckpt,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["--images", "1", "--pixels", "48", "--doses", "5e3", "5e5", "--ckpt", str(ckpt)]
        assert _script().main([*args, "--out", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "out" / "restoration_benchmark.json").read_text())
    table = {(row["dose_e_per_A2"], row["method"]): row for row in result["table"]}
    assert set(table) == {(d, m) for d in (5e3, 5e5) for m in ("noisy", "gaussian_oracle", "bm3d", "cgrdn")}
    for row in table.values():
        assert np.isfinite(row["psnr_db"]) and -1.0 <= row["ssim"] <= 1.0
    # more dose, less noise; the oracle is never below the input it filters (width 0 is a candidate)
    assert table[(5e5, "noisy")]["psnr_db"] > table[(5e3, "noisy")]["psnr_db"] + 5.0
    for dose in (5e3, 5e5):
        assert table[(dose, "gaussian_oracle")]["psnr_db"] >= table[(dose, "noisy")]["psnr_db"]
    markdown = (tmp_path / "out" / "restoration_benchmark.md").read_text()
    assert markdown.count("| cgrdn |") == 2
    assert (tmp_path / "out" / "restoration_benchmark.png").stat().st_size > 0
