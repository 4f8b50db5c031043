"""`python datagen.py simulation=stock_images|scan4d` and the shared runner machinery (issue 4 sections 1, 3).

Real files through :func:`datagen.cli.run` with the composed Hydra config (tiny settings); they must pass
:func:`datagen.store.open_checked`, reruns skip, stock-image sets do not depend on the sharding, and the
scan4d truth is registered with the specimen (a vacancy shows in the truth phase where the column was).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from datagen import store
from datagen.cli import run
from datagen.parameters import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def composed(overrides=()) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="datagen", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "simulation, folder",
    [("kernel", "data/kernel"), ("kernel_paper", "data/kernel"), ("haadf", "data/haadf"),
     ("stock_images", "data/stock_images"), ("scan4d", "data/scan4d")],
)  # fmt: skip
def test_default_out_dir_is_per_simulation(simulation, folder):
    cfg = composed([f"simulation={simulation}"])
    assert cfg["out_dir"] == folder
    assert composed([f"simulation={simulation}", "out_dir=/x/y"])["out_dir"] == "/x/y"


# --------------------------------------------------------------------------------------------------
# stock_images

TINY_STOCK = [
    "simulation=stock_images",
    "simulation.num_samples=10",
    "simulation.batch_size=4",
    "simulation.forward_model.diffraction_px=16",
    "simulation.image_bank.photographs=[camera,coins]",
    "simulation.image_bank.faces=0",
    "simulation.image_bank.textures=3",
    "simulation.image_bank.size_px=64",
    "progress=false",
    "seed=5",
]


def stock(out_dir, *extra) -> dict:
    return composed([*TINY_STOCK, f"out_dir={out_dir}", *extra])


def read_stock(folder: Path) -> dict[str, np.ndarray]:
    parts = []
    for path in sorted(folder.glob("shard-*.h5")):
        with store.open_checked(path, store.STOCK) as handle:
            parts.append({name: handle[name][()] for name in store.STOCK_PER_SAMPLE})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def test_stock_images_set_is_written_checked_reproducible_and_shard_invariant(tmp_path):
    from datagen.stock_images import forward_model_from_config, sample_seed

    whole = tmp_path / "whole"
    summary = run(stock(whole))
    assert summary.written == 10 and not summary.failed
    path = whole / "shard-00000-of-00001.h5"
    with store.open_checked(path, store.STOCK) as handle:
        assert handle["diffraction"].shape == (10, 16, 16) and handle["mask"].dtype == np.bool_
        assert handle["aberrations"].shape == (10, 7)
        assert handle.attrs["energy_eV"] == 300e3 and handle.attrs["semiangle_mrad"] == 17.1
        assert handle.attrs["k_detector_invA"] > 0 and handle.attrs["pixel_size_A"] > 0
    data = read_stock(whole)
    assert data["sample_index"].tolist() == list(range(10))
    # noise-free intensities: non-negative fractions of the incident beam (<= 1 per pattern)
    assert np.all(data["diffraction"] >= 0)
    assert np.all(data["diffraction"].sum(axis=(1, 2)) <= 1 + 1e-5)
    assert np.all(data["diffraction"].sum(axis=(1, 2)) > 0.9)
    assert np.all(data["phase"][~data["mask"]] == 0) and data["mask"].any(axis=(1, 2)).all()
    assert len(np.unique(data["seed"])) == 10
    assert json.loads((whole / "index.json").read_text())["num_samples"] == 10

    # sample i is forward(1, generator seeded from (seed, i)), whatever the batching
    cfg = stock(whole)["simulation"]
    model = forward_model_from_config(cfg["forward_model"], cfg["image_bank"])
    for index in (0, 7):
        assert data["seed"][index] == sample_seed(5, index)
        single = model(1, torch.Generator().manual_seed(int(data["seed"][index])))
        np.testing.assert_allclose(
            data["diffraction"][index], single["diffraction"][0].numpy(), rtol=1e-5, atol=1e-9
        )
        np.testing.assert_allclose(data["phase"][index], single["phase"][0].numpy(), rtol=1e-5, atol=1e-6)

    # three shards with another batch size hold the very same samples
    sharded = tmp_path / "sharded"
    for shard in range(3):
        run(stock(sharded, f"shard_index={shard}", "num_shards=3", "simulation.batch_size=3"))
    split = read_stock(sharded)
    for name in store.STOCK_PER_SAMPLE:
        np.testing.assert_allclose(split[name], data[name], rtol=1e-5, atol=1e-8)
    assert json.loads((sharded / "index.json").read_text())["num_samples"] == 10

    # a rerun skips the finished shard; another seed gives another set
    again = run(stock(whole))
    assert again.skipped_existing and again.written == 0
    other = run(stock(tmp_path / "other", "seed=6"))
    assert other.written == 10
    assert not np.allclose(read_stock(tmp_path / "other")["diffraction"], data["diffraction"])

    # another simulation refuses a folder of stock-image shards
    with pytest.raises(ConfigError, match="out_dir"):
        run(composed([f"out_dir={whole}", "simulation.num_samples=1"]))


def test_stock_images_resume_after_a_crash(tmp_path, monkeypatch):
    from datagen import stock_images

    cfg = stock(tmp_path, "simulation.batch_size=2", "checkpoint_every=2")
    calls = []
    original = stock_images.ChangForwardModel.indexed

    def crashing(self, seeds, device="cpu"):
        calls.append(len(seeds))
        if len(calls) == 3:
            raise KeyboardInterrupt  # a killed job: 4 samples checkpointed
        return original(self, seeds, device)

    monkeypatch.setattr(stock_images.ChangForwardModel, "indexed", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert not (tmp_path / "shard-00000-of-00001.h5").exists()
    monkeypatch.setattr(stock_images.ChangForwardModel, "indexed", original)
    summary = run(cfg)
    assert summary.resumed == 4 and summary.written == 6
    reference = tmp_path / "reference"
    run(stock(reference))
    np.testing.assert_allclose(
        read_stock(tmp_path)["diffraction"], read_stock(reference)["diffraction"], rtol=1e-5
    )


@pytest.mark.parametrize(
    "override, parameter",
    [
        ("simulation.forward_model.collection_ratio=0.5", "simulation.forward_model"),
        ("simulation.forward_model.C10_A=-100", "simulation.forward_model.C10_A"),
        ("simulation.image_bank.photographs=[no_such_photo]", "simulation.image_bank"),
        ("simulation.batch_size=0", "simulation.batch_size"),
    ],
)
def test_stock_images_bad_config_names_the_parameter(tmp_path, override, parameter):
    with pytest.raises(ConfigError) as err:
        run(stock(tmp_path, override))
    assert err.value.parameter == parameter
    assert parameter in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_datagen_command_exits_with_one_line_for_a_bad_stock_config(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "datagen.py"), *TINY_STOCK, f"out_dir={tmp_path}",
         "simulation.forward_model.bin_factor=0", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("deepstem: error:")]
    assert len(lines) == 1 and "simulation.forward_model" in lines[0]


# --------------------------------------------------------------------------------------------------
# scan4d

A_STO = 3.905


def tiny_scans(out_dir, *extra) -> dict:
    cfg = composed(["simulation=scan4d", f"out_dir={out_dir}", "progress=false", *extra])
    simulation = cfg["simulation"]
    simulation["settings"].update(
        energy_eV=200e3, scan_gpts=[4, 4], scan_step_A=0.5, detector_px=16, sampling_A=0.1,
        slice_thickness_A=2.0, num_phonons=1,
    )  # fmt: skip
    bilayer = simulation["scans"]["mos2_bilayer_5deg"]
    bilayer["specimen"].update(material="graphene", size_A=9.0)
    bilayer["edge_margin_A"] = 2.0
    crystal = simulation["scans"]["srtio3_001_vacancy"]
    crystal["specimen"].update(thickness_A=A_STO, lateral_size_A=2 * A_STO)
    return cfg


def test_scan4d_runner_writes_checked_scans_with_registered_truth_and_skips_on_rerun(tmp_path):
    # shard 1 of 2 holds the second scan only
    half = run(tiny_scans(tmp_path, "num_shards=2", "shard_index=1"))
    assert half.written == 1 and not half.failed
    crystal_path = tmp_path / "srtio3_001_vacancy.h5"
    assert crystal_path.is_file() and not (tmp_path / "mos2_bilayer_5deg.h5").exists()
    first_mtime = crystal_path.stat().st_mtime_ns
    # the whole list: the finished scan is skipped, the other one simulated
    whole = run(tiny_scans(tmp_path))
    assert whole.written == 1 and whole.resumed == 1 and not whole.failed
    assert crystal_path.stat().st_mtime_ns == first_mtime
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["schema"] == store.SCAN4D.id
    assert [s["name"] for s in index["scans"]] == ["mos2_bilayer_5deg", "srtio3_001_vacancy"]
    assert all(s["truth"] and s["shape"] == [4, 4, 16, 16] for s in index["scans"])
    rerun = run(tiny_scans(tmp_path))
    assert rerun.skipped_existing and rerun.written == 0 and "already complete" in rerun.lines()[0]

    for path in (crystal_path, tmp_path / "mos2_bilayer_5deg.h5"):
        with store.open_checked(path, store.SCAN4D) as handle:
            data = handle["data"][()]
            assert data.shape == (4, 4, 16, 16) and np.all(data >= 0)
            assert 0.9 < data.sum(axis=(2, 3)).min() and data.sum(axis=(2, 3)).max() <= 1.0 + 1e-4
            assert handle.attrs["energy_eV"] == 200e3 and np.all(handle.attrs["scan_step_A"] == 0.5)
            assert "truth" in handle and handle["truth/phase"].ndim == 2
            config = store.read_config(path)
            assert "phonon_seed" in config and "specimen" in config

    # registration: truth pixel (0, 0) sits at scan coordinate origin_A; the emptied Sr column (the one
    # nearest the box centre, at (a, a) in the 2 x 2 cell) has (almost) no phase left, its periodic
    # images at (0, 0) etc. keep the full column's phase
    with store.open_checked(crystal_path, store.SCAN4D) as handle:
        phase = handle["truth/phase"][()]
        pixel = np.asarray(handle["truth"].attrs["pixel_size_A"], dtype=float) * np.ones(2)
        origin = np.asarray(handle["truth"].attrs["origin_A"], dtype=float)
    span = 3 * 0.5
    cell = 2 * A_STO
    np.testing.assert_allclose(origin, -np.full(2, (cell - span) / 2), atol=1e-6)  # centred scan

    def phase_at(x_cell, y_cell):
        """Phase integrated (rad A^2) over +-0.5 A about a cell position (robust to the phonon shift)."""
        i, j = np.round(np.array([x_cell, y_cell]) / pixel).astype(int)
        reach = np.ceil(0.5 / pixel).astype(int)
        rows = np.arange(i - reach[0], i + reach[0] + 1) % phase.shape[0]
        cols = np.arange(j - reach[1], j + reach[1] + 1) % phase.shape[1]
        return phase[np.ix_(rows, cols)].sum() * pixel[0] * pixel[1]

    full_column = phase_at(0.0, 0.0)
    assert full_column > 0.1
    assert phase_at(A_STO, A_STO) < 0.2 * full_column
    for x, y in ((A_STO, 0.0), (0.0, A_STO)):  # the other Sr columns are intact
        np.testing.assert_allclose(phase_at(x, y), full_column, rtol=0.1)


def test_scan4d_bad_config_is_one_line_naming_the_parameter(tmp_path):
    cfg = tiny_scans(tmp_path)
    cfg["simulation"]["scans"]["srtio3_001_vacancy"]["specimen"]["kind"] = "nanotube"
    with pytest.raises(ConfigError, match=r"simulation\.scans\.srtio3_001_vacancy\.specimen\.kind"):
        run(cfg)
    cfg = tiny_scans(tmp_path)
    cfg["simulation"]["settings"]["sampling_A"] = 0.3  # too coarse for a 40 mrad detector
    with pytest.raises(ConfigError, match=r"settings\.detector_max_angle_mrad") as err:
        run(cfg)
    assert "\n" not in str(err.value)
    cfg = tiny_scans(tmp_path)
    cfg["simulation"]["scans"]["srtio3_001_vacancy"]["specimen"]["structure"] = "Unobtainium"
    with pytest.raises(ConfigError, match=r"specimen\.structure"):
        run(cfg)
    assert not list(tmp_path.glob("*.h5"))


@pytest.mark.slow
def test_default_scan4d_config_runs_through_the_command(tmp_path):
    """The shipped defaults (two 24 x 24 scans): minutes on 2 cores."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "datagen.py"), "simulation=scan4d", f"out_dir={tmp_path}",
         f"hydra.run.dir={tmp_path / 'run'}", "progress=false"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("mos2_bilayer_5deg", "srtio3_001_vacancy"):
        with store.open_checked(tmp_path / f"{name}.h5", store.SCAN4D) as handle:
            assert handle["data"].shape == (24, 24, 32, 32) and "truth" in handle
