"""HaadfDataModule crops (``data.crop_px``) and ``experiment=cgrdn_cpu`` through its real config (#16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datagen import store
from tests.test_train import compose_train
from training.cli import train
from training.datamodules import HaadfDataModule

NO_DISTORTION = {"dose_e_per_A2_range": None, "jitter_prob": 0.0, "fast_scan_prob": 0.0}


def _write_images(directory, images: np.ndarray, pixel_size_A: float = 0.1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    store.write(
        directory / "shard-00000-of-00001.h5",
        store.IMAGE,
        {"image": images.astype(np.float32), "pixel_size_A": np.full(len(images), pixel_size_A)},
    )


def _batch(images: np.ndarray, pixel_size_A: float = 0.1) -> dict[str, torch.Tensor]:
    n = len(images)
    return {
        "image": torch.from_numpy(images.astype(np.float32)),
        "pixel_size_A": torch.full((n,), pixel_size_A),
        "index": torch.arange(n),
    }


class _Stage:
    """Stands in for the Trainer: ``_stage`` reads ``trainer.training`` / ``state.stage``."""

    def __init__(self, training: bool) -> None:
        self.training = training
        self.sanity_checking = False


def _module(tmp_path, training: bool, **kwargs) -> HaadfDataModule:
    dm = HaadfDataModule(tmp_path, batch_size=4, **kwargs)
    dm.trainer = _Stage(training)  # type: ignore[assignment]
    return dm


def _locate(crop: np.ndarray, image: np.ndarray) -> list[tuple[int, int]]:
    c = crop.shape[0]
    return [
        (i, j)
        for i in range(image.shape[0] - c + 1)
        for j in range(image.shape[1] - c + 1)
        if np.array_equal(image[i : i + c, j : j + c], crop)
    ]


def test_training_crops_are_random_windows_of_the_clean_image_and_validation_takes_the_centre(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((6, 40, 48), dtype=np.float32)  # distinct values: a crop's position is unique
    train_dm = _module(tmp_path, True, distortion=NO_DISTORTION, crop_px=16, crop_margin_px=3)
    out = train_dm.on_after_batch_transfer(_batch(images), 0)
    assert out["clean"].shape == out["distorted"].shape == (6, 1, 16, 16)
    positions = [_locate(out["clean"][k, 0].numpy(), images[k]) for k in range(6)]
    assert all(len(p) == 1 for p in positions)  # every crop is a window of its own image
    assert len({p[0] for p in positions}) > 1  # at random positions
    # no distortion: the distorted crop is the clean crop (the margin was cut at the right place)
    assert torch.equal(out["distorted"], out["clean"])
    again = train_dm.on_after_batch_transfer(_batch(images), 0)
    assert not torch.equal(again["clean"], out["clean"])  # the generator moves on
    val_dm = _module(tmp_path, False, distortion=NO_DISTORTION, crop_px=16)
    val = val_dm.on_after_batch_transfer(_batch(images), 0)
    assert all(_locate(val["clean"][k, 0].numpy(), images[k]) == [(12, 16)] for k in range(6))


def test_crop_keeps_the_dose_per_pixel(tmp_path):
    """Poisson noise at 1e3 e/A^2, 0.1 A pixels: 10 e per unit intensity, in a crop as in the whole image."""
    flat = np.full((64, 96, 96), 0.5)  # 5 electrons expected per pixel
    poisson = {
        "dose_e_per_A2_range": [1e3, 1e3],
        "detector": "poisson",
        "jitter_prob": 0.0,
        "fast_scan_prob": 0.0,
    }
    full = _module(tmp_path, True, distortion=poisson).on_after_batch_transfer(_batch(flat), 0)
    crop = _module(tmp_path, True, distortion=poisson, crop_px=32).on_after_batch_transfer(_batch(flat), 0)
    counts_full, counts_crop = 10 * full["distorted"].double(), 10 * crop["distorted"].double()
    assert crop["distorted"].shape == (64, 1, 32, 32)
    # mean and variance of Poisson(5): 5 and 5 (65,536 crop pixels: standard error of the mean 0.009)
    assert abs(counts_crop.mean().item() - 5.0) < 0.05 and abs(counts_crop.var().item() - 5.0) < 0.15
    assert abs(counts_full.mean().item() - 5.0) < 0.05 and abs(counts_full.var().item() - 5.0) < 0.15
    # integer electron counts: the distortion saw the physical dose, not a rescaled crop
    assert torch.allclose(counts_crop, counts_crop.round(), atol=1e-4)


def test_bad_crop_settings_get_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="crop_px"):
        HaadfDataModule(tmp_path, crop_px=15)
    with pytest.raises(ValueError, match="crop_margin_px"):
        HaadfDataModule(tmp_path, crop_px=16, crop_margin_px=-1)
    dm = _module(tmp_path, True, distortion=NO_DISTORTION, crop_px=64)
    with pytest.raises(ValueError, match="crop_px=64 is larger than the images"):
        dm.on_after_batch_transfer(_batch(np.zeros((2, 32, 32))), 0)


def test_cgrdn_cpu_experiment_trains_with_its_real_config(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:80]
    images = (
        np.stack(
            [
                sum(
                    np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 4.0) for cx, cy in rng.uniform(4, 76, (20, 2))
                )
                for _ in range(10)
            ]
        )
        * 0.01
    )
    _write_images(tmp_path / "data", images, pixel_size_A=0.15)
    cfg = compose_train(
        [
            "experiment=cgrdn_cpu",
            f"data.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'run'}",
            "logger=csv",
            "+trainer.fast_dev_run=true",
        ]
    )
    assert cfg.data.crop_px == 64 and cfg.model.loss.w_adversarial == 0 and cfg.threads == 1
    assert cfg.model.net.grdbs == 4 and cfg.model.net.rdbs_per_grdb == 4 and cfg.model.net.rdb_layers == 8
    assert cfg.callbacks.model_checkpoint.monitor == "val/psnr"
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/psnr"])
