"""HDF5 store: round trip, atomic writes, schema checks and secret redaction."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from datagen import store
from datagen.provenance import REDACTED, config_yaml
from datagen.store import StoreError


def kernel_datasets(n: int = 3, k: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {
        "cbed": rng.random((n, 9, k, k), dtype=np.float32) / np.float32(k * k),  # each CBED below the beam
        "wave": (rng.normal(size=(n, k, k)) + 1j * rng.normal(size=(n, k, k))).astype(np.complex64),
        "probe": np.ones((n, k, k), np.complex64),
        "energy_eV": np.full(n, 200e3),
        "semiangle_mrad": np.full(n, 20.0),
        "gmax_invA": np.full(n, 2.0),
        "step_A": np.full(n, 0.2),
        "Cs_A": np.full(n, 1e4),
        "defocus_A": np.full(n, 19.4),
        "thickness_A": np.full(n, 10.0),
        "rotation_deg": np.zeros(n),
        "zone_axis": np.tile([0, 0, 1], (n, 1)),
        "num_phonons": np.full(n, 30),
        "seed": np.arange(n),
        "source_id": np.array(["mp-81"] * n),
        "formula": np.array(["Au"] * n),
    }


def test_round_trip_keeps_data_attributes_and_config(tmp_path):
    data = kernel_datasets()
    config = {"simulation": {"num_phonons": 30}, "out_dir": str(tmp_path)}
    path = store.write(tmp_path / "shard-00000-of-00001.h5", store.KERNEL, data, config=config)
    with store.open_checked(path, "deepstem.kernel/1") as f:
        assert f.attrs["schema"] == "deepstem.kernel/1"
        assert f.attrs["deepstem_version"]
        assert f.attrs["created"].endswith("+00:00")
        np.testing.assert_array_equal(f["cbed"][:], data["cbed"])
        np.testing.assert_array_equal(f["wave"][:], data["wave"])
        assert f["wave"].dtype == np.complex64
        assert [s.decode() for s in f["source_id"][:]] == ["mp-81"] * 3
    assert yaml.safe_load(store.read_config(path)) == config
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000-of-00001.h5"]


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "scan.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with store.create(
            path, store.RECON, attrs={"pixel_size_A": 0.1, "origin_A": [0, 0], "method": "ssb"}
        ) as f:
            f.create_dataset("phase", data=np.zeros((4, 4), np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    store.write(
        path,
        store.RECON,
        {"phase": np.ones((4, 4), np.float32)},
        attrs={"pixel_size_A": 0.1, "origin_A": [0, 0], "method": "ssb"},
    )
    with pytest.raises(StoreError, match="file exists"):
        store.write(path, store.RECON, {"phase": np.zeros((4, 4))}, attrs={})
    # an incomplete file (missing its required content) is never renamed into place
    with pytest.raises(StoreError, match="missing attribute"):
        store.write(path, store.RECON, {"phase": np.zeros((4, 4))}, attrs={"method": "x"}, overwrite=True)
    with store.open_checked(path, store.RECON) as f:
        assert f["phase"][0, 0] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["scan.h5"]


def test_truncated_file_is_one_clear_error(tmp_path):
    path = store.write(tmp_path / "shard.h5", store.KERNEL, kernel_datasets(n=20, k=16))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StoreError, match=r"shard\.h5: truncated"):
        with store.open_checked(path, store.KERNEL):
            pass


def test_wrong_schema_and_foreign_files_are_named(tmp_path):
    path = store.write(
        tmp_path / "images.h5", store.IMAGE, {"image": np.zeros((2, 4, 4)), "pixel_size_A": [0.1, 0.1]}
    )
    with pytest.raises(
        StoreError, match=r"images\.h5: schema is 'deepstem.image/1', expected 'deepstem.kernel/1'"
    ):
        with store.open_checked(path, store.KERNEL):
            pass
    import h5py

    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match=r"foreign\.h5: no 'schema' attribute"):
        with store.open_checked(tmp_path / "foreign.h5", store.KERNEL):
            pass
    with h5py.File(tmp_path / "newer.h5", "w") as f:
        f.attrs["schema"] = "deepstem.kernel/2"
    with pytest.raises(StoreError, match="newer deepstem"):
        with store.open_checked(tmp_path / "newer.h5", store.KERNEL):
            pass
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(StoreError, match=r"text\.h5: not a readable HDF5 file"):
        with store.open_checked(tmp_path / "text.h5", store.KERNEL):
            pass
    with pytest.raises(StoreError, match=r"absent\.h5: no such file"):
        with store.open_checked(tmp_path / "absent.h5", store.KERNEL):
            pass


def test_missing_dataset_and_inconsistent_samples_are_named(tmp_path):
    import h5py

    path = store.write(tmp_path / "shard.h5", store.KERNEL, kernel_datasets())
    with h5py.File(path, "a") as f:
        del f["wave"]
    with pytest.raises(
        StoreError, match=r"shard\.h5: missing dataset\(s\) 'wave' required by schema deepstem.kernel/1"
    ):
        with store.open_checked(path, store.KERNEL):
            pass
    data = kernel_datasets()
    data["probe"] = data["probe"][:2]
    with pytest.raises(StoreError, match=r"probe: 2"):
        store.write(tmp_path / "bad.h5", store.KERNEL, data)
    assert not (tmp_path / "bad.h5").exists()


def test_secrets_never_reach_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MP_API_KEY", "abcd1234secretkey")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-0123456789")
    config = {
        "source": {"api_key": "abcd1234secretkey", "endpoint": "https://x/?key=abcd1234secretkey"},
        "logger": {"wandb": {"api_key": "${oc.env:WANDB_API_KEY}", "project": "deepstem"}},
        "note": "run with wandb-0123456789",
    }
    path = store.write(
        tmp_path / "r.h5",
        store.IMAGE,
        {"image": np.zeros((1, 2, 2)), "pixel_size_A": [0.1]},
        config=config,
        attrs={"comment": "plain"},
    )
    raw = path.read_bytes()
    assert b"abcd1234secretkey" not in raw and b"wandb-0123456789" not in raw
    stored = yaml.safe_load(store.read_config(path))
    assert stored["source"]["api_key"] == REDACTED
    assert stored["logger"]["wandb"]["project"] == "deepstem"
    assert "abcd1234secretkey" not in config_yaml(config)


def test_omegaconf_configs_are_resolved_before_storing(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("WANDB_API_KEY", "zzzz-very-secret")
    cfg = OmegaConf.create({"a": 2, "b": "${a}", "key_in_env": "${oc.env:WANDB_API_KEY}"})
    text = config_yaml(cfg)
    assert yaml.safe_load(text)["b"] == 2
    assert "zzzz-very-secret" not in text
