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
  (``h5py.File(out_dir / "kernel.vds.h5")``). A shard it cannot read is listed under ``unreadable``.
* One job owns a shard: :class:`ShardLock` (``.shard-0000i-of-0000n.lock``, JSON with host, pid, start
  time and a token; its mtime is a heartbeat refreshed while the job runs). A second job stops with a
  one-line :class:`ShardLockError`; a lock whose pid is dead on this host, or whose heartbeat is older than
  ``stale_s`` (another host), is taken over. Checkpoints that two jobs both wrote for the same samples are
  merged when identical; the owner removes the temporaries a killed job left
  (:func:`remove_stale_temporaries`).

The same machinery serves every sharded simulation: a :class:`ShardLayout` names a shard's schema, its
per-sample fields and their dtypes (:data:`KERNEL_LAYOUT` here; the image and stock-image layouts live
next to their runners), and :class:`PartialShard`, :func:`assemble_shard` and :func:`write_index` take it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
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
    "ExistingShard",
    "PartialShard",
    "ShardLayout",
    "ShardLock",
    "ShardLockError",
    "assemble_shard",
    "atomic_savez",
    "atomic_write_text",
    "fingerprint_differences",
    "inspect_shard",
    "read_index",
    "remove_stale_temporaries",
    "shard_name",
    "shard_range",
    "write_index",
]

log = logging.getLogger("deepstem.datagen")

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
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


class ShardLockError(Exception):
    """Another live job owns the shard (one line: who, since when, and the way out)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


class ShardLock:
    """The lock file of one shard: ``out_dir/.shard-0000i-of-0000n.lock`` (see the module docstring).

    ``acquire()`` creates it atomically (hard link of a whole temporary file, so a reader never sees it
    half-written) or takes over a stale one; ``release()`` removes it if it is still this job's. Used as
    a context manager it also refreshes the heartbeat every ``stale_s / 4`` s (at most 60 s) from a
    daemon thread. ``verify()`` raises :class:`ShardLockError` when another job has taken the lock.
    """

    def __init__(
        self, out_dir: str | os.PathLike, shard_index: int, num_shards: int, stale_s: float = 900.0
    ) -> None:
        self.out_dir = Path(out_dir)
        self.shard = shard_name(shard_index, num_shards)
        self.path = self.out_dir / f".{Path(self.shard).stem}.lock"
        self.stale_s = float(stale_s)
        self.host = socket.gethostname()
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self, path: Path | None = None) -> tuple[dict | None, float] | None:
        """``(owner, seconds since the last heartbeat)``; owner None if unreadable; None if no lock."""
        path = path or self.path
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:  # no lock (or no folder: creating it reports the real problem)
            return None
        try:
            owner = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None, age
        return (owner if isinstance(owner, dict) else None), age

    def _stale(self, owner: dict | None, age: float) -> bool:
        if owner and owner.get("host") == self.host and isinstance(owner.get("pid"), int):
            return not _pid_alive(owner["pid"])
        return age > self.stale_s

    def _refusal(self, owner: dict | None, age: float) -> ShardLockError:
        who = (
            f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('started')})"
            if owner
            else "an unreadable lock"
        )
        return ShardLockError(
            f"{self.out_dir / self.shard} is being computed by {who}, last heartbeat {age:.0f} s ago "
            f"(lock {self.path}); this job stops. Wait for that job; if it is dead on another host, "
            f"delete the lock or wait until it is older than lock_stale_s={self.stale_s:g}"
        )

    def check(self) -> None:
        """Raise :class:`ShardLockError` if a live job (not this one) holds the lock; writes nothing."""
        found = self._read()
        if found is None:
            return
        owner, age = found
        if self.token is not None and owner and owner.get("token") == self.token:
            return
        if not self._stale(owner, age):
            raise self._refusal(owner, age)

    def acquire(self) -> None:
        """Take the lock (creating ``out_dir``), or raise :class:`ShardLockError` naming its live owner."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        owner = {
            "host": self.host,
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": token,
        }
        for _ in range(10):
            if self._create(json.dumps(owner)):
                self.token = token
                return
            found = self._read()
            if found is None:
                continue  # released meanwhile: try again
            current, age = found
            if not self._stale(current, age):
                raise self._refusal(current, age)
            self._take_over(current)
        raise ShardLockError(f"{self.path}: could not take the lock (other jobs keep taking it); retry later")

    def _create(self, text: str) -> bool:
        temporary = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(temporary, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, self.path)  # atomic and exclusive, also over NFS
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system: exclusive create instead
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
            return True
        finally:
            temporary.unlink(missing_ok=True)

    def _take_over(self, stale: dict | None) -> None:
        """Move the stale lock aside; put it back if it changed since it was judged stale."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        moved_owner = moved[0] if moved else None
        if (moved_owner or {}).get("token") != (stale or {}).get("token"):
            try:  # a fresh lock arrived in between: it is not ours to remove
                os.link(aside, self.path)
            except OSError:
                pass
        else:
            who = f"pid {stale.get('pid')} on {stale.get('host')}" if stale else "an unreadable lock"
            log.warning("%s: took over the stale lock of %s", self.shard, who)
        aside.unlink(missing_ok=True)

    def owned(self) -> bool:
        """Whether the lock on disk is this job's."""
        found = self._read()
        return bool(self.token and found and found[0] and found[0].get("token") == self.token)

    def verify(self) -> None:
        """Raise :class:`ShardLockError` unless the lock on disk is still this job's."""
        found = self._read()
        owner = found[0] if found else None
        if self.token is None or not owner or owner.get("token") != self.token:
            holder = f"now pid {owner.get('pid')} on {owner.get('host')}" if owner else "the lock is gone"
            raise ShardLockError(
                f"{self.path}: this job lost the lock of {self.shard} ({holder}); "
                "it stops without writing the shard, rerun it when the other job has finished"
            )

    def refresh(self) -> None:
        """Heartbeat: set the lock's mtime to now (if it is still this job's)."""
        if self.owned():
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.owned():
            self.path.unlink(missing_ok=True)
        self.token = None

    def _beat(self) -> None:
        interval = max(0.5, min(60.0, self.stale_s / 4))
        while not self._stop.wait(interval):
            self.refresh()

    def __enter__(self) -> ShardLock:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock {self.shard}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temporaries(out_dir: str | os.PathLike, shard: str, stale_s: float) -> list[Path]:
    """Remove what killed jobs left: the shard's hidden ``.<shard>.tmp-*`` files and the chunk temporaries
    of its partial folder (call with its lock held: no live job writes them then), and ``index.json`` /
    virtual-dataset temporaries older than ``stale_s`` (any job may be writing a fresh one). Returns the
    removed paths."""
    out_dir = Path(out_dir)
    removed: list[Path] = []
    candidates = [(p, 0.0) for p in out_dir.glob(f".{shard}.tmp-*")]
    candidates += [(p, 0.0) for p in (out_dir / f".{Path(shard).stem}.partial").glob(".*.tmp-*")]
    for pattern in (f".{INDEX_NAME}.tmp-*", ".*.vds.h5.tmp-*"):
        candidates += [(p, stale_s) for p in out_dir.glob(pattern)]
    now = time.time()
    for path, min_age in candidates:
        try:
            if min_age and now - path.stat().st_mtime <= min_age:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
        log.info("removed %s (left by a killed job)", path)
    return removed


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def fingerprint_differences(stored: Any, current: Any, limit: int = 4) -> str:
    """The dotted keys in which two fingerprints (YAML text or mappings) differ, as one short phrase
    (``"simulation.num_samples: 0 stored, 128 now"``); empty when they agree."""
    import yaml

    def parsed(value: Any) -> dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        return _flatten(value if isinstance(value, Mapping) else {"": value})

    old, new = parsed(stored), parsed(current)
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<missing>") != new.get(k, "<missing>"))
    if "num_samples" in keys and "simulation.num_samples" in keys:
        keys.remove("num_samples")  # the fingerprint repeats it at the top

    def shown(value: Any) -> str:
        text = " ".join(str(value).split())
        return text if len(text) <= 40 else text[:37] + "..."

    missing = "<missing>"
    parts = [f"{k}: {shown(old.get(k, missing))} stored, {shown(new.get(k, missing))} now" for k in keys]
    if len(parts) > limit:
        parts = [*parts[:limit], f"and {len(parts) - limit} more"]
    return "; ".join(parts)


@dataclass(frozen=True)
class ExistingShard:
    """What :func:`inspect_shard` found under a shard's final name."""

    whole: bool
    """A readable shard of the schema holding exactly the expected samples (less its failed ones)."""
    reason: str = ""
    """Why it is not whole (truncated, unreadable, samples missing)."""
    differences: str = ""
    """:func:`fingerprint_differences` to the current configuration (empty: the same)."""


def inspect_shard(
    final: Path,
    layout: ShardLayout,
    fingerprint: str,
    expected: Iterable[int],
    fingerprint_of_config: Any = None,
) -> ExistingShard:
    """Verify a finished shard before trusting it: schema, fingerprint, every dataset readable to its
    end, and the sample indices. ``fingerprint_of_config(config_dict)`` derives the fingerprint of a
    shard written before shards stored theirs (from its ``config`` attribute)."""
    import yaml

    try:
        with store.open_checked(final, layout.schema) as handle:
            stored = handle.attrs.get("fingerprint")
            if stored is None and fingerprint_of_config is not None:
                config = handle.attrs.get("config", "")
                config = config.decode() if isinstance(config, bytes) else str(config)
                stored = fingerprint_of_config(yaml.safe_load(config) or {})
            if stored is not None:
                stored = stored.decode() if isinstance(stored, bytes) else str(stored)
                differences = fingerprint_differences(stored, fingerprint)
                if differences:
                    return ExistingShard(False, "made with another configuration", differences)
            for name in handle:
                item = handle[name]
                if isinstance(item, h5py.Dataset) and item.ndim and item.shape[0]:
                    item[-1]  # reads the last chunk: a file cut short fails here
            indices = handle["sample_index"][()] if "sample_index" in handle else None
            failed = set(json.loads(handle.attrs.get("failed_indices", "[]")))
    except (store.StoreError, OSError, ValueError) as err:
        return ExistingShard(False, " ".join(str(err).split()))
    if indices is not None and sorted(indices.tolist()) != sorted(set(expected) - failed):
        return ExistingShard(False, "its samples are not those of this shard")
    return ExistingShard(True)


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
            differing = fingerprint_differences(marker.read_text(), self.fingerprint)
            if differing:
                raise ValueError(
                    f"{self.folder}: partial shard written with a different configuration "
                    f"({differing}); rerun with that configuration, or set overwrite=true to start "
                    "the shard again, or write to another out_dir"
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
        """All checkpointed samples, sorted by sample index.

        A sample checkpointed twice (two jobs on one shard) is kept once when both copies are identical;
        copies that differ raise :class:`~datagen.store.StoreError` naming the way out.
        """
        parts = []
        for chunk in self.chunks():
            with np.load(chunk) as data:
                parts.append({name: data[name] for name in self.layout.fields})
        if not parts:
            return {}
        merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        order = np.argsort(merged["sample_index"], kind="stable")
        merged = {name: value[order] for name, value in merged.items()}
        repeated = np.flatnonzero(np.diff(merged["sample_index"]) == 0) + 1
        if repeated.size:
            first = {int(merged["sample_index"][i]): i for i in range(len(order) - 1, -1, -1)}
            for i in repeated:
                index = int(merged["sample_index"][i])
                j = first[index]
                same = all(
                    np.array_equal(value[i], value[j], equal_nan=value.dtype.kind in "fc")
                    for value in merged.values()
                )
                if not same:
                    raise store.StoreError(
                        f"{self.folder}: sample {index} was checkpointed twice with different content "
                        "(two jobs on one shard); delete the folder or rerun with overwrite=true"
                    )
            keep = np.ones(len(order), dtype=bool)
            keep[repeated] = False
            merged = {name: value[keep] for name, value in merged.items()}
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
        raise store.StoreError(
            f"{partial.folder}: checkpoint holds samples outside this shard: {sorted(stray)[:5]}; "
            "delete the folder or rerun with overwrite=true"
        )
    if not data:
        data = layout.empty()
    attrs = {**attrs, "fingerprint": partial.fingerprint}
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


def _index_entry(path: Path, layout: ShardLayout, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
    """The ``index.json`` entry of one finished shard (adds its per-sample shapes to ``shapes``)."""
    with store.open_checked(path, layout.schema) as handle:
        n = int(handle[layout.count_field].shape[0])
        indices = handle["sample_index"][()] if "sample_index" in handle else np.zeros(0, np.int64)
        for name in layout.fields:
            if name in handle and n:
                shapes[name] = (handle[name].shape[1:], handle[name].dtype)
        return {
            "file": path.name,
            "num_samples": n,
            "first_index": int(indices.min()) if n else None,
            "last_index": int(indices.max()) if n else None,
            "failed_indices": json.loads(handle.attrs.get("failed_indices", "[]")),
        }


def _write_index_once(out_dir: Path, layout: ShardLayout) -> Path:
    entries = []
    unreadable = []
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    for path in sorted(out_dir.glob("shard-*-of-*.h5")):
        try:
            entries.append(_index_entry(path, layout, shapes))
        except (store.StoreError, OSError) as err:  # a damaged file must not stop the other jobs
            log.warning("index: %s skipped: %s", path.name, err)
            unreadable.append({"file": path.name, "reason": " ".join(str(err).split())})
    index: dict[str, Any] = {
        "schema": layout.schema.id,
        "num_samples": sum(e["num_samples"] for e in entries),
        "shards": entries,
    }
    if unreadable:
        index["unreadable"] = unreadable
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
