"""Shared pieces of the conventional references: the result type, chunked reading, detector geometry.

Conventions: scans are indexed ``[Rx, Ry, Kx, Ky]``; probe position ``(Rx, Ry)`` sits at
``(Rx * step_x, Ry * step_y)`` Angstrom in scan coordinates (first position at the origin). Detector pixel
``(Kx, Ky)`` has spatial frequency ``((Kx, Ky) - centre) * k_pixel_invA`` in the detector frame; a detector
vector ``v_det`` (after the optional transpose, which swaps its components) is the scan-frame vector
``R(scan_rotation_deg) v_det`` with ``R`` the counter-clockwise rotation from +x towards +y.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "InsufficientMemoryError",
    "Reconstruction",
    "available_memory_bytes",
    "check_memory",
    "check_scan_array",
    "detector_frequencies",
    "iter_scan_rows",
    "mean_pattern",
    "memory_limit_bytes",
    "pair",
    "rotate_vectors",
    "smooth_periodic_extension",
]


@dataclass
class Reconstruction:
    """A reconstructed image with its placement in scan coordinates.

    ``phase`` (rad, or arbitrary units for virtual detectors) is indexed ``[x, y]``; pixel ``(i, j)`` sits at
    ``origin_A + (i, j) * pixel_size_A`` in scan coordinates.

    ``consistency`` (network methods, float32 ``(Rx, Ry)`` over the effective scan positions, or None):
    the forward-model consistency of each position's prediction with its CBED, a normalised Poisson
    deviance (~1 = explained to within shot noise for electron counts;
    :mod:`evaluation.networks.consistency`).
    """

    phase: np.ndarray
    pixel_size_A: tuple[float, float]
    origin_A: tuple[float, float]
    method: str
    amplitude: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    consistency: np.ndarray | None = None


class InsufficientMemoryError(ValueError):
    """A reconstruction would need more memory than it may use; raised before the large allocation."""


def available_memory_bytes() -> int | None:
    """Memory the system can give a new allocation without swapping (Linux ``MemAvailable``; elsewhere the
    free physical pages), or None when it cannot be told."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def memory_limit_bytes(memory_limit_GB: float | None, name: str) -> tuple[float | None, str]:
    """The byte limit of ``memory_limit_GB`` (None: the available memory) and where it comes from."""
    if memory_limit_GB is None:
        available = available_memory_bytes()
        return (None, "") if available is None else (float(available), "available")
    if not float(memory_limit_GB) > 0:
        raise ValueError(f"{name}: memory_limit_GB must be > 0 or null, got {memory_limit_GB!r}")
    return float(memory_limit_GB) * 1e9, "allowed (memory_limit_GB)"


def check_memory(need_bytes: float, what: str, memory_limit_GB: float | None, name: str, hint: str) -> None:
    """Raise :class:`InsufficientMemoryError` (one line: the need, the limit, ``hint``) when ``need_bytes``
    exceeds ``memory_limit_GB`` (None: the memory available now)."""
    limit, source = memory_limit_bytes(memory_limit_GB, name)
    if limit is not None and need_bytes > limit:
        raise InsufficientMemoryError(
            f"{name}: {what} needs ~{need_bytes / 1e9:.2f} GB, {limit / 1e9:.2f} GB {source}; {hint}"
        )


def pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """A positive scalar or pair as a pair of floats."""
    values = np.broadcast_to(np.asarray(value, dtype=np.float64), (2,)) if np.ndim(value) == 0 else value
    result = tuple(float(v) for v in values)
    if len(result) != 2 or not all(np.isfinite(result)) or min(result) <= 0:
        raise ValueError(f"{name} must be a positive number or pair, got {value!r}")
    return result  # type: ignore[return-value]


def check_scan_array(data: Any, minimum_scan: int = 3) -> tuple[int, int, int, int]:
    """Shape check of a 4D scan ``(Rx, Ry, Kx, Ky)``; returns the shape."""
    shape = tuple(int(n) for n in getattr(data, "shape", ()))
    if len(shape) != 4:
        raise ValueError(f"a 4D-STEM scan must have 4 dimensions (Rx, Ry, Kx, Ky), got shape {shape}")
    if min(shape[:2]) < minimum_scan:
        raise ValueError(
            f"the scan is {shape[0]}x{shape[1]} positions; at least {minimum_scan}x{minimum_scan}"
        )
    if min(shape[2:]) < 4:
        raise ValueError(f"diffraction patterns of {shape[2]}x{shape[3]} pixels are too small")
    return shape  # type: ignore[return-value]


def iter_scan_rows(
    data: Any,
    rows_per_chunk: int | None = None,
    desc: str | None = None,
    progress: bool = True,
    read_ahead: bool = False,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(row_slice, float32 array)`` blocks of whole scan rows (works for h5py / memmap data).

    ``read_ahead``: a reader thread reads the next block while the caller works on this one (h5py and
    NumPy's reductions release the GIL), so at most two blocks are in memory; the blocks are the same.
    """
    rx, ry, kx, ky = data.shape
    if rows_per_chunk is None:
        rows_per_chunk = max(1, int(2**26 // max(1, ry * kx * ky * 4)))  # about 64 MB per block
    blocks = [slice(start, min(rx, start + rows_per_chunk)) for start in range(0, rx, rows_per_chunk)]

    def read(block: slice) -> np.ndarray:
        return np.asarray(data[block], dtype=np.float32)

    bar = tqdm(blocks, desc=desc, disable=not progress or len(blocks) < 2, leave=False)
    if not read_ahead or len(blocks) < 2:
        for block in bar:
            yield block, read(block)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepstem-read") as reader:
        ahead = reader.submit(read, blocks[0])
        for index, block in enumerate(bar):
            array = ahead.result()
            if index + 1 < len(blocks):
                ahead = reader.submit(read, blocks[index + 1])
            yield block, array


def mean_pattern(
    data: Any, progress: bool = True, rows_per_chunk: int | None = None, read_ahead: bool = True
) -> np.ndarray:
    """Position-averaged diffraction pattern (float64), read in blocks of ``rows_per_chunk`` scan rows;
    ``read_ahead``: the next block read during the sum of this one (the same result;
    scripts/bench_mean_cbed.py measures the two)."""
    total = np.zeros(data.shape[2:], dtype=np.float64)
    blocks = iter_scan_rows(data, rows_per_chunk, desc="mean CBED", progress=progress, read_ahead=read_ahead)
    for _, block in blocks:
        total += block.sum(axis=(0, 1), dtype=np.float64)
    return total / (data.shape[0] * data.shape[1])


def pattern_centre(pattern: np.ndarray) -> np.ndarray:
    """Centre of mass (pixels) of a pattern, e.g. the bright-field disc of the mean CBED."""
    total = pattern.sum()
    if not total > 0:
        raise ValueError("the diffraction patterns hold no counts")
    kx = np.arange(pattern.shape[0])
    ky = np.arange(pattern.shape[1])
    return np.array([(pattern.sum(1) * kx).sum() / total, (pattern.sum(0) * ky).sum() / total])


def smooth_periodic_extension(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Extend the first ``len(shape)`` axes of ``array`` to ``shape`` so that it is smoothly periodic there.

    Along each axis of length ``n`` padded to ``m``, the ``m - n`` appended samples blend the last slice
    into the first with raised-cosine weights ``s_t = (1 - cos(pi t / (m - n + 1))) / 2``,
    ``t = 1 .. m - n``: ``a[n - 1] (1 - s_t) + a[0] s_t``, so the periodic continuation of the result has
    no jump at the seam. The original samples keep their indices ``0 .. n - 1`` (crop ``[:n]`` to undo).
    """
    result = np.asarray(array)
    for axis, size in enumerate(shape):
        n = result.shape[axis]
        extra = int(size) - n
        if extra < 0:
            raise ValueError(f"smooth_periodic_extension: axis {axis} has {n} samples, more than {size}")
        if extra == 0:
            continue
        weight = 0.5 * (1.0 - np.cos(np.pi * np.arange(1, extra + 1) / (extra + 1)))
        weight = weight.reshape((-1,) + (1,) * (result.ndim - axis - 1)).astype(result.dtype, copy=False)
        first = np.take(result, [0], axis=axis)
        last = np.take(result, [n - 1], axis=axis)
        result = np.concatenate([result, last * (1 - weight) + first * weight], axis=axis)
    return result


def rotation_matrix(angle_deg: float) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def rotate_vectors(vectors: np.ndarray, angle_deg: float, transpose: bool = False) -> np.ndarray:
    """Detector-frame vectors ``(..., 2)`` to the scan frame: optional component swap, then ``R(angle)``."""
    v = np.asarray(vectors)
    if transpose:
        v = v[..., ::-1]
    return v @ rotation_matrix(angle_deg).T


def detector_frequencies(
    shape: tuple[int, int],
    k_pixel_invA: tuple[float, float],
    centre_px: np.ndarray,
    scan_rotation_deg: float = 0.0,
    transpose: bool = False,
) -> np.ndarray:
    """Scan-frame spatial frequencies (1/A) of every detector pixel, shape ``(Kx, Ky, 2)``."""
    kx = (np.arange(shape[0]) - centre_px[0]) * k_pixel_invA[0]
    ky = (np.arange(shape[1]) - centre_px[1]) * k_pixel_invA[1]
    k_det = np.stack(np.meshgrid(kx, ky, indexing="ij"), axis=-1)
    return rotate_vectors(k_det, scan_rotation_deg, transpose)
