"""A Chang U-Net checkpoint knows its training optics and input geometry (issue 14): the exporter reads them
off the run's config, ``reconstruct.py`` resamples the patterns to the recorded geometry, and a scan outside
the recorded optics gets a warning naming the quantity."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scan4d_helpers import simulate_scan

from evaluation.io import Scan4D
from evaluation.networks import (
    DetectorReachError,
    chang_geometry_params,
    load_network,
    optics_mismatch,
    reconstruct_with_network,
    recorded_geometry,
    training_ranges,
)
from evaluation.references import Reconstruction
from models.checkpoints import CheckpointError
from tests.test_reconstruct_networks import save_checkpoint
from tests.test_training_ranges import _export_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_config(tmp_path: Path, **forward: Any) -> Path:
    """A resolved training config as train.py writes it (config.yaml), stock-image data."""
    config = {
        "model": {"_target_": "models.lightning.ChangLightning"},
        "data": {
            "_target_": "training.datamodules.StockImagesDataModule",
            "dose_e_range": [100.0, 1.0e7],
            "forward_model": {
                "energy_eV": 300.0e3,
                "semiangle_mrad": 17.1,
                "diffraction_px": 32,
                "bin_factor": 2,
                "collection_ratio": 2.0,
                "C10_A": [-200.0, -80.0],
                "Cs_A": 1.0e4,
                **forward,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_export_reads_chang_optics_and_geometry_off_the_config(tmp_path):
    script = _export_script()
    source = save_checkpoint("chang_unet", tmp_path / "last.ckpt")
    config = _run_config(tmp_path, collection_ratio=2.5)
    target = tmp_path / "chang.ckpt"
    # an explicit --trained-for wins for the quantity it names
    assert (
        script.main([str(source), str(target), "--config", str(config), "--trained-for", "Cs_A=0:2e4"]) == 0
    )
    model = load_network(target, "chang_unet")
    ranges = training_ranges(model)
    assert ranges["energy_eV"] == (300e3, 300e3)
    assert ranges["semiangle_mrad"] == (17.1, 17.1)
    assert ranges["defocus_A"] == (80.0, 200.0)  # defocus = -C10, bounds swapped
    assert ranges["Cs_A"] == (0.0, 2e4)
    assert ranges["dose_e_per_cbed"] == (100.0, 1e7)
    assert "scan_step_A" not in ranges  # one pattern's network does not depend on the step
    geometry = recorded_geometry(model)
    # illuminated_fraction is absent from this config: ChangForwardModel's default (0.9) is recorded
    assert geometry == {
        "diffraction_px": 32.0,
        "bin_factor": 2.0,
        "collection_ratio": 2.5,
        "illuminated_fraction": 0.9,
    }
    # a scan at 20 A defocus (a focused probe) is outside the 80-200 A the model saw; 120 A is inside
    scan = type(
        "Calibration",
        (),
        {"energy_eV": 300e3, "semiangle_mrad": 17.1, "Cs_A": 1e4, "scan_step_A": (0.25, 0.25)},
    )
    scan.defocus_A = 20.0
    assert [m for m in optics_mismatch(model, scan) if m.startswith("defocus_A=20")]
    scan.defocus_A = 120.0
    assert optics_mismatch(model, scan) == []


def test_export_of_other_data_records_no_geometry(tmp_path):
    script = _export_script()
    source = save_checkpoint("chang_unet", tmp_path / "last.ckpt")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"_target_": "training.datamodules.KernelDataModule"}}))
    assert script.main([str(source), str(tmp_path / "c.ckpt"), "--config", str(config)]) == 0
    model = load_network(tmp_path / "c.ckpt", "chang_unet")
    assert recorded_geometry(model) == {} and training_ranges(model) == {}


def test_geometry_params_fill_unset_keys_and_flag_conflicts():
    model = {"deepstem": {"geometry": {"diffraction_px": 16.0, "bin_factor": 4.0, "collection_ratio": 3.0}}}
    filled, conflicts = chang_geometry_params(
        model, {"pixels": None, "collection_ratio": None, "batch_size": 8}
    )
    assert filled == {"pixels": 16, "bin_factor": 4, "collection_ratio": 3.0, "batch_size": 8}
    assert isinstance(filled["pixels"], int) and conflicts == []
    kept, conflicts = chang_geometry_params(model, {"collection_ratio": 2.0})
    assert kept["collection_ratio"] == 2.0 and len(conflicts) == 1 and "collection_ratio=2.0" in conflicts[0]
    assert chang_geometry_params({}, {"pixels": None}) == ({"pixels": None}, [])
    with pytest.raises(CheckpointError, match="bin_factor"):
        recorded_geometry({"deepstem": {"geometry": {"bin_factor": -2}}})


def _chang_model(tmp_path: Path, geometry: dict[str, float] | None) -> torch.nn.Module:
    path = save_checkpoint("chang_unet", tmp_path / "chang.ckpt")
    if geometry is not None:
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["deepstem"] = {"geometry": geometry}
        torch.save(checkpoint, path)
    return load_network(path, "chang_unet")


def test_reconstruction_receives_the_recorded_geometry(tmp_path):
    """What reaches the reconstruction: recorded values for unset keys, the caller's value (with a warning)
    where it differs, the reconstruction's own defaults when nothing is recorded."""
    seen: list[dict[str, Any]] = []

    def capture(scan, predictor, *, device, progress, **params):
        seen.append(params)
        return Reconstruction(np.zeros((2, 2)), (1.0, 1.0), (0.0, 0.0), "chang_unet")

    model = _chang_model(tmp_path, {"diffraction_px": 32.0, "bin_factor": 2.0, "collection_ratio": 3.0})
    unset = {"pixels": None, "bin_factor": None, "collection_ratio": None, "illuminated_fraction": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reconstruct_with_network(None, "chang_unet", model, unset, device="cpu", reconstructor=capture)
    # batch_size=auto on the CPU: 32 patterns of 64 px, i.e. 128 of the recorded 32 px
    assert seen[-1] == {"pixels": 32, "bin_factor": 2, "collection_ratio": 3.0, "batch_size": 128}
    with pytest.warns(RuntimeWarning, match="collection_ratio=2.0 differs"):
        reconstruct_with_network(
            None, "chang_unet", model, {"collection_ratio": 2.0}, device="cpu", reconstructor=capture
        )
    assert seen[-1]["collection_ratio"] == 2.0
    bare = _chang_model(tmp_path, None)
    reconstruct_with_network(None, "chang_unet", bare, unset, device="cpu", reconstructor=capture)
    # chang_reconstruct's defaults (paper 001: 32 / 2 / 2.0 / 0.9) then apply; the batch is auto's for 64 px
    assert seen[-1] == {"batch_size": 32}


def test_recorded_collection_ratio_reaches_the_detector_check(tmp_path):
    """A model trained on patterns to 5 alpha cannot run on a detector that ends at 4 alpha; the same
    detector serves a model of the paper's 2 alpha."""
    s = simulate_scan(scan_px=6, cbed_px=48, defocus_A=100.0)  # +-4 alpha
    scan = Scan4D(
        data=s.data, energy_eV=s.energy_eV, semiangle_mrad=s.semiangle_mrad, scan_step_A=s.scan_step_A,
        k_pixel_invA=s.k_pixel_invA, defocus_A=100.0,
    )  # fmt: skip
    wide = _chang_model(tmp_path, {"collection_ratio": 5.0, "diffraction_px": 32.0, "bin_factor": 2.0})
    with pytest.raises(DetectorReachError, match="alpha"):
        reconstruct_with_network(
            scan, "chang_unet", wide, {"collection_ratio": None}, device="cpu", progress=False
        )
    paper = _chang_model(tmp_path, {"collection_ratio": 2.0, "diffraction_px": 32.0, "bin_factor": 2.0})
    result = reconstruct_with_network(scan, "chang_unet", paper, {}, device="cpu", progress=False)
    assert np.all(np.isfinite(result.phase))


def test_float16_export_halves_the_file_and_predicts_as_before(tmp_path):
    """--weights-dtype float16: the Chang U-Net file (9.4 M parameters, 38 MB in float32) must fit the
    ~20 MB a shipped model may take; the loaded model is float32 and predicts within float16 rounding."""
    script = _export_script()
    source = save_checkpoint("chang_unet", tmp_path / "last.ckpt")
    full, half = tmp_path / "full.ckpt", tmp_path / "half.ckpt"
    assert script.main([str(source), str(full)]) == 0
    assert script.main([str(source), str(half), "--weights-dtype", "float16"]) == 0
    stored = torch.load(half, weights_only=True)
    nbytes = {
        name: sum(
            v.numel() * v.element_size() for v in torch.load(f, weights_only=True)["state_dict"].values()
        )
        for name, f in (("full", full), ("half", half))
    }
    assert nbytes["half"] < 0.51 * nbytes["full"]  # (the tiny test model's file is mostly container overhead)
    assert stored["deepstem"]["weights_dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in stored["state_dict"].values() if v.is_floating_point())
    a, b = load_network(full, "chang_unet"), load_network(half, "chang_unet")
    assert all(p.dtype == torch.float32 for p in b.parameters())
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, rtol=0, atol=5e-3 * float(ya.abs().max()) + 1e-6)
    assert not torch.equal(ya, yb)  # the weights were rounded


def test_float16_export_keeps_tensors_beyond_its_range_in_float32(tmp_path):
    """A batch-norm running variance above 65504 (seen in a trained Chang U-Net) would round to inf in
    float16: that tensor stays float32, is named in the checkpoint, and the model predicts as the float32
    export does (the rest is rounded)."""
    script = _export_script()
    source = save_checkpoint("chang_unet", tmp_path / "last.ckpt")
    checkpoint = torch.load(source, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("running_var"))
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] * 0 + 1.0e6
    torch.save(checkpoint, source)
    full, half = tmp_path / "full.ckpt", tmp_path / "half.ckpt"
    assert script.main([str(source), str(full)]) == 0
    assert script.main([str(source), str(half), "--weights-dtype", "float16"]) == 0
    stored = torch.load(half, weights_only=True)
    assert stored["deepstem"]["float32_tensors"] == [key]
    assert (
        stored["state_dict"][key].dtype == torch.float32 and float(stored["state_dict"][key].max()) == 1.0e6
    )
    others = [v for k, v in stored["state_dict"].items() if k != key and v.is_floating_point()]
    assert all(v.dtype == torch.float16 for v in others)
    a, b = load_network(full, "chang_unet"), load_network(half, "chang_unet")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.isfinite(yb).all() and torch.allclose(
        ya, yb, rtol=0, atol=5e-3 * float(ya.abs().max()) + 1e-6
    )
