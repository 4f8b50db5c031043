"""Re-estimate a saved network's batch-norm statistics over training batches and score it on validation.

``python scripts/recalibrate_batchnorm.py CKPT [OUT] [--config RUN/config.yaml] [--batches 32]
[--threads 2] [--json FILE] [KEY=VALUE ...]``

Loads ``CKPT`` (a run's Lightning checkpoint or an exported ``pretrained/`` one, weights-only), builds the
data module of its training config (``--config``; else the checkpoint's own ``deepstem.config_yaml``;
else ``RUN/config.yaml`` beside ``RUN/checkpoints/``; ``KEY=VALUE`` Hydra-style overrides of that config,
e.g. ``paths.data_dir=/data/kernels``), scores the validation split as saved, re-estimates every batch-norm
layer's running statistics over the first ``--batches`` training batches
(:func:`training.precise_bn.recalibrate_batchnorm`: the same fixed calibration batches as the
``callbacks.precise_bn`` of training) and scores it again; prints one JSON line (both validation scores,
the metric's name, the batches used). With ``OUT`` it writes the checkpoint with the new statistics there
(everything else copied unchanged; the statistics in float32; under a temporary name, then renamed:
``OUT`` may be ``CKPT``, and an interrupted run leaves no partial file).

Why: eval-mode batch norm uses a trailing average over the last ~10 small training batches, which for
these networks is noisy enough to move a checkpoint's validation xc from 0.68 to 0.42
(training/precise_bn.py, docs/results_chang.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the buffers of a batch-norm layer that the re-estimate replaces
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
#: the validation score each network logs (models.lightning)
VAL_METRIC = {
    "airpi": "val/xc_object_phase",
    "chang_unet": "val/xc_phase",
    "ptychonn": "val/xc_phase",
}


def _config(args: argparse.Namespace, checkpoint: dict[str, Any]) -> Any:
    from omegaconf import OmegaConf

    if args.config is not None:
        source = OmegaConf.load(args.config)
    elif (checkpoint.get("deepstem") or {}).get("config_yaml"):
        source = OmegaConf.create(checkpoint["deepstem"]["config_yaml"])
    else:
        beside = Path(args.ckpt).resolve().parents[1] / "config.yaml"
        if not beside.is_file():
            raise ValueError(
                f"{args.ckpt}: no training config: give --config RUN/config.yaml (none in the checkpoint, "
                f"none at {beside})"
            )
        source = OmegaConf.load(beside)
    if args.overrides:
        source = OmegaConf.merge(source, OmegaConf.from_dotlist(args.overrides))
    return source


def _validate(module: Any, datamodule: Any, metric: str) -> float:
    import lightning.pytorch as L

    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(results[0][metric])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=None)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--batches", type=int, default=32, help="training batches for the statistics")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON line here")
    parser.add_argument("overrides", nargs="*", default=[], help="KEY=VALUE overrides of the training config")
    # options may come between the positionals; the positional OUT would swallow a first KEY=VALUE: re-sort
    args = parser.parse_intermixed_args()
    if args.out is not None and "=" in str(args.out):
        args.overrides.insert(0, str(args.out))
        args.out = None
    from models.checkpoints import CheckpointError
    from physics.runtime import report_error

    try:
        import torch
        from hydra.utils import instantiate

        from evaluation.networks import identify_checkpoint, load_network
        from models.checkpoints import load_checkpoint
        from training.cli import check_pairing
        from training.precise_bn import batchnorm_layers, recalibrate_batchnorm

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.batches < 1:
            raise ValueError(f"--batches must be >= 1, got {args.batches}")
        checkpoint = load_checkpoint(args.ckpt)
        method = identify_checkpoint(checkpoint)
        if method not in VAL_METRIC:
            raise ValueError(
                f"{args.ckpt}: holds model {method!r}; batch-norm networks: {', '.join(VAL_METRIC)}"
            )
        cfg = _config(args, checkpoint)
        check_pairing(cfg)  # as train.py: resolves data.view=auto for the multislice data
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        module = load_network(args.ckpt, method).float()
        if not batchnorm_layers(module):
            raise ValueError(f"{args.ckpt}: the {method} network has no batch norm")
        metric = VAL_METRIC[method]
        before = _validate(module, datamodule, metric)
        key = module.BATCH_KEYS[0]
        batches = (datamodule.on_after_batch_transfer(b, 0) for b in datamodule.train_dataloader())
        used = recalibrate_batchnorm(module, batches, args.batches, forward=lambda b: module(b[key]))
        after = _validate(module, datamodule, metric)
        report = {
            "ckpt": str(args.ckpt), "method": method, "metric": metric, "val_as_saved": before,
            "val_recalibrated": after, "batches": used, "batch_size": int(cfg.data.batch_size),
            "out": None if args.out is None else str(args.out),
        }  # fmt: skip
        if args.out is not None:
            state = module.state_dict()
            names = [n for n in checkpoint["state_dict"] if n.rsplit(".", 1)[-1] in BN_BUFFERS]
            for name in names:
                value = state[name]
                checkpoint["state_dict"][name] = value.float() if value.is_floating_point() else value
            info = checkpoint.get("deepstem")
            if isinstance(info, dict):
                info["batchnorm_recalibrated"] = {"batches": used, "val_as_saved": before, "val": after}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
            torch.save(checkpoint, partial)
            os.replace(partial, args.out)
        line = json.dumps(report)
        print(line)
        if args.json is not None:
            args.json.write_text(line + "\n")
    except (ValueError, KeyError, OSError, CheckpointError) as err:  # one line, exit 2 (ConfigError too)
        return report_error(err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
