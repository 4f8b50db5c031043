"""The ``deepstem.4dstem/1`` writer (file contract 3), below datagen and evaluation, which both write scans.

Simulated scans (:mod:`datagen.scan4d`), benchmarks and tests write with :func:`save_4dstem`;
:mod:`evaluation.io` reads these files (and foreign formats) and re-exports the writer. Units: eV, mrad,
Angstrom, 1/Angstrom; arrays ``[Rx, Ry, Kx, Ky]``. The provenance attributes, the atomic write and the
schema check come from :mod:`datagen.store`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datagen import store

__all__ = ["ScanError", "save_4dstem"]


class ScanError(ValueError):
    """A scan cannot be read or is not usable; the message is one line naming the file."""


def _pair(value: Any, name: str, where: str) -> tuple[float, float]:
    array = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    if array.size == 1:
        array = np.repeat(array, 2)
    if array.size != 2 or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ScanError(f"{where}: {name} must be a positive number or pair, got {value!r}")
    return float(array[0]), float(array[1])


def _positive(value: Any, name: str, where: str) -> float:
    try:
        number = float(np.asarray(value).ravel()[0])
    except (TypeError, ValueError, IndexError):
        raise ScanError(f"{where}: {name} must be a number, got {value!r}") from None
    if not (np.isfinite(number) and number > 0):
        raise ScanError(f"{where}: {name} must be positive, got {value!r}")
    return number


def save_4dstem(
    path: str | os.PathLike,
    data: Any,
    *,
    energy_eV: float,
    semiangle_mrad: float,
    scan_step_A: float | Sequence[float],
    k_pixel_invA: float | Sequence[float],
    scan_rotation_deg: float = 0.0,
    scan_transpose: bool = False,
    Cs_A: float | None = None,
    defocus_A: float | None = None,
    probe: np.ndarray | None = None,
    truth_phase: np.ndarray | None = None,
    truth_pixel_size_A: float | Sequence[float] | None = None,
    truth_origin_A: Sequence[float] = (0.0, 0.0),
    config: Any = None,
    overwrite: bool = False,
    compression: str | None = None,
) -> Path:
    """Write a ``deepstem.4dstem/1`` file (atomically: it appears only when complete).

    ``data`` ``(Rx, Ry, Kx, Ky)`` (float32 or integer counts; any array-like, copied in blocks of scan
    rows) is chunked one scan row block of patterns at a time, so readers can stream it.
    """
    path = Path(path)
    where = str(path)
    shape = tuple(int(n) for n in getattr(data, "shape", np.shape(data)))
    if len(shape) != 4:
        raise ScanError(f"{where}: data must be 4D (Rx, Ry, Kx, Ky), got shape {shape}")
    attrs: dict[str, Any] = {
        "energy_eV": _positive(energy_eV, "energy_eV", where),
        "semiangle_mrad": _positive(semiangle_mrad, "semiangle_mrad", where),
        "scan_step_A": np.array(_pair(scan_step_A, "scan_step_A", where)),
        "k_pixel_invA": np.array(_pair(k_pixel_invA, "k_pixel_invA", where)),
        "scan_rotation_deg": float(scan_rotation_deg),
        "scan_transpose": bool(scan_transpose),
    }
    if Cs_A is not None:
        attrs["Cs_A"] = float(Cs_A)
    if defocus_A is not None:
        attrs["defocus_A"] = float(defocus_A)
    dtype = np.dtype(getattr(data, "dtype", np.float32))
    if dtype.kind not in "iu":
        dtype = np.dtype(np.float32)
    chunk_rows = max(1, min(shape[1], int(2**22 // max(1, shape[2] * shape[3] * dtype.itemsize))))
    with store.create(path, store.SCAN4D, config=config, attrs=attrs, overwrite=overwrite) as handle:
        dataset = handle.create_dataset(
            "data",
            shape=shape,
            dtype=dtype,
            chunks=(1, chunk_rows, shape[2], shape[3]),
            compression=compression,
        )
        for start in range(0, shape[0], 16):
            dataset[start : start + 16] = np.asarray(data[start : start + 16], dtype=dtype)
        if probe is not None:
            handle.create_dataset("probe", data=np.asarray(probe))
        if truth_phase is not None:
            if truth_pixel_size_A is None:
                raise ScanError(f"{where}: truth_phase needs truth_pixel_size_A")
            truth = handle.create_group("truth")
            truth.create_dataset("phase", data=np.asarray(truth_phase, dtype=np.float32))
            truth.attrs["pixel_size_A"] = np.array(_pair(truth_pixel_size_A, "truth_pixel_size_A", where))
            truth.attrs["origin_A"] = np.asarray(truth_origin_A, dtype=np.float64)
    return path
