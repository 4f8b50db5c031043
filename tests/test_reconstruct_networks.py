"""`python reconstruct.py method=airpi|chang_unet|ptychonn ckpt=PATH` with tiny checkpoints made here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan

from datagen import store
from evaluation.cli import reconstruct_main
from evaluation.io import load_4dstem, save_4dstem
from evaluation.networks import CheckpointError, identify_checkpoint, load_network, training_ranges
from models.lightning import AIRPILightning, CGRDNLightning, ChangLightning, PtychoNNLightning
from tests.entrypoint_helpers import run_entry_point

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "airpi": (AIRPILightning, {"net": {"filters": 4, "depth": 1, "block_convs": 1}}),
    "chang_unet": (
        ChangLightning,
        {"net": {"channels": [4, 8], "encoder_blocks": 1, "decoder_blocks": 1, "bridge_blocks": 0}},
    ),
    "ptychonn": (PtychoNNLightning, {"net": {"channels": [4, 8]}}),
    "cgrdn": (
        CGRDNLightning,
        {
            "net": {"features": 4, "growth": 2, "rdb_layers": 1, "rdbs_per_grdb": 1, "grdbs": 1},
            "discriminator": {"channels": [4, 4, 4, 4]},
        },
    ),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_checkpoint(method: str, path: Path) -> Path:
    """A checkpoint dict as ``Trainer.save_checkpoint`` writes it (state dict + hyper-parameters)."""
    cls, kwargs = TINY[method]
    torch.manual_seed(0)
    module = cls(**kwargs)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small scan (24 x 24 positions, 48 px CBEDs over +-4 alpha) and one checkpoint per model."""
    root = tmp_path_factory.mktemp("networks")
    s = simulate_scan(scan_px=12, cbed_px=48)
    save_4dstem(
        root / "scan.h5", s.data, energy_eV=s.energy_eV, semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A, k_pixel_invA=s.k_pixel_invA,
    )  # fmt: skip
    for method in TINY:
        save_checkpoint(method, root / f"{method}.ckpt")
    return root


@pytest.mark.parametrize("method", ["airpi", "chang_unet", "ptychonn"])
def test_tiny_checkpoints_load_both_ways(folder, method):
    cls, _ = TINY[method]
    reloaded = cls.load_from_checkpoint(folder / f"{method}.ckpt", map_location="cpu")
    ours = load_network(folder / f"{method}.ckpt", method, "cpu")
    assert type(ours) is cls and not ours.training
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    assert identify_checkpoint(torch.load(folder / f"{method}.ckpt", weights_only=False)) == method


def _config(folder: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="reconstruct", overrides=[f"input={folder}/scan.h5", "progress=false", *overrides]
        )


@pytest.mark.parametrize(
    "method, extra, pixel_factor, size",
    [
        ("airpi", ["airpi.pixels=32", "airpi.oversampling=2"], 0.5, 23),
        ("airpi", ["airpi.pixels=32", "airpi.data_repetition=true"], 2.0, 6),
        ("airpi", ["airpi.pixels=32", "airpi.oversampling=2", "airpi.inference_stride=2"], 0.5, 23),
        ("chang_unet", [], 1.0, 12),
        ("ptychonn", ["ptychonn.pixels=32", "ptychonn.oversampling=1"], 1.0, 12),
        # oversampling null: the object pixel no coarser than the network's (here step / 2)
        ("ptychonn", ["ptychonn.pixels=32"], 0.5, 23),
    ],
)
def test_network_methods_write_a_reconstruction(folder, method, extra, pixel_factor, size, capsys, tmp_path):
    output = tmp_path / f"{method}.h5"
    cfg = _config(folder, f"method={method}", f"ckpt={folder}/{method}.ckpt", f"output={output}", *extra)
    assert reconstruct_main(cfg) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "patterns/s" in printed and f"{method}: 144 patterns" in printed
    assert output.with_suffix(".png").stat().st_size > 1000
    with store.open_checked(folder / "scan.h5", store.SCAN4D) as handle:
        step = float(np.atleast_1d(handle.attrs["scan_step_A"])[0])
    with store.open_checked(output, store.RECON) as handle:
        phase = handle["phase"][()]
        assert handle.attrs["method"] == method
        np.testing.assert_allclose(handle.attrs["pixel_size_A"], step * pixel_factor)
        np.testing.assert_allclose(handle.attrs["origin_A"], 0.0)
        assert handle.attrs["patterns_per_s"] > 0
        if "airpi.inference_stride=2" in extra:  # 7 x 7 of the 12 x 12 positions (every 2nd and the last)
            assert handle.attrs["info_network_passes"] == 49
    assert phase.dtype == np.float32 and np.all(np.isfinite(phase)) and phase.std() > 0
    assert phase.shape == (size, size)


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_entry_point("reconstruct.py", tmp_path, *overrides)


def test_reconstruct_py_airpi_end_to_end(folder, tmp_path):
    result = _run(tmp_path, f"input={folder}/scan.h5", "method=airpi", f"ckpt={folder}/airpi.ckpt",
                  "output=out/airpi.h5", "airpi.pixels=32", "device=cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "patterns/s" in result.stdout
    assert (tmp_path / "out" / "airpi.h5").is_file() and (tmp_path / "out" / "airpi.png").is_file()


@pytest.mark.parametrize(
    "method, ckpt, message",
    [
        ("airpi", "ptychonn.ckpt", "holds model 'ptychonn', not 'airpi'; use method=ptychonn"),
        ("ptychonn", "cgrdn.ckpt", "holds model 'cgrdn', not 'ptychonn'"),
        ("chang_unet", "airpi.ckpt", "holds model 'airpi', not 'chang_unet'"),
        ("airpi", "scan.h5", "not a readable PyTorch checkpoint"),
        ("chang_unet", None, "needs a network checkpoint"),  # none in the (empty) folder of shipped models
    ],
)
def test_wrong_checkpoint_is_one_line_and_writes_nothing(
    folder, tmp_path, method, ckpt, message, capsys, monkeypatch
):
    monkeypatch.setenv("DEEPSTEM_PRETRAINED_DIR", str(tmp_path / "no_shipped_models"))
    overrides = [f"method={method}", f"output={tmp_path}/out.h5"]
    if ckpt:
        overrides.append(f"ckpt={folder}/{ckpt}")
    assert reconstruct_main(_config(folder, *overrides)) == 2  # physics.runtime.EXIT_ERROR
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("deepstem: error:") and message in lines[0], lines[0]
    assert not list(tmp_path.iterdir())


def test_airpi_without_ckpt_uses_the_shipped_model(folder, tmp_path, monkeypatch, capsys):
    import evaluation.cli

    monkeypatch.setenv(evaluation.cli.PRETRAINED_DIR_ENV, str(folder))  # folder/airpi.ckpt: the one AIRPI
    overrides = ["method=airpi", f"output={tmp_path}/out.h5", "airpi.pixels=32", "device=cpu"]
    assert reconstruct_main(_config(folder, *overrides)) == 0
    assert f"using the shipped model {folder / 'airpi.ckpt'}" in capsys.readouterr().err
    assert (tmp_path / "out.h5").is_file()
    monkeypatch.setenv(evaluation.cli.PRETRAINED_DIR_ENV, str(tmp_path / "missing"))
    assert reconstruct_main(_config(folder, *overrides)) == 2  # physics.runtime.EXIT_ERROR
    assert "needs a network checkpoint" in capsys.readouterr().err


def test_reconstruct_py_checkpoint_of_another_model_exits_non_zero(folder, tmp_path):
    result = _run(tmp_path, f"input={folder}/scan.h5", "method=airpi", f"ckpt={folder}/cgrdn.ckpt",
                  "output=out.h5")  # fmt: skip
    assert result.returncode == 2  # physics.runtime.EXIT_ERROR
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds model 'cgrdn', not 'airpi'" in lines[0], result.stderr
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".h5", ".png") or ".tmp" in p.name]


def test_load_network_names_the_model_it_found(folder):
    with pytest.raises(CheckpointError, match="holds model 'chang_unet'"):
        load_network(folder / "chang_unet.ckpt", "airpi")


def test_export_checkpoint_is_slim_loads_safely_and_warns_about_other_optics(folder, tmp_path, capsys):
    """scripts/export_checkpoint.py: optimiser state dropped, weights_only-loadable, same weights, config
    redacted, and reconstruct.py warns when the scan's optics differ from ``--trained-for``."""
    full = torch.load(folder / "airpi.ckpt", weights_only=False)
    full["optimizer_states"] = [{"state": {i: torch.zeros(1000) for i in range(50)}}]
    source = tmp_path / "last.ckpt"
    torch.save(full, source)
    (tmp_path / "config.yaml").write_text("logger:\n  wandb:\n    api_key: sk-do-not-ship\nseed: 3\n")
    target = tmp_path / "pretrained" / "airpi.ckpt"
    script = Path(__file__).resolve().parents[1] / "scripts" / "export_checkpoint.py"
    scan = load_4dstem(folder / "scan.h5")
    result = subprocess.run(
        [sys.executable, str(script), str(source), str(target), "--config", str(tmp_path / "config.yaml"),
         "--trained-for", f"energy_eV={scan.energy_eV * 1.5}", f"semiangle_mrad={scan.semiangle_mrad}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert target.stat().st_size < source.stat().st_size / 2
    slim = torch.load(target, weights_only=True)
    assert "optimizer_states" not in slim and "sk-do-not-ship" not in slim["deepstem"]["config_yaml"]
    assert "seed: 3" in slim["deepstem"]["config_yaml"]
    for key, value in full["state_dict"].items():
        assert torch.equal(slim["state_dict"][key], value)
    model = load_network(target, "airpi")
    assert training_ranges(model)["semiangle_mrad"] == pytest.approx((scan.semiangle_mrad,) * 2)
    overrides = ["method=airpi", f"ckpt={target}", f"output={tmp_path}/out.h5", "airpi.pixels=32"]
    assert reconstruct_main(_config(folder, *overrides)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "energy_eV" in warnings[0] and "semiangle" not in warnings[0]
