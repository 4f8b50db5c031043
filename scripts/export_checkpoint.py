"""Export a trained Lightning checkpoint as a small inference checkpoint (what ``pretrained/`` ships).

``python scripts/export_checkpoint.py RUN/checkpoints/last.ckpt pretrained/airpi_reference.ckpt
[--config RUN/config.yaml] [--trained-for energy_eV=300000 semiangle_mrad=20]``

Keeps what :func:`evaluation.stitching.load_network` and ``LightningModule.load_from_checkpoint`` need
(``state_dict`` with the batch-norm running statistics, ``hyper_parameters``) plus the epoch, the global step
and a ``deepstem`` section (source checkpoint name, export time, the training run's resolved config as YAML
text, ``trained_for``: the optics of the training data, which ``reconstruct.py`` compares with a scan's
calibration and warns about); drops the optimiser, scheduler, callback and loop states (for AIRPI ~2/3 of
the file). Every value is a tensor or a plain Python container, so ``torch.load(..., weights_only=True)``
reads it. Written under a temporary name and renamed: an interrupted export leaves no partial file under the
final name. The resolved config is passed through the provenance redaction, so no API key reaches the file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Mapping
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


def export(
    source: Path, target: Path, config_yaml: str | None = None, trained_for: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Write the slim checkpoint of ``source`` to ``target``; returns what was written."""
    from models.checkpoints import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(source)  # weights only: a crafted file cannot run code here either
    except CheckpointError as err:
        raise SystemExit(f"export_checkpoint: {err}") from None
    if "state_dict" not in checkpoint:
        raise SystemExit(f"export_checkpoint: {source}: not a Lightning checkpoint (no 'state_dict')")
    slim = {
        "state_dict": {k: v.detach().clone() for k, v in checkpoint["state_dict"].items()},
        "hyper_parameters": plain(checkpoint.get("hyper_parameters") or {}),
        "epoch": int(checkpoint.get("epoch", -1)),
        "global_step": int(checkpoint.get("global_step", -1)),
        "pytorch-lightning_version": str(checkpoint.get("pytorch-lightning_version", "")),
        "deepstem": {
            "source_checkpoint": source.name,
            "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config_yaml": config_yaml or "",
            "trained_for": {str(k): float(v) for k, v in (trained_for or {}).items()},
        },
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        torch.save(slim, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return slim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Lightning checkpoint of a training run")
    parser.add_argument("target", type=Path, help="output file, e.g. pretrained/airpi_reference.ckpt")
    parser.add_argument("--config", type=Path, help="the run's resolved config (RUN/config.yaml)")
    parser.add_argument(
        "--trained-for",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="optics of the training data (energy_eV, semiangle_mrad), checked against scans",
    )
    args = parser.parse_args(argv)
    try:
        trained_for = {k: float(v) for k, v in (item.split("=", 1) for item in args.trained_for)}
    except ValueError:
        print(f"export_checkpoint: --trained-for takes KEY=NUMBER, got {args.trained_for}", file=sys.stderr)
        return 1
    if not args.source.is_file():
        print(f"export_checkpoint: {args.source}: no such file", file=sys.stderr)
        return 1
    config_yaml = None
    if args.config is not None:
        import yaml

        from datagen.provenance import config_yaml as redacted_yaml

        # as written (a run's .hydra/config.yaml keeps ${hydra:...} interpolations that resolve only inside
        # that run; the run folder's config.yaml is the resolved one)
        config_yaml = redacted_yaml(yaml.safe_load(args.config.read_text()))
    slim = export(args.source, args.target, config_yaml, trained_for)
    size_mb = args.target.stat().st_size / 1e6
    params = sum(v.numel() for k, v in slim["state_dict"].items() if v.is_floating_point())
    print(
        f"export_checkpoint: wrote {args.target} ({size_mb:.1f} MB, {params:,} floating-point values, "
        f"epoch {slim['epoch']}, step {slim['global_step']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
