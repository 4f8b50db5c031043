"""`scripts/bench_train.py` and `scripts/bench_reconstruct.py` at tiny sizes: one valid JSON line each.

Only the structure and that the numbers are positive and finite are checked: timings depend on the
machine, so there are no thresholds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *arguments: str) -> dict[str, Any]:
    """Run ``scripts/<name>`` on one thread and return its last stdout line, parsed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), "--threads", "1", *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # progress and per-model lines go to stderr
    return json.loads(lines[0])


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def test_bench_train_reports_every_model():
    report = run_script(
        "bench_train.py", "--steps", "1", "--warmup", "1", "--batch", "2", "--cgrdn-tile", "16",
        "--precision", "32",
    )  # fmt: skip
    assert report["benchmark"] == "train"
    assert report["device"] == "cpu" and report["threads"] == 1
    assert report["precision"] == "32" and report["precisions"] == ["32"] and report["compile"] is False
    assert isinstance(report["machine"], dict) and report["torch"]
    assert set(report["results"]) == {"airpi", "chang", "ptychonn", "cgrdn"}
    shapes = {"airpi": [11, 64, 64], "chang": [1, 32, 32], "ptychonn": [1, 64, 64], "cgrdn": [1, 16, 16]}
    for name, result in report["results"].items():
        assert positive(result["samples_per_s"]), (name, result)
        assert result["batch"] == 2
        assert result["input_shape"] == shapes[name]
        assert positive(result["params"]) and isinstance(result["params"], int)
        assert math.isfinite(result["last_loss"])
    assert positive(report["results"]["cgrdn"]["params_discriminator"])


def test_bench_train_bf16_autocast():
    report = run_script(
        "bench_train.py", "--models", "ptychonn", "--steps", "1", "--warmup", "0", "--batch", "2",
        "--precision", "bf16",
    )  # fmt: skip
    assert report["precision"] == "bf16" and report["precisions"] == ["bf16"]
    result = report["results"]["ptychonn"]
    assert positive(result["samples_per_s"]) and result["precision"] == "bf16"
    assert result["channels_last"] is True  # --channels-last auto: NHWC for bf16, as train.py does
    assert "bf16_speedup" not in result  # one precision: nothing to compare


def test_bench_train_default_times_fp32_and_bf16_in_one_run():
    from physics.runtime import bf16_supported

    report = run_script(
        "bench_train.py", "--models", "chang", "--steps", "1", "--warmup", "0", "--batch", "2"
    )
    assert report["precision"] == "both" and report["precisions"] == ["32", "bf16"]
    native = bf16_supported("cpu")
    assert report["bf16"]["native"] is native
    assert report["bf16"]["mode"] == ("native" if native else "emulated")
    assert report["bf16"]["auto_precision"] == ("bf16-mixed" if native else "32-true")
    result = report["results"]["chang"]
    runs = result["precisions"]
    assert set(runs) == {"32", "bf16"}
    assert runs["32"]["precision"] == "32" and runs["32"]["channels_last"] is False
    assert runs["bf16"]["precision"] == "bf16" and runs["bf16"]["channels_last"] is True
    for run in runs.values():
        assert positive(run["samples_per_s"]) and math.isfinite(run["first_loss"])
    assert result["samples_per_s"] == runs["32"]["samples_per_s"]  # the top level: the fp32 reference
    assert result["bf16_speedup"] == pytest.approx(
        runs["bf16"]["samples_per_s"] / runs["32"]["samples_per_s"], abs=1e-4
    )
    # same seed-0 weights and batch: bf16 autocast changes the first loss by rounding only
    difference = abs(runs["bf16"]["first_loss"] - runs["32"]["first_loss"]) / runs["32"]["first_loss"]
    assert result["bf16_first_loss_rel_diff"] == pytest.approx(difference)
    assert 0 < difference < 0.05


def test_bench_reconstruct_reports_every_method_and_the_scale_check():
    # fp32 only here: bf16 and both layouts are tests/test_bench_reconstruct.py's (in-process, faster)
    report = run_script(
        "bench_reconstruct.py", "--scan", "6", "6", "--detector", "32", "32", "--batch", "16",
        "--epie-iterations", "1", "--scale-check", "--precisions", "32", "--network-min-s", "0",
    )  # fmt: skip
    assert report["benchmark"] == "reconstruct"
    assert report["device"] == "cpu" and report["threads"] == 1
    assert report["precisions"] == ["32"] and report["channels_last"] == "on"
    assert isinstance(report["bf16"]["native"], bool) and report["bf16"]["auto_precision"] in ("32", "bf16")
    assert report["airpi_vs_ssb"]["goal_ratio"] == 0.05 and positive(report["airpi_vs_ssb"]["ratio"]["32"])
    assert report["scan"] == [6, 6] and report["detector"] == [32, 32]
    methods = {"airpi", "ptychonn", "chang", "epie", "ssb", "icom", "ricom"}
    assert set(report["results"]) == methods
    for name, result in report["results"].items():
        assert "error" not in result, (name, result)
        assert positive(result["patterns_per_s"]), (name, result)
        assert positive(result["seconds"]), (name, result)
        assert non_negative(result["peak_memory_MB"]), (name, result)
        assert positive(result["peak_rss_MB"]), (name, result)
        assert result["positions"] == 36 and result["finite_output"] is True
    for name in ("airpi", "ptychonn", "chang"):
        run = report["results"][name]["precisions"]["32"]
        assert positive(run["network_patterns_per_s"]) and run["precision"] == "32", (name, run)
    for name in ("epie", "ssb", "icom", "ricom"):
        assert non_negative(report["results"][name]["tracemalloc_peak_MB"])
    assert report["results"]["epie"]["iterations"] == 1
    check = report["airpi_scale_check"]
    assert check["scans"] == [[6, 6], [12, 12]]
    assert math.isclose(check["data_MB"][1], 4 * check["data_MB"][0], rel_tol=0.01)
    assert all(non_negative(v) for v in check["peak_memory_MB"]), check
    assert all(positive(v) for v in check["patterns_per_s"]), check


def test_bench_mean_cbed_times_both_reads_and_they_agree():
    """The mean-CBED pass serially and with read-ahead: both timed, the same mean bit for bit."""
    result = run_script("bench_mean_cbed.py", "--scan", "8", "8", "--detector", "16", "16", "--repeats", "1")
    assert result["benchmark"] == "mean_cbed" and result["identical"] is True
    assert positive(result["serial_s"]) and positive(result["read_ahead_s"])
    ratio = result["serial_s"] / result["read_ahead_s"]
    assert result["read_ahead_speedup"] == pytest.approx(ratio, rel=0.01)
