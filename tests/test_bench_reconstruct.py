"""`scripts/bench_reconstruct.py`'s measuring function in-process: one network at fp32 and bf16.

Only the structure is checked (both precisions, both layouts, positive rates, an agreement field): the
rates depend on the machine, and bf16 is emulated (slower) on CPUs without AVX512-BF16 / AMX, so there
are no thresholds.
"""

from __future__ import annotations

import json
import math
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.script_modules import load_script


def _bench() -> ModuleType:
    return load_script("bench_reconstruct")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_configurations_put_the_fp32_reference_first():
    bench = _bench()
    assert bench.configurations(["32", "bf16"], "on") == [("32", True), ("bf16", True)]
    assert bench.configurations(["32", "bf16"], "off") == [("32", False), ("bf16", False)]
    assert bench.configurations(["32", "bf16"], "both") == [("32", True), ("32", False), ("bf16", True)]
    assert bench.configurations(["bf16"], "both") == [("bf16", True)]
    with pytest.raises(ValueError, match="channels_last must be one of on, off, both"):
        bench.configurations(["32"], "nhwc")


def test_network_at_fp32_and_bf16_reports_both_rates_and_the_agreement(tmp_path, one_thread):
    bench = _bench()
    path = bench.SyntheticScan((4, 4), (32, 32)).write(tmp_path / "scan.h5")
    result = bench.child(
        "chang", path, "cpu", batch=4, epie_iterations=1, precisions=("32", "bf16"),
        channels_last="both", network_min_s=0.0,
    )  # fmt: skip
    json.dumps(result)  # what the child prints
    assert set(result["precisions"]) == {"32", "bf16"}
    assert set(result["layouts"]) == {"nhwc", "nchw"}
    assert result["layouts"]["nhwc"] is result["precisions"]["32"]
    runs = [*result["precisions"].values(), result["layouts"]["nchw"]]
    for run in runs:
        assert _positive(run["patterns_per_s"]) and _positive(run["network_patterns_per_s"]), run
        assert run["network_batch"] == 4 and run["network_passes"] >= 1
        assert run["finite_output"] is True
    assert [run["precision"] for run in runs] == ["32", "bf16", "32"]
    assert [run["channels_last"] for run in runs] == [True, True, False]
    bf16 = result["precisions"]["bf16"]
    assert "xc_vs_fp32" in bf16 and "xc_vs_fp32" not in result["precisions"]["32"]
    assert bf16["xc_vs_fp32"] is None or -1.0 <= bf16["xc_vs_fp32"] <= 1.0
    assert bf16["max_abs_phase_diff_rad"] >= 0 and bf16["reference_phase_std_rad"] >= 0
    assert result["layouts"]["nchw"]["max_abs_phase_diff_rad"] < 1e-4  # the layout changes no answer
    # the format before precisions: the reference run at the method's top level
    assert result["patterns_per_s"] == result["precisions"]["32"]["patterns_per_s"]
    assert result["precision"] == "32" and result["positions"] == 16 and result["weights"] == "untrained"


def test_airpi_to_ssb_ratio_per_precision():
    bench = _bench()
    results = {
        "airpi": {"precisions": {"32": {"patterns_per_s": 30.0}, "bf16": {"patterns_per_s": 3.0}}},
        "ssb": {"patterns_per_s": 300.0},
    }
    ratio = bench.airpi_vs_ssb(results)
    assert ratio["ratio"] == {"32": 0.1, "bf16": 0.01}
    assert ratio["meets_goal"] == {"32": True, "bf16": False} and ratio["goal_ratio"] == 0.05
    assert bench.airpi_vs_ssb({"airpi": results["airpi"], "ssb": {"error": "exit 1"}}) is None


def test_read_ahead_check_reports_both_rates_and_the_same_phase(tmp_path, one_thread):
    """``--read-ahead-check``: the network with the pattern read-ahead off and on gives the same phase
    (reading ahead changes when a block is read, not what) and both rates; the switch is restored."""
    from evaluation.networks.geometry import _PatternStream

    bench = _bench()
    path = bench.SyntheticScan((6, 6), (32, 32)).write(tmp_path / "scan.h5")
    result = bench.child(
        "airpi", path, "cpu", batch=4, epie_iterations=1, precisions=("32",), channels_last="on",
        network_min_s=0.0, read_ahead_check=True,
    )  # fmt: skip
    json.dumps(result)
    check = result["read_ahead"]
    assert _positive(check["off_patterns_per_s"]) and _positive(check["on_patterns_per_s"])
    ratio = check["on_patterns_per_s"] / check["off_patterns_per_s"]
    assert check["on_over_off"] == pytest.approx(ratio, rel=1e-2)
    assert check["max_abs_phase_diff_rad"] == 0.0
    assert _PatternStream.read_ahead is True


def test_compile_both_and_batch_sweep_report_the_compiled_run_and_each_batch(tmp_path, one_thread):
    """``--compile both``: every precision again through ``torch.compile`` (flagged compiled, the same
    phase as eager fp32); ``--batch-sweep``: the network alone at each batch; ``airpi_vs_ssb`` names the
    compiled runs."""
    bench = _bench()
    path = bench.SyntheticScan((4, 4), (32, 32)).write(tmp_path / "scan.h5")
    result = bench.child(
        "chang", path, "cpu", batch=4, epie_iterations=1, precisions=("32",), channels_last="on",
        network_min_s=0.0, compile="both", batch_sweep=(2, 3),
    )  # fmt: skip
    json.dumps(result)
    compiled = result["compiled"]["32"]
    assert compiled["compiled"] is True and result["precisions"]["32"]["compiled"] is False
    assert _positive(compiled["patterns_per_s"]) and _positive(compiled["network_warmup_s"])
    assert compiled["max_abs_phase_diff_rad"] < 1e-4  # compiling changes no answer
    assert set(result["batch_sweep"]["32"]) == {"2", "3"}
    assert all(_positive(rate) for rate in result["batch_sweep"]["32"].values())
    ratio = bench.airpi_vs_ssb(
        {
            "airpi": {**result, "precisions": {"32": {"patterns_per_s": 30.0}}},
            "ssb": {"patterns_per_s": 300.0},
        }
    )
    assert set(ratio["ratio"]) == {"32", "32/compiled"}


def test_warm_repeat_times_the_call_again_and_with_the_centre_given(tmp_path, one_thread):
    """``--warm-repeat``: the end-to-end call once more (nothing compiled again: eager here) and with the
    detector centre it found given back, which skips the mean-CBED pass and must give the same phase."""
    bench = _bench()
    path = bench.SyntheticScan((6, 6), (32, 32)).write(tmp_path / "scan.h5")
    result = bench.child(
        "airpi", path, "cpu", batch=4, epie_iterations=1, precisions=("32",), channels_last="on",
        network_min_s=0.0, warm_repeat=True,
    )  # fmt: skip
    json.dumps(result)
    run = result["precisions"]["32"]
    assert _positive(run["warm"]["patterns_per_s"]) and run["warm"]["recompiled"] is False
    given = run["warm_centre_given"]
    assert _positive(given["patterns_per_s"])
    assert given["max_abs_phase_diff_rad"] == 0.0
