"""Export a trained Lightning checkpoint as a small inference checkpoint (what ``pretrained/`` ships).

``python scripts/export_checkpoint.py RUN/checkpoints/last.ckpt pretrained/airpi_reference.ckpt
[--config RUN/config.yaml] [--trained-for energy_eV=300000 semiangle_mrad=20 scan_step_A=0.24:0.36 ...]``

Keeps what :func:`evaluation.networks.load_network` and ``LightningModule.load_from_checkpoint`` need
(``state_dict`` with the batch-norm running statistics, ``hyper_parameters``) plus the epoch, the global step
and a ``deepstem`` section (source checkpoint name, export time, the training run's resolved config as YAML
text, ``trained_for``: the ranges of the training data, which ``reconstruct.py`` compares with a scan's
calibration, warns about and resamples to); drops the optimiser, scheduler, callback and loop states (for
AIRPI ~2/3 of the file). Every value is a tensor or a plain Python container, so ``torch.load(...,
weights_only=True)`` reads it. Written under a temporary name and renamed: an interrupted export leaves no
partial file under the final name. The resolved config is passed through the provenance redaction, so no
API key reaches the file.

``--trained-for`` takes ``KEY=VALUE`` (one value) or ``KEY=LOW:HIGH`` for the quantities of
:data:`evaluation.networks.TRAINED_FOR_UNITS`: ``energy_eV``, ``semiangle_mrad``, ``alpha_over_gmax``,
``scan_step_A``, ``Cs_A``, ``defocus_A``, ``dose_e_per_cbed``; each is stored as ``[low, high]`` (floats).

Re-exporting an export (source = an earlier output of this script, e.g. to record new ranges in place:
``export_checkpoint.py pretrained/airpi_reference.ckpt pretrained/airpi_reference.ckpt --trained-for ...``)
keeps its ``deepstem`` section (source checkpoint, export time, config) and replaces only what is given,
noting the time in ``deepstem.updated``; the tensors are copied unchanged.

With ``--config`` of a Chang U-Net run (stock-image data) the ranges and the input geometry are read off the
config (:func:`recorded_from_config`: energy, semi-angle, defocus, Cs, dose; ``deepstem.geometry`` =
``diffraction_px``, ``bin_factor``, ``collection_ratio``, ``illuminated_fraction``), which
``reconstruct.py method=chang_unet`` then uses; ``--trained-for`` overrides single quantities.

Bad arguments (unknown key, ``LOW > HIGH``, not a number, a missing or unreadable source) print one line
``deepstem: error: ...`` and exit 2 (:func:`physics.runtime.report_error`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def plain(value: Any) -> Any:
    """Containers of the checkpoint as plain dicts/lists (Lightning stores an ``AttributeDict``)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def parse_trained_for(items: Sequence[str]) -> dict[str, list[float]]:
    """``["energy_eV=300000", "scan_step_A=0.24:0.36"]`` -> ``{"energy_eV": [300000.0, 300000.0],
    "scan_step_A": [0.24, 0.36]}``.

    Raises ValueError (one line naming the item) for an unknown or repeated key, a value that is not a
    finite number, ``LOW > HIGH``, or an ``alpha_over_gmax`` outside ``(0, 1)``.
    """
    from evaluation.networks import TRAINED_FOR_UNITS

    ranges: dict[str, list[float]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--trained-for takes KEY=VALUE or KEY=LOW:HIGH, got {item!r}")
        if key not in TRAINED_FOR_UNITS:
            raise ValueError(
                f"--trained-for: unknown quantity {key!r}; choose from {', '.join(TRAINED_FOR_UNITS)}"
            )
        if key in ranges:
            raise ValueError(f"--trained-for: {key} given twice")
        parts = text.split(":")
        try:
            bounds = [float(part) for part in parts] if len(parts) <= 2 else []
        except ValueError:
            bounds = []
        if not bounds or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"--trained-for: {item!r}: give {key}=NUMBER or {key}=LOW:HIGH")
        low, high = bounds[0], bounds[-1]
        if low > high:
            raise ValueError(f"--trained-for: {item!r}: LOW {low:g} is above HIGH {high:g}")
        if key == "alpha_over_gmax" and not 0 < low <= high < 1:
            raise ValueError(f"--trained-for: {item!r}: alpha_over_gmax must lie in (0, 1)")
        ranges[key] = [low, high]
    return ranges


def _bounds(value: Any) -> list[float]:
    values = [float(v) for v in value] if isinstance(value, list | tuple) else [float(value)]
    return [min(values), max(values)]


def recorded_from_config(config: Mapping[str, Any]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``(trained_for, geometry)`` read off a training run's resolved config, for the data modules whose
    config states the optics: the stock-image data of the Chang U-Net (``data.forward_model``, missing keys
    at :class:`datagen.stock_images.ChangForwardModel`'s defaults): ``energy_eV``, ``semiangle_mrad``,
    ``defocus_A`` (``-C10_A`` reversed), ``Cs_A``, ``dose_e_per_cbed`` (``data.dose_e_range``; absent for
    noise-free training) and the geometry ``diffraction_px``, ``bin_factor``, ``collection_ratio``,
    ``illuminated_fraction``. ``({}, {})`` for other data (their optics live in the shards: give
    ``--trained-for``). The scan step is not recorded: one pattern's network does not depend on it."""
    import inspect

    data = config.get("data") or {}
    if not str(data.get("_target_", "")).endswith("StockImagesDataModule"):
        return {}, {}
    from datagen.stock_images import ChangForwardModel

    defaults = {
        name: p.default
        for name, p in inspect.signature(ChangForwardModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    forward = {**defaults, **(data.get("forward_model") or {})}
    c10 = _bounds(forward["C10_A"])
    trained_for = {
        "energy_eV": _bounds(forward["energy_eV"]),
        "semiangle_mrad": _bounds(forward["semiangle_mrad"]),
        "defocus_A": [-c10[1], -c10[0]],
        "Cs_A": _bounds(forward["Cs_A"]),
    }
    if data.get("dose_e_range") is not None:
        trained_for["dose_e_per_cbed"] = _bounds(data["dose_e_range"])
    geometry = {
        key: float(forward[key])
        for key in ("diffraction_px", "bin_factor", "collection_ratio", "illuminated_fraction")
    }
    return trained_for, geometry


def save_atomic(checkpoint: Mapping[str, Any], target: Path) -> None:
    """``torch.save`` under a temporary name beside ``target``, then renamed: an interrupted write leaves
    no partial file under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def export(
    source: Path,
    target: Path,
    config_yaml: str | None = None,
    trained_for: Mapping[str, Sequence[float] | float] | None = None,
    geometry: Mapping[str, float] | None = None,
    weights_dtype: str = "float32",
) -> dict[str, Any]:
    """Write the slim checkpoint of ``source`` to ``target``; returns what was written.

    ``trained_for`` maps a quantity to ``[low, high]`` (or one number: ``[v, v]``). When ``source`` is
    itself an export, its ``deepstem`` section is kept and only ``config_yaml`` / ``trained_for`` given
    here replace its entries; ``geometry`` (the network's input geometry, e.g. the Chang U-Net's
    ``diffraction_px`` / ``bin_factor`` / ``collection_ratio`` / ``illuminated_fraction``) likewise.
    ``weights_dtype="float16"`` stores the floating-point tensors in half precision (half the file: the
    9.4 M-parameter Chang U-Net is 38 MB in float32); :func:`evaluation.networks.load_network` copies them
    into the float32 model, so inference runs as before, on weights rounded to 11 significant bits
    (recorded as ``deepstem.weights_dtype``); a tensor outside the float16 range (a batch-norm running
    variance above 65504) stays float32 and is named in ``deepstem.float32_tensors``. Raises
    :class:`models.checkpoints.CheckpointError` for an unreadable source.
    """
    from models.checkpoints import CheckpointError, load_checkpoint

    checkpoint = load_checkpoint(source)  # weights only: a crafted file cannot run code here either
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{source}: not a Lightning checkpoint (no 'state_dict')")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    previous = plain(checkpoint.get("deepstem") or {})
    deepstem = {
        "source_checkpoint": source.name,
        "exported": now,
        "config_yaml": "",
        "trained_for": {},
    }
    if previous:
        deepstem.update(previous)
        deepstem["updated"] = now
    if config_yaml is not None:
        deepstem["config_yaml"] = config_yaml
    if trained_for is not None:
        deepstem["trained_for"] = {
            str(k): [float(v), float(v)] if isinstance(v, int | float) else [float(v[0]), float(v[-1])]
            for k, v in trained_for.items()
        }
    if geometry is not None:
        deepstem["geometry"] = {str(k): float(v) for k, v in geometry.items()}
    if weights_dtype not in ("float32", "float16"):
        raise CheckpointError(f"weights_dtype must be float32 or float16, got {weights_dtype!r}")
    state = {}
    kept_float32 = []
    for key, value in checkpoint["state_dict"].items():
        value = value.detach().clone()
        if weights_dtype == "float16" and value.is_floating_point():
            if value.numel() and float(value.abs().max()) > float(torch.finfo(torch.float16).max):
                kept_float32.append(key)  # e.g. a batch-norm running variance: kept exact, a few numbers
            else:
                value = value.to(torch.float16)
        state[key] = value
    deepstem["weights_dtype"] = weights_dtype
    if kept_float32:
        deepstem["float32_tensors"] = kept_float32
    slim = {
        "state_dict": state,
        "hyper_parameters": plain(checkpoint.get("hyper_parameters") or {}),
        "epoch": int(checkpoint.get("epoch", -1)),
        "global_step": int(checkpoint.get("global_step", -1)),
        "pytorch-lightning_version": str(checkpoint.get("pytorch-lightning_version", "")),
        "deepstem": deepstem,
    }
    save_atomic(slim, target)
    return slim


def strip_weight_average(source: Path, target: Path) -> dict[str, Any]:
    """Write the whole training state of ``source`` to ``target`` without its weight-average copy.

    A run with a :class:`lightning.pytorch.callbacks.WeightAveraging` callback (e.g. EMA) saves the
    averaged weights as ``state_dict`` and the trained ones as ``current_model_state``: one more copy of
    the weights (AIRPI: 25.7 -> 34.3 MB). This puts the trained weights back as ``state_dict`` and drops
    the average, so that the file resumes the run exactly (weights, optimiser, schedule, loops, data
    position) except that the average restarts from the trained weights (Lightning warns "not created with
    WeightAveraging"); with decay d it has caught up after ~1 / (1 - d) steps. Written under a temporary
    name and renamed."""
    from models.checkpoints import CheckpointError, load_checkpoint

    checkpoint = load_checkpoint(source)
    if "current_model_state" not in checkpoint:
        raise CheckpointError(f"{source}: no weight average to strip (no 'current_model_state')")
    checkpoint["state_dict"] = checkpoint.pop("current_model_state")
    checkpoint.pop("averaging_state", None)
    for key in [k for k in checkpoint.get("callbacks", {}) if "WeightAveraging" in k]:
        del checkpoint["callbacks"][key]
    save_atomic(checkpoint, target)
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Lightning checkpoint of a training run")
    parser.add_argument("target", type=Path, help="output file, e.g. pretrained/airpi_reference.ckpt")
    parser.add_argument("--config", type=Path, help="the run's resolved config (RUN/config.yaml)")
    parser.add_argument(
        "--trained-for",
        nargs="*",
        default=None,
        metavar="KEY=VALUE|KEY=LOW:HIGH",
        help="ranges of the training data (energy_eV, semiangle_mrad, alpha_over_gmax, scan_step_A, Cs_A, "
        "defocus_A, dose_e_per_cbed), checked against scans",
    )
    parser.add_argument(
        "--weights-dtype",
        default="float32",
        choices=["float32", "float16"],
        help="storage precision of the weights (float16: half the file; loaded into a float32 model)",
    )
    parser.add_argument(
        "--strip-weight-average",
        action="store_true",
        help="instead of an inference export: the whole resumable training state without the weight "
        "average's extra copy of the weights (see strip_weight_average)",
    )
    args = parser.parse_args(argv)
    from physics.runtime import report_error

    if args.strip_weight_average:
        from models.checkpoints import CheckpointError

        if not args.source.is_file():
            return report_error(f"export_checkpoint: {args.source}: no such file")
        try:
            strip_weight_average(args.source, args.target)
        except CheckpointError as err:
            return report_error(f"export_checkpoint: {err}")
        print(f"wrote {args.target} (resumable, without the weight average)")
        return 0

    try:
        trained_for = None if args.trained_for is None else parse_trained_for(args.trained_for)
    except ValueError as err:
        return report_error(f"export_checkpoint: {err}")
    if not args.source.is_file():
        return report_error(f"export_checkpoint: {args.source}: no such file")
    config_yaml = None
    geometry = None
    if args.config is not None:
        import yaml

        from datagen.provenance import config_yaml as redacted_yaml

        # as written (a run's .hydra/config.yaml keeps ${hydra:...} interpolations that resolve only inside
        # that run; the run folder's config.yaml is the resolved one)
        config = yaml.safe_load(args.config.read_text())
        config_yaml = redacted_yaml(config)
        # the ranges the config states (stock-image data); --trained-for wins where both give a quantity
        from_config, geometry = recorded_from_config(config if isinstance(config, dict) else {})
        if from_config:
            trained_for = {**from_config, **(trained_for or {})}
    from models.checkpoints import CheckpointError

    try:
        slim = export(
            args.source, args.target, config_yaml, trained_for, geometry or None, args.weights_dtype
        )
    except CheckpointError as err:
        return report_error(f"export_checkpoint: {err}")
    size_mb = args.target.stat().st_size / 1e6
    params = sum(v.numel() for k, v in slim["state_dict"].items() if v.is_floating_point())
    print(
        f"export_checkpoint: wrote {args.target} ({size_mb:.1f} MB, {params:,} floating-point values, "
        f"epoch {slim['epoch']}, step {slim['global_step']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
