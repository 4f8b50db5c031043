"""End-to-end `reconstruct.py` speed of this tree against an earlier revision, in one run (issue #17).

    python scripts/bench_against_rev.py [--rev 6f445e3^] [--method airpi] [--scan 128 128] [--repeats 2]
        [--threads 2] [--ckpt pretrained/airpi_reference.ckpt] [--with-ssb] [--json out.json]
        [--extra-ckpt slim=pretrained/airpi_generalist_slim.ckpt ...]

Issue #17's goal is stated against "today", the tree before the inference work (``--rev``, default
``6f445e3^``: the commit before ``precision=auto``): AIRPI end to end >= 10x that on 2 CPU cores. Speeds
quoted from different sessions come from different machines, so this script measures both trees on the
same machine, the same scan and in alternating order:

* the scan is :class:`bench_reconstruct.SyntheticScan` (weak phase object, 300 kV, 20 mrad, +-40 mrad
  detector), written once to a temporary folder;
* the old tree is ``git archive REV`` unpacked into that folder; each tree runs its own
  ``python reconstruct.py input=SCAN method=M ckpt=C threads=T`` with its own defaults (the old: fp32,
  batch 256; this one: ``precision=auto``, ``batch_size=auto``) in a fresh process, ``repeats`` times,
  old and new alternating (old first in odd repeats, new first in even ones);
* the rate is the one each run prints (``N patterns in S s = R patterns/s``: the reconstruction, not
  the Python start-up), and ``--with-ssb`` times this tree's SSB on the same scan (issue #17's second
  goal: AIRPI >= 5 % of SSB's patterns/s in the same run);
* the two trees' phase images are compared (``evaluation.metrics.xc``, no registration): the speed-up must
  not change the answer;
* ``--extra-ckpt NAME=PATH`` (repeatable) also runs this tree with another checkpoint in each repeat (e.g.
  a slimmer distilled network), reported under ``extra.NAME`` with its speed-up over the old tree, its
  phase xc against the old tree's and against this tree's ``--ckpt`` run; whether it reconstructs as well
  as the full model is for the held-out suites (``evaluate.py``) to say, not this synthetic scan.

Background load skews both alike only when it is steady: stop other jobs first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: the line every `reconstruct.py` run prints (before and after the issue #17 work)
RATE_LINE = re.compile(r"(\d+) patterns in ([0-9.]+) s = ([0-9.]+) patterns/s")
DEFAULT_REV = "6f445e3^"


def parse_rate(output: str) -> tuple[int, float, float]:
    """``(patterns, seconds, patterns_per_s)`` of the last rate line of a `reconstruct.py` run's output;
    ValueError quoting the end of the output if there is none."""
    found = RATE_LINE.findall(output)
    if not found:
        raise ValueError(f"no 'N patterns in S s = R patterns/s' line in the output: ...{output[-500:]}")
    patterns, seconds, rate = found[-1]
    return int(patterns), float(seconds), float(rate)


def export_revision(rev: str, folder: Path, repo: Path = ROOT) -> Path:
    """The tree of ``rev`` (``git archive``) unpacked into ``folder/tree``; ValueError naming ``rev`` if git
    does not know it."""
    done = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev], capture_output=True)
    if done.returncode != 0:
        raise ValueError(f"--rev {rev!r}: {done.stderr.decode(errors='replace').strip()}")
    target = folder / "tree"
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(target, filter="data")
    return target


def run_tree(
    tree: Path,
    scan: Path,
    method: str,
    output: Path,
    threads: int,
    ckpt: Path | None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """One ``python reconstruct.py`` of ``tree`` (its own packages first on the path, its own config) in a
    fresh process; returns the printed rate and the output path."""
    command = [sys.executable, str(tree / "reconstruct.py"), f"input={scan}", f"method={method}",
               f"output={output}", f"threads={threads}", "progress=false",
               f"hydra.run.dir={output.parent / ('hydra_' + output.stem)}", *extra]  # fmt: skip
    if ckpt is not None:
        command.append(f"ckpt={ckpt}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)  # the tree's own top-level packages, before the installed ones
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    done = subprocess.run(command, capture_output=True, text=True, cwd=tree, env=env)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(
            f"{tree}: reconstruct.py method={method} failed ({done.returncode}): {text[-800:]}"
        )
    patterns, seconds, rate = parse_rate(text)
    return {"patterns": patterns, "seconds": seconds, "patterns_per_s": rate, "output": str(output)}


def phase_of(path: str | Path) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return np.asarray(handle["phase"][:], dtype=np.float64)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["patterns_per_s"] for r in runs]
    return {"patterns_per_s": rates, "median": statistics.median(rates), "best": max(rates)}


def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from evaluation.metrics import xc

    sys.path.insert(0, str(ROOT / "scripts"))  # its sibling script, for the synthetic scan writer
    import bench_reconstruct as bench

    scan, _, size_MB = bench._write_scan(folder, tuple(args.scan), tuple(args.detector))
    old_tree = export_revision(args.rev, folder)
    # a relative checkpoint path is each tree's own copy (its file format may have changed in between:
    # 0b694f0 added training ranges to the shipped AIRPI, which the older loaders cannot read)
    ckpt = None if args.ckpt is None else Path(args.ckpt)
    trees = {"old": old_tree, "new": ROOT}
    ckpts = {"old": ckpt, "new": ckpt}
    for name, path in args.extra_ckpt:
        trees[name], ckpts[name] = ROOT, Path(path)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for repeat in range(args.repeats):
        order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
        for name in order:
            out = folder / f"{name}_{repeat}.h5"
            runs[name].append(run_tree(trees[name], scan, args.method, out, args.threads, ckpts[name]))
            print(f"repeat {repeat}: {name} ({args.rev if name == 'old' else 'this tree'}) "
                  f"{runs[name][-1]['patterns_per_s']:.1f} patterns/s", flush=True)  # fmt: skip
    report: dict[str, Any] = {
        "rev": args.rev,
        "method": args.method,
        "scan": list(args.scan),
        "detector": list(args.detector),
        "scan_MB": round(size_MB, 1),
        "threads": args.threads,
        "old": summarise(runs["old"]),
        "new": summarise(runs["new"]),
    }
    report["speedup_median"] = report["new"]["median"] / report["old"]["median"]
    report["xc_new_vs_old"] = float(
        xc(phase_of(runs["new"][0]["output"]), phase_of(runs["old"][0]["output"]))
    )
    if args.extra_ckpt:
        report["extra"] = {}
    for name, path in args.extra_ckpt:
        phase = phase_of(runs[name][0]["output"])
        report["extra"][name] = {
            "ckpt": path,
            **summarise(runs[name]),
            "speedup_median": statistics.median(r["patterns_per_s"] for r in runs[name])
            / report["old"]["median"],
            "xc_vs_old": float(xc(phase, phase_of(runs["old"][0]["output"]))),
            "xc_vs_new": float(xc(phase, phase_of(runs["new"][0]["output"]))),
        }
    if args.with_ssb:
        ssb = run_tree(ROOT, scan, "ssb", folder / "ssb.h5", args.threads, None)
        report["ssb_patterns_per_s"] = ssb["patterns_per_s"]
        report["new_over_ssb"] = report["new"]["median"] / ssb["patterns_per_s"]
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rev", default=DEFAULT_REV, help="the earlier revision (git rev)")
    parser.add_argument("--method", default="airpi")
    parser.add_argument(
        "--ckpt", default="pretrained/airpi_reference.ckpt", help="network checkpoint ('none')"
    )
    parser.add_argument("--scan", nargs=2, type=int, default=(128, 128))
    parser.add_argument("--detector", nargs=2, type=int, default=(64, 64))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--with-ssb", action="store_true", help="also time this tree's SSB on the scan")
    parser.add_argument("--tmpdir", default=None, help="folder for the scan, the old tree and the outputs")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--extra-ckpt",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run this tree with checkpoint PATH, reported as NAME (repeatable)",
    )
    args = parser.parse_args(argv)
    pairs = []
    for item in args.extra_ckpt:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in ("old", "new"):
            parser.error(f"--extra-ckpt {item!r}: give NAME=PATH (NAME not 'old' or 'new')")
        pairs.append((name, path))
    args.extra_ckpt = pairs
    if args.ckpt is not None and args.ckpt.lower() == "none":
        args.ckpt = None
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deepstem-rev-", dir=args.tmpdir) as tmp:
        report = measure(args, Path(tmp))
    print(json.dumps(report, indent=2))
    print(f"{args.method} end to end, {args.scan[0]} x {args.scan[1]} scan, {args.threads} threads: "
          f"{args.rev} {report['old']['median']:.1f} -> this tree {report['new']['median']:.1f} patterns/s "
          f"(x{report['speedup_median']:.2f}, medians of {args.repeats}); phase xc new vs old "
          f"{report['xc_new_vs_old']:.4f}")  # fmt: skip
    for name, extra in report.get("extra", {}).items():
        print(f"{name} ({extra['ckpt']}): {extra['median']:.1f} patterns/s (x{extra['speedup_median']:.2f} "
              f"the old tree); phase xc vs old {extra['xc_vs_old']:.4f}, vs this tree's --ckpt "
              f"{extra['xc_vs_new']:.4f}")  # fmt: skip
    if "new_over_ssb" in report:
        share = 100 * report["new_over_ssb"]
        print(f"SSB {report['ssb_patterns_per_s']:.0f} patterns/s: {args.method} = {share:.1f} % of it")
        for name, extra in report.get("extra", {}).items():
            report["extra"][name]["over_ssb"] = extra["median"] / report["ssb_patterns_per_s"]
            print(f"  {name}: {100 * report['extra'][name]['over_ssb']:.1f} % of SSB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
