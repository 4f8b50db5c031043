"""Every network side by side in one suite (issue #14): conf/suite/all_networks.yaml and network entries
without a checkpoint (the shipped model of their method, or skipped with one line when none ships)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from matplotlib.image import imread
from omegaconf import OmegaConf
from scan4d_helpers import simulate_scan

from evaluation.io import save_4dstem
from evaluation.suite import SuiteError, _method_entries, evaluate_main
from models.lightning import ChangLightning

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_shipped_models(tmp_path, monkeypatch) -> Path:
    """An empty folder of shipped models, so the test does not depend on what pretrained/ holds."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    monkeypatch.setenv("DEEPSTEM_PRETRAINED_DIR", str(folder))
    return folder


def chang_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    module = ChangLightning(
        net={"channels": [4, 8], "encoder_blocks": 1, "decoder_blocks": 1, "bridge_blocks": 0}
    )
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The scan of tests/test_evaluate.py (16 x 16 positions, 32 px over +-4 alpha, truth) and a tiny Chang
    checkpoint."""
    root = tmp_path_factory.mktemp("suite_networks")
    s = simulate_scan(scan_px=16, cbed_px=32)
    save_4dstem(
        root / "scan.h5", s.data, energy_eV=s.energy_eV, semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A, k_pixel_invA=s.k_pixel_invA, truth_phase=s.phase,
        truth_pixel_size_A=s.object_pixel_A,
    )  # fmt: skip
    chang_checkpoint(root / "chang.ckpt")
    return root


def _evaluate_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=["progress=false", *overrides])


def _skip_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("evaluate: skipping")]


def test_a_network_without_checkpoint_is_skipped_and_the_rest_runs(
    folder, no_shipped_models, tmp_path, capsys
):
    """Tiny suite (SSB, iCOM, ePIE) + a Chang entry with a tiny checkpoint + a PtychoNN entry without one:
    PtychoNN is skipped with one line, the table and the figures hold the other four methods."""
    cfg = _evaluate_config(
        "suite=tiny", f"suite.scans.tiny.path={folder}/scan.h5", "suite.doses_e_per_A2=[inf,1e4]",
        "+suite.methods.chang.method=chang_unet", f"+suite.methods.chang.ckpt={folder}/chang.ckpt",
        "+suite.methods.ptychonn.method=ptychonn",
    )  # fmt: skip
    assert evaluate_main(cfg, tmp_path) == 0
    captured = capsys.readouterr()
    skipped = _skip_lines(captured.err)
    assert len(skipped) == 1, captured.err
    assert "suite.methods.ptychonn (ptychonn)" in skipped[0]
    assert "give suite.methods.ptychonn.ckpt=PATH" in skipped[0] and str(no_shipped_models) in skipped[0]
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    labels = ["ssb", "icom", "epie", "chang"]
    assert [r["method"] for r in rows] == labels * 2  # per dose, in the suite's order
    assert {r["kind"] for r in rows if r["method"] == "chang"} == {"chang_unet"}
    table = (tmp_path / "results.md").read_text()
    assert "| tiny | inf | chang |" in table and "| tiny | 10000 | chang |" in table
    assert "ptychonn" not in table and "| tiny | inf | chang |" in captured.out
    # one figure per scan, a column per method that ran (plus the truth), a row per dose (110 dpi)
    figure = imread(tmp_path / "figures" / "recon_tiny.png")
    assert figure.shape[:2] == (round(2.3 * 2 * 110), round(2.2 * (len(labels) + 1) * 110))
    assert (tmp_path / "figures" / "frc_tiny.png").is_file()
    assert (tmp_path / "figures" / "xc_vs_dose_tiny.png").is_file()


def test_a_null_checkpoint_takes_the_shipped_model_of_its_method(folder, no_shipped_models, capsys):
    chang_checkpoint(no_shipped_models / "chang_shipped.ckpt")
    entries = _method_entries(
        {"methods": {"chang": {"method": "chang_unet"}, "pty": {"method": "ptychonn"}, "ssb": None}}
    )
    assert [(e["label"], e["ckpt"]) for e in entries] == [
        ("chang", str(no_shipped_models / "chang_shipped.ckpt")),
        ("ssb", None),
    ]
    err = capsys.readouterr().err
    assert f"suite.methods.chang: ckpt not given; using the shipped model {no_shipped_models}" in err
    assert len(_skip_lines(err)) == 1 and "suite.methods.pty.ckpt=PATH" in _skip_lines(err)[0]


def test_a_suite_of_skipped_networks_only_is_one_error_line(folder, no_shipped_models, tmp_path, capsys):
    cfg = _evaluate_config(
        "suite=tiny", f"suite.scans.tiny.path={folder}/scan.h5", "~suite.methods.ssb", "~suite.methods.icom",
        "~suite.methods.epie", "+suite.methods.net.method=chang_unet",
    )  # fmt: skip
    assert evaluate_main(cfg, tmp_path / "run") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepstem: error:")]
    assert len(errors) == 1 and "every network entry was skipped" in errors[0], errors
    assert not list(tmp_path.rglob("metrics.json"))
    with pytest.raises(SuiteError, match=r"suite\.methods is empty: list at least one method"):
        _method_entries({"methods": {}})


def test_all_networks_suite_is_the_reference_benchmark_with_every_network(no_shipped_models, capsys):
    cfg = _evaluate_config("suite=all_networks")
    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    reference = OmegaConf.to_container(_evaluate_config("suite=reference").suite, resolve=True)
    assert suite["scans"] == reference["scans"] and suite["doses_e_per_A2"] == reference["doses_e_per_A2"]
    methods = {label: entry["method"] for label, entry in suite["methods"].items()}
    assert methods == {"airpi": "airpi", "chang_unet": "chang_unet", "ptychonn": "ptychonn", "ssb": "ssb",
                       "icom": "icom", "epie": "epie"}  # fmt: skip
    assert suite["methods"]["epie"] == reference["methods"]["epie"]  # the references as in reference.yaml
    # without checkpoints for Chang and PtychoNN (and none shipped) the suite runs the other four
    entries = _method_entries(suite)
    assert [e["label"] for e in entries] == ["airpi", "ssb", "icom", "epie"]
    assert entries[0]["ckpt"] == str(ROOT / "pretrained" / "airpi_reference.ckpt")
    skipped = _skip_lines(capsys.readouterr().err)
    assert len(skipped) == 2 and "chang_unet.ckpt=PATH" in skipped[0] and "ptychonn.ckpt=PATH" in skipped[1]
    given = _evaluate_config(
        "suite=all_networks",
        "suite.methods.chang_unet.ckpt=/x/chang.ckpt",
        "suite.methods.ptychonn.ckpt=/x/p.ckpt",
    )
    entries = _method_entries(OmegaConf.to_container(given.suite, resolve=True))
    assert [e["label"] for e in entries] == ["airpi", "chang_unet", "ptychonn", "ssb", "icom", "epie"]
    assert not _skip_lines(capsys.readouterr().err)


def test_a_method_that_cannot_take_a_scan_is_left_out_of_that_scan_only(
    folder, no_shipped_models, tmp_path, capsys
):
    """An AIRPI model trained at alpha / gmax = 0.2 needs a detector reaching 5 alpha; the scan's reaches 4:
    that (scan, method) cell is left out with one line, named in metrics.json and results.md, and every
    other method is still scored at every dose (before, the whole run stopped and wrote nothing)."""
    from tests.test_training_ranges import SPECIALIST, tiny

    ckpt = tiny("airpi", tmp_path / "airpi_wide.ckpt", {**SPECIALIST, "alpha_over_gmax": [0.2, 0.2]})
    cfg = _evaluate_config(
        "suite=tiny", f"suite.scans.tiny.path={folder}/scan.h5", "suite.doses_e_per_A2=[inf,1e4]",
        "~suite.methods.epie", "+suite.methods.wide.method=airpi", f"+suite.methods.wide.ckpt={ckpt}",
    )  # fmt: skip
    assert evaluate_main(cfg, tmp_path / "run") == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("evaluate: tiny: skipping wide")]
    assert len(lines) == 1 and "the detector reaches" in lines[0], err
    content = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["method"] for r in content["rows"]] == ["ssb", "icom"] * 2
    assert [(s["scan"], s["method"]) for s in content["not_applicable"]] == [("tiny", "wide")]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "Not applicable: wide on tiny: the detector reaches" in table
    assert imread(tmp_path / "run" / "figures" / "recon_tiny.png").shape[1] == round(2.2 * 3 * 110)


def test_scan_stride_scores_a_sparser_scan_of_the_same_file(folder, no_shipped_models, tmp_path):
    """Two entries on one file, stride 1 and 2: the second is scored at twice the step on every second
    position (8 x 8 of 16 x 16), its per-CBED dose is 4x at the same dose per area, and the file itself is
    unchanged."""
    cfg = _evaluate_config(
        "suite=tiny", f"suite.scans.tiny.path={folder}/scan.h5", "suite.doses_e_per_A2=[1e4]",
        "~suite.methods.epie", "~suite.methods.ssb",
        f"+suite.scans.tiny_x2={{path:{folder}/scan.h5,scan_stride:2}}",
    )  # fmt: skip
    assert evaluate_main(cfg, tmp_path / "run") == 0
    rows = {r["scan"]: r for r in json.loads((tmp_path / "run" / "metrics.json").read_text())["rows"]}
    assert rows["tiny_x2"]["dose_e_per_cbed"] == pytest.approx(4 * rows["tiny"]["dose_e_per_cbed"])
    assert rows["tiny"]["xc"] != rows["tiny_x2"]["xc"]
    from evaluation.io import ScanError, load_4dstem, sparser_scan

    scan = load_4dstem(folder / "scan.h5")
    sparse = sparser_scan(scan, 2)
    assert sparse.shape[:2] == (8, 8) and sparse.scan_step_A == tuple(2 * s for s in scan.scan_step_A)
    np.testing.assert_array_equal(np.asarray(sparse.data[1, 2]), np.asarray(scan.data[2, 4]))
    with pytest.raises(ScanError, match="leaves 2 x 2 positions"):
        sparser_scan(scan, 8)
    scan.close()
