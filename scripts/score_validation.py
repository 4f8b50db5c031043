"""Where an AIRPI model fails: validation xc of the object phase by dose and by optics (issue #13).

    python scripts/score_validation.py --ckpt pretrained/airpi_generalist.ckpt \
        --data-dir /work/data/kernel_generalist --doses 1e2 1e3 1e4 1e5 1e6 inf \
        --json docs/results_airpi_generalist_val.json

The ``val/xc_object_phase`` that training logs is one mean over a log-uniform dose draw (10 .. 1e9 electrons
per CBED in ``experiment=airpi_generalist_cpu``), so it mixes patterns with a handful of electrons, whose
phase no method can recover, with noise-free ones. This script scores the same split (same structures, same
split seed) of the same shards

* at each fixed dose of ``--doses`` (electrons per CBED; ``inf`` = noise free), every sample of the split,
  with the seeded per-sample noise of validation (``eval_seed``), and
* at the training dose draw (``--draw-dose``, the experiment's range), grouped by optics: energy,
  semi-angle, Cs, scan step and ``alpha / gmax``, by specimen: thickness and the spread of the true object
  phase over the illuminated disc (``phase_spread_rad``, its standard deviation: a thin, light crystal is a
  weak phase object whose xc rests on a small signal), all in bins of ``--bins`` quantiles, and by
  structure (``source_id``: which held-out crystals fail),

and prints the mean xc with its standard error per cell. ``--dihedral-average`` scores the mean prediction
over the 8 dihedral images of each kernel (a test-time average, 8 forward passes) and its paired gain over
the single prediction. ``--baseline CKPT`` adds, at each fixed dose, the paired difference to a second
checkpoint on the same samples and noise draws (mean +- its own standard error: the sample-to-sample
spread, ~0.02 here, cancels). ``--split test`` scores the test structures (never
used for checkpoint selection). The model runs at ``--precision`` (auto: bf16 where the CPU has it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation.networks.checkpoints import load_network  # noqa: E402
from models.airpi import output_to_wave  # noqa: E402
from models.inputs import preprocess  # noqa: E402
from models.lightning import as_complex  # noqa: E402
from models.losses import illuminated_mask, object_phase, object_phase_spread, pearson_xc  # noqa: E402
from physics.runtime import configure_threads, resolve_precision  # noqa: E402
from training.augment import DIHEDRAL_OPERATIONS, dihedral_transform, undo_dihedral  # noqa: E402
from training.datamodules import MultisliceDataModule, kernel_sample_optics  # noqa: E402

#: per-sample shard columns the optics table groups by (column -> printed name)
OPTICS_COLUMNS = {
    "energy_eV": "energy (eV)",
    "semiangle_mrad": "semi-angle (mrad)",
    "Cs_A": "Cs (A)",
    "step_A": "scan step (A)",
    "alpha_over_gmax": "alpha / gmax",
    "thickness_A": "thickness (A)",
    "phase_spread_rad": "true phase spread (rad)",
}
#: per-sample shard columns read besides the optics of :func:`kernel_sample_optics`
SPECIMEN_COLUMNS = ("thickness_A",)


@torch.inference_mode()
def score_split(
    model: torch.nn.Module,
    module: MultisliceDataModule,
    dose_e_range: tuple[float, float] | None,
    split: str = "val",
    precision: str = "32",
    max_samples: int | None = None,
    dihedral_average: bool = False,
) -> dict[str, np.ndarray]:
    """Per-sample object-phase xc of ``split`` with the validation noise of ``module.augmentation`` at
    ``dose_e_range`` (electrons per CBED, log-uniform; ``(d, d)`` a fixed dose; ``None`` noise free).

    Returns ``index`` (global sample index), ``xc`` and ``dose_e`` (what each sample got), as the training
    loop's ``val/xc_object_phase`` computes them (mask of the illuminated probe, Pearson xc), and
    ``phase_spread_rad``, the standard deviation of the true object phase over that mask.

    ``dihedral_average``: predict each kernel under all 8 symmetry operations of the square (the same noisy
    counts, transformed with their probe, :func:`training.augment.dihedral_transform`), map each prediction
    back (:func:`training.augment.undo_dihedral`) and score the mean exit wave (8 forward passes)."""
    module.setup()
    if split not in module.datasets:
        raise ValueError(f"--split must be one of {', '.join(module.datasets)}, got {split!r}")
    saved = module.augmentation.dose_e_range
    module.augmentation.dose_e_range = dose_e_range
    parts: dict[str, list[np.ndarray]] = {"index": [], "xc": [], "dose_e": [], "phase_spread_rad": []}
    seen = 0
    try:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        for batch in getattr(module, f"{split}_dataloader")():
            batch = module.augmentation(batch, deterministic=True)
            if dihedral_average:
                wave_pred = dihedral_mean_wave(model, batch, module.augmentation, autocast)
            else:
                with autocast:
                    out = model(batch["inputs"])
                wave_pred = output_to_wave(out.float(), model.net.amplitude_exponent)
            wave_true = as_complex(batch["wave"])
            probe = model._probe(batch)
            mask = illuminated_mask(probe, model.loss.mask_threshold)
            xc = pearson_xc(object_phase(wave_pred, probe), object_phase(wave_true, probe), mask)
            parts["index"].append(batch["index"].numpy())
            parts["xc"].append(xc.float().numpy())
            parts["dose_e"].append(batch["dose_e"].float().numpy())
            spread = object_phase_spread(wave_true, probe, model.loss.mask_threshold)
            parts["phase_spread_rad"].append(spread.numpy())
            seen += len(xc)
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        module.augmentation.dose_e_range = saved
    result = {key: np.concatenate(values) for key, values in parts.items()}
    if max_samples is not None:
        result = {key: value[:max_samples] for key, value in result.items()}
    return result


def dihedral_mean_wave(model: torch.nn.Module, batch: dict, augmentation: Any, autocast: Any) -> torch.Tensor:
    """The mean of the exit waves predicted for the 8 dihedral images of each kernel of an augmented
    ``batch`` (its noisy ``cbed`` counts and ``probe``), each mapped back onto the untransformed specimen;
    the identity's inputs are ``batch["inputs"]`` exactly (the same pre-processing)."""
    cbed, probe = batch["cbed"], as_complex(batch["probe"])
    n = cbed.shape[0]
    total = torch.zeros_like(probe)
    for ops in DIHEDRAL_OPERATIONS:
        transpose, flip_x, flip_y = (torch.full((n,), op, dtype=torch.bool) for op in ops)
        counts, _, probe_t = dihedral_transform(cbed, probe, probe, transpose, flip_x, flip_y)
        inputs = preprocess(
            counts,
            batch["step_A"],
            probe_t,
            exponent=augmentation.exponent,
            zeta_scale=augmentation.zeta_scale,
            standardise_input=augmentation.standardise_input,
        )
        with autocast:
            out = model(inputs)
        wave = output_to_wave(out.float(), model.net.amplitude_exponent)
        total = total + undo_dihedral(wave, transpose, flip_x, flip_y)
    return total / len(DIHEDRAL_OPERATIONS)


def by_structure(xc: np.ndarray, source_ids: np.ndarray) -> dict[str, dict[str, float]]:
    """:func:`summarise` of ``xc`` per structure, worst mean first."""
    table = {str(s): summarise(xc[source_ids == s]) for s in np.unique(source_ids.astype(str))}
    return dict(sorted(table.items(), key=lambda item: item[1]["mean"]))


def paired_difference(scored: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """:func:`summarise` of the per-sample xc differences ``scored - reference`` over the samples both
    scored (matched by global index; the same samples and noise draws, so the sample-to-sample spread
    cancels and the standard error is that of the difference alone)."""
    common, mine, theirs = np.intersect1d(scored["index"], reference["index"], return_indices=True)
    if common.size == 0:
        raise ValueError("paired_difference: the two scorings share no sample")
    return summarise(scored["xc"][mine] - reference["xc"][theirs])


def summarise(xc: np.ndarray) -> dict[str, float]:
    """Mean, standard error of the mean, median and count of per-sample xc (NaN entries left out: a
    sample with a flat true phase has no xc)."""
    finite = xc[np.isfinite(xc)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "sem": float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "median": float(np.median(finite)) if n else math.nan,
        "n": n,
    }


def quantile_bins(values: np.ndarray, bins: int) -> list[tuple[float, float]]:
    """Up to ``bins`` intervals of ``values`` with about equal counts (fewer where values repeat, as for
    two energies or two Cs)."""
    unique = np.unique(values[np.isfinite(values)])
    if unique.size <= bins:
        return [(float(v), float(v)) for v in unique]
    edges = np.unique(np.quantile(values[np.isfinite(values)], np.linspace(0, 1, bins + 1)))
    return [(float(lo), float(hi)) for lo, hi in itertools.pairwise(edges)]


def by_optics(
    xc: np.ndarray, optics: dict[str, np.ndarray], bins: int = 3
) -> dict[str, list[dict[str, Any]]]:
    """:func:`summarise` of ``xc`` per bin of each optics column (``low``/``high`` the bin's range)."""
    table: dict[str, list[dict[str, Any]]] = {}
    for name in OPTICS_COLUMNS:
        if name not in optics:  # a column the shards do not hold
            continue
        values = optics[name]
        rows = []
        intervals = quantile_bins(values, bins)
        for i, (low, high) in enumerate(intervals):
            last = i == len(intervals) - 1
            inside = (values >= low) & ((values <= high) if last or low == high else (values < high))
            rows.append({"low": low, "high": high, **summarise(xc[inside])})
        table[name] = rows
    return table


def parse_dose(text: str) -> float:
    """A dose in electrons per CBED; ``inf`` (or ``noise-free``) = noise free."""
    if text.strip().lower() in ("inf", "noise-free", "noise_free"):
        return math.inf
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--doses: a dose must be > 0 electrons per CBED, got {text!r}")
    return value


def build_module(
    data_dir: str,
    batch_size: int,
    seed: int,
    split_fractions: Sequence[float],
    draw: tuple[float, float],
    no_specimen_prob: float = 0.0,
) -> MultisliceDataModule:
    """The experiment's data module (same split seed and fractions) over ``data_dir``, no workers; the
    validation noise of training (seeded per sample by ``eval_seed``) without the dihedral draws, which
    validation does not make either."""
    return MultisliceDataModule(
        data_dir,
        view="airpi",
        batch_size=batch_size,
        num_workers=0,
        split=tuple(split_fractions),
        seed=seed,
        check_data=False,
        augmentation={"dose_e_range": draw, "no_specimen_prob": no_specimen_prob, "dihedral": False},
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score ``args.ckpt`` at every dose of ``args.doses`` and at the draw, print both tables."""
    threads = configure_threads(args.threads)
    precision = resolve_precision(args.precision, "cpu")
    model = load_network(args.ckpt, "airpi")
    draw = (float(args.draw_dose[0]), float(args.draw_dose[1]))
    module = build_module(
        args.data_dir, args.batch_size, args.seed, args.split_fractions, draw, args.no_specimen_prob
    )
    report: dict[str, Any] = {
        "ckpt": str(args.ckpt),
        "data_dir": str(args.data_dir),
        "split": args.split,
        "precision": precision,
        "dihedral_average": bool(args.dihedral_average),
        "threads": threads,
        "by_dose_e_per_cbed": {},
    }
    print(f"{args.ckpt}: {args.split} split of {args.data_dir}, precision {precision}, {threads} threads")
    print(f"{'dose (e/CBED)':>14} {'mean xc':>8} {'+-sem':>6} {'median':>7} {'n':>5}")
    baseline = load_network(args.baseline, "airpi") if args.baseline else None
    if baseline is not None:
        report["baseline"] = str(args.baseline)
        report["paired_difference_by_dose_e_per_cbed"] = {}
    for dose in args.doses:
        fixed = None if math.isinf(dose) else (dose, dose)
        scored = score_split(
            model, module, fixed, args.split, precision, args.max_samples, args.dihedral_average
        )
        row = summarise(scored["xc"])
        key = "inf" if math.isinf(dose) else f"{dose:g}"
        report["by_dose_e_per_cbed"][key] = row
        line = f"{dose:>14g} {row['mean']:8.3f} {row['sem']:6.3f} {row['median']:7.3f} {row['n']:5d}"
        if args.dihedral_average:  # the gain over the same model's single prediction, paired
            single = score_split(model, module, fixed, args.split, precision, args.max_samples)
            gain = paired_difference(scored, single)
            report.setdefault("dihedral_gain_by_dose_e_per_cbed", {})[key] = gain
            line += f"   minus single prediction {gain['mean']:+.3f} +- {gain['sem']:.3f}"
        if baseline is not None:
            reference = score_split(baseline, module, fixed, args.split, precision, args.max_samples,
                                    args.dihedral_average)  # fmt: skip
            diff = paired_difference(scored, reference)
            report["paired_difference_by_dose_e_per_cbed"][key] = diff
            line += f"   minus baseline {diff['mean']:+.3f} +- {diff['sem']:.3f} (paired, n {diff['n']})"
        print(line)
    scored = score_split(model, module, draw, args.split, precision, args.max_samples)
    overall = summarise(scored["xc"])
    report["draw"] = {"dose_e_range": list(draw), **overall}
    print(f"dose draw {draw[0]:g} .. {draw[1]:g} e/CBED (log-uniform, as in training): "
          f"mean xc {overall['mean']:.3f} +- {overall['sem']:.3f} (n {overall['n']})")  # fmt: skip
    decades = np.floor(np.log10(np.maximum(scored["dose_e"], 1e-30)))
    report["draw"]["by_decade"] = {}
    for decade in np.unique(decades):
        row = summarise(scored["xc"][decades == decade])
        report["draw"]["by_decade"][f"1e{int(decade)}"] = row
        print(f"  drawn dose 1e{int(decade)}-1e{int(decade) + 1}: {row['mean']:.3f} +- {row['sem']:.3f} "
              f"(n {row['n']})")  # fmt: skip
    optics = kernel_sample_optics(module.index, scored["index"], extra_columns=SPECIMEN_COLUMNS)
    optics["phase_spread_rad"] = scored["phase_spread_rad"]
    report["draw"]["by_optics"] = by_optics(scored["xc"], optics, args.bins)
    for name, rows in report["draw"]["by_optics"].items():
        cells = ", ".join(
            f"{r['low']:.4g}"
            + (f"-{r['high']:.4g}" if r["high"] != r["low"] else "")
            + f": {r['mean']:.3f}+-{r['sem']:.3f} (n {r['n']})"
            for r in rows
        )
        print(f"  {OPTICS_COLUMNS[name]}: {cells}")
    report["draw"]["by_structure"] = by_structure(
        scored["xc"], np.asarray(module.index.source_ids)[scored["index"]]
    )
    print("  by structure (worst first): " + ", ".join(
        f"{name}: {r['mean']:.3f} (median {r['median']:.3f}, n {r['n']})"
        for name, r in report["draw"]["by_structure"].items()
    ))  # fmt: skip
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
        print(f"wrote {path}")
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="AIRPI checkpoint (Lightning or exported)")
    parser.add_argument("--data-dir", required=True, help="folder of kernel shards (shard-*.h5)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--baseline", default=None,
                        help="a second AIRPI checkpoint: also print the paired per-sample xc difference "
                             "(ckpt - baseline) at each fixed dose, for controlled comparisons")  # fmt: skip
    parser.add_argument("--doses", nargs="+", type=parse_dose, default=[1e2, 1e3, 1e4, 1e5, 1e6, math.inf],
                        help="fixed doses, electrons per CBED (inf = noise free)")  # fmt: skip
    parser.add_argument("--draw-dose", nargs=2, type=float, default=(10.0, 1e9), metavar=("LOW", "HIGH"),
                        help="the log-uniform dose draw of training (electrons per CBED)")  # fmt: skip
    parser.add_argument("--no-specimen-prob", type=float, default=0.0,
                        help="share of bare-probe samples (training validation: 0.03)")  # fmt: skip
    parser.add_argument("--bins", type=int, default=3, help="quantile bins per optics column")
    parser.add_argument("--seed", type=int, default=12345, help="the experiment's split seed (conf seed)")
    parser.add_argument("--split-fractions", nargs=3, type=float, default=(0.8, 0.1, 0.1))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--dihedral-average",
        action="store_true",
        help="score the mean prediction over the 8 dihedral images of each kernel (x8 cost)",
    )
    parser.add_argument("--max-samples", type=int, default=None, help="score at most this many samples")
    parser.add_argument("--precision", default="auto", help="auto | bf16 | 32")
    parser.add_argument("--threads", default="auto", help="torch intra-op threads (auto: the cores)")
    parser.add_argument("--json", default=None, help="write the tables here")
    args = parser.parse_args(argv)
    if args.bins < 1:
        parser.error(f"--bins must be >= 1, got {args.bins}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
