"""Dose x method tables of an evaluation suite's metrics.json (``python evaluate.py`` or an experiment).

``python scripts/summarize_suite.py RUN/evaluate/metrics.json [--metric xc frc_0.143_A]``

Prints, per scan and metric, one Markdown table with a row per dose (noise free first, then falling dose)
and a column per method label, plus a last column naming the best method of that row (highest xc, or
finest FRC resolution). Values are read from the file, nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HIGHER_IS_BETTER = {"xc": True}


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
            out.append(f"{scan}: {metric}\n")
            out.append("| dose (e/A^2) | " + " | ".join(methods) + " | best |")
            out.append("|---" * (len(methods) + 2) + "|")
            for dose in doses:
                values = {}
                for r in mine:
                    if r["dose_e_per_A2"] == dose and r.get(metric) is not None:
                        values[r["method"]] = float(r[metric])
                finite = {m: v for m, v in values.items() if math.isfinite(v)}
                best = (max if higher else min)(finite, key=finite.get) if finite else "-"
                cells = [f"{values[m]:.3f}" if m in values else "-" for m in methods]
                label = "inf" if math.isinf(float(dose)) else f"{float(dose):.0e}"
                out.append(f"| {label} | " + " | ".join(cells) + f" | {best} |")
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics_json", type=Path)
    parser.add_argument("--metric", nargs="+", default=["xc", "frc_0.143_A"])
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
