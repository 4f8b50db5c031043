"""scripts/summarize_suite.py: dose x method tables from a suite's metrics.json rows."""

from __future__ import annotations

import json
from types import ModuleType

from tests.script_modules import load_script


def _module() -> ModuleType:
    return load_script("summarize_suite")


def _row(dose, method, xc, frc):
    return {"scan": "s", "dose_e_per_A2": dose, "method": method, "xc": xc, "frc_0.143_A": frc}


def test_rows_are_doses_noise_free_first_and_best_follows_the_metric(tmp_path, capsys):
    rows = [
        _row(1000.0, "ssb", 0.5, 1.2),
        _row("inf", "ssb", 0.9, 0.6),
        _row(1e5, "ssb", 0.8, 0.7),
        _row(1000.0, "airpi", 0.6, 1.5),
        _row("inf", "airpi", 0.7, 0.5),
        _row(1e5, "airpi", float("nan"), 0.9),
    ]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"rows": rows}))
    assert _module().main([str(path), "--metric", "xc", "frc_0.143_A"]) == 0
    text = capsys.readouterr().out
    xc_table, frc_table = text.split("s: frc_0.143_A")
    lines = [line for line in xc_table.splitlines() if line.startswith("| ") and "dose" not in line]
    assert [line.split("|")[1].strip() for line in lines] == ["inf", "1e+05", "1e+03"]
    assert lines[0].endswith("| ssb |") and lines[1].endswith("| ssb |") and lines[2].endswith("| airpi |")
    frc_lines = [line for line in frc_table.splitlines() if line.startswith("| ") and "dose" not in line]
    assert frc_lines[0].endswith("| airpi |") and frc_lines[2].endswith("| ssb |")  # smaller is better
    assert _module().main([str(tmp_path / "missing.json")]) == 1


def test_tables_name_the_criterion_and_flag_shifts_at_the_bound(tmp_path, capsys):
    rows = [
        {"scan": "s", "dose_e_per_A2": "inf", "method": "ssb", "xc": 0.9, "frc_0.5_A": 0.7,
         "frc_0.143_A": 0.6, "shift_norm_A": 0.12, "shift_at_bound": False},
        {"scan": "s", "dose_e_per_A2": "inf", "method": "airpi", "xc": 0.1, "frc_0.5_A": 2.0,
         "frc_0.143_A": 0.9, "shift_norm_A": 0.71, "shift_at_bound": True},
    ]  # fmt: skip
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"rows": rows}))
    assert _module().main([str(path)]) == 0  # default: xc, the headline FRC 0.5 and the shift
    text = capsys.readouterr().out
    assert "s: frc_0.5_A (FRC 0.5 against the truth" in text and "s: shift_norm_A" in text
    shift_table = text.split("s: shift_norm_A")[1]
    assert "| 0.120 | 0.710 (bound) |" in shift_table
    assert _module().main([str(path), "--metric", "frc_0.143_A"]) == 0
    assert "half-map criterion" in capsys.readouterr().out
