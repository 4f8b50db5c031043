"""Scan geometry, pattern streaming, the network grid and the object grid shared by the network
reconstructions of :mod:`evaluation.networks` (conventions and pipeline in its docstring).

* :class:`ScanGeometry`: the calibration of a scan plus the effective positions of data repetition.
* :class:`_PatternStream`: rows of CBEDs read lazily in blocks and resampled by exact area overlap
  (:func:`overlap_matrix`) from the detector onto a network's ``K x K`` grid over ``+-gmax`` (1/A, zero
  frequency at pixel ``K // 2``), rotated onto the scan frame there (:func:`models.inputs.rotate_patterns`).
* :func:`default_gmax_invA`, :func:`_network_grid`: the network grid's ``gmax`` from the detector's reach;
  :class:`DetectorReachError` when the detector is too small for it.
* :class:`_ObjectGrid`: object pixels (A), patch footprints and the accumulator layout of the stitching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluation.references._common import check_scan_array, mean_pattern, pair, pattern_centre
from models.inputs import rotate_patterns
from physics import wavelength

__all__ = [
    "PAPER_RATIO_ALPHA_GMAX",
    "DetectorReachError",
    "Predictor",
    "ScanGeometry",
    "default_gmax_invA",
    "overlap_matrix",
    "resolve_device",
]

#: alpha / gmax range of paper 002's training data (U(0.1, 0.95)): the default grid for an unrecorded model
PAPER_RATIO_ALPHA_GMAX = (0.1, 0.95)

#: a network's stand-in: ``predictor(inputs, positions_A)`` -> its outputs (per reconstruction)
Predictor = Callable[..., Any]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or ``None``) -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(str(device))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was requested but CUDA is not available; use device=cpu or auto")
    return resolved


# ------------------------------------------------------------------------------------------------------
# Detector -> network grid


def overlap_matrix(n_in: int, pixel_in: float, centre_in: float, n_out: int, pixel_out: float) -> np.ndarray:
    """Area-overlap matrix ``(n_out, n_in)`` from a 1D grid centred at (sub-pixel) ``centre_in`` onto a grid
    centred at pixel ``n_out // 2``.

    The rule of :func:`datagen.kernel.rebin_matrix` (each input pixel split by the overlapping fraction of
    its width) with an arbitrary input centre, so a detector whose zero frequency is not at a pixel centre
    is resampled exactly; counts inside the output range are preserved.
    """
    centres_in = (np.arange(n_in) - float(centre_in)) * pixel_in
    centres_out = (np.arange(n_out) - n_out // 2) * pixel_out
    lo = np.maximum(centres_in[None, :] - pixel_in / 2, centres_out[:, None] - pixel_out / 2)
    hi = np.minimum(centres_in[None, :] + pixel_in / 2, centres_out[:, None] + pixel_out / 2)
    return np.clip(hi - lo, 0.0, None) / pixel_in


def _detector_reach_invA(
    shape: tuple[int, int],
    k_pixel: tuple[float, float],
    centre: np.ndarray,
    pixels: int,
    slack_px: float = 0.0,
) -> float:
    """Largest ``g`` whose ``pixels`` x ``pixels`` grid over ``+-g`` (zero at pixel ``pixels // 2``) lies on
    the detector, allowing ``slack_px`` detector pixels of overhang at an edge (1/A).

    The grid reaches ``(pixels // 2 + 1/2) 2 g / pixels`` below zero and ``(pixels - pixels // 2 - 1/2) 2 g /
    pixels`` above, the detector ``centre + 1/2`` and ``n - 1/2 - centre`` pixels.
    """
    low_out = (pixels // 2 + 0.5) * 2.0 / pixels
    high_out = (pixels - pixels // 2 - 0.5) * 2.0 / pixels
    reach = []
    for a in range(2):
        low = (centre[a] + 0.5 + slack_px) * k_pixel[a]
        high = (shape[a] - 0.5 - centre[a] + slack_px) * k_pixel[a]
        reach.append(min(low / low_out, high / high_out))
    return float(min(reach))


class DetectorReachError(ValueError):
    """The detector does not reach the ``gmax`` a network's ``alpha / gmax`` range needs."""


def default_gmax_invA(
    semiangle_mrad: float,
    energy_eV: float,
    detector_reach_invA: float,
    ratio_range: tuple[float, float] = PAPER_RATIO_ALPHA_GMAX,
) -> float:
    """``gmax`` for a network trained with ``alpha / gmax`` in ``ratio_range`` (paper 002: U(0.1, 0.95)).

    The largest the detector covers (AIRPI uses the dark field beyond the disc), but no more than
    ``alpha / ratio_range[0]``; :class:`DetectorReachError` when the detector does not even reach
    ``alpha / ratio_range[1]``.
    """
    alpha_invA = float(semiangle_mrad) * 1e-3 / wavelength(energy_eV)
    low, high = float(ratio_range[0]), float(ratio_range[1])
    if not 0 < low <= high < 1:
        raise ValueError(f"ratio_alpha_gmax must satisfy 0 < low <= high < 1, got {list(ratio_range)}")
    if detector_reach_invA < alpha_invA / high:
        raise DetectorReachError(
            f"the detector reaches {detector_reach_invA:.4g} 1/A from its centre, less than alpha / "
            f"{high} = {alpha_invA / high:.4g} 1/A: the network was not trained on such patterns"
        )
    return float(min(detector_reach_invA, alpha_invA / low))


@dataclass
class ScanGeometry:
    """Calibration of a scan plus the effective positions after data repetition.

    ``data`` is the lazily readable ``(Rx, Ry, Kx, Ky)`` array; ``step_A`` the step of the *effective*
    positions (``stride`` x the scan step); effective position ``(e, c)`` is scan position
    ``(stride * e, stride * c)``.
    """

    data: Any
    energy_eV: float
    semiangle_mrad: float
    scan_step_A: tuple[float, float]
    k_pixel_invA: tuple[float, float]
    scan_rotation_deg: float = 0.0
    transpose: bool = False
    defocus_A: float = 0.0
    Cs_A: float = 0.0
    box: int = 1
    stride: int = 1

    @classmethod
    def from_scan(
        cls, scan: Any, data_repetition: bool = False, box: int = 5, stride: int = 2
    ) -> ScanGeometry:
        """From an :class:`evaluation.io.Scan4D` (or anything with the same attributes)."""
        if data_repetition and (box < 1 or box % 2 == 0 or stride < 1):
            raise ValueError(f"repetition_box must be odd and >= 1 and stride >= 1, got {box}, {stride}")
        return cls(
            data=scan.data,
            energy_eV=float(scan.energy_eV),
            semiangle_mrad=float(scan.semiangle_mrad),
            scan_step_A=pair(scan.scan_step_A, "scan_step_A"),
            k_pixel_invA=pair(scan.k_pixel_invA, "k_pixel_invA"),
            scan_rotation_deg=float(getattr(scan, "scan_rotation_deg", 0.0) or 0.0),
            transpose=bool(getattr(scan, "scan_transpose", False)),
            defocus_A=float(getattr(scan, "defocus_A", 0.0) or 0.0),
            Cs_A=float(getattr(scan, "Cs_A", 0.0) or 0.0),
            box=int(box) if data_repetition else 1,
            stride=int(stride) if data_repetition else 1,
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def positions_shape(self) -> tuple[int, int]:
        rx, ry = self.shape[:2]
        return (rx - 1) // self.stride + 1, (ry - 1) // self.stride + 1

    @property
    def step_A(self) -> tuple[float, float]:
        return self.scan_step_A[0] * self.stride, self.scan_step_A[1] * self.stride

    @property
    def alpha_invA(self) -> float:
        return self.semiangle_mrad * 1e-3 / wavelength(self.energy_eV)


class _PatternStream:
    """Reads effective rows of CBEDs resampled to the network grid (see :mod:`evaluation.networks`, 1-2).

    ``margin_px`` network pixels per side are resampled beyond the grid when the scan is rotated, so the
    rotation draws on what the detector holds there instead of zeros; they are cropped after it.
    """

    #: read the next block of raw rows in a reader thread while the caller works (off: each block read in
    #: place; scripts/bench_reconstruct.py --read-ahead-check compares the two)
    read_ahead: bool = True

    def __init__(
        self,
        geometry: ScanGeometry,
        pixels: int,
        g_invA: float,
        centre_px: np.ndarray,
        device: torch.device,
        margin_px: int = 0,
    ) -> None:
        self.geometry = geometry
        self.device = device
        _, _, kx, ky = geometry.shape
        pixel_out = 2.0 * g_invA / pixels
        self.margin = int(margin_px) if geometry.scan_rotation_deg else 0
        size = pixels + 2 * self.margin  # zero frequency at size // 2 = pixels // 2 + margin
        mx = overlap_matrix(kx, geometry.k_pixel_invA[0], centre_px[0], size, pixel_out)
        my = overlap_matrix(ky, geometry.k_pixel_invA[1], centre_px[1], size, pixel_out)
        self.mx = torch.from_numpy(mx.astype(np.float32)).to(device)
        self.my_t = torch.from_numpy(my.T.astype(np.float32)).to(device)
        self.pixels = pixels

    def _read(self, first: int, last: int) -> np.ndarray | torch.Tensor:
        """Raw scan rows ``first .. last`` (inclusive) as float32 in host memory: a page-locked tensor when
        the device is CUDA (its copy to the device then runs asynchronously), else an array."""
        block = np.ascontiguousarray(self.geometry.data[first : last + 1], dtype=np.float32)
        if self.device.type == "cuda":
            return torch.from_numpy(block).pin_memory()
        return block

    def _raw_range(self, start: int, stop: int) -> tuple[int, int]:
        """The raw scan rows (first, last inclusive) that effective rows ``start .. stop - 1`` draw on."""
        g = self.geometry
        h = g.box // 2
        return max(0, g.stride * start - h), min(g.shape[0] - 1, g.stride * (stop - 1) + h)

    def _resample(self, block: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(block, torch.Tensor):
            x = block.to(self.device, non_blocking=block.is_pinned())
        else:
            x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(self.device)
        out = torch.matmul(torch.matmul(self.mx, x), self.my_t)  # (..., K + 2 margin, K + 2 margin)
        if self.geometry.transpose:
            out = out.transpose(-2, -1)
        if self.geometry.scan_rotation_deg:
            size = out.shape[-1]
            flat = out.reshape(-1, size, size)
            angle = torch.full((flat.shape[0],), self.geometry.scan_rotation_deg, device=self.device)
            out = rotate_patterns(flat, angle).reshape(out.shape)
        if self.margin:
            m = self.margin
            out = out[..., m : m + self.pixels, m : m + self.pixels].contiguous()
        return out

    def rows(self, start: int, stop: int, raw: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Effective rows ``start .. stop - 1``: (rows, Ry_eff, K, K) float32 on the device. ``raw``: their
        raw rows (:meth:`_raw_range`) read already (by :meth:`kernels`' read-ahead), else read here."""
        g = self.geometry
        rx, ry = g.shape[:2]
        h = g.box // 2
        first, last = self._raw_range(start, stop)
        if raw is None:
            raw = self._read(first, last)
        raw = self._resample(raw)  # (n, Ry, K, K)
        if g.box == 1 and g.stride == 1:
            return raw
        _, ry_eff = g.positions_shape
        centres_x = g.stride * np.arange(start, stop)
        centres_y = g.stride * np.arange(ry_eff)
        out = torch.zeros((stop - start, ry_eff, self.pixels, self.pixels), device=self.device)
        for a in range(-h, h + 1):
            row_index = torch.as_tensor(np.clip(centres_x + a, 0, rx - 1) - first, device=self.device)
            rows = raw[row_index]
            for b in range(-h, h + 1):
                col_index = torch.as_tensor(np.clip(centres_y + b, 0, ry - 1), device=self.device)
                out += rows[:, col_index]
        return out

    def kernels(
        self, block_rows: int, progress: bool, desc: str, neighbours: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        """Yield ``(e, c, counts)``: effective positions of a block and their 3x3 kernels (B, 9, K, K).

        Kernel index ``3 i + j`` holds position ``(e + i - 1, c + j - 1)``, clamped to the scan (edge
        positions reuse the nearest CBEDs). Without ``neighbours`` only the centre CBED (B, 1, K, K).

        Read-ahead (:attr:`read_ahead`, on by default): while the caller works on one block (the network's
        forward pass, which releases the GIL), a reader thread reads the next block's raw rows from the file
        (into page-locked memory for a CUDA device), so reading and inference overlap; at most two blocks of
        raw rows are in memory.
        """
        rx = self.geometry.positions_shape[0]
        starts = range(0, rx, block_rows)
        spans = []  # effective rows (lo, hi) each block resamples: the block and, for kernels, its neighbours
        for start in starts:
            stop = min(rx, start + block_rows)
            spans.append((start, stop) if not neighbours else (max(0, start - 1), min(rx, stop + 1)))
        bar = tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False)
        if not self.read_ahead:
            for index, start in enumerate(bar):
                raw = self._read(*self._raw_range(*spans[index]))
                yield from self._block(start, min(rx, start + block_rows), spans[index], raw, neighbours)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepstem-read") as reader:
            ahead = reader.submit(self._read, *self._raw_range(*spans[0])) if spans else None
            for index, start in enumerate(bar):
                raw = ahead.result()
                if index + 1 < len(spans):
                    ahead = reader.submit(self._read, *self._raw_range(*spans[index + 1]))
                yield from self._block(start, min(rx, start + block_rows), spans[index], raw, neighbours)

    def _block(
        self,
        start: int,
        stop: int,
        span: tuple[int, int],
        raw: np.ndarray | torch.Tensor,
        neighbours: bool,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        """The positions and kernels of effective rows ``start .. stop - 1`` from ``raw`` (of ``span``)."""
        rx, ry = self.geometry.positions_shape
        if not neighbours:
            ee, cc = np.meshgrid(np.arange(start, stop), np.arange(ry), indexing="ij")
            rows = self.rows(start, stop, raw=raw)
            yield ee.ravel(), cc.ravel(), rows.reshape(-1, 1, self.pixels, self.pixels)
            return
        lo, hi = span
        rows = self.rows(lo, hi, raw=raw)
        e = np.arange(start, stop)
        ri = np.clip(e[:, None] + np.arange(-1, 2)[None, :], 0, rx - 1) - lo  # (ne, 3)
        ci = np.clip(np.arange(ry)[:, None] + np.arange(-1, 2)[None, :], 0, ry - 1)  # (ry, 3)
        index_r = torch.as_tensor(ri, device=self.device)[:, None, :, None]
        index_c = torch.as_tensor(ci, device=self.device)[None, :, None, :]
        kernels = rows[index_r, index_c]  # (ne, ry, 3, 3, K, K)
        ee, cc = np.meshgrid(e, np.arange(ry), indexing="ij")
        yield ee.ravel(), cc.ravel(), kernels.reshape(-1, 9, self.pixels, self.pixels)


def _default_block_rows(ry: int, pixels: int, budget_bytes: float = 2**27) -> int:
    return max(1, int(budget_bytes // max(1, ry * 9 * pixels * pixels * 4)))


def _inference_bar(geometry: ScanGeometry, progress: bool, desc: str) -> Any:
    """Patterns/s and ETA of network inference over a scan, on stderr; only on a terminal (tqdm's
    ``disable=None``), so that logs and captured output stay free of bar redraws."""
    rx, ry = geometry.positions_shape
    return tqdm(total=rx * ry, desc=desc, unit="pattern", disable=None if progress else True, leave=False)


# ------------------------------------------------------------------------------------------------------
# Patch -> object grid


def _linear_evaluation(n: int, coordinates: np.ndarray) -> np.ndarray:
    """Matrix ``(M, n)`` of linear interpolation at fractional sample ``coordinates`` (0 outside)."""
    coordinates = np.asarray(coordinates, dtype=np.float64)
    matrix = np.zeros((coordinates.size, n))
    lower = np.floor(coordinates).astype(int)
    t = coordinates - lower
    for m, (i, w) in enumerate(zip(lower, t, strict=True)):
        if 0 <= i < n:
            matrix[m, i] += 1.0 - w
        if 0 <= i + 1 < n and w > 0:
            matrix[m, i + 1] += w
    return matrix


@dataclass
class _ObjectGrid:
    """Object pixels ``p`` (A), footprint half-widths ``h`` (object pixels) and the accumulator layout.

    Effective position ``(e, c)`` sits at object pixel ``(e, c) * step / p`` (integer when ``p = step /
    oversampling``); accumulator index = object pixel + ``h``.
    """

    pixel_A: tuple[float, float]
    step_A: tuple[float, float]
    half: tuple[int, int]
    positions: tuple[int, int]

    def placement(self, e: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest object pixel (B, 2) int and fractional remainder (B, 2) of each position."""
        exact = np.stack([e * self.step_A[0] / self.pixel_A[0], c * self.step_A[1] / self.pixel_A[1]], -1)
        nearest = np.rint(exact).astype(np.int64)
        return nearest[:, 0], nearest[:, 1], exact - nearest

    @property
    def last_pixel(self) -> tuple[int, int]:
        return tuple(
            round((n - 1) * s / p) for n, s, p in zip(self.positions, self.step_A, self.pixel_A, strict=True)
        )  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int]:
        last = self.last_pixel
        return last[0] + 2 * self.half[0] + 1, last[1] + 2 * self.half[1] + 1

    def flat_indices(self, mx: np.ndarray, my: np.ndarray, device: torch.device) -> torch.Tensor:
        """(B, Ox, Oy) flat accumulator indices of the footprints at object pixels ``(mx, my)``."""
        ox = np.arange(-self.half[0], self.half[0] + 1)
        oy = np.arange(-self.half[1], self.half[1] + 1)
        ix = mx[:, None] + ox[None, :] + self.half[0]
        iy = my[:, None] + oy[None, :] + self.half[1]
        flat = ix[:, :, None] * self.shape[1] + iy[:, None, :]
        return torch.as_tensor(flat, device=device)

    def crop(self, image: np.ndarray, to_scan: bool) -> tuple[np.ndarray, tuple[float, float]]:
        """The scan field (pixels of the first to the last position) or the whole covered area."""
        if to_scan:
            last = self.last_pixel
            hx, hy = self.half
            return image[hx : hx + last[0] + 1, hy : hy + last[1] + 1], (0.0, 0.0)
        origin = (-self.half[0] * self.pixel_A[0], -self.half[1] * self.pixel_A[1])
        return image, origin


def _object_pixel(
    geometry: ScanGeometry, oversampling: int, pixel_size_A: float | None, allow_fractional: bool
) -> tuple[float, float]:
    if pixel_size_A is not None:
        if not allow_fractional:
            raise ValueError("pixel_size_A is supported for AIRPI only; use oversampling")
        return pair(pixel_size_A, "pixel_size_A")
    if int(oversampling) < 1 or int(oversampling) != oversampling:
        raise ValueError(f"oversampling must be an integer >= 1, got {oversampling}")
    return geometry.step_A[0] / int(oversampling), geometry.step_A[1] / int(oversampling)


def _mask_half_width(
    mask: np.ndarray, centre: int, patch_pixel_A: float, pixel_A: tuple[float, float]
) -> tuple:
    """Footprint half-widths (object pixels) covering a patch mask, limited to the patch window."""
    where = np.argwhere(mask)
    if where.size == 0:
        raise ValueError("the probe mask is empty (no pixel above 0.1 of the maximum intensity)")
    reach_px = np.abs(where - centre).max(axis=0) + 1.0
    window_px = (mask.shape[0] // 2 - 1, mask.shape[1] // 2 - 1)
    return tuple(
        int(max(1, math.floor(min(reach_px[a], window_px[a]) * patch_pixel_A / pixel_A[a]))) for a in range(2)
    )


def _check_patterns(geometry: ScanGeometry) -> None:
    check_scan_array(geometry.data)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _detector_centre(
    geometry: ScanGeometry, centre_px: Any, progress: bool, block_rows: int | None
) -> np.ndarray:
    """Given centre, or the centre of mass of the position-averaged CBED (read in blocks of rows)."""
    if centre_px is not None:
        return np.asarray(centre_px, dtype=np.float64).reshape(2)
    rows = None if block_rows is None else max(1, block_rows * geometry.stride)
    return pattern_centre(mean_pattern(geometry.data, progress, rows))


def _network_grid(
    geometry: ScanGeometry,
    centre: np.ndarray,
    pixels: int,
    gmax_invA: float | None,
    ratio_range: tuple[float, float] | None,
) -> float:
    """``gmax``: given (checked against the detector, half a detector pixel of overhang allowed) or the
    default of :func:`default_gmax_invA` for the detector about its nearest-pixel centre (``ratio_range``
    None: paper 002's)."""
    if gmax_invA is None:
        reach = _detector_reach_invA(geometry.shape[2:], geometry.k_pixel_invA, np.rint(centre), pixels)
        ratio = PAPER_RATIO_ALPHA_GMAX if ratio_range is None else tuple(ratio_range)
        return default_gmax_invA(geometry.semiangle_mrad, geometry.energy_eV, reach, ratio)
    gmax = float(gmax_invA)
    if not gmax > 0:
        raise ValueError(f"gmax_invA must be positive, got {gmax_invA}")
    reach = _detector_reach_invA(geometry.shape[2:], geometry.k_pixel_invA, centre, pixels, slack_px=0.5)
    if gmax > reach:
        raise ValueError(
            f"gmax_invA={gmax:.4g} 1/A: the network grid would leave the detector (<= {reach:.4g})"
        )
    return gmax
