"""Experiment loggers. Weights & Biases is the dashboard; it runs offline unless a key is set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from datagen.provenance import redacted_argv

__all__ = ["RedactingWandbLogger", "wandb_is_online", "wandb_logger"]


class RedactingWandbLogger(WandbLogger):
    """``WandbLogger`` whose run (created lazily, on first use) never sees a credential in ``sys.argv``."""

    @property
    def experiment(self) -> Any:
        if self._experiment is not None:
            return super().experiment
        with redacted_argv():
            return super().experiment


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
) -> RedactingWandbLogger:
    """A Lightning ``WandbLogger``; offline runs land in ``save_dir/wandb`` (sync later: ``wandb sync``).

    The key is read by wandb itself from the environment and never passed through configs. wandb records
    the command line (``sys.argv``) in the run's metadata; the run is created with credentials redacted
    from it (:func:`datagen.provenance.redacted_argv`), also when ``train`` is called outside a Hydra run.
    """
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    online = wandb_is_online(offline)
    os.environ.setdefault("WANDB_SILENT", "true")
    return RedactingWandbLogger(project=project, save_dir=str(save_dir), offline=not online, **kwargs)
