"""``reconstruct.py engine=libertem`` for AIRPI and the Chang U-Net equals the local engine (issue #17.2).

The frames are resampled onto the network grid in LiberTEM (:class:`ResampleUDF`, partitions that split
scan rows); the 3x3 neighbourhoods, data repetition, network, placement, stitching and trust map are the
local code on the resampled stack. Tiny networks with weights drawn wide (an untrained network's phase is
nearly flat, which would make equality trivial) on an 8 x 8 scan of 32 px patterns; inline executor and a
local Dask cluster of two workers. Skipped without LiberTEM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scan4d_helpers import simulate_scan
from test_reconstruct_networks import save_checkpoint

from evaluation.cli import run_method
from evaluation.engines.libertem import libertem_context, run_libertem
from evaluation.io import load_4dstem, save_4dstem
from evaluation.networks import load_network

pytest.importorskip("libertem.api", reason="LiberTEM is not installed (the libertem extra)")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("airpi", "chang_unet")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("libertem_networks")
    s = simulate_scan(scan_px=8, cbed_px=32)
    save_4dstem(
        root / "scan.h5", s.data, energy_eV=s.energy_eV, semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A, k_pixel_invA=s.k_pixel_invA,
    )  # fmt: skip
    for method in METHODS:
        save_checkpoint(method, root / f"{method}.ckpt")
    return root


@pytest.fixture(scope="module")
def cluster():
    with libertem_context(workers=2) as ctx:
        yield ctx


def _model(folder: Path, method: str) -> torch.nn.Module:
    model = load_network(folder / f"{method}.ckpt", method, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.5)
    return model


def _params(method: str, **extra) -> dict:
    params = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "reconstruct.yaml"))[method]
    if method == "airpi":
        params["pixels"] = 32
    return {**params, **extra}


def _compare(folder: Path, method: str, ctx, partitions: int, prepare=None, **extra) -> None:
    model = _model(folder, method)
    with load_4dstem(folder / "scan.h5", progress=False) as scan:
        if prepare is not None:
            prepare(scan)
        local = run_method(
            scan, method, _params(method, **extra), progress=False, model=model, precision="32"
        )
        engine = run_libertem(
            scan, method, _params(method, **extra), ctx=ctx, model=model, precision="32", progress=False,
            partitions=partitions,
        )  # fmt: skip
    assert engine.method == local.method == method and engine.info["engine"] == "libertem"
    assert engine.phase.shape == local.phase.shape and local.phase.std() > 1e-2
    assert np.abs(engine.phase - local.phase).max() <= 1e-3
    np.testing.assert_allclose(engine.pixel_size_A, local.pixel_size_A)
    np.testing.assert_allclose(engine.origin_A, local.origin_A)
    assert local.consistency is not None and np.nanmax(local.consistency) > np.nanmin(local.consistency)
    np.testing.assert_allclose(engine.consistency, local.consistency, rtol=1e-5, atol=1e-6)
    for key, value in local.info.items():
        if key != "patterns_per_s" and not isinstance(value, (float, np.ndarray)):
            assert engine.info[key] == value, key


@pytest.mark.parametrize("method", METHODS)
def test_inline_executor_equals_the_local_engine(folder, method):
    with libertem_context() as ctx:
        _compare(folder, method, ctx, partitions=3)  # 64 positions in 3 partitions: split scan rows


def test_airpi_data_repetition_on_inline_executor(folder):
    with libertem_context() as ctx:
        _compare(folder, "airpi", ctx, partitions=5, data_repetition=True, repetition_box=3)


def test_airpi_inference_stride_on_inline_executor(folder):
    """The network on every 2nd position (reconstruct.py airpi.inference_stride=2) through LiberTEM's
    resampled stream: the same image, passes and trust map (NaN at the skipped positions) as locally."""
    with libertem_context() as ctx:
        _compare(folder, "airpi", ctx, partitions=3, inference_stride=2)


@pytest.mark.parametrize("method", METHODS)
def test_rotated_transposed_memory_scan(folder, method):
    """A rotated, transposed scan read from memory (the rotation margin of Chang's stream included)."""

    def prepare(scan) -> None:
        scan.data = np.ascontiguousarray(scan.data[()])
        scan.scan_rotation_deg, scan.scan_transpose = 25.0, True

    with libertem_context() as ctx:
        _compare(folder, method, ctx, partitions=4, prepare=prepare)


@pytest.mark.parametrize("method", METHODS)
def test_local_cluster_of_two_workers_equals_the_local_engine(folder, cluster, method):
    _compare(folder, method, cluster, partitions=4)
