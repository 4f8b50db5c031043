"""Kernel shards on disk: names, index ranges, crash-safe resume, and a dataset index over all shards.

* Shard ``i`` of ``n`` is ``shard-0000i-of-0000n.h5`` (schema ``deepstem.kernel/1``) and holds the
  global sample indices ``range(i * total // n, (i + 1) * total // n)``: disjoint, covering, and
  independent of which job computes them (a sample depends only on ``(seed, index)``).
* While a shard is being computed its finished samples go, a chunk at a time, into the hidden folder
  ``.shard-0000i-of-0000n.partial/``: every chunk is one ``.npz`` written under a temporary name and
  renamed, so a killed job leaves only whole chunks. A rerun reads them, computes only the missing
  indices, and assembles the shard (written by :func:`datagen.store.create`, i.e. renamed into place
  only when whole); the partial folder is removed afterwards. A finished shard is skipped.
* :func:`write_index` writes ``index.json`` (shards, counts, index ranges) and ``kernel.vds.h5``, an
  HDF5 virtual dataset that reads all shards as one file (``h5py.File(out_dir / "kernel.vds.h5")``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from datagen import store

__all__ = [
    "INDEX_NAME",
    "NUMERIC_FIELDS",
    "STRING_FIELDS",
    "VDS_NAME",
    "PartialShard",
    "assemble_shard",
    "read_index",
    "shard_name",
    "shard_range",
    "write_index",
]

INDEX_NAME = "index.json"
VDS_NAME = "kernel.vds.h5"
STRING_FIELDS = ("source_id", "formula")
NUMERIC_FIELDS = (
    "cbed",
    "wave",
    "probe",
    "energy_eV",
    "semiangle_mrad",
    "gmax_invA",
    "step_A",
    "Cs_A",
    "defocus_A",
    "thickness_A",
    "rotation_deg",
    "zone_axis",
    "num_phonons",
    "seed",
    "sample_index",
)
_DTYPES = {
    "cbed": np.float32,
    "wave": np.complex64,
    "probe": np.complex64,
    "zone_axis": np.int32,
    "num_phonons": np.int32,
    "seed": np.int64,
    "sample_index": np.int64,
}


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


def _atomic_savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
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


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _stack(records: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name in NUMERIC_FIELDS:
        arrays[name] = np.stack([np.asarray(r[name]) for r in records]).astype(_DTYPES.get(name, np.float64))
    for name in STRING_FIELDS:
        arrays[name] = np.array([str(r[name]) for r in records], dtype=str)
    return arrays


class PartialShard:
    """The checkpoint folder of one shard being computed (see the module docstring).

    ``fingerprint`` is the YAML text of everything that determines the samples (seed, sizes,
    simulation and source config); resuming with a different one is refused.
    """

    def __init__(
        self, out_dir: str | os.PathLike, shard_index: int, num_shards: int, fingerprint: str
    ) -> None:
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
        _atomic_write_text(marker, self.fingerprint)

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
        _atomic_savez(path, _stack(records))
        return path

    def load(self) -> dict[str, np.ndarray]:
        """All checkpointed samples, sorted by sample index (duplicates are an error)."""
        parts = []
        for chunk in self.chunks():
            with np.load(chunk) as data:
                parts.append({name: data[name] for name in (*NUMERIC_FIELDS, *STRING_FIELDS)})
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

    Samples outside ``expected`` are an error (a checkpoint from another sharding).
    """
    data = partial.load()
    indices = data.get("sample_index", np.zeros(0, dtype=np.int64))
    stray = set(indices.tolist()) - set(expected)
    if stray:
        raise RuntimeError(
            f"{partial.folder}: checkpoint holds samples outside this shard: {sorted(stray)[:5]}"
        )
    if not data:
        data = {name: np.zeros((0,), dtype=_DTYPES.get(name, np.float64)) for name in NUMERIC_FIELDS}
        data.update({name: np.zeros((0,), dtype=str) for name in STRING_FIELDS})
    datasets = {name: data[name] for name in (*NUMERIC_FIELDS, *STRING_FIELDS)}
    store.write(partial.final, store.KERNEL, datasets, attrs=attrs, config=config, overwrite=overwrite)
    partial.remove()
    return partial.final, int(indices.size)


def write_index(out_dir: str | os.PathLike) -> Path:
    """Write ``index.json`` and the virtual dataset ``kernel.vds.h5`` over every finished shard.

    Safe to call from every job at its end (the files are replaced atomically; the last call sees all
    shards finished so far). Returns the path of ``index.json``.
    """
    out_dir = Path(out_dir)
    # jobs finishing together may each miss the other's shard: rewrite until the listing is stable
    for _ in range(5):
        before = sorted(p.name for p in out_dir.glob("shard-*-of-*.h5"))
        path = _write_index_once(out_dir)
        if sorted(p.name for p in out_dir.glob("shard-*-of-*.h5")) == before:
            break
    return path


def _write_index_once(out_dir: Path) -> Path:
    entries = []
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    for path in sorted(out_dir.glob("shard-*-of-*.h5")):
        with store.open_checked(path, store.KERNEL) as handle:
            n = int(handle["cbed"].shape[0])
            indices = handle["sample_index"][()] if "sample_index" in handle else np.zeros(0, np.int64)
            entry = {
                "file": path.name,
                "num_samples": n,
                "first_index": int(indices.min()) if n else None,
                "last_index": int(indices.max()) if n else None,
                "failed_indices": json.loads(handle.attrs.get("failed_indices", "[]")),
            }
            for name in (*NUMERIC_FIELDS, *STRING_FIELDS):
                if name in handle and n:
                    shapes[name] = (handle[name].shape[1:], handle[name].dtype)
        entries.append(entry)
    index = {
        "schema": store.KERNEL.id,
        "num_samples": sum(e["num_samples"] for e in entries),
        "shards": entries,
        "virtual_dataset": VDS_NAME,
    }
    path = out_dir / INDEX_NAME
    _atomic_write_text(path, json.dumps(index, indent=1) + "\n")
    _write_vds(out_dir, entries, shapes)
    return path


def _write_vds(out_dir: Path, entries: list[dict], shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> None:
    total = sum(e["num_samples"] for e in entries)
    final = out_dir / VDS_NAME
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with h5py.File(temporary, "w", libver="latest") as handle:
            handle.attrs["schema"] = store.KERNEL.id
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
