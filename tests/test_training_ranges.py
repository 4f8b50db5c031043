"""A model knows what it was trained for (issue 13, point 2): ranges recorded by the exporter, warnings naming
the quantity and the range, ``strict_optics``, resampling to the model's alpha / gmax, and the choice among
several shipped models."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan

from evaluation.cli import choose_checkpoint, reconstruct_main
from evaluation.io import Scan4D, save_4dstem
from evaluation.networks import (
    load_network,
    optics_mismatch,
    reconstruct_with_network,
    training_ranges,
)
from physics import wavelength
from tests.script_modules import load_script
from tests.test_reconstruct_networks import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: the shipped model's ranges (pretrained/README.md)
SPECIALIST = {
    "energy_eV": [300e3, 300e3],
    "semiangle_mrad": [20.0, 20.0],
    "Cs_A": [0.0, 0.0],
    "defocus_A": [0.0, 0.0],
    "alpha_over_gmax": [0.5, 0.5],
    "scan_step_A": [0.24, 0.36],
    "dose_e_per_cbed": [10.0, 1e9],
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _export_script() -> ModuleType:
    return load_script("export_checkpoint")


def tiny(method: str, path: Path, trained_for: dict[str, Any] | None = None) -> Path:
    """A tiny checkpoint of ``method`` with ``deepstem.trained_for`` as the exporter writes it."""
    save_checkpoint(method, path)
    if trained_for is not None:
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["deepstem"] = {"trained_for": trained_for}
        torch.save(checkpoint, path)
    return path


def _calibration(**values: Any) -> SimpleNamespace:
    base = {
        "energy_eV": 300e3,
        "semiangle_mrad": 20.0,
        "scan_step_A": (0.3, 0.3),
        "Cs_A": 0.0,
        "defocus_A": 0.0,
    }
    return SimpleNamespace(**{**base, **values})


# ------------------------------------------------------------------------------------------------------
# 1. ranges in the checkpoint


def test_export_records_ranges_and_rejects_bad_ones(tmp_path, capsys):
    script = _export_script()
    source = tiny("airpi", tmp_path / "last.ckpt")
    target = tmp_path / "out" / "airpi.ckpt"
    items = ["energy_eV=300000", "scan_step_A=0.24:0.36", "defocus_A=-50:-10", "dose_e_per_cbed=10:1e9"]
    assert script.main([str(source), str(target), "--trained-for", *items]) == 0
    saved = torch.load(target, weights_only=True)["deepstem"]["trained_for"]
    assert saved == {
        "energy_eV": [300000.0, 300000.0],
        "scan_step_A": [0.24, 0.36],
        "defocus_A": [-50.0, -10.0],
        "dose_e_per_cbed": [10.0, 1e9],
    }
    assert training_ranges(load_network(target, "airpi"))["scan_step_A"] == (0.24, 0.36)
    # re-exporting an export in place: same tensors, new ranges, earlier provenance kept
    assert script.main([str(target), str(target), "--trained-for", "semiangle_mrad=20"]) == 0
    again = torch.load(target, weights_only=True)
    assert again["deepstem"]["trained_for"] == {"semiangle_mrad": [20.0, 20.0]}
    assert again["deepstem"]["source_checkpoint"] == "last.ckpt" and "updated" in again["deepstem"]
    for key, value in torch.load(source, weights_only=True)["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value)
    capsys.readouterr()
    for bad, message in [
        ("voltage_kV=300", "unknown quantity 'voltage_kV'"),
        ("scan_step_A=0.4:0.2", "LOW 0.4 is above HIGH 0.2"),
        ("Cs_A=big", "give Cs_A=NUMBER or Cs_A=LOW:HIGH"),
        ("alpha_over_gmax=0.5:1.5", "alpha_over_gmax must lie in (0, 1)"),
    ]:
        assert script.main([str(source), str(tmp_path / "bad.ckpt"), "--trained-for", bad]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("deepstem: error:") and message in lines[0], lines
    assert not (tmp_path / "bad.ckpt").exists()


def test_old_scalar_records_read_as_ranges():
    model = SimpleNamespace(deepstem_info={"trained_for": {"energy_eV": 300000.0, "semiangle_mrad": 20.0}})
    assert training_ranges(model) == {"energy_eV": (300e3, 300e3), "semiangle_mrad": (20.0, 20.0)}
    assert training_ranges({"deepstem": {"trained_for": {"Cs_A": [0.0, 10.0]}}}) == {"Cs_A": (0.0, 10.0)}
    assert training_ranges(SimpleNamespace()) == {} and training_ranges({"state_dict": {}}) == {}
    assert optics_mismatch(model, _calibration(energy_eV=80e3)) == [
        "energy_eV=80000 outside the model's training range [300000, 300000] eV"
    ]


# ------------------------------------------------------------------------------------------------------
# 2. warnings naming the quantity and the range


def test_scherzer_optics_warn_for_cs_and_defocus_only():
    """Cs 0.001 mm at Scherzer defocus on the Cs 0 / defocus 0 specialist: two warnings; a scan inside the
    ranges (within the tolerances) none."""
    model = {"deepstem": {"trained_for": SPECIALIST}}
    cs_A = 1e4  # 0.001 mm
    scherzer_A = math.sqrt(1.5 * cs_A * wavelength(300e3))  # 17.2 A
    found = optics_mismatch(model, _calibration(Cs_A=cs_A, defocus_A=scherzer_A))
    assert found == [
        "Cs_A=10000 outside the model's training range [0, 0] A",
        f"defocus_A={scherzer_A:g} outside the model's training range [0, 0] A",
    ]
    inside = _calibration(energy_eV=303e3, scan_step_A=(0.365, 0.24), Cs_A=900.0, defocus_A=-1.9)
    assert optics_mismatch(model, inside) == []
    steps = optics_mismatch(model, _calibration(scan_step_A=(0.3, 0.5), semiangle_mrad=25.0))
    assert steps == [
        "semiangle_mrad=25 outside the model's training range [20, 20] mrad",
        "scan_step_A[y]=0.5 outside the model's training range [0.24, 0.36] A",
    ]
    repetition = optics_mismatch(model, _calibration(), step_factor=2)  # data repetition: 0.6 A
    assert repetition == [
        "scan_step_A=0.6 (data repetition: 2 x the scan step) outside the model's training range "
        "[0.24, 0.36] A"
    ]


# ------------------------------------------------------------------------------------------------------
# 3. resampling to the model's alpha / gmax


def _scan(gmax_over_alpha: float, scan_px: int = 6) -> Scan4D:
    sim = simulate_scan(scan_px=scan_px, cbed_px=48, gmax_over_alpha=gmax_over_alpha)
    return Scan4D(
        data=sim.data,
        energy_eV=sim.energy_eV,
        semiangle_mrad=sim.semiangle_mrad,
        scan_step_A=(sim.scan_step_A, sim.scan_step_A),
        k_pixel_invA=(sim.k_pixel_invA, sim.k_pixel_invA),
    )


@pytest.mark.parametrize("method", ["airpi", "ptychonn"])
def test_network_grid_follows_the_models_alpha_over_gmax(tmp_path, method):
    """A detector reaching 3 alpha: a model recorded at alpha/gmax 0.5 is fed gmax = 2 alpha; without the
    record, or with ratio_alpha_gmax given, gmax is what the detector covers (~3 alpha) as before."""
    scan = _scan(gmax_over_alpha=3.0)
    alpha = scan.semiangle_mrad * 1e-3 / wavelength(scan.energy_eV)
    params = {"pixels": 32, "batch_size": 64, "ratio_alpha_gmax": None}
    run = {"device": "cpu", "progress": False, "precision": "32"}
    recorded = load_network(tiny(method, tmp_path / "a.ckpt", {"alpha_over_gmax": [0.5, 0.5]}), method)
    result = reconstruct_with_network(scan, method, recorded, params, **run)
    assert result.info["gmax_invA"] == pytest.approx(2 * alpha, rel=1e-9)
    assert result.info["alpha_over_gmax"] == pytest.approx(0.5)
    assert result.info["alpha_over_gmax_from"] == "model"
    plain = load_network(tiny(method, tmp_path / "b.ckpt"), method)
    result = reconstruct_with_network(scan, method, plain, params, **run)
    assert result.info["gmax_invA"] > 2.9 * alpha and result.info["alpha_over_gmax_from"] == "paper"
    paper = {**params, "ratio_alpha_gmax": [0.1, 0.95]}
    with pytest.warns(RuntimeWarning, match=r"ratio_alpha_gmax\) outside the model's training range"):
        given = reconstruct_with_network(scan, method, recorded, paper, **run)  # the user's grid: ~3 alpha
    assert given.info["gmax_invA"] == pytest.approx(result.info["gmax_invA"])
    short = _scan(gmax_over_alpha=1.5, scan_px=3)  # the model needs 2 alpha: refused, naming the range
    with pytest.raises(ValueError, match=r"alpha_over_gmax training range \[0.5, 0.5\].*ratio_alpha_gmax"):
        reconstruct_with_network(short, method, recorded, params, **run)


# ------------------------------------------------------------------------------------------------------
# reconstruct.py: strict_optics, and the choice among shipped models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An 80 kV / 20 mrad scan (6 x 6 positions, detector to 4 alpha) and a folder of shipped models."""
    root = tmp_path_factory.mktemp("ranges")
    s = simulate_scan(scan_px=6, cbed_px=48)
    save_4dstem(
        root / "scan.h5", s.data, energy_eV=s.energy_eV, semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A, k_pixel_invA=s.k_pixel_invA,
    )  # fmt: skip
    shipped = root / "pretrained"
    shipped.mkdir()
    tiny("airpi", shipped / "airpi_reference.ckpt", SPECIALIST)  # the default: 300 kV
    tiny("airpi", shipped / "airpi_80kV.ckpt", {"energy_eV": [60e3, 100e3], "semiangle_mrad": [15, 25]})
    tiny("airpi", shipped / "airpi_200kV.ckpt", {"energy_eV": [200e3, 200e3]})
    tiny("ptychonn", shipped / "ptychonn.ckpt", {"energy_eV": [80e3, 80e3]})
    (shipped / "broken.ckpt").write_bytes(b"not a checkpoint")
    return root


def _config(folder: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="reconstruct",
            overrides=[f"input={folder}/scan.h5", "progress=false", "device=cpu", *overrides],
        )


def test_strict_optics_refuses_with_one_line_and_writes_nothing(folder, tmp_path, capsys):
    ckpt = folder / "pretrained" / "airpi_reference.ckpt"
    base = ["method=airpi", f"ckpt={ckpt}", "airpi.pixels=32", "calibration_override.scan_step_A=0.3"]
    assert reconstruct_main(_config(folder, *base, f"output={tmp_path}/strict.h5", "strict_optics=true")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepstem: error: scan.h5: outside"), lines
    assert "energy_eV=80000 outside the model's training range [300000, 300000] eV" in lines[0]
    assert "strict_optics" in lines[0]
    assert not list(tmp_path.iterdir())
    assert reconstruct_main(_config(folder, *base, f"output={tmp_path}/warned.h5")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "reconstruct: warning: scan.h5: energy_eV=80000 outside the model's training range "
        "[300000, 300000] eV"
    ]
    assert (tmp_path / "warned.h5").is_file()


def test_shipped_model_is_chosen_by_its_ranges(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEEPSTEM_PRETRAINED_DIR", str(folder / "pretrained"))
    shipped = folder / "pretrained"
    path, reason = choose_checkpoint("airpi", _calibration(energy_eV=80e3, scan_step_A=(0.2, 0.2)))
    assert path == shipped / "airpi_80kV.ckpt" and "cover the scan" in reason
    assert choose_checkpoint("airpi", _calibration())[0] == shipped / "airpi_reference.ckpt"
    path, reason = choose_checkpoint("airpi", _calibration(energy_eV=120e3, Cs_A=0.0))
    assert path == shipped / "airpi_reference.ckpt" and "tie, the default" in reason  # one outside each
    assert choose_checkpoint("airpi")[0] == shipped / "airpi_reference.ckpt"
    assert choose_checkpoint("ptychonn")[0] == shipped / "ptychonn.ckpt"
    assert choose_checkpoint("chang_unet") is None
    output = tmp_path / "out.h5"
    assert reconstruct_main(_config(folder, "method=airpi", f"output={output}", "airpi.pixels=32")) == 0
    err = capsys.readouterr().err
    assert f"using the shipped model {shipped / 'airpi_80kV.ckpt'} (its training ranges cover the scan" in err
    assert "warning" not in err and output.is_file()
    monkeypatch.setenv("DEEPSTEM_PRETRAINED_DIR", str(tmp_path / "empty"))
    assert reconstruct_main(_config(folder, "method=airpi", f"output={tmp_path}/none.h5")) == 2
    assert "needs a network checkpoint" in capsys.readouterr().err


def test_shipped_reference_records_its_ranges():
    checkpoint = torch.load(ROOT / "pretrained" / "airpi_reference.ckpt", weights_only=True)
    assert checkpoint["deepstem"]["trained_for"] == SPECIALIST
    assert np.isclose(training_ranges(checkpoint)["alpha_over_gmax"][0], 0.5)
