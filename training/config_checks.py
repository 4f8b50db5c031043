"""Checks of a `python train.py` config before anything is built or written.

A bad value (``data.batch_size=-3``, a missing ``init_from`` file, ``threads=0``, ...) is one
:class:`training.cli.ConfigError` naming the key, raised before the data module, the model, the loggers
(a W&B run folder) or ``config.yaml`` exist; train.py prints it as ``deepstem: error: <message>`` and exits
with :data:`physics.runtime.EXIT_ERROR`.
"""

from __future__ import annotations

import glob
import math
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from physics.runtime import resolve_threads
from training.cli import ConfigError

__all__ = ["loader_workers", "max_time_seconds", "missing_key", "validate_config"]

_GLOB = re.compile(r"[*?\[]")


def missing_key(cfg: DictConfig) -> str | None:
    """The first mandatory value (``???``) left unset, as a dotted key; None when all are set."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    return missing[0] if missing else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def loader_workers(cfg: DictConfig) -> int:
    """DataLoader worker processes of ``cfg.data`` (0 when the data module has no such setting)."""
    value = (cfg.get("data") or {}).get("num_workers", 0)
    return int(value) if _is_int(value) and value > 0 else 0


def max_time_seconds(value: Any) -> float | None:
    """``trainer.max_time`` in seconds: ``"DD:HH:MM:SS"``, a mapping of timedelta keys, or None."""
    if value is None:
        return None
    if isinstance(value, Mapping | DictConfig):
        units = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
        unknown = set(value) - set(units)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; use {sorted(units)}")
        return float(sum(units[k] * float(v) for k, v in value.items()))
    parts = str(value).split(":")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{value!r} is not DD:HH:MM:SS")
    days, hours, minutes, seconds = (int(p) for p in parts)
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def _check_trainer(trainer: Mapping[str, Any]) -> None:
    epochs = trainer.get("max_epochs")
    if epochs is not None and not (_is_int(epochs) and (epochs >= 1 or epochs == -1)):
        raise ConfigError(f"trainer.max_epochs={epochs}: must be a positive integer (or -1: no limit)")
    steps = trainer.get("max_steps")
    if steps is not None and not (_is_int(steps) and (steps >= 1 or steps == -1)):
        raise ConfigError(f"trainer.max_steps={steps}: must be a positive integer (or -1: no limit)")
    for stage in ("train", "val", "test"):
        key = f"limit_{stage}_batches"
        value = trainer.get(key)
        if value is None:
            continue
        lowest = 1 if stage == "train" else 0  # validation and test may be switched off with 0
        if _is_int(value):
            ok = value >= lowest
        else:
            ok = _is_number(value) and (0 < value <= 1 if stage == "train" else 0 <= value <= 1)
        if not ok:
            what = "a positive" if stage == "train" else "a non-negative"
            raise ConfigError(
                f"trainer.{key}={value}: must be {what} number of batches per epoch or a fraction in (0, 1]"
            )
    try:
        seconds = max_time_seconds(trainer.get("max_time"))
    except ValueError as err:
        raise ConfigError(f"trainer.max_time: {err}") from None
    if seconds is not None and seconds <= 0:
        raise ConfigError(f"trainer.max_time={trainer.get('max_time')}: must be longer than 0 s")


def _check_learning_rates(model: Mapping[str, Any]) -> None:
    for key, value in model.items():
        if key == "lr" or str(key).startswith("lr_"):
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ConfigError(f"model.{key}={value}: must be a positive learning rate")


def _check_file(key: str, value: Any) -> None:
    from training.pipeline import absolute_path

    if value in (None, ""):
        return
    path = absolute_path(str(value))
    if not path.is_file():
        raise ConfigError(f"{key}={value}: no such file ({path})")


def _check_data(cfg: DictConfig, data: Mapping[str, Any]) -> None:
    from training.pipeline import absolute_path

    batch = data.get("batch_size")
    if batch is not None and not (_is_int(batch) and batch >= 1):
        raise ConfigError(f"data.batch_size={batch}: must be a positive integer (samples per batch)")
    workers = data.get("num_workers")
    if workers is not None and not (_is_int(workers) and workers >= 0):
        raise ConfigError(f"data.num_workers={workers}: must be 0 (load in the main process) or more")
    for key in ("scan_path", "recon_path"):
        _check_file(f"data.{key}", data.get(key))
    folder = data.get("data_dir")
    if cfg.get("datagen") or not isinstance(folder, str) or _GLOB.search(folder):
        return  # generated first (training/pipeline.py), or a glob / list the data module resolves
    path = absolute_path(folder)
    if not path.exists() and not glob.glob(str(path)):
        raise ConfigError(
            f"data.data_dir={path}: no such shard file or folder (generate data with `python datagen.py` "
            "or point paths.data_dir / data.data_dir at it)"
        )


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first key whose value cannot run; builds and writes nothing."""
    key = missing_key(cfg)
    if key is not None:
        raise ConfigError(f"{key} is not set: give {key}=...")
    try:
        resolve_threads(cfg.get("threads", "auto"), loader_workers(cfg))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    data = cfg.get("data") or {}
    _check_data(cfg, data)
    _check_learning_rates(cfg.get("model") or {})
    _check_trainer(cfg.get("trainer") or {})
    _check_file("init_from", cfg.get("init_from"))
    _check_file("model.teacher_ckpt", (cfg.get("model") or {}).get("teacher_ckpt"))
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "") and str(ckpt).split(":", 1)[0] not in ("last", "best", "hpc", "registry"):
        _check_file("ckpt_path", ckpt)  # names Lightning resolves itself are left to it
    scan = ((cfg.get("callbacks") or {}).get("scan_reconstruction") or {}).get("scan_path")
    _check_file("callbacks.scan_reconstruction.scan_path", scan)
    section = cfg.get("evaluate")
    if section and isinstance(section.get("suite"), str):
        from training.pipeline import load_suite

        load_suite(section.suite, list(section.get("suite_overrides") or []))
