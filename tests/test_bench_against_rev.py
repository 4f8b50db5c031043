"""`scripts/bench_against_rev.py`: this tree's `reconstruct.py` against an earlier revision's, in one run.

The rates are the machine's, so no thresholds: the rate line is parsed, a revision is exported as a runnable
tree (its own packages used, not the installed ones), a bad revision is named, and one tree runs a method on
a small synthetic scan and reports its printed rate.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_parse_rate_takes_the_last_rate_line():
    script = load_script("bench_against_rev")
    text = (
        "x\nairpi: 10 patterns in 2.000 s = 5 patterns/s\n"
        "airpi: 576 patterns in 5.383 s = 107 patterns/s (bf16)"
    )
    assert script.parse_rate(text) == (576, 5.383, 107.0)
    with pytest.raises(ValueError, match="no 'N patterns in S s"):
        script.parse_rate("deepstem: error: something")


def test_export_revision_and_bad_revision(tmp_path):
    script = load_script("bench_against_rev")
    tree = script.export_revision("HEAD", tmp_path)
    assert (tree / "reconstruct.py").is_file() and (tree / "evaluation" / "cli.py").is_file()
    with pytest.raises(ValueError, match="--rev 'no-such-rev-xyz'"):
        script.export_revision("no-such-rev-xyz", tmp_path / "bad")


def test_run_tree_reports_the_printed_rate(tmp_path):
    script = load_script("bench_against_rev")
    bench = load_script("bench_reconstruct")
    scan, _, _ = bench._write_scan(tmp_path, (8, 8), (16, 16))
    run = script.run_tree(ROOT, scan, "icom", tmp_path / "icom.h5", 1, None)
    assert run["patterns"] == 64 and run["patterns_per_s"] > 0
    assert script.phase_of(run["output"]).ndim == 2
    with pytest.raises(RuntimeError, match="method=nosuch failed"):
        script.run_tree(ROOT, scan, "nosuch", tmp_path / "x.h5", 1, None)


def test_extra_checkpoints_are_name_path_pairs():
    script = load_script("bench_against_rev")
    args = script.parse_args(["--extra-ckpt", "slim=a/b.ckpt", "--extra-ckpt", "other=c=d.ckpt"])
    assert args.extra_ckpt == [("slim", "a/b.ckpt"), ("other", "c=d.ckpt")]
    assert script.parse_args([]).extra_ckpt == []
    for bad in ("slim", "=x.ckpt", "old=x.ckpt", "slim="):
        with pytest.raises(SystemExit):
            script.parse_args(["--extra-ckpt", bad])
