"""Issue #13 loss-balance study (docs/results_airpi_loss.md): curves and loss-term shares of two AIRPI runs.

    python scripts/plot_loss_study.py --run balanced=/work/data/runs/airpi_loss_balanced \
        --run paper=/work/data/runs/airpi_loss_paper --json docs/results_airpi_loss.json \
        --figure docs/figures/airpi_loss_curves.png [--init-terms]

Reads each run's Lightning CSV log (``<run>/csv/version_*/metrics.csv``) and prints, per validation, the
step, ``val/xc_object_phase``, ``val/loss`` and every ``val/weighted_<term>`` with its share of the total
(weighted term / sum of the weighted terms), so that one sees whether the weights "mean what they say".
``--init-terms`` also validates the untrained network (the same initial weights as both runs: the
experiment's seed) on the same validation batches under both normalisations, the shares at step 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from models.losses import AIRPILoss

TERMS = AIRPILoss.TERMS  # the weighted terms every AIRPI run logs (val/weighted_<term>)


def read_validations(run_dir: Path) -> list[dict[str, float]]:
    """Validation rows (step, val/xc_object_phase, val/loss, val/weighted_*) of a run's CSV log."""
    logs = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not logs:
        raise SystemExit(f"--run {run_dir}: no csv/version_*/metrics.csv")
    rows: dict[int, dict[str, float]] = {}  # by step: a resumed run (ckpt_path=last.ckpt) adds a version
    for log in logs:
        with log.open() as f:
            for row in csv.DictReader(f):
                if row.get("val/xc_object_phase"):
                    values = {k: float(v) for k, v in row.items() if v not in ("", None)}
                    rows[int(values["step"])] = values
    return [rows[step] for step in sorted(rows)]


def shares(row: dict[str, float], prefix: str = "val/weighted_") -> dict[str, float]:
    """Each weighted term's share of the sum of the weighted terms (dimensionless, sums to 1)."""
    total = sum(row[prefix + t] for t in TERMS)
    return {t: row[prefix + t] / total for t in TERMS}


def init_terms(ckpt: str | None = None, limit_val_batches: int = 8) -> dict[str, dict[str, float]]:
    """Validation metrics under both normalisations of the untrained network (seeded as train.py does) or,
    given ``ckpt``, of that checkpoint's weights (the same validation batches and dose noise as training)."""
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from physics.runtime import configure_threads

    conf = Path(__file__).resolve().parents[1] / "conf"
    out = {}
    for norm in ("balanced", "paper"):
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose(
                "train",
                overrides=[
                    "experiment=airpi_loss_study",
                    f"model.loss.normalization={norm}",
                    "paths.output_dir=/tmp/airpi_loss_init",
                ],
            )
        configure_threads(1, 0)
        L.seed_everything(int(cfg.seed), workers=True)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        model = instantiate(cfg.model)
        if ckpt:
            from training.cli import load_weights

            load_weights(model, ckpt)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            limit_val_batches=limit_val_batches,
        )
        (metrics,) = trainer.validate(model=model, datamodule=datamodule, verbose=False)
        out[norm] = {k: float(v) for k, v in metrics.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the curves and shares; write the JSON and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeat)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--init-terms", action="store_true")
    parser.add_argument(
        "--cross-terms",
        action="append",
        default=[],
        help="LABEL=CKPT: val terms, both normalisations",
    )
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        label, _, path = item.partition("=")
        if not path:
            parser.error(f"--run {item!r}: expected LABEL=RUN_DIR")
        runs[label] = read_validations(Path(path))
    content: dict = {"runs": {}}
    if args.init_terms:
        content["init"] = init_terms()
        for norm, m in content["init"].items():
            s = shares(m)
            print(f"init ({norm}): val/xc {m['val/xc_object_phase']:.4f} val/loss {m['val/loss']:.4f}")
            print("  " + "  ".join(f"{t} {m['val/weighted_' + t]:.4g} ({100 * s[t]:.1f}%)" for t in TERMS))
    for item in args.cross_terms:
        label, _, ckpt = item.partition("=")
        content.setdefault("cross", {})[label] = init_terms(ckpt)
        for norm, m in content["cross"][label].items():
            s = shares(m)
            xc_loss = f"val/xc {m['val/xc_object_phase']:.4f} val/loss {m['val/loss']:.4f}"
            print(f"{label} scored with {norm}: {xc_loss}")
            print("  " + "  ".join(f"{t} {m['val/weighted_' + t]:.4g} ({100 * s[t]:.1f}%)" for t in TERMS))
    for label, rows in runs.items():
        content["runs"][label] = rows
        print(f"\n{label}: step  val/xc  val/loss  weighted terms (share %)")
        for row in rows:
            s = shares(row)
            terms = "  ".join(f"{t} {row['val/weighted_' + t]:.4g} ({100 * s[t]:.1f}%)" for t in TERMS)
            head = f"{int(row['step']) + 1:4d}  {row['val/xc_object_phase']:.4f}  {row['val/loss']:.4f}"
            print(f"  {head}  {terms}")
        best = max(rows, key=lambda r: r["val/xc_object_phase"])
        print(f"  best val/xc {best['val/xc_object_phase']:.4f} at step {int(best['step']) + 1}")
    if args.json:
        args.json.write_text(json.dumps(content, indent=1) + "\n")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 1 + len(runs), figsize=(4.2 * (1 + len(runs)), 3.6))
        for label, rows in runs.items():
            steps = [int(r["step"]) + 1 for r in rows]
            axes[0].plot(steps, [r["val/xc_object_phase"] for r in rows], "o-", label=label)
        axes[0].set(xlabel="optimiser step", ylabel="val xc of the object phase", title="validation xc")
        axes[0].legend()
        for ax, (label, rows) in zip(axes[1:], runs.items(), strict=True):
            steps = [int(r["step"]) + 1 for r in rows]
            bottom = [0.0] * len(rows)
            for t in TERMS:
                vals = [shares(r)[t] for r in rows]
                ax.bar(steps, vals, bottom=bottom, width=8, label=t)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            ax.set(xlabel="optimiser step", ylabel="share of the weighted val loss", title=label, ylim=(0, 1))
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
