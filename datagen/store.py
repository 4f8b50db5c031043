"""The HDF5 store: schemas of deepstem's files, atomic writes and checked reads.

Every file carries the attributes ``schema`` (``name/version``), ``created`` (UTC, ISO 8601),
``deepstem_version`` and ``config`` (the resolved run config as YAML, secrets redacted). Files are written
under a hidden temporary name in the target folder and renamed when complete, so a file under its final
name is always whole; readers check the schema and the required datasets and attributes, and every error
is one :class:`StoreError` whose message starts with the file's path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from datagen.provenance import config_yaml, package_version

__all__ = [
    "IMAGE",
    "KERNEL",
    "RECON",
    "RESTORED",
    "SCAN4D",
    "SCHEMAS",
    "STOCK",
    "Schema",
    "StoreError",
    "create",
    "open_checked",
    "read_config",
    "write",
]


class StoreError(Exception):
    """A deepstem file is missing, unreadable, or does not follow its schema."""


@dataclass(frozen=True)
class Schema:
    """Name, version and the required content of one kind of file."""

    name: str
    version: int
    datasets: tuple[str, ...]
    attrs: tuple[str, ...] = ()
    per_sample: tuple[str, ...] = field(default=())
    """Datasets whose first axis counts samples: they must all have the same length."""

    @property
    def id(self) -> str:
        return f"{self.name}/{self.version}"


KERNEL_METADATA = (
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
    "source_id",
    "formula",
)
KERNEL = Schema(
    "deepstem.kernel",
    1,
    datasets=("cbed", "wave", "probe", *KERNEL_METADATA),
    per_sample=("cbed", "wave", "probe", *KERNEL_METADATA),
)
IMAGE = Schema("deepstem.image", 1, datasets=("image", "pixel_size_A"), per_sample=("image", "pixel_size_A"))
SCAN4D = Schema(
    "deepstem.4dstem",
    1,
    datasets=("data",),
    attrs=("energy_eV", "semiangle_mrad", "scan_step_A", "k_pixel_invA", "scan_rotation_deg"),
)
STOCK_PER_SAMPLE = ("diffraction", "phase", "mask", "aberrations", "seed", "sample_index")
STOCK = Schema(
    "deepstem.stock_images",
    1,
    datasets=STOCK_PER_SAMPLE,
    attrs=("energy_eV", "semiangle_mrad", "pixel_size_A", "k_detector_invA", "aberration_keys"),
    per_sample=STOCK_PER_SAMPLE,
)
"""Chang U-Net samples (datagen.stock_images): noise-free ``diffraction`` (fraction of the incident
electrons per detector pixel, zero frequency at pixel n // 2), label ``phase`` (rad) and ``mask`` on the
label window of ``pixel_size_A``, ``aberrations`` in the order of the ``aberration_keys`` attribute
(Angstrom, rad); the detector spans ``-k_detector_invA .. +k_detector_invA``."""
RECON = Schema("deepstem.recon", 1, datasets=("phase",), attrs=("pixel_size_A", "origin_A", "method"))
RESTORED = Schema("deepstem.restored", 1, datasets=("image",), attrs=("pixel_size_A", "method", "checkpoint"))
"""A restored 2D image (``python reconstruct.py method=cgrdn``, :mod:`evaluation.restore`): ``image``
(rows, columns) float32 in the input's intensity units, ``pixel_size_A`` (Angstrom along rows, columns),
``method`` and ``checkpoint`` (file name of the model)."""
SCHEMAS: dict[str, Schema] = {s.id: s for s in (KERNEL, IMAGE, SCAN4D, RECON, RESTORED, STOCK)}


def _schema(schema: Schema | str) -> Schema:
    if isinstance(schema, Schema):
        return schema
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; known: {', '.join(SCHEMAS)}")
    return SCHEMAS[schema]


def _temporary_path(path: Path) -> Path:
    # hidden and without the .h5 suffix, so globs for finished files never see it
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def create(
    path: str | os.PathLike,
    schema: Schema | str,
    config: Any = None,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Iterator[h5py.File]:
    """Open a new file for writing; it appears under ``path`` only if the ``with`` block completes.

    The provenance attributes are written first; on an exception the temporary file is deleted and an
    existing file at ``path`` is left untouched. The required content is verified before the rename.
    """
    path = Path(path)
    spec = _schema(schema)
    if path.exists() and not overwrite:
        raise StoreError(f"{path}: file exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        with h5py.File(temporary, "w") as handle:
            handle.attrs["schema"] = spec.id
            handle.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            handle.attrs["deepstem_version"] = package_version()
            handle.attrs["config"] = config_yaml(config)
            for key, value in (attrs or {}).items():
                handle.attrs[key] = value
            yield handle
            _verify(handle, spec, path)
            _check_flux(handle, spec, path)
        _fsync(temporary)  # the data reaches the disk before the name does
        os.replace(temporary, path)
        _fsync(path.parent)
    finally:
        if temporary.exists():
            temporary.unlink()


def _fsync(path: Path) -> None:
    """Flush a file (or a folder, after a rename in it) to the disk; folders that refuse are skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def write(
    path: str | os.PathLike,
    schema: Schema | str,
    datasets: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
    config: Any = None,
    overwrite: bool = False,
    compression: str | None = None,
) -> Path:
    """Write a whole file in one call (see :func:`create`); strings become variable-length UTF-8."""
    with create(path, schema, config=config, attrs=attrs, overwrite=overwrite) as handle:
        for name, value in datasets.items():
            array = np.asarray(value)
            if array.dtype.kind in "UO":
                handle.create_dataset(name, data=array.astype(object), dtype=h5py.string_dtype())
            else:
                handle.create_dataset(name, data=array, compression=compression if array.ndim > 0 else None)
    return Path(path)


def _verify(handle: h5py.File, spec: Schema, path: Path) -> None:
    missing = [name for name in spec.datasets if not isinstance(handle.get(name), h5py.Dataset)]
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise StoreError(f"{path}: missing dataset(s) {names} required by schema {spec.id}")
    missing_attrs = [name for name in spec.attrs if name not in handle.attrs]
    if missing_attrs:
        names = ", ".join(repr(m) for m in missing_attrs)
        raise StoreError(f"{path}: missing attribute(s) {names} required by schema {spec.id}")
    lengths = {name: handle[name].shape[0] if handle[name].ndim else None for name in spec.per_sample}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}: {n}" for name, n in lengths.items())
        raise StoreError(f"{path}: per-sample datasets disagree on the number of samples ({detail})")


FLUX_TOLERANCE = 1e-5
"""How far (float32 rounding) a stored CBED's total may exceed the incident electrons (1)."""


def _check_flux(handle: h5py.File, spec: Schema, path: Path) -> None:
    """A kernel shard's CBEDs are fractions of the incident electrons: none may sum to more than 1."""
    if spec.id != KERNEL.id or "cbed" not in handle:
        return
    cbed = handle["cbed"]
    for start in range(0, cbed.shape[0], 256):
        totals = np.asarray(cbed[start : start + 256], dtype=np.float64).sum(axis=(-2, -1))
        over = np.argwhere(totals > 1.0 + FLUX_TOLERANCE)
        if len(over):
            i, n = int(over[0][0]) + start, int(over[0][1])
            index = int(handle["sample_index"][i]) if "sample_index" in handle else i
            names = [
                str(v.decode() if isinstance(v, bytes) else v)
                for key in ("formula", "source_id")
                if key in handle
                for v in [handle[key][i]]
            ]
            raise StoreError(
                f"{path}: sample {index} ({', '.join(names) or 'no source'}): CBED {n} sums to "
                f"{totals[i - start, n]:.6f} of the incident electrons (more than the beam, tolerance "
                f"{FLUX_TOLERANCE:g})"
            )


@contextmanager
def open_checked(path: str | os.PathLike, schema: Schema | str) -> Iterator[h5py.File]:
    """Open a deepstem file read-only after checking that it is whole and follows ``schema``."""
    path = Path(path)
    spec = _schema(schema)
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        reason = (
            "truncated" if "truncated" in str(err) else "not a readable HDF5 file (truncated or corrupt?)"
        )
        raise StoreError(f"{path}: {reason}: {err}") from None
    try:
        found = handle.attrs.get("schema")
        if found is None:
            raise StoreError(f"{path}: no 'schema' attribute, not a deepstem file (expected {spec.id})")
        found = found.decode() if isinstance(found, bytes) else str(found)
        if found != spec.id:
            name, _, version = found.partition("/")
            if name == spec.name and version.isdigit() and int(version) > spec.version:
                hint = "; it was written by a newer deepstem, upgrade to read it"
            else:
                hint = ""
            raise StoreError(f"{path}: schema is {found!r}, expected {spec.id!r}{hint}")
        _verify(handle, spec, path)
        yield handle
    finally:
        handle.close()


def read_config(path: str | os.PathLike) -> str:
    """The resolved config (YAML text) stored in any deepstem file."""
    try:
        with h5py.File(path, "r") as handle:
            value = handle.attrs.get("config", "")
    except OSError as err:
        raise StoreError(f"{path}: not a readable HDF5 file: {err}") from None
    return value.decode() if isinstance(value, bytes) else str(value)
