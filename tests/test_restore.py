"""`python reconstruct.py input=IMAGE method=cgrdn`: image reading, tiled restoration, output, errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import h5py
import lightning
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from datagen import store
from evaluation.cli import PRETRAINED_DIR_ENV, reconstruct_main
from evaluation.image_io import ImageError, load_image
from evaluation.restore import blend_weights, load_cgrdn, restore_image, tile_starts
from models.cgrdn import CGRDN
from models.lightning import AIRPILightning, CGRDNLightning

ROOT = Path(__file__).resolve().parents[1]
TINY_CGRDN = {
    "net": {"features": 4, "growth": 2, "rdb_layers": 1, "rdbs_per_grdb": 1, "grdbs": 1},
    "discriminator": {"channels": [4, 4, 4, 4]},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny CGRDN checkpoint, an AIRPI one, and a 300 x 270 HAADF-like image (fractions of the beam)."""
    root = tmp_path_factory.mktemp("restore")
    torch.manual_seed(0)
    _save(CGRDNLightning(**TINY_CGRDN), root / "cgrdn.ckpt")
    _save(AIRPILightning(net={"filters": 4, "depth": 1, "block_convs": 1}), root / "airpi.ckpt")
    rng = np.random.default_rng(0)
    np.save(root / "image.npy", 0.01 + 0.004 * rng.random((300, 270)))
    (root / "image.yaml").write_text("pixel_size_A: 0.2\n")
    return root


def _config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="reconstruct", overrides=["progress=false", "device=cpu", *overrides])


def test_tiles_cover_the_axis_and_blend_weights_cross_fade() -> None:
    assert tile_starts(300, 256, 32) == [0, 44]
    assert tile_starts(256, 256, 32) == [0]
    assert tile_starts(600, 256, 32) == [0, 224, 344]
    rise, fall = blend_weights(64, 32, True, False), blend_weights(64, 32, False, True)
    np.testing.assert_allclose(fall[32:] + rise[:32], 1.0)  # overlap of exactly 32 px: weights sum to 1
    assert np.all(rise > 0) and np.all(blend_weights(8, 32, True, True) > 0)


@pytest.mark.parametrize("shape", [(300, 270), (301, 271), (97, 300)])
def test_tiling_reproduces_an_identity_network(shape) -> None:
    """A CGRDN whose residual branch is zeroed returns its input: the tiled, blended result is the image."""
    torch.manual_seed(0)
    net = CGRDN(**TINY_CGRDN["net"]).eval()
    torch.nn.init.zeros_(net.tail.weight)
    torch.nn.init.zeros_(net.tail.bias)
    image = 300.0 + 50.0 * np.random.default_rng(1).random(shape)  # counts
    restored = restore_image(net, image, tile_px=128, overlap_px=32, batch_size=3)
    assert restored.shape == shape and restored.dtype == np.float32
    np.testing.assert_allclose(restored, image, rtol=1e-5)


def test_one_tile_equals_the_untiled_network_and_scale_carries_through(folder) -> None:
    model = load_cgrdn(folder / "cgrdn.ckpt")
    image = np.load(folder / "image.npy")
    small = image[:128, :96]
    with torch.no_grad():
        direct = model(torch.from_numpy(small.astype(np.float32))[None, None])[0, 0].numpy()
    np.testing.assert_allclose(restore_image(model, small), direct, rtol=1e-5, atol=1e-9)
    restored = restore_image(model, image, batch_size=2)
    np.testing.assert_allclose(restore_image(model, 1000.0 * image) / 1000.0, restored, rtol=1e-4, atol=1e-9)


def test_restore_command_writes_image_and_png(folder, tmp_path, capsys) -> None:
    output = tmp_path / "out" / "restored.h5"
    cfg = _config(
        f"input={folder}/image.npy",
        "method=cgrdn",
        f"ckpt={folder}/cgrdn.ckpt",
        f"output={output}",
        "precision=32",  # compared with fp32 restore_image below (auto is bf16 on a CPU with bf16 units)
    )
    assert reconstruct_main(cfg) == 0, capsys.readouterr().err
    assert "cgrdn: 300 x 270 px image" in capsys.readouterr().out
    with store.open_checked(output, store.RESTORED) as handle:
        restored = handle["image"][()]
        assert handle.attrs["method"] == "cgrdn" and handle.attrs["checkpoint"] == "cgrdn.ckpt"
        np.testing.assert_allclose(handle.attrs["pixel_size_A"], [0.2, 0.2])
    assert restored.shape == (300, 270) and restored.dtype == np.float32 and np.all(np.isfinite(restored))
    expected = restore_image(load_cgrdn(folder / "cgrdn.ckpt"), np.load(folder / "image.npy"))
    np.testing.assert_allclose(restored, expected, rtol=1e-5)
    assert output.with_suffix(".png").stat().st_size > 1000
    assert sorted(p.name for p in output.parent.iterdir()) == ["restored.h5", "restored.png"]
    assert load_image(output).data.shape == (300, 270)  # deepstem.restored/1 reads back


def test_tif_and_deepstem_image_read_the_same_array(folder, tmp_path) -> None:
    import tifffile

    image = np.load(folder / "image.npy").astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", image, imagej=True, resolution=(50.0, 50.0), metadata={"unit": "nm"})
    from_tif = load_image(tmp_path / "a.tif")  # ImageJ: 50 px per nm = 0.2 A per pixel
    np.testing.assert_array_equal(from_tif.data, image)
    np.testing.assert_allclose(from_tif.pixel_size_A, (0.2, 0.2))
    tifffile.imwrite(tmp_path / "b.tif", image)  # no resolution: the YAML beside it
    (tmp_path / "b.yaml").write_text("pixel_size_A: [0.3, 0.25]\n")
    assert load_image(tmp_path / "b.tif").pixel_size_A == (0.3, 0.25)
    stack = np.stack([image, 2 * image])
    store.write(tmp_path / "one.h5", store.IMAGE, {"image": stack[:1], "pixel_size_A": [0.2]})
    store.write(tmp_path / "two.h5", store.IMAGE, {"image": stack, "pixel_size_A": [0.2, 0.4]})
    one = load_image(tmp_path / "one.h5")
    np.testing.assert_array_equal(one.data, image)
    assert one.pixel_size_A == (0.2, 0.2)
    second = load_image(tmp_path / "two.h5", index=1)
    np.testing.assert_array_equal(second.data, 2 * image)
    assert second.pixel_size_A == (0.4, 0.4)
    with pytest.raises(ImageError, match=r"holds 2 images: choose one with cgrdn.index=0..1"):
        load_image(tmp_path / "two.h5")


def test_rosettasciio_formats_and_the_missing_extra(tmp_path, monkeypatch) -> None:
    (tmp_path / "a.dm4").write_bytes(b"not read: the reader is faked")
    image = np.arange(12.0).reshape(3, 4)
    signals = [
        {"data": np.zeros((2, 2, 4, 4)), "axes": [], "metadata": {}},
        {
            "data": image,
            "axes": [{"scale": 0.05, "units": "nm"}, {"scale": 50.0, "units": "pm"}],
            "metadata": {"General": {"title": "HAADF"}},
        },
    ]
    fake = types.ModuleType("rsciio.digitalmicrograph")
    fake.file_reader = lambda filename, lazy=False: signals
    monkeypatch.setitem(sys.modules, "rsciio.digitalmicrograph", fake)
    read = load_image(tmp_path / "a.dm4")
    np.testing.assert_array_equal(read.data, image)
    assert read.pixel_size_A == pytest.approx((0.5, 0.5)) and read.source_format == "RosettaSciIO .dm4"
    monkeypatch.setitem(sys.modules, "rsciio.digitalmicrograph", None)  # not installed
    with pytest.raises(ImageError, match=r"needs RosettaSciIO.*pip install 'deepstem\[io\]'"):
        load_image(tmp_path / "a.dm4")


def test_legacy_checkpoint_keeps_the_absolute_floor(tmp_path) -> None:
    """Hyper-parameters of a CGRDN made before issue #16 (net.std_min: 0.1) load with the old rule."""
    legacy = {**TINY_CGRDN, "net": {**TINY_CGRDN["net"], "std_min": 0.1}, "loss": {"sigma_min": 0.1}}
    model = load_cgrdn(_save(CGRDNLightning(**legacy), tmp_path / "old.ckpt"))
    assert model.net.std_min == 0.1 and model.loss.sigma_min == 0.1


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("deepstem: error: "), lines[0]
    return lines[0]


def test_errors_are_one_line_exit_2_and_write_nothing(folder, tmp_path, monkeypatch, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "bare.npy", np.ones((16, 16)))  # no YAML beside it
    np.save(inputs / "scan.npy", np.ones((2, 2, 4, 4)))
    (inputs / "scan.yaml").write_text(yaml.safe_dump({"pixel_size_A": 0.2}))
    out = tmp_path / "out"
    ckpt = f"ckpt={folder}/cgrdn.ckpt"
    cases = [
        ([f"input={inputs}/bare.npy", ckpt], "no pixel size; write bare.yaml beside it"),
        ([f"input={inputs}/scan.npy", ckpt], "a 4D-STEM scan (shape (2, 2, 4, 4)), not an image"),
        ([f"input={folder}/image.npy", f"ckpt={folder}/airpi.ckpt"], "holds model 'airpi', not 'cgrdn'"),
        ([f"input={folder}/image.npy", ckpt, "cgrdn.tile_px=255"], "cgrdn.tile_px must be an even number"),
    ]
    for overrides, message in cases:
        assert reconstruct_main(_config("method=cgrdn", f"output={out}/x.h5", *overrides)) == 2
        line = _one_error_line(capsys)
        assert message in line, line
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(tmp_path / "empty"))  # nothing shipped
    assert reconstruct_main(_config("method=cgrdn", f"input={folder}/image.npy", f"output={out}/x.h5")) == 2
    line = _one_error_line(capsys)
    assert "no CGRDN model ships yet" in line and "give ckpt=PATH" in line, line
    assert reconstruct_main(_config("method=ssb", f"input={folder}/image.npy", f"output={out}/x.h5")) == 2
    line = _one_error_line(capsys)
    assert "a 2D array, not a 4D-STEM scan: method=ssb needs a 4D scan" in line, line
    assert not out.exists()
    with h5py.File(inputs / "plain.h5", "w") as handle:
        handle["image"] = np.ones((4, 4))
    with pytest.raises(ImageError, match="without a deepstem schema"):
        load_image(inputs / "plain.h5", pixel_size_A=0.2)
