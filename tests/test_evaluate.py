"""`python evaluate.py`: a tiny suite end to end (numbers, JSON, Markdown, figures) and bad suites."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan

from evaluation.io import save_4dstem
from evaluation.suite import PoissonScan, evaluate_main
from models.lightning import AIRPILightning, PtychoNNLightning
from tests.entrypoint_helpers import run_entry_point

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 16 x 16 scan of a known POA object with its truth group, and two tiny checkpoints."""
    root = tmp_path_factory.mktemp("suite")
    s = simulate_scan(scan_px=16, cbed_px=32)
    save_4dstem(
        root / "scan.h5", s.data, energy_eV=s.energy_eV, semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A, k_pixel_invA=s.k_pixel_invA, truth_phase=s.phase,
        truth_pixel_size_A=s.object_pixel_A,
    )  # fmt: skip
    for name, module in (
        ("airpi", AIRPILightning(net={"filters": 4, "depth": 1, "block_convs": 1})),
        ("ptychonn", PtychoNNLightning(net={"channels": [4, 8]})),
    ):
        torch.save(
            {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
             "pytorch-lightning_version": lightning.__version__},
            root / f"{name}.ckpt",
        )  # fmt: skip
    return root


def _config(folder: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="evaluate",
            overrides=["suite=tiny", f"suite.scans.tiny.path={folder}/scan.h5", "progress=false", *overrides],
        )


def test_tiny_suite_numbers_table_and_figures(folder, tmp_path, capsys):
    net = "+suite.methods.airpi_tiny"
    cfg = _config(folder, f"{net}.method=airpi", f"{net}.ckpt={folder}/airpi.ckpt", f"{net}.params.pixels=32")
    assert evaluate_main(cfg, tmp_path) == 0, capsys.readouterr().err
    content = json.loads((tmp_path / "metrics.json").read_text())
    rows = content["rows"]
    step = next(r for r in rows if r["method"] == "ssb")["pixel_size_A"][0]  # SSB is on the scan grid
    assert len(rows) == 3 * 4  # doses x methods
    value = {(r["method"], str(r["dose_e_per_A2"])): r for r in rows}
    # noise-free: the conventional references find the object (bounds of tests/test_references.py)
    assert value[("epie", "inf")]["xc"] > 0.99
    # (against the truth band-limited to the scoring grid, not smoothed to each method's own grid: SSB and
    # iCOM, limited to the scan Nyquist, lose the truth's finer detail)
    assert value[("ssb", "inf")]["xc"] > 0.85 and value[("icom", "inf")]["xc"] > 0.85
    for method in ("ssb", "icom", "epie"):  # xc falls with the dose: inf > 1e4 > 1e2 e/A^2
        assert (
            value[(method, "inf")]["xc"] > value[(method, "10000.0")]["xc"] > value[(method, "100.0")]["xc"]
        )
        assert value[(method, "100.0")]["frc_0.143_A"] > value[(method, "inf")]["frc_0.143_A"]
    for r in rows:
        assert r["frc_half_bit_A"] > 0 and r["patterns_per_s"] > 0 and len(r["frc_curve"]["frc"]) > 4
        if r["dose_e_per_A2"] != "inf":  # D = d s^2 electrons per CBED
            assert r["dose_e_per_cbed"] == pytest.approx(r["dose_e_per_A2"] * step**2)
    assert all(r["registered"] for r in rows if r["kind"] != "airpi" and r["dose_e_per_A2"] != 100)
    assert math.isfinite(value[("airpi_tiny", "inf")]["xc"])  # an untrained network: it runs, no claim
    # one scoring grid for every method (finer than the scan step: SSB's FRC is no longer pinned at the
    # grid Nyquist), AIRPI placed on it; registration bounded by max_shift_A (0.5 A) and reported
    pixels = {r["score_pixel_A"] for r in rows}
    assert len(pixels) == 1 and pixels.pop() < 0.75 * step
    nyquist = {round(r["frc_curve"]["freq_invA"][-1] * r["score_pixel_A"], 1) for r in rows}
    assert nyquist == {0.5}  # every curve runs to the one grid's Nyquist (fields differ by a cropped row)
    assert value[("airpi_tiny", "inf")]["pixel_size_A"][0] == pytest.approx(rows[0]["score_pixel_A"])
    for r in rows:
        assert max(abs(v) for v in r["shift_A"]) <= 0.5 + 1e-9 and isinstance(r["shift_at_bound"], bool)
        assert r["shift_norm_A"] == pytest.approx(math.hypot(*r["shift_A"]))
    assert value[("ssb", "inf")]["frc_0.5_A"] > 2 * step * 1.02  # crosses before the scan Nyquist
    assert content["headline_resolution"] == "frc_0.5_A" and "truth" in content["frc_criteria"]["frc_0.5_A"]
    assert "half-data" in content["frc_criteria"]["frc_0.143_A"] and content["max_shift_A"] == 0.5
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| scan | dose (e/Å²) | method | xc | FRC 0.5 vs truth (Å) | FRC 0.143, half-map")
    assert "| shift (Å) |" in table and "Rosenthal & Henderson" in table
    assert len([line for line in table.splitlines() if line.startswith("| tiny |")]) == len(rows)
    assert "| tiny | inf | epie |" in table
    for figure in ("recon_tiny", "frc_tiny", "xc_vs_dose_tiny"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 5000
    assert "| tiny | 100 | ssb |" in capsys.readouterr().out


def test_poisson_noise_is_reproducible_and_has_the_dose(folder):
    data = np.random.default_rng(0).random((5, 4, 8, 8)).astype(np.float32)
    data /= data.sum(axis=(-2, -1), keepdims=True)  # fractions of the beam: D * sum(I) = D electrons
    noisy = PoissonScan(data, 1000.0, (0, 1, 2))
    whole = noisy[0:5]
    assert whole.shape == data.shape and whole.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([noisy[0:2], noisy[2:5]]), whole)  # blocks do not matter
    np.testing.assert_array_equal(noisy[3], whole[3])
    np.testing.assert_array_equal(noisy[1:3, 2], whole[1:3, 2])
    assert np.all(whole == np.round(whole))
    assert whole.sum(axis=(-2, -1)).mean() == pytest.approx(1000, rel=0.01)
    assert not np.array_equal(PoissonScan(data, 1000.0, (1, 1, 2))[0:5], whole)


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_entry_point("evaluate.py", tmp_path, *overrides)


def test_evaluate_py_writes_its_outputs_in_the_run_directory(folder, tmp_path):
    scan = f"suite.scans.tiny.path={folder}/scan.h5"
    result = _run(tmp_path, "suite=tiny", scan, "suite.doses_e_per_A2=[inf]", "~suite.methods.epie")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert (run / "metrics.json").is_file() and (run / "results.md").is_file()
    assert len(list((run / "figures").glob("*.png"))) == 3
    assert (run / ".hydra" / "config.yaml").is_file()
    assert "| tiny | inf | ssb |" in result.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+suite.methods.net.method=airpi", "+suite.methods.net.ckpt=FOLDER/ptychonn.ckpt"],
         "holds model 'ptychonn', not 'airpi'"),
        (["suite.scans.tiny.path=FOLDER/absent.h5"], "does not exist"),
        (["+suite.methods.x.method=nonsense"], "unknown method 'nonsense'"),
        (["logger=tensorboard"], "evaluate logs to W&B (logger=wandb) or not at all"),
    ],
)  # fmt: skip
def test_bad_suite_is_one_line_and_writes_nothing(folder, tmp_path, capsys, overrides, message):
    cfg = _config(folder, *[o.replace("FOLDER", str(folder)) for o in overrides])
    assert evaluate_main(cfg, tmp_path / "run") == 2  # physics.runtime.EXIT_ERROR
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepstem: error:") and message in lines[0], lines
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.md"))


@pytest.mark.slow
def test_wandb_offline_logging(folder, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = _config(folder, "logger=wandb", "suite.doses_e_per_A2=[inf]", "~suite.methods.epie")
    assert evaluate_main(cfg, tmp_path) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


def test_a_reconstruction_one_pixel_short_of_the_grid_is_scored_on_the_overlap(folder):
    """AIRPI with data repetition ends one scoring pixel before the grid: score the overlap, not fail."""
    from evaluation.io import load_4dstem
    from evaluation.references._common import Reconstruction
    from evaluation.suite import score, scoring_grid

    scan = load_4dstem(folder / "scan.h5")
    grid = scoring_grid(scan)
    short = grid.truth[:-1, :-1].copy()  # the truth itself, one row and one column short
    result = Reconstruction(short, (grid.pixel_A, grid.pixel_A), (0.0, 0.0), "airpi")
    metrics = score(scan, result, grid=grid)
    assert metrics["xc"] > 0.999
    assert metrics["shift_norm_A"] < 1e-3


def test_frc_against_another_reconstruction(folder):
    """score_against: a reconstruction identical to the reference (up to a shift inside the bound)
    correlates to the grid's Nyquist; one low-passed to 1 A loses it near 1 A; an unrelated field has
    no resolution below the coarsest rings."""
    from evaluation.io import load_4dstem
    from evaluation.references._common import Reconstruction
    from evaluation.suite import score_against, scoring_grid

    scan = load_4dstem(folder / "scan.h5")
    grid = scoring_grid(scan)
    pixel = (grid.pixel_A, grid.pixel_A)
    truth = grid.truth.copy()
    reference = Reconstruction(truth, pixel, (0.0, 0.0), "epie")
    nyquist_A = 2 * grid.pixel_A
    same = score_against(grid, Reconstruction(truth + 0.3, pixel, (0.0, 0.0), "x"), reference)
    assert same["frc_0.5_A"] == pytest.approx(nyquist_A, rel=0.05)
    spectrum = np.fft.fft2(truth)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(truth.shape[0], grid.pixel_A),
                              np.fft.fftfreq(truth.shape[1], grid.pixel_A), indexing="ij"))  # fmt: skip
    blurred = np.fft.ifft2(spectrum * (f < 1.0)).real  # nothing beyond 1 / (1 A)
    low = score_against(grid, Reconstruction(blurred, pixel, (0.0, 0.0), "x"), reference)
    assert 0.9 < low["frc_0.5_A"] < 1.25 and low["frc_0.143_A"] <= low["frc_0.5_A"]
    noise = np.random.default_rng(0).normal(size=truth.shape)
    none = score_against(grid, Reconstruction(noise, pixel, (0.0, 0.0), "x"), reference)
    assert none["frc_0.5_A"] > 3 * low["frc_0.5_A"]  # the first searched rings of the field


def test_suite_frc_against_epie_adds_columns(folder, tmp_path, capsys):
    cfg = _config(folder, "+suite.frc_against=epie", "suite.doses_e_per_A2=[inf]")
    assert evaluate_main(cfg, tmp_path) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert "frc_vs_epie_0.5_A" not in by["epie"]
    for method in ("ssb", "icom"):
        assert by[method]["frc_vs_epie_0.5_A"] >= by[method]["frc_vs_epie_0.143_A"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "FRC vs epie 0.5 / 0.143 (Å)" in table and "(reference) |" in table
    bad = _config(folder, "+suite.frc_against=nonsense")
    assert evaluate_main(bad, tmp_path / "bad") == 2
    assert "suite.frc_against='nonsense' is not one of the suite's methods" in capsys.readouterr().err
