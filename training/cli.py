"""`python train.py model=... data=...`: instantiate the configured model, data, trainer, loggers and
callbacks, check that model and data fit together, train, test, and return the metrics (for sweeps)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, open_dict

from datagen.provenance import config_yaml
from datagen.store import StoreError
from training.datasets import ShardReadError

if TYPE_CHECKING:
    from training.run_report import TrainingSummary

__all__ = [
    "PAIRINGS",
    "ConfigError",
    "check_pairing",
    "checked_resume_path",
    "fit",
    "load_weights",
    "resolve_trainer_precision",
    "train",
]

log = logging.getLogger(__name__)

# model class -> {data module class: view of the multislice data (or None)}
PAIRINGS: dict[str, dict[str, str | None]] = {
    "AIRPILightning": {"MultisliceDataModule": "airpi"},
    "PtychoNNLightning": {"MultisliceDataModule": "ptychonn", "EpieLabelsDataModule": None},
    "ChangLightning": {"StockImagesDataModule": None},
    "CGRDNLightning": {"HaadfDataModule": None},
}
_CONFIG_NAMES = {
    "AIRPILightning": "airpi",
    "PtychoNNLightning": "ptychonn",
    "ChangLightning": "chang_unet",
    "CGRDNLightning": "cgrdn",
    "MultisliceDataModule": "multislice",
    "StockImagesDataModule": "stock_images",
    "HaadfDataModule": "haadf",
    "EpieLabelsDataModule": "epie_labels",
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the parameter.

    train.py prints it as ``deepstem: error: <message>`` (:func:`physics.runtime.report_error`), so a
    leading ``train.py: `` of older messages is dropped here.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(str(message).removeprefix("train.py: "))


def _class_name(node: Any, group: str) -> str:
    target = node.get("_target_") if isinstance(node, Mapping | DictConfig) else None
    if not target:
        raise ConfigError(f"train.py: {group} has no _target_; choose one with {group}=NAME")
    return str(target).rsplit(".", 1)[-1]


def check_pairing(cfg: DictConfig) -> None:
    """Reject model/data pairs that do not fit and resolve ``data.view=auto`` for the multislice data."""
    model, data = _class_name(cfg.model, "model"), _class_name(cfg.data, "data")
    allowed = PAIRINGS.get(model)
    if allowed is None:
        raise ConfigError(f"train.py: unknown model class {model}")
    if data not in allowed:
        names = " or ".join(f"data={_CONFIG_NAMES.get(d, d)}" for d in allowed)
        raise ConfigError(
            f"train.py: model={_CONFIG_NAMES.get(model, model)} trains on {names}, "
            f"not data={_CONFIG_NAMES.get(data, data)}"
        )
    view = allowed[data]
    if view is not None and "view" in cfg.data:
        if cfg.data.view in (None, "auto"):
            with open_dict(cfg):
                cfg.data.view = view
        elif cfg.data.view != view:
            raise ConfigError(
                f"train.py: data.view={cfg.data.view} does not fit model={_CONFIG_NAMES[model]}; use {view}"
            )


def load_weights(model: Any, path: str | Path) -> None:
    """Initialise ``model`` from a checkpoint's weights (fresh optimiser and schedule: fine-tuning).

    The file is read weights-only (:func:`models.checkpoints.load_checkpoint`): a checkpoint that would
    run code when unpickled is refused with one line naming it.
    """
    from models.checkpoints import CheckpointError, load_checkpoint
    from training.pipeline import absolute_path

    path = absolute_path(path)  # relative to where train.py was started
    if not path.is_file():
        raise ConfigError(f"train.py: init_from={path}: no such checkpoint")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"train.py: init_from={err}") from None
    state = checkpoint.get("state_dict", checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"train.py: init_from={path} holds weights of another model "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys for {type(model).__name__})"
        )


# ckpt_path values that Lightning resolves itself (it then loads them with the weights_only we pass)
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def checked_resume_path(ckpt_path: Any) -> str | None:
    """``ckpt_path`` for ``trainer.fit``, after reading the file with the safe loader.

    Lightning is also called with ``weights_only=True``, so that it cannot unpickle code either; checking
    first turns a refused or unreadable file into one line naming it instead of a traceback.
    """
    from models.checkpoints import CheckpointError, check_checkpoint
    from training.pipeline import absolute_path

    if ckpt_path in (None, ""):
        return None
    text = str(ckpt_path)
    if text in _LIGHTNING_CKPT_NAMES or text.startswith("registry:"):
        return text
    path = absolute_path(text)  # relative to where train.py was started
    if not path.is_file():
        raise ConfigError(f"train.py: ckpt_path={path}: no such checkpoint")
    try:
        check_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"train.py: ckpt_path={err}") from None
    return str(path)


def _lightning_precisions() -> set[str]:
    """The ``trainer.precision`` values Lightning accepts, as strings (empty where they cannot be read)."""
    from typing import get_args

    try:
        from lightning.fabric.plugins.precision import precision as names
    except ImportError:  # pragma: no cover - a Lightning without this module validates by itself
        return set()
    literals = ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_INT", "_PRECISION_INPUT_STR_ALIAS")
    return {str(value) for name in literals for value in get_args(getattr(names, name, None))}


def resolve_trainer_precision(cfg: DictConfig) -> str | int | None:
    """Resolve ``cfg.trainer.precision`` in place (``auto`` -> ``bf16-mixed`` or ``32-true``); returns it.

    ``auto`` (the default of conf/trainer/*.yaml) is ``bf16-mixed`` where the accelerator in use
    (``trainer.accelerator``) has native bf16 arithmetic (:func:`physics.runtime.bf16_supported`: AVX512-BF16
    or AMX on an x86 CPU, compute capability >= 8.0 on CUDA) and ``32-true`` elsewhere; any other Lightning
    value passes through unchanged (an explicit bf16 one on hardware without bf16 units warns once: emulated
    bf16 is slower than fp32). Where the result is a bf16 precision, the model's ``channels_last`` switch is
    turned on (NHWC memory order, oneDNN's and cuDNN's fast layout for bf16 convolutions; the numbers do not
    depend on it). Runs before config.yaml is written, so the saved config says what the run used. A config
    without ``trainer.precision`` is left to Lightning's default; a value Lightning does not know is a
    :class:`ConfigError` naming it.
    """
    from physics.runtime import TRAINING_AUTO, accelerator_device_type, resolve_training_precision

    trainer = cfg.get("trainer")
    if trainer is None or "precision" not in trainer:
        return None
    requested = trainer.precision
    known = _lightning_precisions()
    if known and requested is not None and str(requested).strip().lower() != TRAINING_AUTO:
        if str(requested) not in known:
            raise ConfigError(
                f"trainer.precision={requested}: must be auto or one of {', '.join(sorted(known))}"
            )
    device_type = accelerator_device_type(trainer.get("accelerator"))
    precision = resolve_training_precision(requested, device_type)
    with open_dict(cfg):
        cfg.trainer.precision = precision
        model = cfg.get("model")
        if "bf16" in str(precision) and model is not None and model.get("channels_last") is False:
            cfg.model.channels_last = True
    if precision != requested:
        log.info("trainer.precision=%s on %s: %s", requested, device_type, precision)
    return precision


def _instantiate_all(nodes: DictConfig | None) -> list:
    from hydra.utils import instantiate

    if not nodes:
        return []
    return [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and optionally test) the configured model; returns the final callback metrics."""
    return fit(cfg)[0]


def fit(cfg: DictConfig) -> tuple[dict[str, float], TrainingSummary]:
    """Fit (and optionally test) the configured model; returns the final callback metrics and the
    :class:`training.run_report.TrainingSummary` printed at the end (epochs, caps, outputs, W&B)."""
    import lightning as L
    from hydra.utils import instantiate

    from physics.runtime import configure_threads
    from training.config_checks import loader_workers, validate_config
    from training.run_report import PlateauWithoutValidation, single_lightning_log, summarize

    validate_config(cfg)  # before anything is built or written
    check_pairing(cfg)
    resume = checked_resume_path(cfg.get("ckpt_path"))  # before any work: a refused file is one line
    resolve_trainer_precision(cfg)  # auto -> bf16-mixed | 32-true, before config.yaml is written
    single_lightning_log()
    workers = loader_workers(cfg)
    threads = configure_threads(cfg.get("threads", "auto"), workers)
    L.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = config_yaml(cfg)  # secrets redacted
    (output_dir / "config.yaml").write_text(resolved)

    datamodule = instantiate(cfg.data)
    try:
        datamodule.setup("fit")
    except (ShardReadError, StoreError) as err:
        raise ConfigError(
            f"train.py: {err} (generate data with `python datagen.py` or point paths.data_dir / "
            "data.data_dir at it)"
        ) from None
    model = instantiate(cfg.model)
    if cfg.get("init_from"):
        load_weights(model, cfg.init_from)
    callbacks = [*_instantiate_all(cfg.get("callbacks")), PlateauWithoutValidation()]
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(yaml.safe_load(resolved))

    log.info(
        "training %s on %s (%d intra-op threads, %d loader workers)",
        type(model).__name__, type(datamodule).__name__, threads, workers,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model=model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test") and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    (output_dir / "metrics.yaml").write_text(yaml.safe_dump(metrics, sort_keys=True))
    summary = summarize(trainer, cfg, loggers, seconds, threads, workers)
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "finish"):
            experiment.finish()
    print("\n".join(summary.lines()), flush=True)
    return metrics, summary


def run(cfg: DictConfig) -> float | None:
    """Entry point body: train, then return ``optimized_metric`` for Hydra sweepers.

    With ``datagen`` / ``evaluate`` set (e.g. experiment=quickstart) the training data are generated
    first and the trained checkpoint is benchmarked afterwards (:mod:`training.pipeline`).
    """
    from training.config_checks import validate_config
    from training.pipeline import evaluate_checkpoint, prepare_data

    validate_config(cfg)  # before datagen, training and evaluation: a bad value is one line
    prepare_data(cfg)
    metrics, summary = fit(cfg)
    evaluate_checkpoint(cfg, training=summary)
    name = cfg.get("optimized_metric")
    if name:
        if name not in metrics:
            raise ConfigError(f"train.py: optimized_metric={name} was not logged; logged: {sorted(metrics)}")
        return metrics[name]
    return None
