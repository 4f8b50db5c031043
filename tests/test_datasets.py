"""Kernel-shard datasets: values, chunk-aligned batches, workers, splits by structure, clear read errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datagen import store
from datagen.store import StoreError
from training.datasets import (
    ChunkBatchSampler,
    DataError,
    KernelDataset,
    ResumableDataLoader,
    ShardIndex,
    ShardReadError,
    collate_batched,
    split_by_structure,
)

K = 8
CBED_BASE, CBED_STEP = 0.75 / K**2, 2.0**-14  # per pixel: a CBED holds 0.75 to 1 of the beam


def cbed_code(cbed):
    """The ``index + channel / 10`` that :func:`write_shard` encodes in every CBED pixel."""
    return (np.asarray(cbed, dtype=np.float64) - CBED_BASE) / CBED_STEP


def write_shard(path, first_index: int, n: int, structures: list[str], chunk: int | None = 4):
    """A small but schema-complete kernel shard whose values encode the global sample index: every pixel
    of CBED ``c`` of sample ``i`` is ``CBED_BASE + (i + c / 10) * CBED_STEP`` (see :func:`cbed_code`), so
    that every CBED sums to less than the incident beam (global indices below 64)."""
    index = np.arange(first_index, first_index + n)
    code = index[:, None, None, None] + np.arange(9)[None, :, None, None] / 10
    cbed = np.broadcast_to(CBED_BASE + code * CBED_STEP, (n, 9, K, K)).astype(np.float32)
    assert cbed.sum(axis=(-2, -1)).max() <= 1
    wave = (index[:, None, None] * (1 + 1j) * np.ones((n, K, K))).astype(np.complex64)
    metadata = {
        "energy_eV": np.full(n, 200e3),
        "semiangle_mrad": np.full(n, 20.0),
        "gmax_invA": np.full(n, 2.0),
        "step_A": 0.1 + index / 1000,
        "Cs_A": np.full(n, 1e4),
        "defocus_A": np.full(n, 19.4),
        "thickness_A": np.full(n, 10.0),
        "rotation_deg": np.zeros(n),
        "zone_axis": np.tile([0, 0, 1], (n, 1)),
        "num_phonons": np.full(n, 2),
        "seed": index,
        "source_id": np.array([structures[i % len(structures)] for i in range(n)]),
        "formula": np.array(["X"] * n),
    }
    with store.create(path, store.KERNEL) as f:
        f.create_dataset("cbed", data=cbed, chunks=(chunk, 9, K, K) if chunk else None)
        f.create_dataset("wave", data=wave)
        f.create_dataset("probe", data=np.ones((n, K, K), np.complex64))
        for key, value in metadata.items():
            if value.dtype.kind == "U":
                f.create_dataset(key, data=value.astype(object), dtype=h5py.string_dtype())
            else:
                f.create_dataset(key, data=value)
    return path


@pytest.fixture
def shard_dir(tmp_path):
    write_shard(tmp_path / "shard-00000-of-00003.h5", 0, 20, ["mp-1", "mp-2", "mp-3"])
    write_shard(tmp_path / "shard-00001-of-00003.h5", 20, 20, ["mp-4", "mp-5"])
    write_shard(tmp_path / "shard-00002-of-00003.h5", 40, 12, ["mp-6", "mp-1"])
    return tmp_path


def test_samples_and_batches_carry_the_right_values(shard_dir):
    shards = ShardIndex.open(shard_dir)
    assert len(shards) == 52 and shards.kernel_px == K and shards.chunk == 4
    dataset = KernelDataset(shards)
    sample = dataset[23]
    assert sample["cbed"].shape == (9, K, K) and sample["cbed"].dtype == torch.float32
    assert sample["wave"].dtype == torch.complex64
    assert cbed_code(sample["cbed"][4, 0, 0]) == pytest.approx(23.4, abs=1e-3)
    assert sample["index"].item() == 23
    assert sample["step_A"].item() == pytest.approx(0.123)
    positions = [45, 3, 21, 4, 5, 44, 19]
    batch = dataset.__getitems__(positions)
    np.testing.assert_allclose(cbed_code(batch["cbed"][:, 0, 0, 0]), positions, atol=1e-3)
    np.testing.assert_allclose(batch["wave"][:, 1, 1].real.numpy(), positions)
    assert batch["index"].tolist() == positions


def test_split_by_structure_is_disjoint_complete_and_reproducible(shard_dir):
    ids = ShardIndex.open(shard_dir).source_ids
    splits = split_by_structure(ids, (0.6, 0.2, 0.2), seed=3)
    sets = {name: set(ids[idx]) for name, idx in splits.items()}
    assert all(sets.values())
    assert (
        not (sets["train"] & sets["val"])
        and not (sets["train"] & sets["test"])
        and not (sets["val"] & sets["test"])
    )
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(ids)))
    again = split_by_structure(ids, (0.6, 0.2, 0.2), seed=3)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert any(
        not np.array_equal(splits["val"], split_by_structure(ids, (0.6, 0.2, 0.2), seed=s)["val"])
        for s in range(4, 10)
    )
    with pytest.raises(ValueError, match="at least 3 distinct structures"):
        split_by_structure(["a", "a", "b"], (0.8, 0.1, 0.1))
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_structure(ids, (0.8, 0.1, 0.2))


def test_chunk_batches_cover_each_sample_once_and_read_few_runs(shard_dir):
    dataset = KernelDataset(ShardIndex.open(shard_dir))
    sampler = ChunkBatchSampler(dataset, batch_size=8, block_size=4, shuffle=True, seed=1)
    batches = list(sampler)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(52))
    for batch in batches:  # blocks of 4 consecutive samples: at most 2 runs per batch of 8
        runs = np.count_nonzero(np.diff(np.sort(batch)) != 1) + 1
        assert runs <= 2
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches
    replicas = [list(ChunkBatchSampler(dataset, 8, 4, seed=1, rank=r, num_replicas=2)) for r in (0, 1)]
    assert sorted(np.concatenate(replicas[0] + replicas[1]).tolist()) == list(range(52))


def test_chunk_batches_hold_repeated_samples_as_often_as_asked(shard_dir):
    dataset = KernelDataset(ShardIndex.open(shard_dir))
    repeats = np.ones(52, dtype=int)
    repeats[[3, 4, 5, 30]] = 3
    repeats[7] = 2
    sampler = ChunkBatchSampler(dataset, batch_size=8, block_size=4, seed=1, repeats=repeats)
    counts = np.bincount(np.concatenate(list(sampler)), minlength=52)
    np.testing.assert_array_equal(counts, repeats)  # each position as often as its repeat count
    assert len(sampler) == int(np.ceil(repeats.sum() / 8))
    for bad in (np.ones(51, dtype=int), np.zeros(52, dtype=int)):
        with pytest.raises(ValueError, match="repeats must hold one integer >= 1 per sample"):
            ChunkBatchSampler(dataset, batch_size=8, repeats=bad)


def test_lightning_sets_the_epoch_and_batches_mix_blocks(shard_dir):
    from lightning.fabric.utilities.data import _set_sampler_epoch

    dataset = KernelDataset(ShardIndex.open(shard_dir))
    sampler = ChunkBatchSampler(dataset, batch_size=8, seed=0)  # default blocks: 8 // 4 = 2 samples
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batched)
    first = list(sampler)
    _set_sampler_epoch(loader, 1)  # what Lightning does at every epoch start
    assert sampler.epoch == 1 and list(sampler) != first
    runs = [np.count_nonzero(np.diff(np.sort(batch)) != 1) + 1 for batch in first]
    assert max(runs) > 1  # a batch is not one fixed block


def test_dataloader_with_workers_delivers_every_sample_once(shard_dir):
    dataset = KernelDataset(ShardIndex.open(shard_dir), indices=np.arange(3, 50))
    dataset[0]  # a handle opened in the parent must not be reused by the workers
    loader = DataLoader(
        dataset,
        batch_sampler=ChunkBatchSampler(dataset, batch_size=6, seed=0),
        num_workers=2,
        collate_fn=collate_batched,
        multiprocessing_context="fork",
    )
    seen = []
    for batch in loader:
        np.testing.assert_allclose(
            cbed_code(batch["cbed"][:, 4, 0, 0]), batch["index"].numpy() + 0.4, atol=1e-3
        )
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(3, 50))


def test_nan_sample_is_found_when_the_shards_open(shard_dir):
    path = shard_dir / "shard-00001-of-00003.h5"
    with h5py.File(path, "a") as f:
        f["cbed"][13, 2, 3, 3] = np.nan
    message = r"^\S*shard-00001-of-00003\.h5: sample 13 has NaN or inf values in 'cbed'$"
    with pytest.raises(DataError, match=message):
        ShardIndex.open(shard_dir)
    assert len(ShardIndex.open(shard_dir, check=False)) == 52  # the read-time check still guards
    with h5py.File(path, "a") as f:
        f["cbed"][13, 2, 3, 3] = 0.0
        f["step_A"][19] = np.inf
    with pytest.raises(
        DataError, match=r"shard-00001-of-00003\.h5: sample 19 has NaN or inf values in 'step_A'"
    ):
        ShardIndex.open(shard_dir)
    with h5py.File(shard_dir / "shard-00000-of-00003.h5", "a") as f:
        f["wave"][0, 0, 0] = complex(0, np.inf)
    with h5py.File(path, "a") as f:
        f["step_A"][19] = 0.1
    with pytest.raises(
        DataError, match=r"shard-00000-of-00003\.h5: sample 0 has NaN or inf values in 'wave'"
    ):
        ShardIndex.open(shard_dir)


def test_check_finite_reads_in_bounded_blocks(shard_dir):
    from training.datasets import check_finite

    path = shard_dir / "shard-00000-of-00003.h5"
    with h5py.File(path, "a") as f:
        f["cbed"][17, 8, 7, 7] = np.nan
    with h5py.File(path, "r") as f:  # blocks of one chunk (4 samples): the NaN is in the fifth block
        with pytest.raises(DataError, match="sample 17 has NaN"):
            check_finite(f, path, ["cbed"], block_bytes=1)
        check_finite(f, path, ["wave", "probe", "missing"], block_bytes=1)


@pytest.mark.parametrize("workers", [0, 1])
def test_nan_sample_met_while_reading_is_one_line_with_file_and_index(shard_dir, workers):
    path = shard_dir / "shard-00001-of-00003.h5"
    with h5py.File(path, "a") as f:
        f["cbed"][7, 2, 3, 3] = np.nan
    dataset = KernelDataset(ShardIndex.open(shard_dir, check=False))
    message = r"^\S*shard-00001-of-00003\.h5: sample 7 has NaN or inf values in 'cbed'$"
    with pytest.raises(DataError, match=message):
        dataset.__getitems__([0, 26, 27, 28])
    sampler = ChunkBatchSampler(dataset, batch_size=4, block_size=4, shuffle=False)
    loader = ResumableDataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_batched
    )
    with pytest.raises(DataError, match=message):  # the worker's traceback is not the message
        list(loader)


def test_missing_dataset_and_truncated_shard_are_named(shard_dir):
    path = shard_dir / "shard-00002-of-00003.h5"
    with h5py.File(path, "a") as f:
        del f["probe"]
    with pytest.raises(StoreError, match=r"shard-00002-of-00003\.h5: missing dataset\(s\) 'probe'"):
        ShardIndex.open(shard_dir)
    path.unlink()
    write_shard(path, 40, 12, ["mp-6"], chunk=None)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(StoreError, match=r"shard-00002-of-00003\.h5: truncated"):
        ShardIndex.open(shard_dir)
    with pytest.raises(ShardReadError, match="no such shard file or folder"):
        ShardIndex.open(shard_dir / "empty-folder-that-does-not-exist")


@pytest.mark.parametrize("workers", [0, 1])
def test_resumable_loader_continues_the_epoch_it_was_stopped_in(shard_dir, workers):
    dataset = KernelDataset(ShardIndex.open(shard_dir))

    def loader() -> ResumableDataLoader:
        sampler = ChunkBatchSampler(dataset, batch_size=4, block_size=2, shuffle=True, seed=5)
        context = "fork" if workers else None
        return ResumableDataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_batched,
            multiprocessing_context=context,
        )  # fmt: skip

    def indices(batches) -> list[list[int]]:
        return [batch["index"].tolist() for batch in batches]

    first = loader()
    iterator = iter(first)  # Lightning builds the iterator first and sets the epoch afterwards
    first.batch_sampler.sampler.set_epoch(2)
    epoch_2 = ChunkBatchSampler(dataset, batch_size=4, block_size=2, shuffle=True, seed=5)
    epoch_2.set_epoch(2)
    expected = [dataset.indices[b].tolist() for b in epoch_2]
    head = [next(iterator) for _ in range(3)]
    assert indices(head) == expected[:3]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 3}
    second = loader()  # a new run from the checkpoint
    second.load_state_dict(state)
    iterator = iter(second)
    second.batch_sampler.sampler.set_epoch(2)
    assert indices(iterator) == expected[3:]
    assert second.state_dict() == {"epoch": 2, "batches": len(expected)}
    third = loader()  # a checkpoint at the end of epoch 2: epoch 3 starts at its first batch
    third.load_state_dict(second.state_dict())
    iterator = iter(third)
    third.batch_sampler.sampler.set_epoch(3)
    epoch_2.set_epoch(3)
    assert indices(iterator) == [dataset.indices[b].tolist() for b in epoch_2]
