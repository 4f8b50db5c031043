"""Formats read through LiberTEM's readers (issue #17, point 2): headerless ``.raw`` with its shape and dtype
in the calibration YAML, and EMPAD ``.xml`` + ``.raw``.

One 8 x 8 scan of 32 px patterns written as ``.npy`` and as ``.raw`` (the same float32 array): the reader
returns the array, and ``reconstruct.py`` gives the same iCOM / riCOM / SSB on both files with
``engine=local`` and ``engine=libertem``. Skipped without LiberTEM (``pip install -e '.[libertem]'``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan

from datagen import store
from evaluation.cli import reconstruct_main
from evaluation.io import LiberTEMArray, ScanError, load_4dstem

pytest.importorskip("libertem.api", reason="LiberTEM is not installed (the libertem extra)")

ROOT = Path(__file__).resolve().parents[1]


def _calibration(s) -> dict:
    return {
        "energy_eV": float(s.energy_eV),
        "semiangle_mrad": float(s.semiangle_mrad),
        "scan_step_A": float(s.scan_step_A),
        "k_pixel_invA": float(s.k_pixel_invA),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """``scan.npy`` + ``scan.yaml`` and ``raw.raw`` + ``raw.yaml`` (with raw_nav_shape, raw_sig_shape,
    raw_dtype) of one simulated 8 x 8 scan of 32 px patterns; ``scan.npy`` is the reference array."""
    root = tmp_path_factory.mktemp("readers")
    s = simulate_scan(scan_px=8, cbed_px=32)
    data = np.ascontiguousarray(s.data, dtype=np.float32)
    np.save(root / "scan.npy", data)
    (root / "scan.yaml").write_text(yaml.safe_dump(_calibration(s)))
    data.tofile(root / "raw.raw")
    raw_keys = {"raw_nav_shape": [8, 8], "raw_sig_shape": [32, 32], "raw_dtype": "float32"}
    (root / "raw.yaml").write_text(yaml.safe_dump({**_calibration(s), **raw_keys}))
    return root


def test_raw_file_reads_as_the_array(folder):
    reference = np.load(folder / "scan.npy")
    calibration = yaml.safe_load((folder / "scan.yaml").read_text())
    with load_4dstem(folder / "raw.raw", progress=False) as scan:
        data = scan.data
        assert isinstance(data, LiberTEMArray) and data.kind == "raw"
        assert scan.shape == reference.shape == (8, 8, 32, 32) and data.dtype == np.float32
        assert scan.source_format == "LiberTEM raw"
        assert scan.energy_eV == calibration["energy_eV"]
        assert scan.k_pixel_invA == 2 * (calibration["k_pixel_invA"],)
        np.testing.assert_array_equal(data[2:5], reference[2:5])  # a block of scan rows
        np.testing.assert_array_equal(data[3, 6], reference[3, 6])  # one pattern
        np.testing.assert_array_equal(data[-1], reference[-1])
        np.testing.assert_array_equal(data[::-3, 1:4, 5:9], reference[::-3, 1:4, 5:9])
        np.testing.assert_array_equal(data[[6, 1], 2], reference[[6, 1], 2])
        np.testing.assert_array_equal(np.asarray(data), reference)
        with pytest.raises(IndexError):
            data[8]


def test_libertem_engine_opens_the_file_itself(folder):
    """engine=libertem gets LiberTEM's raw reader on the file (read on the workers), not a memory copy."""
    from evaluation.engines.libertem import libertem_context, load_dataset

    with load_4dstem(folder / "raw.raw", progress=False) as scan, libertem_context() as ctx:
        dataset = load_dataset(ctx, scan.data, partitions=3)
        assert type(dataset).__name__ == "RawFileDataSet"
        assert tuple(dataset.shape) == scan.shape
        assert len(list(dataset.get_partitions())) == 3


def _config(path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="reconstruct", overrides=[f"input={path}", "progress=false", *overrides])


def _phase(path: Path) -> dict[str, np.ndarray]:
    with store.open_checked(path, store.RECON) as handle:
        return {key: handle[key][()] for key in handle if handle[key].dtype.kind == "f"}


@pytest.mark.parametrize(
    "method, extra", [("icom", []), ("ricom", ["ricom.kernel_size=5"]), ("ssb", ["ssb.boundary=periodic"])]
)
def test_reconstruct_on_raw_equals_npy(folder, method, extra, capsys, tmp_path):
    outputs = {}
    for engine in ("local", "libertem"):
        for name in ("scan.npy", "raw.raw"):
            outputs[engine, name] = tmp_path / f"{engine}_{Path(name).stem}.h5"
            cfg = _config(
                folder / name,
                f"method={method}",
                f"engine={engine}",
                f"output={outputs[engine, name]}",
                *extra,
            )
            assert reconstruct_main(cfg) == 0, capsys.readouterr().err
    results = {key: _phase(path) for key, path in outputs.items()}
    reference = results["local", "scan.npy"]
    assert "phase" in reference and reference["phase"].std() > 0
    for engine in ("local", "libertem"):
        got, npy = results[engine, "raw.raw"], results[engine, "scan.npy"]
        assert got.keys() == npy.keys() == reference.keys()
        for key, value in npy.items():
            assert np.abs(got[key] - value).max() <= 1e-6, (engine, key)
    for key, value in reference.items():  # and the engines agree as in test_libertem_engine
        assert np.abs(results["libertem", "raw.raw"][key] - value).max() <= 1e-3, key


def _write_raw(folder: Path, tmp_path: Path, drop: str | None = None, size: int | None = None) -> Path:
    content = yaml.safe_load((folder / "raw.yaml").read_text())
    if drop is not None:
        del content[drop]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(content))
    data = (folder / "raw.raw").read_bytes()
    (tmp_path / "bad.raw").write_bytes(data[:size] if size is not None else data)
    return tmp_path / "bad.raw"


@pytest.mark.parametrize("key", ["raw_nav_shape", "raw_sig_shape", "raw_dtype"])
def test_missing_raw_key_is_one_line_naming_it(folder, key, capsys, tmp_path):
    path = _write_raw(folder, tmp_path, drop=key)
    with pytest.raises(ScanError, match=re.escape(f"{path}: missing '{key}'")):
        load_4dstem(path, progress=False)
    cfg = _config(path, "method=icom", f"output={tmp_path}/out.h5")
    assert reconstruct_main(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepstem: error: ")
    assert str(path) in err[0] and f"missing '{key}'" in err[0]
    assert not (tmp_path / "out.h5").exists()


def test_wrong_file_size_is_one_line(folder, capsys, tmp_path):
    path = _write_raw(folder, tmp_path, size=8 * 8 * 32 * 32 * 4 - 4096)
    cfg = _config(path, "method=icom", f"output={tmp_path}/out.h5")
    assert reconstruct_main(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepstem: error: ")
    assert str(path) in err[0] and f"has {8 * 8 * 32 * 32 * 4 - 4096} bytes" in err[0]
    assert f"needs {8 * 8 * 32 * 32 * 4}" in err[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"raw_nav_shape": [8]}, "raw_nav_shape must be two positive integers"),
        ({"raw_sig_shape": [32, 0]}, "raw_sig_shape must be two positive integers"),
        ({"raw_dtype": "float97"}, "raw_dtype 'float97' is not a NumPy data type"),
    ],
)
def test_bad_raw_values(folder, content, message, tmp_path):
    path = _write_raw(folder, tmp_path)
    values = {**yaml.safe_load((folder / "raw.yaml").read_text()), **content}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ScanError, match=message):
        load_4dstem(path, progress=False)


def test_empad_xml_reads_the_cropped_frames(tmp_path):
    """EMPAD: an .xml naming its .raw of 130 x 128 float32 frames (2 rows of frame metadata, cropped by the
    reader), scan size from ``scan_parameters mode="acquire"``; a non-square 6 x 5 scan."""
    s = simulate_scan(scan_px=6, cbed_px=128)
    reference = np.ascontiguousarray(s.data[:, :5], dtype=np.float32)
    frames = np.full((6, 5, 130, 128), 7.0, dtype=np.float32)
    frames[:, :, :128] = reference
    frames.tofile(tmp_path / "empad_data.raw")
    (tmp_path / "acq.xml").write_text(
        '<?xml version="1.0"?>\n<root>\n  <raw_file filename="empad_data.raw"/>\n  <type>scan</type>\n'
        '  <scan_parameters mode="acquire"><scan_resolution_x>5</scan_resolution_x>'
        "<scan_resolution_y>6</scan_resolution_y></scan_parameters>\n</root>\n"
    )
    (tmp_path / "acq.yaml").write_text(yaml.safe_dump(_calibration(s)))
    with load_4dstem(tmp_path / "acq.xml", progress=False) as scan:
        assert scan.data.kind == "empad" and scan.shape == (6, 5, 128, 128)
        np.testing.assert_array_equal(np.asarray(scan.data), reference)
        np.testing.assert_array_equal(scan.data[4, 2], reference[4, 2])
    with pytest.raises(ScanError, match=r"raw_dtype only apply to \.raw files"):
        load_4dstem(tmp_path / "acq.xml", progress=False, raw_dtype="uint16")


def test_big_endian_uint16_raw_keeps_its_counts(folder, tmp_path):
    counts = np.random.default_rng(3).integers(0, 60000, size=(4, 3, 16, 16)).astype(">u2")
    counts.tofile(tmp_path / "counts.raw")
    values = {**yaml.safe_load((folder / "scan.yaml").read_text()), "raw_dtype": ">u2"}
    values.update(raw_nav_shape=[4, 3], raw_sig_shape=[16, 16])
    (tmp_path / "counts.yaml").write_text(yaml.safe_dump(values))
    with load_4dstem(tmp_path / "counts.raw", progress=False) as scan:
        assert scan.shape == (4, 3, 16, 16)
        np.testing.assert_array_equal(scan.data[1:3], counts[1:3].astype(np.uint16))
        np.testing.assert_array_equal(scan.data[3, 2], counts[3, 2].astype(np.uint16))


def test_two_dask_workers_read_the_raw_file(folder):
    """A local Dask cluster of two workers: the workers open the .raw file with LiberTEM's raw reader."""
    from evaluation.cli import run_method
    from evaluation.engines.libertem import run_libertem

    params = {"estimate_rotation": False, "boundary": "mirror"}
    with load_4dstem(folder / "scan.npy", progress=False) as scan:
        local = run_method(scan, "icom", dict(params), progress=False)
    with load_4dstem(folder / "raw.raw", progress=False) as scan:
        engine = run_libertem(scan, "icom", dict(params), workers=2, progress=False, partitions=4)
    assert engine.info["engine_executor"] == "DaskJobExecutor"
    assert np.abs(engine.phase - local.phase).max() <= 1e-3 and local.phase.std() > 0
