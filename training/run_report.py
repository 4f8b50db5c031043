"""What a finished `python train.py` run tells its user, and the run-time adjustments it needs.

* :class:`TrainingSummary` (from :func:`summarize`): how many epochs were trained, what cut the run short
  (``trainer.max_time``, ``trainer.max_steps``, early stopping, an interrupt), where the outputs, the
  checkpoints and the W&B run are (with the ``wandb sync`` command of an offline run); printed at the end
  of training and shown next to the evaluation table of experiment=quickstart.
* :func:`single_lightning_log`: ``import lightning`` gives the ``lightning`` logger a console handler of
  its own while its records also propagate to the root logger that Hydra configures, so every INFO line
  was printed twice; with root handlers present, Lightning's own console handler is dropped.
* :class:`PlateauWithoutValidation`: with validation off (``trainer.limit_val_batches=0``) there is no
  ``val/loss``, and a ReduceLROnPlateau on it would stop training with an error; the learning rate is then
  kept as it is.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

__all__ = [
    "PlateauWithoutValidation",
    "TrainingSummary",
    "duration_text",
    "single_lightning_log",
    "summarize",
]

log = logging.getLogger(__name__)


def duration_text(seconds: float) -> str:
    """``5 min``, ``1 s``, ``2 h``, ``1.5 h``: a cap's length as a user wrote it."""
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def single_lightning_log() -> None:
    """Print each Lightning log record once: drop Lightning's console handler when the root logger
    (Hydra's job logging: console and the run's .log file) already shows propagated records."""
    root = logging.getLogger()
    if not root.handlers:
        return  # outside Hydra: Lightning's own handler is the only one
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # its console handler, not a user's file handler
                logger.removeHandler(handler)
        logger.propagate = True


class PlateauWithoutValidation(Callback):
    """Scheduler monitors on ``val/...`` are not required when validation is off."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.limit_val_batches not in (0, 0.0):
            return
        for config in trainer.lr_scheduler_configs:
            if config.monitor and str(config.monitor).startswith("val/") and config.strict:
                config.strict = False  # Lightning then skips the update instead of failing
                log.info(
                    "validation is off (trainer.limit_val_batches=0): %s keeps its learning rate "
                    "(it monitors %s)", type(config.scheduler).__name__, config.monitor,
                )  # fmt: skip


@dataclass
class TrainingSummary:
    """One training run, as printed at its end and recorded next to its evaluation."""

    output_dir: str
    epochs: float  # epochs trained; fractional when a cap stopped the run inside an epoch
    max_epochs: int | None
    stopped_by: str | None  # e.g. "the 5 min cap (trainer.max_time)"; None: ran to its end
    seconds: float
    threads: int
    workers: int
    init_from: str | None = None
    best: str | None = None
    last: str | None = None
    wandb: list[str] = field(default_factory=list)  # `wandb sync ...` commands or run URLs
    precision: str | None = None  # Lightning's trainer.precision the run used (e.g. "32-true", "bf16-mixed")

    def epochs_text(self) -> str:
        """``4.9 of 40 epochs`` (``2 of 2 epochs`` for a run that finished)."""
        done = f"{self.epochs:.1f}" if self.stopped_by else f"{self.epochs:.3g}"
        total = f" of {self.max_epochs}" if self.max_epochs and self.max_epochs > 0 else ""
        return f"{done}{total} epochs"

    def trained_text(self) -> str:
        """``for 10 of 10 epochs (4.1 min)`` or ``stopped by the 5 min cap (trainer.max_time) after ...``."""
        took = duration_text(self.seconds)
        if self.stopped_by:
            return f"stopped by {self.stopped_by} after {self.epochs_text()} ({took})"
        return f"for {self.epochs_text()} ({took})"

    def lines(self) -> list[str]:
        threads = f"{self.threads} intra-op thread{'s' if self.threads != 1 else ''}"
        workers = f", {self.workers} loader worker{'s' if self.workers != 1 else ''}" if self.workers else ""
        start = f" from {self.init_from}" if self.init_from else ""
        precision = f", precision {self.precision}" if self.precision else ""
        lines = [f"train: trained{start} {self.trained_text()}, {threads}{workers}{precision}"]
        if self.stopped_by:
            lines.append(f"train: warning: training did not reach its end; stopped by {self.stopped_by}")
        lines.append(f"train: outputs in {self.output_dir} (config.yaml, metrics.yaml, figures/, logs)")
        checkpoints = [f"{name} {path}" for name, path in (("best", self.best), ("last", self.last)) if path]
        if checkpoints:
            lines.append(f"train: checkpoints: {', '.join(checkpoints)}")
        lines.extend(f"train: W&B run: {entry}" for entry in self.wandb)
        return lines

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stopped_by(trainer: Any, epochs: float) -> str | None:
    from lightning.pytorch.callbacks import EarlyStopping, Timer

    if getattr(trainer, "interrupted", False):
        return "an interrupt"
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > 0 and epochs >= max_epochs - 1e-6:
        return None
    for callback in trainer.callbacks:
        if isinstance(callback, Timer):
            remaining = callback.time_remaining()
            duration = getattr(callback, "_duration", None)
            if remaining is not None and remaining <= 0 and duration:
                return f"the {duration_text(duration)} cap (trainer.max_time)"
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
            return f"early stopping on {callback.monitor}"
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return f"trainer.max_steps={trainer.max_steps}"
    return None


def _epochs(trainer: Any) -> float:
    batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed
    per_epoch = trainer.num_training_batches
    if isinstance(per_epoch, int | float) and math.isfinite(per_epoch) and per_epoch > 0:
        return batches / per_epoch
    return float(trainer.current_epoch)


def _wandb_lines(loggers: list) -> list[str]:
    lines = []
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        folder = Path(run.dir).parent  # <save_dir>/wandb/<offline-run-...>/files -> the run folder
        if run.settings.mode == "offline" or folder.name.startswith("offline-"):
            lines.append(f"offline; upload it with: wandb sync {folder}")
        else:
            lines.append(str(getattr(run, "url", folder)))
    return lines


def summarize(
    trainer: Any, cfg: Any, loggers: list, seconds: float, threads: int, workers: int
) -> TrainingSummary:
    """The summary of ``trainer``'s finished fit (call before the loggers are finished)."""
    epochs = _epochs(trainer)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last = None
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or ""
        if not path and getattr(callback, "monitor", "x") is None:
            path = getattr(callback, "best_model_path", "") or ""  # the unmonitored last.ckpt callback
        if path and Path(path).name.startswith("last"):
            last = path
    return TrainingSummary(
        output_dir=str(cfg.paths.output_dir),
        epochs=epochs,
        max_epochs=trainer.max_epochs,
        stopped_by=_stopped_by(trainer, epochs),
        seconds=seconds,
        threads=threads,
        workers=workers,
        init_from=str(cfg.init_from) if cfg.get("init_from") else None,
        best=best or None,
        last=last,
        wandb=_wandb_lines(loggers),
        precision=str(trainer.precision) if getattr(trainer, "precision", None) is not None else None,
    )
