"""Checks every shipped model under pretrained/ must pass (tests of the model cards' claims)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evaluation.networks import identify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "pretrained"


def check_shipped(name: str, method: str, experiment: str) -> dict[str, Any]:
    """``pretrained/<name>``: present, <= 20 MB, loads weights-only (no pickled objects), holds ``method``
    without optimiser state, records the ``experiment`` that made it with no API key in its config, and is
    documented in pretrained/README.md with that experiment. Returns the loaded checkpoint."""
    path = PRETRAINED / name
    assert path.is_file() and path.stat().st_size <= 20e6, path
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert identify_checkpoint(checkpoint) == method and "optimizer_states" not in checkpoint
    config = checkpoint["deepstem"]["config_yaml"]
    assert f"task_name: {experiment}" in config
    for secret in ("api_key: ", "MP_API_KEY=", "WANDB_API_KEY="):
        assert secret not in config
    card = (PRETRAINED / "README.md").read_text()
    assert name in card and f"experiment={experiment}" in card
    return checkpoint
