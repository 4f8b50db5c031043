"""Real- and reciprocal-space sampling of square or rectangular grids.

Conventions (shared with abTEM): arrays are indexed ``[x, y]``; a grid of ``gpts`` pixels with real-space
pixel size ``sampling_A`` has extent ``gpts * sampling_A``; reciprocal pixels are ``1 / extent`` in
1/Angstrom; frequencies are in FFT order (zero first) unless a function says it returns them centred,
in which case zero frequency sits at pixel ``n // 2`` (``numpy.fft.fftshift`` order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "fft_friendly_size", "polar_frequencies", "spatial_frequencies"]


def fft_friendly_size(n: int, primes: Sequence[int] = (2, 3, 5)) -> int:
    """Smallest integer >= ``n`` whose prime factors are all in ``primes`` (FFTs of such sizes are fast).

    >>> fft_friendly_size(254)
    256
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"fft_friendly_size: n must be >= 1, got {n}")
    candidate = n
    while True:
        remainder = candidate
        for p in primes:
            while remainder % p == 0:
                remainder //= p
        if remainder == 1:
            return candidate
        candidate += 1


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    if np.isscalar(value):
        pair = (value, value)
    else:
        pair = tuple(value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be a number or a pair, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class Grid:
    """A 2D sampling grid: ``gpts`` pixels of ``sampling_A`` Angstrom along x and y."""

    gpts: tuple[int, int]
    sampling_A: tuple[float, float]

    def __post_init__(self) -> None:
        gpts = tuple(int(n) for n in _pair(self.gpts, "gpts"))
        sampling = tuple(float(s) for s in _pair(self.sampling_A, "sampling_A"))
        if min(gpts) < 1:
            raise ValueError(f"Grid: gpts must be positive, got {gpts}")
        if not min(sampling) > 0:
            raise ValueError(f"Grid: sampling_A must be positive, got {sampling}")
        object.__setattr__(self, "gpts", gpts)
        object.__setattr__(self, "sampling_A", sampling)

    @classmethod
    def from_sampling(cls, sampling_A: float | Sequence[float], gpts: int | Sequence[int]) -> Grid:
        """Grid from the real-space pixel size (Angstrom) and the number of pixels."""
        return cls(gpts=_pair(gpts, "gpts"), sampling_A=_pair(sampling_A, "sampling_A"))

    @classmethod
    def from_gmax(cls, gmax_invA: float | Sequence[float], gpts: int | Sequence[int]) -> Grid:
        """Grid whose reciprocal space covers ``-gmax .. +gmax`` (1/Angstrom) with ``gpts`` pixels.

        The real-space pixel is then ``1 / (2 gmax)``: the grid on which AIRPI's exit waves live.
        """
        gmax = _pair(gmax_invA, "gmax_invA")
        if not min(gmax) > 0:
            raise ValueError(f"Grid.from_gmax: gmax_invA must be positive, got {gmax_invA}")
        return cls(gpts=_pair(gpts, "gpts"), sampling_A=tuple(1.0 / (2.0 * g) for g in gmax))

    @property
    def extent_A(self) -> tuple[float, float]:
        return (self.gpts[0] * self.sampling_A[0], self.gpts[1] * self.sampling_A[1])

    @property
    def reciprocal_sampling_invA(self) -> tuple[float, float]:
        return (1.0 / self.extent_A[0], 1.0 / self.extent_A[1])

    @property
    def gmax_invA(self) -> tuple[float, float]:
        """Nyquist frequency ``1 / (2 sampling)`` along x and y."""
        return (0.5 / self.sampling_A[0], 0.5 / self.sampling_A[1])

    @property
    def antialias_cutoff_invA(self) -> float:
        """Band limit ``1 / (3 sampling)`` (2/3 of Nyquist) that keeps multislice free of aliasing."""
        return 1.0 / (3.0 * max(self.sampling_A))


def spatial_frequencies(grid: Grid, centred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """1D spatial frequencies (1/Angstrom) along x and y, float64."""
    kx = np.fft.fftfreq(grid.gpts[0], d=grid.sampling_A[0])
    ky = np.fft.fftfreq(grid.gpts[1], d=grid.sampling_A[1])
    if centred:
        kx, ky = np.fft.fftshift(kx), np.fft.fftshift(ky)
    return kx, ky


def polar_frequencies(grid: Grid, centred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """2D frequency magnitude ``|k|`` (1/Angstrom) and azimuth ``atan2(ky, kx)`` (rad), shape ``gpts``."""
    kx, ky = spatial_frequencies(grid, centred=centred)
    kx2d, ky2d = np.meshgrid(kx, ky, indexing="ij")
    return np.hypot(kx2d, ky2d), np.arctan2(ky2d, kx2d)
