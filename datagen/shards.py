"""Kernel shards on disk: names, index ranges, crash-safe resume, and a dataset index over all shards.

* Shard ``i`` of ``n`` is ``shard-0000i-of-0000n.h5`` (schema ``deepstem.kernel/1``) and holds the
  global sample indices ``range(i * total // n, (i + 1) * total // n)``: disjoint, covering, and
  independent of which job computes them (a sample depends only on ``(seed, index)``).
* While a shard is being computed its finished samples go, a chunk at a time, into the hidden folder
  ``.shard-0000i-of-0000n.partial/``: every chunk is one ``.npz`` written under a temporary name and
  renamed, so a killed job leaves only whole chunks. A rerun reads them, computes only the missing
  indices, and assembles the shard (written by :func:`datagen.store.create`, i.e. renamed into place
  only when whole); the partial folder is removed afterwards. A finished shard is skipped.
* :func:`write_index` writes ``index.json`` (shards, counts, index ranges) and, for kernel data,
  ``kernel.vds.h5``, an HDF5 virtual dataset that reads all shards as one file
  (``h5py.File(out_dir / "kernel.vds.h5")``).

The same machinery serves every sharded simulation: a :class:`ShardLayout` names a shard's schema, its
per-sample fields and their dtypes (:data:`KERNEL_LAYOUT` here; the image and stock-image layouts live
next to their runners), and :class:`PartialShard`, :func:`assemble_shard` and :func:`write_index` take it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from datagen import store

__all__ = [
    "INDEX_NAME",
    "KERNEL_LAYOUT",
    "NUMERIC_FIELDS",
    "STRING_FIELDS",
    "VDS_NAME",
    "PartialShard",
    "ShardLayout",
    "assemble_shard",
    "atomic_savez",
    "atomic_write_text",
    "read_index",
    "shard_name",
    "shard_range",
    "write_index",
]

INDEX_NAME = "index.json"
VDS_NAME = "kernel.vds.h5"
STRING_FIELDS = ("source_id", "formula")
# the kernel schema's datasets (store.KERNEL is the one list), plus the global sample index
NUMERIC_FIELDS = (*(name for name in store.KERNEL.datasets if name not in STRING_FIELDS), "sample_index")
_DTYPES = {
    "cbed": np.float32,
    "wave": np.complex64,
    "probe": np.complex64,
    "zone_axis": np.int32,
    "num_phonons": np.int32,
    "seed": np.int64,
    "sample_index": np.int64,
}


@dataclass(frozen=True)
class ShardLayout:
    """What a shard of one schema holds: the per-sample fields of its records and how they are stored.

    ``numeric`` fields are stacked along a new first axis with ``dtypes[name]`` (float64 when absent);
    ``strings`` become variable-length UTF-8. ``sample_index`` must be among ``numeric``. ``empty_shapes``
    gives the per-sample shape of fields of a shard without samples (default: scalars), ``chunked`` the
    fields stored in HDF5 chunks of up to 16 samples, and ``vds_name`` (if set) the virtual dataset
    :func:`write_index` writes over all shards.
    """

    schema: store.Schema
    numeric: tuple[str, ...]
    strings: tuple[str, ...] = ()
    dtypes: Mapping[str, Any] = field(default_factory=dict)
    empty_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    chunked: tuple[str, ...] = ()
    vds_name: str | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.numeric, *self.strings)

    @property
    def count_field(self) -> str:
        """The first per-sample dataset of the schema: its length is the shard's sample count."""
        return self.schema.per_sample[0] if self.schema.per_sample else "sample_index"

    def stack(self, records: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Records (one mapping per sample) as arrays with the first axis over the samples."""
        arrays: dict[str, np.ndarray] = {}
        for name in self.numeric:
            arrays[name] = np.stack([np.asarray(r[name]) for r in records]).astype(
                self.dtypes.get(name, np.float64)
            )
        for name in self.strings:
            arrays[name] = np.array([str(r[name]) for r in records], dtype=str)
        return arrays

    def empty(self) -> dict[str, np.ndarray]:
        """Zero-sample arrays of every field (a shard whose samples all failed)."""
        data = {
            name: np.zeros((0, *self.empty_shapes.get(name, ())), dtype=self.dtypes.get(name, np.float64))
            for name in self.numeric
        }
        data.update({name: np.zeros((0,), dtype=str) for name in self.strings})
        return data


def shard_name(shard_index: int, num_shards: int) -> str:
    """``shard-00003-of-00100.h5``."""
    return f"shard-{int(shard_index):05d}-of-{int(num_shards):05d}.h5"


def shard_range(num_samples: int, shard_index: int, num_shards: int) -> range:
    """Global sample indices of one shard (contiguous; all shards together cover ``range(num_samples)``)."""
    num_samples, shard_index, num_shards = int(num_samples), int(shard_index), int(num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in 0..{num_shards - 1}, got {shard_index}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return range(shard_index * num_samples // num_shards, (shard_index + 1) * num_samples // num_shards)


def atomic_savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` atomically: written (and fsynced) under a hidden name, then renamed."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (hidden temporary file, then rename)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


KERNEL_LAYOUT = ShardLayout(store.KERNEL, NUMERIC_FIELDS, STRING_FIELDS, dtypes=_DTYPES, vds_name=VDS_NAME)
"""Kernel shards (``deepstem.kernel/1``) and their virtual dataset ``kernel.vds.h5``."""


class PartialShard:
    """The checkpoint folder of one shard being computed (see the module docstring).

    ``fingerprint`` is the YAML text of everything that determines the samples (seed, sizes,
    simulation and source config); resuming with a different one is refused. ``layout`` names the
    records' fields (default: kernel samples).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_index: int,
        num_shards: int,
        fingerprint: str,
        layout: ShardLayout = KERNEL_LAYOUT,
    ) -> None:
        self.layout = layout
        self.out_dir = Path(out_dir)
        self.final = self.out_dir / shard_name(shard_index, num_shards)
        self.folder = self.out_dir / f".{self.final.stem}.partial"
        self.fingerprint = fingerprint

    def open(self) -> None:
        """Create the folder, or check that an existing one was written with the same fingerprint."""
        marker = self.folder / "fingerprint.yaml"
        if self.folder.is_dir() and marker.is_file():
            if marker.read_text() != self.fingerprint:
                raise ValueError(
                    f"{self.folder}: partial shard written with a different configuration; "
                    "rerun with that configuration, or delete the folder (or set overwrite=true)"
                )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, self.fingerprint)

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz"))

    def done(self) -> set[int]:
        """Global sample indices already checkpointed."""
        indices: set[int] = set()
        for chunk in self.chunks():
            with np.load(chunk) as data:
                indices.update(int(i) for i in data["sample_index"])
        return indices

    def save(self, records: list[Mapping[str, Any]]) -> Path:
        """Checkpoint finished samples (atomically: the chunk is whole or absent)."""
        if not records:
            raise ValueError("save: no records")
        first = min(int(r["sample_index"]) for r in records)
        path = self.folder / f"chunk-{first:012d}-{len(records):06d}-{uuid.uuid4().hex[:6]}.npz"
        atomic_savez(path, self.layout.stack(records))
        return path

    def load(self) -> dict[str, np.ndarray]:
        """All checkpointed samples, sorted by sample index (duplicates are an error)."""
        parts = []
        for chunk in self.chunks():
            with np.load(chunk) as data:
                parts.append({name: data[name] for name in self.layout.fields})
        if not parts:
            return {}
        merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        order = np.argsort(merged["sample_index"], kind="stable")
        merged = {name: value[order] for name, value in merged.items()}
        if np.any(np.diff(merged["sample_index"]) == 0):
            raise RuntimeError(f"{self.folder}: duplicate sample indices in the checkpoints")
        return merged

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def assemble_shard(
    partial: PartialShard,
    config: Any,
    attrs: Mapping[str, Any],
    expected: Iterable[int],
    overwrite: bool = False,
) -> tuple[Path, int]:
    """Write the final shard from the checkpoints (atomically) and remove them; returns (path, samples).

    Samples outside ``expected`` are an error (a checkpoint from another sharding). The schema and the
    fields come from ``partial.layout``.
    """
    layout = partial.layout
    data = partial.load()
    indices = data.get("sample_index", np.zeros(0, dtype=np.int64))
    stray = set(indices.tolist()) - set(expected)
    if stray:
        raise RuntimeError(
            f"{partial.folder}: checkpoint holds samples outside this shard: {sorted(stray)[:5]}"
        )
    if not data:
        data = layout.empty()
    with store.create(
        partial.final, layout.schema, config=config, attrs=attrs, overwrite=overwrite
    ) as handle:
        for name in layout.fields:
            array = np.asarray(data[name])
            if array.dtype.kind in "UO":
                handle.create_dataset(name, data=array.astype(object), dtype=h5py.string_dtype())
            elif name in layout.chunked and len(array):
                chunks = (max(1, min(16, len(array))), *array.shape[1:])
                handle.create_dataset(name, data=array, chunks=chunks)
            else:
                handle.create_dataset(name, data=array)
    partial.remove()
    return partial.final, int(indices.size)


def write_index(out_dir: str | os.PathLike, layout: ShardLayout = KERNEL_LAYOUT) -> Path:
    """Write ``index.json`` (and the layout's virtual dataset, for kernel data ``kernel.vds.h5``) over every
    finished shard of ``layout``'s schema in ``out_dir``.

    Safe to call from every job at its end (the files are replaced atomically; the last call sees all
    shards finished so far). Returns the path of ``index.json``.
    """
    out_dir = Path(out_dir)
    # jobs finishing together may each miss the other's shard: rewrite until the listing is stable
    for _ in range(5):
        before = sorted(p.name for p in out_dir.glob("shard-*-of-*.h5"))
        path = _write_index_once(out_dir, layout)
        if sorted(p.name for p in out_dir.glob("shard-*-of-*.h5")) == before:
            break
    return path


def _write_index_once(out_dir: Path, layout: ShardLayout) -> Path:
    entries = []
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    for path in sorted(out_dir.glob("shard-*-of-*.h5")):
        with store.open_checked(path, layout.schema) as handle:
            n = int(handle[layout.count_field].shape[0])
            indices = handle["sample_index"][()] if "sample_index" in handle else np.zeros(0, np.int64)
            entry = {
                "file": path.name,
                "num_samples": n,
                "first_index": int(indices.min()) if n else None,
                "last_index": int(indices.max()) if n else None,
                "failed_indices": json.loads(handle.attrs.get("failed_indices", "[]")),
            }
            for name in layout.fields:
                if name in handle and n:
                    shapes[name] = (handle[name].shape[1:], handle[name].dtype)
        entries.append(entry)
    index: dict[str, Any] = {
        "schema": layout.schema.id,
        "num_samples": sum(e["num_samples"] for e in entries),
        "shards": entries,
    }
    if layout.vds_name:
        index["virtual_dataset"] = layout.vds_name
    path = out_dir / INDEX_NAME
    atomic_write_text(path, json.dumps(index, indent=1) + "\n")
    if layout.vds_name:
        _write_vds(out_dir, entries, shapes, layout)
    return path


def _write_vds(
    out_dir: Path,
    entries: list[dict],
    shapes: Mapping[str, tuple[tuple[int, ...], Any]],
    layout: ShardLayout,
) -> None:
    total = sum(e["num_samples"] for e in entries)
    final = out_dir / str(layout.vds_name)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with h5py.File(temporary, "w", libver="latest") as handle:
            handle.attrs["schema"] = layout.schema.id
            handle.attrs["shards"] = json.dumps([e["file"] for e in entries])
            for name, (shape, dtype) in shapes.items():
                layout = h5py.VirtualLayout(shape=(total, *shape), dtype=dtype)
                offset = 0
                for entry in entries:
                    n = entry["num_samples"]
                    if n:
                        # relative file names: the folder can be moved as a whole
                        layout[offset : offset + n] = h5py.VirtualSource(
                            entry["file"], name, shape=(n, *shape)
                        )
                    offset += n
                handle.create_virtual_dataset(name, layout)
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            temporary.unlink()


def read_index(out_dir: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of a dataset folder."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset index; run `python datagen.py` (it writes one)")
    return json.loads(path.read_text())
