"""evaluation.io: deepstem.4dstem/1, EMD 1.0, .npy + YAML, RosettaSciIO, calibration and data checks."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import yaml
from scan4d_helpers import simulate_scan

from datagen import store
from evaluation.io import Scan4D, ScanError, check_scan, load_4dstem, save_4dstem, save_emd
from evaluation.references import centre_of_mass
from physics import wavelength


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(scan_px=8, cbed_px=32)


def _calibration(s) -> dict:
    return {
        "energy_eV": s.energy_eV,
        "semiangle_mrad": s.semiangle_mrad,
        "scan_step_A": s.scan_step_A,
        "k_pixel_invA": s.k_pixel_invA,
    }


def test_deepstem_round_trip_is_lazy(scan, tmp_path):
    path = save_4dstem(
        tmp_path / "scan.h5",
        scan.data,
        **_calibration(scan),
        scan_rotation_deg=12.5,
        defocus_A=30.0,
        truth_phase=scan.phase,
        truth_pixel_size_A=scan.object_pixel_A,
    )
    with store.open_checked(path, store.SCAN4D) as handle:
        assert handle["data"].chunks[2:] == (32, 32)
    with load_4dstem(path) as loaded:
        assert isinstance(loaded.data, h5py.Dataset)  # not read into memory
        np.testing.assert_array_equal(loaded.data[3], scan.data[3])
        assert loaded.energy_eV == scan.energy_eV
        assert loaded.scan_step_A == pytest.approx((scan.scan_step_A,) * 2)
        assert loaded.k_pixel_invA == pytest.approx((scan.k_pixel_invA,) * 2)
        assert loaded.scan_rotation_deg == 12.5 and loaded.defocus_A == 30.0 and loaded.Cs_A == 0.0
        np.testing.assert_allclose(loaded.truth_phase, scan.phase, atol=1e-6)
        assert loaded.truth_pixel_size_A == pytest.approx((scan.object_pixel_A,) * 2)
        assert loaded.truth_origin_A == (0.0, 0.0)
        # chunk-wise consumers give the same answer as the in-memory array
        np.testing.assert_allclose(
            centre_of_mass(loaded.data, loaded.k_pixel_invA, progress=False),
            centre_of_mass(scan.data, scan.k_pixel_invA, progress=False),
            atol=1e-9,
        )
    assert loaded._handle is None  # closed by the context manager


def test_overrides_replace_file_values(scan, tmp_path):
    path = save_4dstem(tmp_path / "scan.h5", scan.data, **_calibration(scan))
    with load_4dstem(path, semiangle_mrad=25.0) as loaded:
        assert loaded.semiangle_mrad == 25.0
    with pytest.raises(ScanError, match="unknown calibration key"):
        load_4dstem(path, semi_angle=25.0)


def test_emd1_round_trip(scan, tmp_path):
    path = save_emd(tmp_path / "scan.emd", scan.data, **_calibration(scan), scan_rotation_deg=-4.0)
    with h5py.File(path, "r") as handle:  # the EMD 1.0 markers py4DSTEM / emdfile check
        assert handle.attrs["emd_group_type"] == "file"
        assert handle.attrs["version_major"] == 1 and handle.attrs["version_minor"] == 0
        assert handle["datacube"].attrs["emd_group_type"] == "root"
        assert handle["datacube/datacube"].attrs["emd_group_type"] == "array"
    with load_4dstem(path) as loaded:
        assert loaded.source_format == "EMD 1.0"
        assert isinstance(loaded.data, h5py.Dataset)
        np.testing.assert_array_equal(loaded.data[...], scan.data)
        assert loaded.scan_step_A == pytest.approx((scan.scan_step_A,) * 2)
        assert loaded.k_pixel_invA == pytest.approx((scan.k_pixel_invA,) * 2)
        assert loaded.energy_eV == scan.energy_eV and loaded.semiangle_mrad == scan.semiangle_mrad
        assert loaded.scan_rotation_deg == -4.0


def test_emd1_calibration_from_dimension_vectors_in_nm_and_mrad(scan, tmp_path):
    """A py4DSTEM-style file whose calibration lives only in the dims (nm and mrad)."""
    path = tmp_path / "dims.emd"
    save_emd(path, scan.data, **_calibration(scan))
    k_pixel_mrad = scan.k_pixel_invA * wavelength(scan.energy_eV) * 1e3
    with h5py.File(path, "a") as handle:
        del handle["datacube/metadatabundle"]
        node = handle["datacube/datacube"]
        for name, scale, units in (("dim1", 0.1, "nm"), ("dim2", 0.1, "nm"), ("dim3", k_pixel_mrad, "mrad")):
            del node[name]
            node.create_dataset(
                name,
                data=np.arange(8 if name != "dim3" else 32)
                * scale
                * (scan.scan_step_A if units == "nm" else 1.0),
            )
            node[name].attrs["units"] = units
        node["dim4"].attrs["units"] = "mrad"
        node["dim4"][...] = np.arange(32) * k_pixel_mrad
    with pytest.raises(ScanError, match="missing calibration 'energy_eV'"):
        load_4dstem(path)
    with load_4dstem(path, energy_eV=scan.energy_eV, semiangle_mrad=20.0) as loaded:
        assert loaded.scan_step_A == pytest.approx((scan.scan_step_A,) * 2)  # 0.1 nm * step = step A
        assert loaded.k_pixel_invA == pytest.approx((scan.k_pixel_invA,) * 2, rel=1e-6)


def test_npy_with_yaml_beside_it(scan, tmp_path):
    np.save(tmp_path / "scan.npy", scan.data)
    with pytest.raises(ScanError, match=r"no calibration; write scan\.yaml"):
        load_4dstem(tmp_path / "scan.npy")
    calibration = {k: np.atleast_1d(v).tolist() for k, v in _calibration(scan).items()}
    del calibration["k_pixel_invA"]
    calibration["k_pixel_mrad"] = scan.k_pixel_invA * wavelength(scan.energy_eV) * 1e3
    calibration["energy_eV"] = scan.energy_eV
    calibration["semiangle_mrad"] = scan.semiangle_mrad
    (tmp_path / "scan.yaml").write_text(yaml.safe_dump(calibration))
    with load_4dstem(tmp_path / "scan.npy") as loaded:
        assert isinstance(loaded.data, np.memmap)
        assert loaded.k_pixel_invA == pytest.approx((scan.k_pixel_invA,) * 2)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"energy_eV": 80e3, "scan_step_A": 0.5, "k_pixel_invA": 0.1}))
    with pytest.raises(ScanError, match="missing calibration 'semiangle_mrad'"):
        load_4dstem(tmp_path / "scan.npy", calibration=other)


def test_rosettasciio_formats_need_the_package(tmp_path, monkeypatch):
    path = tmp_path / "scan.mib"
    path.write_bytes(b"not a real file")
    for module in ("rsciio", "rsciio.quantumdetector"):
        monkeypatch.setitem(sys.modules, module, None)  # as if RosettaSciIO were not installed
    with pytest.raises(ScanError, match="pip install rosettasciio"):
        load_4dstem(path)


def test_rosettasciio_blockfile_round_trip(tmp_path):
    """A .blo written by RosettaSciIO reads lazily; its cm-calibrated detector needs k_pixel_invA given."""
    from rsciio.blockfile import file_writer

    data = (np.random.default_rng(0).random((5, 6, 16, 16)) * 200).astype(np.uint8)
    axes = [
        {"name": "y", "size": 5, "scale": 0.05, "offset": 0.0, "units": "nm", "navigate": True},
        {"name": "x", "size": 6, "scale": 0.05, "offset": 0.0, "units": "nm", "navigate": True},
        {"name": "ky", "size": 16, "scale": 0.02, "offset": 0.0, "units": "cm", "navigate": False},
        {"name": "kx", "size": 16, "scale": 0.02, "offset": 0.0, "units": "cm", "navigate": False},
    ]
    signal = {
        "data": data,
        "axes": axes,
        "metadata": {"General": {"title": "test"}, "Signal": {"signal_type": "diffraction"}},
        "original_metadata": {},
        "attributes": {"_lazy": False},
    }
    path = tmp_path / "scan.blo"
    file_writer(str(path), signal, show_progressbar=False)
    with pytest.raises(ScanError, match="missing calibration 'energy_eV'"):
        load_4dstem(path)
    scan = load_4dstem(path, energy_eV=200e3, semiangle_mrad=21.0, k_pixel_invA=0.05, progress=False)
    assert scan.source_format == "RosettaSciIO .blo"
    assert not isinstance(scan.data, np.ndarray)  # lazy (dask)
    assert scan.scan_step_A == pytest.approx((0.5, 0.5))  # 0.05 nm
    np.testing.assert_array_equal(np.asarray(scan.data[1:3]), data[1:3])


def test_unknown_and_wrong_files(scan, tmp_path):
    with pytest.raises(ScanError, match="no such file"):
        load_4dstem(tmp_path / "missing.h5")
    (tmp_path / "scan.tif").write_bytes(b"x")
    with pytest.raises(ScanError, match="unknown format"):
        load_4dstem(tmp_path / "scan.tif")
    recon = store.write(
        tmp_path / "recon.h5",
        store.RECON,
        {"phase": np.zeros((3, 3))},
        attrs={"pixel_size_A": 1.0, "origin_A": (0, 0), "method": "ssb"},
    )
    with pytest.raises(ScanError, match=r"expected 'deepstem\.4dstem/1'"):
        load_4dstem(recon)
    with h5py.File(tmp_path / "plain.h5", "w") as handle:
        handle["data"] = np.zeros((4, 4, 4, 4))
    with pytest.raises(ScanError, match="neither a deepstem"):
        load_4dstem(tmp_path / "plain.h5")
    # an .emd that is not EMD 1.0 goes to RosettaSciIO's Velox reader (or asks for it)
    (tmp_path / "plain.h5").rename(tmp_path / "plain.emd")
    with pytest.raises(ScanError, match="RosettaSciIO"):
        load_4dstem(tmp_path / "plain.emd")


def _array_scan(data: np.ndarray) -> Scan4D:
    return Scan4D(
        data=data, energy_eV=80e3, semiangle_mrad=20, scan_step_A=(0.5, 0.5), k_pixel_invA=(0.1, 0.1)
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.ones((8, 8, 16), np.float32), "4 dimensions"),
        (np.ones((2, 8, 16, 16), np.float32), "at least 3x3"),
        (np.ones((8, 8, 2, 2), np.float32), "too small"),
        (np.where(np.arange(8 * 8 * 16 * 16).reshape(8, 8, 16, 16) == 700, np.nan, 1.0), "NaN"),
        (
            np.where(np.arange(8 * 8 * 16 * 16).reshape(8, 8, 16, 16) == 5000, -1, 3).astype(np.int16),
            "negative",
        ),
    ],
)
def test_check_scan_rejects_unusable_data(data, message):
    with pytest.raises(ScanError, match=message):
        check_scan(_array_scan(data), progress=False)


def test_check_scan_accepts_unsigned_counts():
    check_scan(_array_scan(np.ones((4, 4, 8, 8), np.uint16)), progress=False)


def test_save_rejects_bad_calibration(scan, tmp_path):
    with pytest.raises(ScanError, match="semiangle_mrad must be positive"):
        save_4dstem(tmp_path / "bad.h5", scan.data, **{**_calibration(scan), "semiangle_mrad": -1.0})
    assert not list(tmp_path.iterdir())
