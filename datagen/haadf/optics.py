"""Optics and image geometry of the HAADF images: :class:`HaadfOptics`, :class:`ImageGeometry`,
:func:`plan_geometry` (conventions: :mod:`datagen.haadf`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from physics import fft_friendly_size, wavelength

__all__ = [
    "FWHM_PER_SIGMA",
    "HaadfOptics",
    "ImageGeometry",
    "plan_geometry",
]


FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class HaadfOptics:
    """Probe, detector and source of one image (plain floats).

    ``defocus_A`` follows ``physics.optics`` (``defocus = -C10``); ``Cs_A`` is C30, ``C5_A`` is C50;
    ``source_fwhm_A`` is the FWHM of the Gaussian source-size blur.
    """

    energy_eV: float = 300e3
    semiangle_mrad: float = 21.0
    defocus_A: float = 0.0
    Cs_A: float = 0.0
    C5_A: float = 0.0
    detector_inner_mrad: float = 60.0
    detector_outer_mrad: float = 190.0
    source_fwhm_A: float = 0.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            object.__setattr__(self, name, float(getattr(self, name)))
        if not self.energy_eV > 0 or not self.semiangle_mrad > 0:
            raise ValueError(f"energy_eV and semiangle_mrad must be positive, got {self}")
        if not 0 <= self.detector_inner_mrad < self.detector_outer_mrad:
            raise ValueError(
                f"detector angles must satisfy 0 <= inner < outer, got {self.detector_inner_mrad}, "
                f"{self.detector_outer_mrad} mrad"
            )
        if self.source_fwhm_A < 0:
            raise ValueError(f"source_fwhm_A must be >= 0, got {self.source_fwhm_A}")

    @property
    def band_limit_invA(self) -> float:
        """``2 alpha / lambda``: the highest spatial frequency of an ADF image (1/A)."""
        return 2.0 * self.semiangle_mrad * 1e-3 / wavelength(self.energy_eV)

    @property
    def aberrations(self) -> dict[str, float]:
        return {"C50": self.C5_A} if self.C5_A else {}


@dataclass(frozen=True)
class ImageGeometry:
    """The image (``pixels`` x ``pixels`` of ``pixel_size_A``) inside its simulation cell (see module doc)."""

    pixels: int
    pixel_size_A: float
    margin_px: int

    @property
    def cell_px(self) -> int:
        return self.pixels + 2 * self.margin_px

    @property
    def box_A(self) -> float:
        """Side of the square simulation cell."""
        return self.cell_px * self.pixel_size_A

    @property
    def field_A(self) -> float:
        return self.pixels * self.pixel_size_A

    @property
    def origin_A(self) -> float:
        """Cell coordinate (x and y) of image pixel (0, 0)."""
        return self.margin_px * self.pixel_size_A

    def crop(self, cell_image: np.ndarray) -> np.ndarray:
        m, n = self.margin_px, self.pixels
        return cell_image[..., m : m + n, m : m + n]


def plan_geometry(pixels: int, pixel_size_A: float, margin_A: float) -> ImageGeometry:
    """Geometry with at least ``margin_A`` on each side and an FFT-friendly cell (an even pixel count)."""
    pixels, pixel_size_A = int(pixels), float(pixel_size_A)
    if pixels < 8 or pixels % 2:
        raise ValueError(f"pixels must be an even number >= 8, got {pixels}")
    if not pixel_size_A > 0:
        raise ValueError(f"pixel_size_A must be positive, got {pixel_size_A}")
    margin_px = max(1, math.ceil(float(margin_A) / pixel_size_A - 1e-9))
    cell = fft_friendly_size(pixels + 2 * margin_px)
    while (cell - pixels) % 2:
        cell = fft_friendly_size(cell + 1)
    return ImageGeometry(pixels, pixel_size_A, (cell - pixels) // 2)
