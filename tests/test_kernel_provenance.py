"""Kernel-shard training records its optics (issue #13 point 2, #15): ``MultisliceDataModule.checkpoint_info``
ranges, the PtychoNN view's mask weights and standardisation statistics, and a real fit writing them."""

from __future__ import annotations

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from models.checkpoints import load_checkpoint
from models.lightning import PtychoNNLightning
from physics.optics import wavelength
from training.callbacks import ModelProvenance
from training.datamodules import MultisliceDataModule


def test_checkpoint_info_gives_the_training_split_ranges(kernel_dir):
    dm = MultisliceDataModule(kernel_dir, split=(0.6, 0.2, 0.2), augmentation={"dose_e_range": [1e3, 1e5]})
    ranges = dm.checkpoint_info()["trained_for"]
    train = dm.datasets["train"].indices
    # write_shard: step_A = 0.1 + global index / 1000; only the training samples count
    assert ranges["scan_step_A"] == pytest.approx([0.1 + train.min() / 1000, 0.1 + train.max() / 1000])
    assert len(train) < 60 and ranges["scan_step_A"] != pytest.approx([0.1, 0.159])
    assert ranges["energy_eV"] == [200e3, 200e3]
    assert ranges["semiangle_mrad"] == [20.0, 20.0]
    assert ranges["Cs_A"] == [1e4, 1e4] and ranges["defocus_A"] == [19.4, 19.4]
    ratio = 20e-3 / wavelength(200e3) / 2.0  # aperture in 1/A over the shards' gmax 2.0 1/A
    assert ranges["alpha_over_gmax"] == pytest.approx([ratio, ratio])
    assert ranges["dose_e_per_cbed"] == [1e3, 1e5]


def test_ptychonn_view_records_no_scan_step_and_noise_free_no_dose(kernel_dir):
    dm = MultisliceDataModule(kernel_dir, view="ptychonn", augmentation={"dose_e_range": None})
    ranges = dm.checkpoint_info()["trained_for"]
    assert "scan_step_A" not in ranges and "dose_e_per_cbed" not in ranges
    assert "alpha_over_gmax" in ranges


def test_mask_weight_is_the_illuminated_region(kernel_dir):
    dm = MultisliceDataModule(kernel_dir, view="ptychonn", batch_size=4, label_weight="mask")
    batch = dm.on_after_batch_transfer(dict(next(iter(dm.val_dataloader()))), 0)
    assert torch.equal(batch["weight"], batch["mask"].float())
    plain = MultisliceDataModule(kernel_dir, view="ptychonn", batch_size=4)
    assert "weight" not in plain.on_after_batch_transfer(dict(next(iter(plain.val_dataloader()))), 0)
    with pytest.raises(ValueError, match="label_weight"):
        MultisliceDataModule(kernel_dir, view="ptychonn", label_weight="probe")
    with pytest.raises(ValueError, match="view=ptychonn"):
        MultisliceDataModule(kernel_dir, view="airpi", label_weight="mask")


def test_training_statistics_are_noise_free_training_views(kernel_dir):
    dm = MultisliceDataModule(kernel_dir, view="ptychonn", statistics_samples=7, seed=3)
    stats = dm.training_statistics()
    assert stats["diffraction"].shape == (7, 1, 8, 8)
    assert stats["amplitude"].shape == stats["phase"].shape == (1, 1, 1, 7 * 64)
    # each pattern over its own maximum (no dose noise: the stored CBED is constant over pixels)
    assert torch.allclose(stats["diffraction"], torch.ones_like(stats["diffraction"]))
    # write_shard's probe is 1 everywhere and its wave index*(1+i): phase pi/4 except sample 0
    lit = stats["amplitude"] > 0
    assert torch.allclose(stats["phase"][lit], torch.full_like(stats["phase"], np.pi / 4)[lit])
    with pytest.raises(ValueError, match="view=ptychonn"):
        MultisliceDataModule(kernel_dir).training_statistics()


def test_mask_weighted_statistics_are_those_of_the_illuminated_pixels(kernel_dir):
    """The label statistics are taken where the loss is: a probe lighting 4 of the 64 pixels gives 4
    label values per sample with ``label_weight="mask"``, all 64 without."""
    for shard in sorted(kernel_dir.glob("shard-*.h5")):
        with h5py.File(shard, "r+") as handle:
            probe = np.zeros(handle["probe"].shape, np.complex64)
            probe[:, 3:5, 3:5] = 1.0
            handle["probe"][...] = probe
    masked = MultisliceDataModule(kernel_dir, view="ptychonn", statistics_samples=5, label_weight="mask")
    whole = MultisliceDataModule(kernel_dir, view="ptychonn", statistics_samples=5)
    assert masked.training_statistics()["phase"].numel() == 5 * 4
    phase = whole.training_statistics()["phase"]
    assert phase.numel() == 5 * 64
    # outside the disc the label is vacuum (phase 0): the whole-patch mean is diluted 16x
    lit = masked.training_statistics()["phase"]
    assert float(phase.mean()) == pytest.approx(float(lit.mean()) * 4 / 64, rel=1e-5)


def test_a_kernel_fit_writes_the_ranges_and_the_fitted_standardisation(kernel_dir, tmp_path):
    torch.manual_seed(0)
    dm = MultisliceDataModule(kernel_dir, view="ptychonn", batch_size=4, label_weight="mask",
                              augmentation={"dose_e_range": [1e4, 1e6]})  # fmt: skip
    model = PtychoNNLightning(net={"channels": [4, 8, 8]}, standardise_inputs=True, standardise_labels=True,
                              input_px=8, loss={"kind": "l2", "w_xc": 1.0})  # fmt: skip
    checkpoint = tmp_path / "run" / "last.ckpt"
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ModelProvenance()], limit_val_batches=1,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(checkpoint)
    saved = load_checkpoint(checkpoint)
    assert saved["deepstem"]["trained_for"]["dose_e_per_cbed"] == [1e4, 1e6]
    assert saved["deepstem"]["trained_for"]["energy_eV"] == [200e3, 200e3]
    assert bool(model.norm.fitted)


def test_ptychonn_cpu_experiment_trains_and_records_what_it_saw(kernel_dir, tmp_path):
    from evaluation.networks.checkpoints import load_network, training_ranges
    from tests.test_train import compose_train
    from training.cli import train

    cfg = compose_train(["experiment=ptychonn_cpu", f"paths.data_dir={kernel_dir}",
                         f"paths.output_dir={tmp_path}/run", "model.input_px=8", "model.net.channels=[4,8,8]",
                         "data.batch_size=4", "threads=1", "callbacks.prediction_images=null",
                         "callbacks.progress_bar=null", "trainer.max_epochs=1",
                         "+trainer.limit_train_batches=2"])  # fmt: skip
    assert cfg.data.view == "ptychonn" and cfg.data.label_weight == "mask"
    assert cfg.callbacks.model_checkpoint.monitor == "val/xc_phase_weighted"
    metrics = train(cfg)
    # (the fixture's phase is one constant per sample, so its xc is undefined: only that it is logged)
    assert np.isfinite(metrics["val/loss"]) and "val/xc_phase_weighted" in metrics
    model = load_network(tmp_path / "run" / "checkpoints" / "last.ckpt", "ptychonn")
    assert bool(model.norm.fitted)
    ranges = training_ranges(model)
    assert ranges["energy_eV"] == (200e3, 200e3) and "scan_step_A" not in ranges
    assert ranges["dose_e_per_cbed"] == (30.0, 1e9)
