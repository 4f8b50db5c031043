"""Experiment loggers. Weights & Biases is the dashboard; it runs offline unless a key is set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["wandb_is_online", "wandb_logger"]


def wandb_is_online(offline: bool | str = "auto") -> bool:
    """``offline="auto"``: online exactly when ``WANDB_API_KEY`` is set and ``WANDB_MODE`` is not offline."""
    if offline == "auto":
        return bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE", "") not in (
            "offline",
            "disabled",
        )
    return not bool(offline)


def wandb_logger(
    project: str = "deepstem",
    save_dir: str | os.PathLike = ".",
    offline: bool | str = "auto",
    **kwargs: Any,
):
    """A Lightning ``WandbLogger``; offline runs land in ``save_dir/wandb`` (sync later: ``wandb sync``).

    The key is read by wandb itself from the environment and never passed through configs.
    """
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    online = wandb_is_online(offline)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=project, save_dir=str(save_dir), offline=not online, **kwargs)
