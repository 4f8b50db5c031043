"""DataModules: splits, augmentation on the batch, deterministic evaluation noise, physics of the views."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from datagen import store
from physics import probe as make_probe
from training.datamodules import HaadfDataModule, MultisliceDataModule, StockImagesDataModule, ptychonn_view


class _FakeTrainer:
    def __init__(self, training: bool) -> None:
        self.training, self.sanity_checking, self.global_rank, self.world_size = training, False, 0, 1


def test_weak_phase_samples_are_oversampled_in_training_only(kernel_dir):
    # the synthetic shards have a flat object phase (probe 1, wave index (1 + i)): give every third sample
    # a 0.2 rad checkerboard (spread 0.2 rad), the others stay weak (spread 0)
    strong, offset = set(), 0
    for path in sorted(kernel_dir.glob("shard-*.h5")):  # global index = position over the sorted shards
        with h5py.File(path, "r+") as f:
            wave = f["wave"][:]
            checker = (np.indices(wave.shape[1:]).sum(0) % 2) * 0.4 - 0.2
            for local in range(wave.shape[0]):
                if (offset + local) % 3 == 0:
                    wave[local] = np.exp(1j * checker)
                    strong.add(offset + local)
            f["wave"][:] = wave
            offset += wave.shape[0]
    option = {"spread_below_rad": 0.03, "repeats": 3}
    dm = MultisliceDataModule(kernel_dir, batch_size=8, split=(0.6, 0.2, 0.2), oversample_weak_phase=option)
    dm.setup()
    train = dm.datasets["train"].indices
    spread = dm.train_phase_spread_rad()
    is_strong = np.isin(train, sorted(strong))
    np.testing.assert_allclose(spread[is_strong], 0.2, atol=1e-5)
    np.testing.assert_allclose(spread[~is_strong], 0.0, atol=1e-5)
    seen = np.concatenate([batch["index"].numpy() for batch in dm.train_dataloader()])
    counts = {int(i): int(n) for i, n in zip(*np.unique(seen, return_counts=True), strict=True)}
    assert counts == {int(i): 1 if s else 3 for i, s in zip(train, is_strong, strict=True)}
    val = np.concatenate([batch["index"].numpy() for batch in dm.val_dataloader()])
    np.testing.assert_array_equal(np.sort(val), dm.datasets["val"].indices)  # validation once each
    for bad in ({"spread_below_rad": 0.03}, {"spread_below_rad": -1, "repeats": 2},
                {"spread_below_rad": 0.03, "repeats": 1.5}):  # fmt: skip
        with pytest.raises(ValueError, match=r"data\.oversample_weak_phase"):
            MultisliceDataModule(kernel_dir, oversample_weak_phase=bad)


def test_multislice_airpi_batches_are_augmented_and_split_by_structure(kernel_dir):
    dm = MultisliceDataModule(
        kernel_dir, batch_size=8, split=(0.6, 0.2, 0.2), augmentation={"dose_e_range": [1e3, 1e4]}
    )
    dm.setup()
    ids = {name: set(dm.index.source_ids[ds.indices]) for name, ds in dm.datasets.items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"])
    raw = next(iter(dm.train_dataloader()))
    dm.trainer = _FakeTrainer(training=True)
    first = dm.on_after_batch_transfer(dict(raw), 0)
    second = dm.on_after_batch_transfer(dict(raw), 0)
    assert first["inputs"].shape == (8, 11, 8, 8) and first["inputs"].dtype == torch.float32
    assert not torch.equal(first["cbed"], second["cbed"])  # fresh training noise per draw
    counts = first["cbed"][~first["no_specimen"]]
    assert torch.all(counts == counts.round()) and counts.sum(dim=(-2, -1)).min() > 500  # Poisson counts
    dm.trainer = _FakeTrainer(training=False)
    val = next(iter(dm.val_dataloader()))
    a, b = dm.on_after_batch_transfer(dict(val), 0), dm.on_after_batch_transfer(dict(val), 0)
    assert torch.equal(a["inputs"], b["inputs"])  # evaluation noise is seeded by the sample index


def test_training_position_travels_in_the_data_module_state(kernel_dir, tmp_path):
    """Lightning drops the loader states of a checkpoint when the model reads
    ``trainer.estimated_stepping_batches`` (PtychoNN); the data module's own state carries the position."""

    def module() -> MultisliceDataModule:
        return MultisliceDataModule(kernel_dir, view="ptychonn", batch_size=4, split=(0.6, 0.2, 0.2))

    def epoch(loader, number: int) -> list[list[int]]:
        iterator = iter(loader)  # Lightning builds the iterator first and sets the epoch afterwards
        loader.batch_sampler.sampler.set_epoch(number)
        return [batch["index"].tolist() for batch in iterator]

    expected = epoch(module().train_dataloader(), 1)
    assert len(expected) > 3
    first = module()
    loader = first.train_dataloader()
    iterator = iter(loader)
    loader.batch_sampler.sampler.set_epoch(1)
    assert [next(iterator)["index"].tolist() for _ in range(2)] == expected[:2]
    torch.save(first.state_dict(), tmp_path / "state.pt")  # as in a checkpoint
    second = module()
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert epoch(second.train_dataloader(), 1) == expected[2:]
    assert epoch(second.train_dataloader(), 1) == expected  # the position is handed on once


def test_ptychonn_view_recovers_the_phase_object():
    n = 32
    probe = torch.from_numpy(make_probe(200e3, 20.0, n, sampling_A=0.15, defocus_A=20.0))[None]
    x = torch.arange(n, dtype=torch.float32)
    phase = 0.4 * torch.sin(2 * torch.pi * x / 8)[:, None] * torch.cos(2 * torch.pi * x / 11)[None, :]
    wave = probe * torch.polar(0.9 * torch.ones_like(phase), phase)
    cbed = torch.rand(1, 9, n, n)
    view = ptychonn_view({"wave": wave, "probe": probe, "index": torch.tensor([0])}, cbed)
    mask = view["mask"][0, 0]
    assert mask.sum() > 10
    torch.testing.assert_close(view["phase"][0, 0][mask], phase[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        view["amplitude"][0, 0][mask], torch.full_like(phase[mask], 0.9), atol=1e-4, rtol=0
    )
    assert torch.all(view["amplitude"][0, 0][~mask] == 1) and torch.all(view["phase"][0, 0][~mask] == 0)
    assert view["diffraction"].shape == (1, 1, n, n) and view["diffraction"].max() == 1


def test_multislice_ptychonn_view_from_shards(kernel_dir):
    dm = MultisliceDataModule(kernel_dir, view="ptychonn", batch_size=4, split=(0.6, 0.2, 0.2))
    batch = dm.on_after_batch_transfer(dict(next(iter(dm.val_dataloader()))), 0)
    assert set(batch) >= {"diffraction", "amplitude", "phase"}
    assert batch["diffraction"].shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"data\.view"):
        MultisliceDataModule(kernel_dir, view="chang")


def test_stock_images_module_draws_fresh_training_and_fixed_validation_batches():
    dm = StockImagesDataModule(
        batch_size=4, train_samples=8, val_samples=4, dose_e_range=(1e3, 1e4),
        image_bank={"photographs": ["camera"], "faces": 2, "textures": 2, "size_px": 64},
    )  # fmt: skip
    val = next(iter(dm.val_dataloader()))
    a, b = dm.on_after_batch_transfer(val, 0), dm.on_after_batch_transfer(val, 0)
    assert a["diffraction"].shape == a["phase"].shape == a["mask"].shape == (4, 1, 32, 32)
    assert torch.equal(a["diffraction"], b["diffraction"]) and torch.equal(a["phase"], b["phase"])
    torch.testing.assert_close(
        (a["diffraction"] ** 2).sum(dim=(-2, -1)), torch.ones(4, 1)
    )  # sqrt(counts/total)
    dm.trainer = _FakeTrainer(training=True)
    train = next(iter(dm.train_dataloader()))
    c, d = dm.on_after_batch_transfer(train, 0), dm.on_after_batch_transfer(train, 0)
    assert not torch.equal(c["phase"], d["phase"])
    with pytest.raises(ValueError, match="dose_e_range"):
        StockImagesDataModule(dose_e_range=(10.0, 1.0))


def test_stock_images_validation_samples_do_not_depend_on_the_batch_size():
    bank = {"photographs": ["camera"], "faces": 2, "textures": 2, "size_px": 64}
    samples = {}
    for batch_size in (2, 3):
        dm = StockImagesDataModule(
            batch_size=batch_size, val_samples=6, dose_e_range=(1e3, 1e4), image_bank=bank
        )
        batches = [dm.on_after_batch_transfer(batch, 0) for batch in dm.val_dataloader()]
        samples[batch_size] = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    a, b = samples[2], samples[3]
    assert a["index"].tolist() == b["index"].tolist() == list(range(10**9, 10**9 + 6))
    for key in ("diffraction", "phase", "mask"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["phase"][0], a["phase"][1])  # samples differ from each other


def test_experiment_config_passes_atom_fraction_to_the_forward_model():
    """`train.py experiment=chang_graphene data.forward_model.atom_fraction=0.5` mixes lattices into the
    validation objects; the committed experiment (0) keeps paper 001's stock images."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    small = ["data.image_bank.photographs=[camera]", "data.image_bank.faces=2", "data.image_bank.textures=2",
             "data.image_bank.size_px=64", "data.val_samples=12", "data.batch_size=12"]  # fmt: skip
    phases = {}
    for fraction in (0.0, 0.5):
        overrides = ["experiment=chang_graphene", f"data.forward_model.atom_fraction={fraction}", *small]
        conf = Path(__file__).resolve().parents[1] / "conf"
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        dm = StockImagesDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
        batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
        assert dm.model.atom_fraction == fraction and dm.model.energy_eV == 80e3
        phases[fraction] = batch["phase"]
    changed = [not torch.equal(phases[0.0][i], phases[0.5][i]) for i in range(12)]
    assert 1 <= sum(changed) <= 11


def test_haadf_module_pairs_distorted_and_clean_images(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for shard in range(2):
        images = np.stack([
            sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 4.0) for cx, cy in rng.uniform(4, 28, (6, 2)))
            for _ in range(10)
        ]).astype(np.float32)  # fmt: skip
        store.write(tmp_path / f"shard-{shard:05d}-of-00002.h5", store.IMAGE,
                    {"image": images, "pixel_size_A": np.full(10, 0.1)})  # fmt: skip
    distortion = {"dose_e_per_A2_range": [1e3, 1e3], "jitter_prob": 0.0, "fast_scan_prob": 0.0}
    dm = HaadfDataModule(tmp_path, batch_size=5, split=(0.6, 0.2, 0.2), distortion=distortion)
    val = next(iter(dm.val_dataloader()))
    a, b = dm.on_after_batch_transfer(dict(val), 0), dm.on_after_batch_transfer(dict(val), 0)
    assert a["distorted"].shape == a["clean"].shape == (len(val["index"]), 1, 32, 32)
    assert torch.equal(a["distorted"], b["distorted"])
    assert not torch.equal(a["distorted"], a["clean"])
    # shot noise at 1e3 e/A^2 and 0.1 A pixels (10 e per unit intensity): unbiased, with Poisson spread
    assert (a["distorted"] - a["clean"]).mean().abs() < 0.05
    assert h5py.is_hdf5(tmp_path / "shard-00000-of-00002.h5")


def _epie_fixture(tmp_path):
    """A small POA scan and a 'reconstruction' that is the true object (pixel (0, 0) at position (0, 0))."""
    from evaluation.io import save_4dstem
    from tests.scan4d_helpers import simulate_scan

    sim = simulate_scan(scan_px=12, cbed_px=32)
    calibration = {"energy_eV": sim.energy_eV, "semiangle_mrad": sim.semiangle_mrad,
                   "scan_step_A": sim.scan_step_A, "k_pixel_invA": sim.k_pixel_invA}  # fmt: skip
    scan_path = save_4dstem(tmp_path / "scan.h5", sim.data, **calibration)
    recon = {"phase": sim.phase.astype(np.float32), "amplitude": np.ones_like(sim.phase, dtype=np.float32)}
    attrs = {"pixel_size_A": [sim.object_pixel_A] * 2, "origin_A": [0.0, 0.0], "method": "truth"}
    recon_path = store.write(tmp_path / "scan_epie.h5", store.RECON, recon, attrs=attrs)
    return sim, scan_path, recon_path


def test_epie_labels_are_object_patches_centred_on_the_probe_positions(tmp_path):
    from training.datamodules import EpieLabelsDataModule

    sim, scan_path, recon_path = _epie_fixture(tmp_path)
    dm = EpieLabelsDataModule(
        str(scan_path), str(recon_path), patch_px=16, train_fraction=0.5, val_fraction=0.34
    )
    dm.setup()
    rows = {name: set(p[:, 0].tolist()) for name, p in dm.positions.items()}
    assert max(rows["train"]) < min(rows["val"]) and max(rows["val"]) < min(rows["test"])
    assert sum(len(p) for p in dm.positions.values()) == 144
    sample = dm.sample(5, 7)  # object pixel (10, 14) at the patch centre (step = 2 object pixels)
    window = sim.phase[10 - 8 : 10 + 8, 14 - 8 : 14 + 8]
    np.testing.assert_allclose(sample["phase"][0].numpy(), window, atol=1e-5)
    np.testing.assert_allclose(sample["amplitude"][0].numpy(), 1.0, atol=1e-6)
    assert sample["pattern"].shape == (16, 16)
    assert sample["pattern"].sum().item() == pytest.approx(float(sim.data[5, 7].sum()), rel=1e-5)
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert batch["diffraction"].shape[1:] == (1, 16, 16) and batch["diffraction"].amax().item() == 1.0
