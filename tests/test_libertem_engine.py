"""``reconstruct.py engine=libertem``: the LiberTEM UDFs equal the local engine (issue #17, point 2).

One 8 x 8 scan of 32 px patterns; the inline executor and one module-scoped local Dask cluster of two
workers (its start-up takes seconds). Skipped without LiberTEM (``pip install -e '.[libertem]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan
from test_reconstruct_networks import save_checkpoint

from datagen import store
from evaluation.cli import reconstruct_main, run_method
from evaluation.engines.libertem import libertem_context, run_libertem, unsupported_message
from evaluation.io import load_4dstem, save_4dstem
from evaluation.networks import load_network

pytest.importorskip("libertem.api", reason="LiberTEM is not installed (the libertem extra)")

ROOT = Path(__file__).resolve().parents[1]

PARAMS = {
    "icom": {"estimate_rotation": False, "boundary": "mirror"},
    "ricom": {"kernel_size": 5, "band_pass_invA": None},
    "vadf": {"detector": "adf", "inner_mrad": None, "outer_mrad": None},
    "ssb": {
        "aberration_compensation": True, "normalize": False, "q_chunk": 256, "boundary": "smooth",
        "pad_fraction": 0.25,
    },
    "ptychonn": {
        "pixels": 32, "gmax_invA": None, "ratio_alpha_gmax": None, "oversampling": 1, "weight_threshold": 0.1,
        "crop_to_scan": True, "unwrap_phase": True, "detector_centre_px": None, "batch_size": 16,
        "block_rows": None,
    },
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An 8 x 8 scan of 32 px CBEDs (deepstem.4dstem/1) and tiny PtychoNN and AIRPI checkpoints."""
    root = tmp_path_factory.mktemp("libertem")
    s = simulate_scan(scan_px=8, cbed_px=32)
    save_4dstem(
        root / "scan.h5", s.data, energy_eV=s.energy_eV, semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A, k_pixel_invA=s.k_pixel_invA,
    )  # fmt: skip
    for method in ("ptychonn", "airpi"):
        save_checkpoint(method, root / f"{method}.ckpt")
    return root


@pytest.fixture(scope="module")
def cluster():
    """One LiberTEM context on a local Dask cluster of 2 single-threaded workers for the module."""
    with libertem_context(workers=2) as ctx:
        assert len(ctx.executor.get_available_workers().has_cpu()) == 2
        yield ctx


def _both(folder: Path, method: str, ctx=None, partitions: int = 3):
    model = load_network(folder / "ptychonn.ckpt", "ptychonn", "cpu") if method == "ptychonn" else None
    with load_4dstem(folder / "scan.h5", progress=False) as scan:
        local = run_method(scan, method, dict(PARAMS[method]), progress=False, model=model, precision="32")
        engine = run_libertem(
            scan, method, dict(PARAMS[method]), ctx=ctx, model=model, precision="32", progress=False,
            partitions=partitions,
        )  # fmt: skip
    return local, engine


def _assert_equal(method: str, local, engine) -> None:
    assert engine.method == local.method == method
    assert engine.phase.shape == local.phase.shape and engine.phase.dtype == np.float32
    np.testing.assert_allclose(engine.pixel_size_A, local.pixel_size_A)
    np.testing.assert_allclose(engine.origin_A, local.origin_A)
    assert local.phase.std() > 0
    if method == "vadf":
        np.testing.assert_allclose(engine.phase, local.phase, rtol=1e-6, atol=0)
    else:
        assert np.abs(engine.phase - local.phase).max() <= 1e-3
    if local.amplitude is not None:
        assert np.abs(engine.amplitude - local.amplitude).max() <= 1e-3
    for key, value in local.info.items():
        if key != "patterns_per_s" and not isinstance(value, float):
            assert engine.info[key] == value, key


@pytest.mark.parametrize("method", ["icom", "ricom", "vadf", "ssb", "ptychonn"])
def test_inline_executor_equals_the_local_engine(folder, method):
    with libertem_context() as ctx:
        local, engine = _both(folder, method, ctx)
    _assert_equal(method, local, engine)


@pytest.mark.parametrize("method", ["icom", "vadf", "ssb", "ptychonn"])
def test_local_cluster_of_two_workers_equals_the_local_engine(folder, cluster, method):
    local, engine = _both(folder, method, cluster, partitions=4)
    _assert_equal(method, local, engine)


def test_memory_dataset_for_arrays(folder):
    """Inputs that are not an HDF5 dataset (.npy, RosettaSciIO) reach LiberTEM as a memory dataset."""
    with load_4dstem(folder / "scan.h5", progress=False) as scan:
        local = run_method(scan, "icom", dict(PARAMS["icom"]), progress=False)
        scan.data = np.asarray(scan.data[()])
        engine = run_libertem(scan, "icom", dict(PARAMS["icom"]), progress=False, partitions=2)
    assert np.abs(engine.phase - local.phase).max() <= 1e-3


@pytest.mark.filterwarnings("ignore:dataset.adjust_tileshape")
def test_ssb_on_split_frames_rows_and_aberrations(folder):
    """SSB with tiles that split the frames (detector rows) and partitions that split scan rows, a scan
    rotation, transpose, defocus and Cs, and a non-square scan: still the local engine's phase."""
    from evaluation.engines.libertem import _dispatch

    params = dict(PARAMS["ssb"], normalize=True, pad_fraction=0.4)
    with load_4dstem(folder / "scan.h5", progress=False) as scan:
        scan.data = np.ascontiguousarray(scan.data[:7, :5])
        scan.scan_rotation_deg, scan.scan_transpose, scan.defocus_A, scan.Cs_A = 20.0, True, 40.0, 1e5
        local = run_method(scan, "ssb", dict(params), progress=False)
        with libertem_context() as ctx:
            dataset = ctx.load("memory", data=scan.data, sig_dims=2, num_partitions=4, tileshape=(3, 8, 32))
            seen = []
            real = _udf_classes_tile_spy(seen)
            try:
                engine = _dispatch(ctx, dataset, scan, "ssb", dict(params), None, "32", True, False)
            finally:
                real()
    assert (8, 32) in seen, seen  # the detector was split into tiles
    assert local.info["fft_shape"] == engine.info["fft_shape"] == "10x8"
    assert local.phase.std() > 0 and np.abs(engine.phase - local.phase).max() <= 1e-3


def _udf_classes_tile_spy(seen: list) -> Callable[[], None]:
    """Record the detector shape of every tile SSBTransformUDF sees; returns the undo."""
    from evaluation.engines.libertem import udf_classes

    cls = udf_classes()["ssb"]
    original = cls.process_tile

    def spy(self, tile):
        seen.append(tuple(tile.shape[1:]))
        return original(self, tile)

    cls.process_tile = spy

    def undo() -> None:
        cls.process_tile = original

    return undo


def test_ssb_bad_option_names_it(folder):
    with load_4dstem(folder / "scan.h5", progress=False) as scan:
        with pytest.raises(ValueError, match="boundary must be"):
            run_libertem(scan, "ssb", dict(PARAMS["ssb"], boundary="mirror"), progress=False)
        with pytest.raises(ValueError, match=r"unknown option.*q_chunks"):
            run_libertem(scan, "ssb", {"q_chunks": 3}, progress=False)


def _config(folder: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="reconstruct", overrides=[f"input={folder}/scan.h5", "progress=false", *overrides]
        )


@pytest.mark.parametrize("method", ["epie"])
def test_unsupported_methods_give_one_line(folder, method, capsys, tmp_path):
    output = tmp_path / "out.h5"
    cfg = _config(folder, f"method={method}", "engine=libertem", f"output={output}")
    assert reconstruct_main(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepstem: error: ")
    assert f"method={method} does not run on engine=libertem" in err[0] and "engine=local" in err[0]
    assert not output.exists()
    assert unsupported_message(method) in err[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["engine=dask"], "unknown engine 'dask'"),
        (["engine=libertem", "engine_workers=0"], "engine_workers must be null"),
        (["engine=libertem", "engine_scheduler=localhost"], "engine_scheduler must be tcp://HOST:PORT"),
    ],
)
def test_bad_engine_settings_give_one_line(folder, overrides, message, capsys, tmp_path):
    cfg = _config(folder, "method=icom", f"output={tmp_path}/out.h5", *overrides)
    assert reconstruct_main(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepstem: error: ") and message in err[0]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("icom", []),
        ("vadf", ["vadf.detector=bf"]),
        ("ssb", ["ssb.boundary=periodic"]),
        ("ptychonn", ["ptychonn.pixels=32", "precision=32"]),
        ("airpi", ["airpi.pixels=32", "precision=32"]),
    ],
)
def test_reconstruct_end_to_end_writes_the_same_file(folder, method, extra, capsys, tmp_path):
    ckpt = [f"ckpt={folder}/{method}.ckpt"] if method in ("ptychonn", "airpi") else []
    outputs = {}
    for engine in ("local", "libertem"):
        outputs[engine] = tmp_path / f"{engine}.h5"
        cfg = _config(
            folder, f"method={method}", f"engine={engine}", f"output={outputs[engine]}", *ckpt, *extra
        )
        assert reconstruct_main(cfg) == 0, capsys.readouterr().err
        assert outputs[engine].with_suffix(".png").exists()
    datasets, attrs = {}, {}
    for engine, path in outputs.items():
        with store.open_checked(path, store.RECON) as handle:
            datasets[engine] = {key: handle[key][()] for key in handle}
            attrs[engine] = {k: v for k, v in handle.attrs.items() if k not in ("patterns_per_s",)}
    assert datasets["local"].keys() == datasets["libertem"].keys()
    assert "engine: libertem" in str(attrs["libertem"]["config"])
    for key, value in datasets["local"].items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            np.testing.assert_allclose(datasets["libertem"][key], value, rtol=1e-6, atol=1e-3, err_msg=key)
    for key, value in attrs["local"].items():
        if key.startswith("info_patterns_per_s") or key in ("created", "config"):
            continue
        got = attrs["libertem"][key]
        if isinstance(value, (float, np.floating, np.ndarray)):
            np.testing.assert_allclose(got, value, rtol=1e-6, err_msg=key)
        else:
            assert got == value, key


def test_existing_scheduler_is_used(folder, capsys, tmp_path):
    """engine_scheduler=tcp://HOST:PORT: a running Dask scheduler (here in-process, one worker carrying the
    resource tags LiberTEM schedules on) runs the UDFs; it keeps running after reconstruct.py."""
    from distributed import LocalCluster

    resources = {"CPU": 1, "compute": 1, "ndarray": 1}
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", resources=resources,
        dashboard_address=None,
    ) as dask_cluster:  # fmt: skip
        address = dask_cluster.scheduler_address
        assert address.startswith("tcp://")
        outputs = {}
        for engine in ("local", "libertem"):
            outputs[engine] = tmp_path / f"{engine}.h5"
            cfg = _config(
                folder, "method=icom", f"engine={engine}", f"engine_scheduler={address}",
                f"output={outputs[engine]}",
            )  # fmt: skip
            assert reconstruct_main(cfg) == 0, capsys.readouterr().err
        assert dask_cluster.scheduler.status.name == "running"
    phases = {}
    for engine, path in outputs.items():
        with store.open_checked(path, store.RECON) as handle:
            phases[engine] = handle["phase"][()]
    assert np.abs(phases["libertem"] - phases["local"]).max() <= 1e-3


def test_without_libertem_the_error_names_the_extra(folder, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "libertem.api", None)  # import libertem.api raises ImportError
    cfg = _config(folder, "method=icom", "engine=libertem", f"output={tmp_path}/out.h5")
    assert reconstruct_main(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepstem: error: engine=libertem needs LiberTEM")
    assert ".[libertem]" in err[0] and not (tmp_path / "out.h5").exists()
