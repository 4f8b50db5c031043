"""Datasets over deepstem's HDF5 shards: kernels (``deepstem.kernel/1``) and images (``deepstem.image/1``).

Reading is built for many shards and many workers:

* every worker process opens its own h5py handles lazily (a handle never crosses a ``fork``);
* :class:`ChunkBatchSampler` forms batches from whole, shuffled blocks of consecutive samples, and
  :meth:`ShardDataset.__getitems__` reads each block with one slice per dataset;
* train/val/test splits are made by *structure* (``source_id``), so validation measures
  generalisation to crystals the network has not seen; they are reproducible from the seed.

Every data error (:class:`DataError`) is one line naming the shard file and the sample index: shards
are checked for NaN and inf values when they are opened (one streaming pass, chunk by chunk), and read
errors during training, also those raised in worker processes, arrive as the same one line.
:class:`ResumableDataLoader` carries the sampler's epoch and position in Lightning checkpoints, so that
a resumed run (also from a checkpoint written in the middle of an epoch) sees the batches of the
uninterrupted one.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datagen import store

__all__ = [
    "IMAGE_FIELDS",
    "KERNEL_FIELDS",
    "ChunkBatchSampler",
    "DataError",
    "EpochBatchSampler",
    "ImageDataset",
    "KernelDataset",
    "ResumableDataLoader",
    "ShardDataset",
    "ShardIndex",
    "ShardReadError",
    "check_finite",
    "collate_batched",
    "find_shards",
    "split_by_structure",
]

# datasets read for every sample; per-sample scalars become (B,) tensors
KERNEL_FIELDS = ("cbed", "wave", "probe", "step_A", "energy_eV", "semiangle_mrad", "gmax_invA")
IMAGE_FIELDS = ("image", "pixel_size_A")
_FINITE_CHECKED = ("cbed", "wave", "probe", "image")


class DataError(RuntimeError):
    """Training data that cannot be used (e.g. a NaN in a CBED); the message is one line naming the
    shard file and the sample index within it."""


class ShardReadError(DataError):
    """A shard or one of its samples cannot be found or read; the message names the file and the index."""


def find_shards(
    location: str | os.PathLike | Sequence[str | os.PathLike], pattern: str = "shard-*.h5"
) -> list[Path]:
    """Shard files at ``location``: a folder (its ``shard-*.h5``), a glob, a file, or a list of those."""
    if isinstance(location, str | os.PathLike):
        location = [location]
    found: list[Path] = []
    for item in location:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(path.glob(pattern)))
        elif any(ch in str(item) for ch in "*?["):
            found.extend(Path(p) for p in sorted(glob.glob(str(item))))
        elif path.is_file():
            found.append(path)
        else:
            raise ShardReadError(f"{path}: no such shard file or folder")
    if not found:
        raise ShardReadError(f"{', '.join(map(str, location))}: no shards ({pattern}) found")
    return found


@dataclass(frozen=True)
class ShardIndex:
    """Index of many shards of one schema: which global sample lives in which file, and its group id.

    The group id (``source_id`` of kernel shards: the structure) is what splits keep together; shards
    without one give every sample its own group.
    """

    paths: tuple[Path, ...]
    offsets: np.ndarray  # (num_shards + 1,) global index of each shard's first sample
    source_ids: np.ndarray  # (num_samples,) str
    chunk: int  # samples per HDF5 chunk of the main dataset (block size for chunk-aligned reads)
    sample_shape: tuple[int, ...]
    schema: store.Schema

    @classmethod
    def open(
        cls,
        location: str | os.PathLike | Sequence[str | os.PathLike],
        schema: store.Schema = store.KERNEL,
        check: bool = True,
    ) -> ShardIndex:
        paths = find_shards(location)
        main = schema.datasets[0]
        checked = _CHECKED_FIELDS.get(schema.id, schema.datasets)
        counts, ids, chunks, shapes = [], [], [], set()
        for path in paths:
            with store.open_checked(path, schema) as handle:
                if check:
                    check_finite(handle, path, checked)
                n = handle[main].shape[0]
                counts.append(n)
                if "source_id" in handle:
                    ids.append(np.asarray([_as_str(s) for s in handle["source_id"][:]], dtype=object))
                else:
                    ids.append(np.asarray([f"{path.name}:{i}" for i in range(n)], dtype=object))
                # contiguous storage reads any run in one slice: use blocks of 16 samples then
                chunks.append(handle[main].chunks[0] if handle[main].chunks else 16)
                shapes.add(tuple(handle[main].shape[1:]))
        if len(shapes) > 1:
            raise ShardReadError(
                f"shards disagree on the {main!r} shape ({sorted(shapes)}): {paths[0].parent}"
            )
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(tuple(paths), offsets, np.concatenate(ids), max(chunks), shapes.pop(), schema)

    @property
    def kernel_px(self) -> int:
        return self.sample_shape[-1]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, index within the shard) of global sample indices."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"sample index out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        return shard, index - self.offsets[shard]


_CHECKED_FIELDS = {store.KERNEL.id: KERNEL_FIELDS, store.IMAGE.id: IMAGE_FIELDS}


def check_finite(
    handle: h5py.File, path: str | os.PathLike, names: Sequence[str], block_bytes: int = 64 << 20
) -> None:
    """Raise :class:`DataError` naming ``path`` and the sample at the first NaN or inf value of the
    floating-point datasets ``names`` of an open shard (absent ones are skipped).

    One streaming pass: whole HDF5 chunks, about ``block_bytes`` per read, so memory stays bounded and
    the cost is one sequential read of the data.
    """
    for key in names:
        dataset = handle.get(key)
        if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "fc" or not dataset.ndim:
            continue
        rows = dataset.shape[0]
        row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:], dtype=np.int64))
        chunk_rows = dataset.chunks[0] if dataset.chunks else 1
        step = max(chunk_rows, block_bytes // max(1, row_bytes) // chunk_rows * chunk_rows)
        for start in range(0, rows, step):
            try:
                block = dataset[start : start + step]
            except (OSError, ValueError) as err:
                raise ShardReadError(
                    f"{path}: cannot read {key!r} for samples {start}..{min(rows, start + step) - 1}: {err}"
                ) from None
            finite = np.isfinite(block)
            if finite.all():
                continue
            bad = start + int(np.flatnonzero(~finite.reshape(len(block), -1).all(axis=1))[0])
            raise DataError(f"{path}: sample {bad} has NaN or inf values in {key!r}")


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def split_by_structure(
    source_ids: Sequence[str] | np.ndarray,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Global sample indices of the ``train``, ``val`` and ``test`` splits, whole structures per split.

    Distinct ``source_id`` values are shuffled with ``seed`` and dealt out by the structure fractions;
    every split with a positive fraction gets at least one structure.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(
            f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}"
        )
    ids = np.asarray(source_ids, dtype=object)
    unique = np.array(sorted(set(ids.tolist())), dtype=object)
    needed = int(np.count_nonzero(fractions))
    if unique.size < needed:
        raise ValueError(
            f"split by structure needs at least {needed} distinct structures, the shards hold {unique.size}; "
            "generate data from more structures or set a split fraction to 0"
        )
    order = np.random.default_rng(seed).permutation(unique.size)
    counts = np.floor(fractions * unique.size).astype(int)
    counts[fractions > 0] = np.maximum(counts[fractions > 0], 1)
    counts[0] = unique.size - counts[1:].sum() if fractions[0] > 0 else counts[0]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    splits = {}
    for name, start, stop in zip(("train", "val", "test"), bounds[:-1], bounds[1:], strict=True):
        members = set(unique[order[start:stop]].tolist())
        splits[name] = np.flatnonzero([s in members for s in ids]).astype(np.int64)
    return splits


class ShardDataset(Dataset):
    """Samples of shards as dicts of tensors (one sample, or a batch through ``__getitems__``).

    Kernel shards (:data:`KERNEL_FIELDS`): ``cbed`` (9, K, K) float32, ``wave`` and ``probe`` (K, K)
    complex64, ``step_A``, ``energy_eV``, ``semiangle_mrad``, ``gmax_invA`` float32 scalars. Image
    shards (:data:`IMAGE_FIELDS`): ``image`` (H, W) float32 and ``pixel_size_A``. Always ``index``: the
    global sample index, which seeds deterministic validation noise.
    """

    fields: tuple[str, ...] = KERNEL_FIELDS

    def __init__(
        self, shards: ShardIndex, indices: np.ndarray | None = None, fields: Sequence[str] | None = None
    ) -> None:
        self.shards = shards
        if fields is not None:
            self.fields = tuple(fields)
        self.indices = np.arange(len(shards), dtype=np.int64) if indices is None else np.asarray(indices)
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _handle(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            path = self.shards.paths[shard]
            try:
                self._handles[shard] = h5py.File(path, "r")
            except OSError as err:
                raise ShardReadError(f"{path}: cannot open shard: {err}") from None
        return self._handles[shard]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([position])
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        global_index = self.indices[np.asarray(positions, dtype=np.int64)]
        shard, local = self.shards.locate(global_index)
        out: dict[str, np.ndarray] = {}
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            for key, values in self._read_runs(int(s), local[rows]).items():
                if key not in out:
                    out[key] = np.empty((global_index.size, *values.shape[1:]), dtype=values.dtype)
                out[key][rows] = values
        batch = {key: torch.from_numpy(value) for key, value in out.items()}
        batch["index"] = torch.from_numpy(global_index)
        return batch

    def _read_runs(self, shard: int, local: np.ndarray) -> dict[str, np.ndarray]:
        """Read the samples ``local`` of one shard with one slice per run of consecutive indices."""
        path = self.shards.paths[shard]
        handle = self._handle(shard)
        order = np.argsort(local, kind="stable")
        sorted_local = local[order]
        breaks = np.flatnonzero(np.diff(sorted_local) != 1) + 1
        runs = np.split(sorted_local, breaks)
        result: dict[str, np.ndarray] = {}
        for key in self.fields:
            try:
                dataset = handle[key]
                parts = [dataset[run[0] : run[-1] + 1] for run in runs]
            except KeyError:
                raise ShardReadError(f"{path}: missing dataset {key!r}") from None
            except (OSError, ValueError) as err:
                raise ShardReadError(
                    f"{path}: cannot read {key!r} for samples {sorted_local[0]}..{sorted_local[-1]}: {err}"
                ) from None
            values = np.concatenate(parts)
            restored = np.empty_like(values)
            restored[order] = values
            if key in _FINITE_CHECKED:
                finite = np.isfinite(restored.reshape(len(restored), -1)).all(axis=1)
                if not finite.all():
                    bad = int(local[np.flatnonzero(~finite)[0]])
                    raise DataError(f"{path}: sample {bad} has NaN or inf values in {key!r}")
            result[key] = restored.astype(np.float32) if restored.dtype.kind == "f" else restored
        return result


class KernelDataset(ShardDataset):
    """:class:`ShardDataset` over kernel shards (``deepstem.kernel/1``)."""

    fields = KERNEL_FIELDS


class ImageDataset(ShardDataset):
    """:class:`ShardDataset` over clean-image shards (``deepstem.image/1``) for restoration training."""

    fields = IMAGE_FIELDS


def collate_batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate function for batches that :meth:`KernelDataset.__getitems__` already assembled."""
    return batch


class _EpochForwarder:
    """Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` (not on the batch sampler itself)."""

    def __init__(self, owner: EpochBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset positions in an order fixed by ``(seed, epoch)``, resumable within an epoch.

    The positions are grouped in ``blocks`` (index arrays, together each position once); with
    ``shuffle`` the block order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation``, and
    the positions of the epoch, block after block, are cut into batches of ``batch_size``. The epoch is set
    by Lightning through ``self.sampler.set_epoch``. For distributed training every replica takes every
    ``num_replicas``-th batch. :meth:`resume_at` makes the next iteration of an epoch start at a given
    batch (a run resumed in the middle of an epoch); :attr:`position` is the epoch and first batch of the
    iteration under way. :meth:`per_sample` gives blocks of one position (an ordinary shuffle).
    """

    def __init__(
        self,
        blocks: Sequence[np.ndarray],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.rank, self.num_replicas = int(rank), int(num_replicas)
        self.epoch = 0
        self.position: tuple[int, int] | None = None  # (epoch, first batch) of the iteration under way
        self._resume: tuple[int, int] | None = None
        self.sampler = _EpochForwarder(self)
        self._blocks = list(blocks)

    @classmethod
    def per_sample(cls, length: int, batch_size: int, **kwargs: Any) -> EpochBatchSampler:
        """A sampler over positions ``0 .. length - 1`` shuffled one by one (blocks of one position)."""
        return cls(list(np.arange(int(length))[:, None]), batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batch: int) -> None:
        """Start the next iteration at batch ``batch`` of epoch ``epoch`` if that is the epoch then set
        (the batches before it were trained before the run stopped); other epochs start at batch 0."""
        self._resume = (int(epoch), int(batch))

    @property
    def pending_resume(self) -> tuple[int, int] | None:
        """The (epoch, batch) given to :meth:`resume_at` that no iteration has used yet."""
        return self._resume

    def _batches(self, epoch: int | None = None) -> list[np.ndarray]:
        order = np.arange(len(self._blocks))
        if self.shuffle:
            epoch = self.epoch if epoch is None else epoch
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        positions = np.concatenate([self._blocks[i] for i in order]) if order.size else np.empty(0, int)
        batches = [positions[i : i + self.batch_size] for i in range(0, positions.size, self.batch_size)]
        if self.drop_last and batches and batches[-1].size < self.batch_size:
            batches.pop()
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                start = self._resume[1]
            self._resume = None
        self.position = (epoch, start)
        for batch in self._batches(epoch)[start:]:
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._batches())


class ChunkBatchSampler(EpochBatchSampler):
    """Batches made of whole blocks of consecutive samples, shuffled per epoch (chunk-aligned reads).

    Yields *positions* into a :class:`ShardDataset` whose ``indices`` are sorted. Blocks are
    ``block_size`` consecutive samples of one shard (default: a quarter of the batch, at most the shards'
    HDF5 chunk, so that every batch mixes several blocks); order, distribution over replicas and resume
    are those of :class:`EpochBatchSampler`.

    ``repeats`` (one integer >= 1 per position, optional): an epoch holds position ``i`` ``repeats[i]``
    times (oversampling). The extra copies form further blocks of the positions repeated, in index order,
    shuffled with the rest; each copy gets its own augmentation draws.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int,
        block_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
        repeats: np.ndarray | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if np.any(np.diff(dataset.indices) < 0):
            raise ValueError("ChunkBatchSampler needs a dataset with sorted indices")
        block = int(block_size or max(1, min(dataset.shards.chunk, int(batch_size) // 4)))
        shard, local = dataset.shards.locate(dataset.indices)
        # a new block starts at each shard change, at each gap, and every `block` samples
        key = shard * (len(dataset.shards) + 1) + local // block
        starts = np.flatnonzero(np.concatenate([[True], np.diff(key) != 0]))
        blocks = np.split(np.arange(dataset.indices.size), starts[1:])
        if repeats is not None:
            repeats = np.asarray(repeats)
            if repeats.shape != dataset.indices.shape or np.any(repeats < 1):
                raise ValueError(
                    f"repeats must hold one integer >= 1 per sample ({dataset.indices.size}), got shape "
                    f"{repeats.shape} with minimum {repeats.min() if repeats.size else None}"
                )
            for copy in range(1, int(repeats.max()) if repeats.size else 1):
                extra = np.flatnonzero(repeats > copy)
                blocks += [extra[i : i + block] for i in range(0, extra.size, block)]
        super().__init__(blocks, batch_size, shuffle, drop_last, seed, rank, num_replicas)


def _worker_message(err: BaseException) -> str:
    """The one-line message of a :class:`DataError` raised in a DataLoader worker process (PyTorch
    re-raises it in the main process with the worker's whole traceback as its message)."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    name = type(err).__name__
    for line in reversed(text.strip().splitlines()):
        head, sep, message = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name:
            return message.strip()
    return text.strip().splitlines()[-1]


class _CountingIterator:
    """Iterates a :class:`ResumableDataLoader`, counting the batches handed out.

    The loader's own iterator (and with it the worker processes and their prefetching) is only created
    at the first ``next``: Lightning creates the training iterator before it sets the sampler's epoch,
    so an eagerly prefetching iterator would read the previous (or the first) epoch's batch order.
    """

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader, self.consumed = loader, 0
        self._iterator: Iterator[Any] | None = None

    @property
    def started(self) -> bool:
        return self._iterator is not None

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = DataLoader.__iter__(self.loader)
        try:
            batch = next(self._iterator)
        except DataError as err:  # one line naming shard and sample, also from a worker process
            raise type(err)(_worker_message(err)) from None
        self.consumed += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochBatchSampler` (e.g. a :class:`ChunkBatchSampler`) whose position
    travels in Lightning checkpoints.

    Lightning saves ``state_dict()`` (epoch and the number of batches of it already trained) with the
    fit loop and hands it back through ``load_state_dict`` before it iterates again, so a run resumed
    from a checkpoint written in the middle of an epoch continues with that epoch's next batch; one
    written at the end of an epoch starts the next epoch at its first batch. Read errors are re-raised
    as one line (see :class:`DataError`).
    """

    def __iter__(self) -> Iterator[Any]:
        self._counting = _CountingIterator(self)
        return self._counting

    def _sampler(self) -> EpochBatchSampler:
        sampler = self.batch_sampler
        if not isinstance(sampler, EpochBatchSampler):
            raise TypeError(f"ResumableDataLoader needs an EpochBatchSampler, got {type(sampler).__name__}")
        return sampler

    def state_dict(self) -> dict[str, int]:
        sampler = self._sampler()
        counting = getattr(self, "_counting", None)
        if counting is None or not counting.started or sampler.position is None:
            epoch, batch = sampler.pending_resume or (sampler.epoch, 0)
            return {"epoch": epoch, "batches": batch}
        epoch, start = sampler.position
        return {"epoch": epoch, "batches": start + counting.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._sampler().resume_at(int(state["epoch"]), int(state["batches"]))
