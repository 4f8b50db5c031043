"""`python reconstruct.py`: a real run on a small saved scan, and every bad input refused cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from scan4d_helpers import simulate_scan

from datagen import store
from evaluation.io import save_4dstem
from evaluation.metrics import xc
from tests.entrypoint_helpers import run_entry_point

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_entry_point("reconstruct.py", tmp_path, *overrides)


def _calibration(s) -> dict:
    return {
        "energy_eV": s.energy_eV,
        "semiangle_mrad": s.semiangle_mrad,
        "scan_step_A": s.scan_step_A,
        "k_pixel_invA": s.k_pixel_invA,
    }


@pytest.fixture(scope="module")
def scan():
    return simulate_scan()


def _outputs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix in (".h5", ".png") and p.name != "scan.h5"
    ) + sorted(p for p in folder.iterdir() if ".tmp" in p.name)


def test_ssb_run_writes_recon_and_png(scan, tmp_path):
    save_4dstem(tmp_path / "scan.h5", scan.data, **_calibration(scan))
    result = _run(tmp_path, "input=scan.h5", "method=ssb")
    assert result.returncode == 0, result.stderr
    assert "patterns/s" in result.stdout
    output = tmp_path / "scan_ssb.h5"
    assert (tmp_path / "scan_ssb.png").stat().st_size > 1000
    with store.open_checked(output, store.RECON) as handle:
        phase = handle["phase"][()]
        assert phase.dtype == np.float32 and phase.shape == (24, 24)
        assert handle.attrs["method"] == "ssb"
        np.testing.assert_allclose(handle.attrs["pixel_size_A"], scan.scan_step_A)
        np.testing.assert_allclose(handle.attrs["origin_A"], 0.0)
        assert handle.attrs["patterns_per_s"] > 0
        assert "method: ssb" in handle.attrs["config"]
    assert xc(scan.truth_on_scan, phase) > 0.95


def test_output_name_and_method_parameters(scan, tmp_path):
    save_4dstem(tmp_path / "scan.h5", scan.data, **_calibration(scan))
    result = _run(tmp_path, "input=scan.h5", "method=epie", "epie.iterations=2", "output=out/epie.h5")
    assert result.returncode == 0, result.stderr
    with store.open_checked(tmp_path / "out" / "epie.h5", store.RECON) as handle:
        assert handle["fourier_error"].shape == (2,)
        assert "amplitude" in handle
    assert (tmp_path / "out" / "epie.png").is_file()


def test_network_method_without_a_checkpoint_file_is_one_clear_error(scan, tmp_path):
    save_4dstem(tmp_path / "scan.h5", scan.data, **_calibration(scan))
    result = _run(tmp_path, "input=scan.h5", "method=airpi", "ckpt=model.ckpt")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no such checkpoint file" in lines[0], result.stderr
    assert not _outputs(tmp_path)


def _write_npy(tmp_path: Path, data: np.ndarray, calibration: dict) -> None:
    np.save(tmp_path / "scan.npy", data)
    (tmp_path / "scan.yaml").write_text(
        yaml.safe_dump({k: np.atleast_1d(v).tolist() for k, v in calibration.items()})
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong_dims", "4 dimensions"),
        ("nan", "NaN"),
        ("negative", "negative counts"),
        ("too_small", "at least 3x3"),
        ("missing_calibration", "missing calibration 'semiangle_mrad'"),
    ],
)
def test_bad_input_exits_with_one_line_and_writes_nothing(scan, tmp_path, case, message):
    data = scan.data[:6, :6].copy()
    calibration = _calibration(scan)
    if case == "wrong_dims":
        data = data[:, :, :, 0]
    elif case == "nan":
        data[2, 3, 10, 10] = np.nan
    elif case == "negative":
        data[4, 1, 0, 0] = -1.0
    elif case == "too_small":
        data = data[:2]
    elif case == "missing_calibration":
        del calibration["semiangle_mrad"]
    _write_npy(tmp_path, data, calibration)
    result = _run(tmp_path, "input=scan.npy", "method=ssb")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deepstem: error:") and message in lines[0]
    assert not [p for p in tmp_path.iterdir() if p.name not in ("scan.npy", "scan.yaml", "run")]


def test_failed_run_keeps_an_existing_output(scan, tmp_path):
    _write_npy(tmp_path, np.full((4, 4, 16, 16), -1.0, np.float32), _calibration(scan))
    (tmp_path / "scan_icom.h5").write_bytes(b"earlier result")
    result = _run(tmp_path, "input=scan.npy", "method=icom")
    assert result.returncode != 0
    assert (tmp_path / "scan_icom.h5").read_bytes() == b"earlier result"


def test_calibration_override_fills_a_missing_value(scan, tmp_path):
    calibration = _calibration(scan)
    del calibration["semiangle_mrad"]
    _write_npy(tmp_path, scan.data[:8, :8], calibration)
    result = _run(
        tmp_path,
        "input=scan.npy",
        "method=vadf",
        "vadf.detector=bf",
        "calibration_override.semiangle_mrad=20",
    )
    assert result.returncode == 0, result.stderr
    with store.open_checked(tmp_path / "scan_vadf.h5", store.RECON) as handle:
        assert handle.attrs["info_inner_mrad"] == 0.0 and handle.attrs["info_outer_mrad"] == 20.0
        assert handle["phase"].shape == (8, 8)
