"""PtychoNN's patterns/s against ePIE's on one scan, each precision in many fresh processes (issue #15).

    python scripts/bench_ptychonn_epie.py --scan SCAN.h5 --ckpt PTYCHONN.ckpt [--repeats 15]
        [--precisions auto bf16 32] [--threads 2] [--out-dir DIR] [--json FILE]

Runs ``reconstruct.py input=SCAN method=epie`` once, then ``reconstruct.py ... method=ptychonn ckpt=CKPT
precision=P`` for every precision in turn, ``--repeats`` rounds, one process per run (what a user runs: model
loading and every first-use cost included in the process, but the rate is the one ``reconstruct.py`` prints,
inference and stitching only). PtychoNN reconstructs a 48 x 48 scan in under a second, so single runs scatter
by +-30 %: the medians over the rounds are the figures to quote. ``--ckpt`` may be omitted for the shipped
model. Prints one line per run, then a summary (median, range, ratio to ePIE) and writes it with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_against_rev import run_tree  # noqa: E402  (one reconstruct.py process, its printed rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scan", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, default=None, help="PtychoNN checkpoint (default: shipped)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--precisions", nargs="+", default=["auto", "bf16", "32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=None, help="reconstructions (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not args.scan.is_file():
        parser.error(f"--scan {args.scan}: no such file")
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = args.out_dir or Path(scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        scan = args.scan.resolve()
        epie = run_tree(ROOT, scan, "epie", out_dir / "epie.h5", args.threads, None)
        epie_patterns, seconds = epie["patterns"], epie["seconds"]
        epie_rate = epie_patterns / seconds
        print(f"epie: {epie_patterns} patterns in {seconds:.2f} s = {epie_rate:.1f} patterns/s", flush=True)
        rates: dict[str, list[float]] = {p: [] for p in args.precisions}
        ckpt = None if args.ckpt is None else args.ckpt.resolve()
        for round_index in range(args.repeats):
            for precision in args.precisions:
                output = out_dir / f"ptychonn_{precision}.h5"
                run = run_tree(ROOT, scan, "ptychonn", output, args.threads, ckpt, [f"precision={precision}"])
                rates[precision].append(run["patterns"] / run["seconds"])
                rate = rates[precision][-1]
                print(f"round {round_index + 1} {precision}: {rate:.0f} patterns/s", flush=True)
    summary = {
        precision: {
            "runs": len(values),
            "median_patterns_per_s": statistics.median(values),
            "range_patterns_per_s": [min(values), max(values)],
            "median_over_epie": statistics.median(values) / epie_rate,
        }
        for precision, values in rates.items()
    }
    print(f"ePIE {epie_rate:.1f} patterns/s ({epie_patterns} patterns); PtychoNN medians of {args.repeats}:")
    for precision, row in summary.items():
        low, high = row["range_patterns_per_s"]
        print(f"  precision={precision}: {row['median_patterns_per_s']:,.0f} patterns/s = "
              f"{row['median_over_epie']:.0f}x ePIE (runs {low:,.0f}-{high:,.0f})")  # fmt: skip
    if args.json is not None:
        record = {"scan": str(args.scan), "ckpt": None if args.ckpt is None else str(args.ckpt),
                  "threads": args.threads, "epie_patterns_per_s": epie_rate,
                  "ptychonn_patterns_per_s": rates, "summary": summary}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
