"""Dose x method tables of an evaluation suite's metrics.json (``python evaluate.py`` or an experiment).

``python scripts/summarize_suite.py RUN/evaluate/metrics.json [--metric xc frc_0.5_A shift_norm_A]``

Prints, per scan and metric, one Markdown table with a row per dose (noise free first, then falling dose)
and a column per method label, plus a last column naming the best method of that row (highest xc, or
finest FRC resolution). Each table's title names the criterion of its metric: ``frc_0.5_A`` is the
resolution against the truth (0.5, the truth equivalent of the half-map 0.143; the headline),
``frc_0.143_A`` and ``frc_half_bit_A`` use half-map criteria; ``shift_norm_A`` is the registration shift
onto the truth, marked "(bound)" where it hit the suite's ``max_shift_A``. Values are read from the file,
nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HIGHER_IS_BETTER = {"xc": True}
#: metrics without a "best" method
NO_BEST = {"shift_norm_A"}
#: the criterion each metric uses, printed in its table's title
CRITERIA = {
    "xc": "Pearson cross-correlation with the truth",
    "frc_0.5_A": "FRC 0.5 against the truth, the truth equivalent of the half-map 0.143 criterion; A",
    "frc_0.143_A": "FRC 0.143, a half-map criterion (lenient against a truth); A",
    "frc_half_bit_A": "FRC half-bit, a half-map criterion (lenient against a truth); A",
    "shift_norm_A": "registration shift onto the truth, A; (bound): it hit max_shift_A",
}


def _dose_key(dose: Any) -> float:
    value = float(dose)
    return -math.inf if math.isinf(value) else -value


def tables(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """The Markdown tables of ``rows`` (metrics.json rows) for ``metrics``."""
    out = []
    for scan in dict.fromkeys(r["scan"] for r in rows):
        mine = [r for r in rows if r["scan"] == scan]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        doses = sorted(dict.fromkeys(r["dose_e_per_A2"] for r in mine), key=_dose_key)
        for metric in metrics:
            higher = HIGHER_IS_BETTER.get(metric, False)
            title = f"{scan}: {metric}" + (f" ({CRITERIA[metric]})" if metric in CRITERIA else "")
            out.append(title + "\n")
            out.append("| dose (e/A^2) | " + " | ".join(methods) + " | best |")
            out.append("|---" * (len(methods) + 2) + "|")
            for dose in doses:
                values, bound = {}, set()
                for r in mine:
                    if r["dose_e_per_A2"] == dose and r.get(metric) is not None:
                        values[r["method"]] = float(r[metric])
                        if metric == "shift_norm_A" and r.get("shift_at_bound"):
                            bound.add(r["method"])
                finite = {m: v for m, v in values.items() if math.isfinite(v)}
                best = (max if higher else min)(finite, key=finite.get) if finite else "-"
                best = "-" if metric in NO_BEST else best
                cells = [
                    (f"{values[m]:.3f}" + (" (bound)" if m in bound else "")) if m in values else "-"
                    for m in methods
                ]
                label = "inf" if math.isinf(float(dose)) else f"{float(dose):.0e}"
                out.append(f"| {label} | " + " | ".join(cells) + f" | {best} |")
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics_json", type=Path)
    parser.add_argument("--metric", nargs="+", default=["xc", "frc_0.5_A", "shift_norm_A"])
    args = parser.parse_args(argv)
    try:
        rows = json.loads(args.metrics_json.read_text())["rows"]
    except (OSError, ValueError, KeyError) as err:
        print(f"summarize_suite: {args.metrics_json}: not a suite metrics.json ({err})", file=sys.stderr)
        return 1
    print(tables(rows, args.metric))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
