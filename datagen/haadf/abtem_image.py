"""The abTEM imaging path (:mod:`datagen.haadf`, ``abtem``): :class:`AbtemSettings` and :func:`simulate_abtem`
(frozen-phonon multislice or PRISM, Fourier-interpolated to the image pixel, blurred by the source)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from datagen.haadf.incoherent import _source_envelope
from datagen.haadf.optics import HaadfOptics, ImageGeometry
from physics import fft_friendly_size, wavelength

__all__ = [
    "AbtemSettings",
    "simulate_abtem",
]


@dataclass(frozen=True)
class AbtemSettings:
    """Numerics of the abTEM path."""

    method: str = "prism"
    """``prism`` (abtem.SMatrix, pays for whole images) or ``multislice`` (abtem.Probe.scan)."""
    num_phonons: int = 8
    rms_displacement_A: float = 0.08
    """3D rms displacement; abTEM gets ``rms / sqrt(3)`` per axis."""
    slice_thickness_A: float = 2.0
    max_potential_sampling_A: float = 0.05
    """Potential pixel at most this, and fine enough that the detector's outer angle is in the band."""
    prism_window_A: float = 12.0
    """PRISM interpolation factor ``f = floor(box / prism_window_A)``: the probe is cropped to box / f."""
    nyquist_fraction: float = 0.9
    """Scan step = this fraction of the Nyquist step ``lambda / (4 alpha)``."""
    device: str = "cpu"
    scheduler: str = "threads"

    def __post_init__(self) -> None:
        if self.method not in ("prism", "multislice"):
            raise ValueError(f"method must be 'prism' or 'multislice', got {self.method!r}")
        for name in ("slice_thickness_A", "max_potential_sampling_A", "prism_window_A"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < float(self.nyquist_fraction) <= 1:
            raise ValueError(f"nyquist_fraction must be in (0, 1], got {self.nyquist_fraction}")
        if int(self.num_phonons) < 0 or float(self.rms_displacement_A) < 0:
            raise ValueError("num_phonons and rms_displacement_A must be >= 0")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> AbtemSettings:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in dict(mapping).items() if k in names})


def _fourier_resample(image: np.ndarray, gpts: int) -> np.ndarray:
    """Band-limited periodic resampling of a square image onto ``gpts`` pixels (same extent, same mean)."""
    n = image.shape[-1]
    spectrum = np.fft.fftshift(np.fft.fft2(image))
    out = np.zeros((gpts, gpts), dtype=complex)
    m = min(n, gpts)
    lo_in, lo_out = n // 2 - m // 2, gpts // 2 - m // 2
    out[lo_out : lo_out + m, lo_out : lo_out + m] = spectrum[lo_in : lo_in + m, lo_in : lo_in + m]
    return np.fft.ifft2(np.fft.ifftshift(out)).real * (gpts / n) ** 2


def simulate_abtem(
    atoms: Any, optics: HaadfOptics, geometry: ImageGeometry, settings: AbtemSettings, seed: int
) -> np.ndarray:
    """abTEM ADF image (pixels, pixels) float64 of a specimen cell of side ``geometry.box_A``.

    Frozen phonons (``settings.num_phonons`` configurations, ``seed``), Lobato potential, hard-aperture
    probe as :func:`physics.probe`, ``AnnularDetector(inner, outer)``; the image is the phonon mean of the
    detected fraction of the incident electrons, scanned over the whole periodic cell and
    Fourier-interpolated to the image pixel (see the module docstring).
    """
    import abtem

    abtem.config.set({"device": settings.device, "precision": "float32", "diagnostics.progress_bar": False})
    box = geometry.box_A
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if abs(cell[0, 0] - box) > 1e-6 or abs(cell[1, 1] - box) > 1e-6:
        raise ValueError(f"simulate_abtem: the cell must be {box:.4f} A square, got {np.diag(cell)[:2]}")
    lam = wavelength(optics.energy_eV)
    band_dx = lam / (3.0 * optics.detector_outer_mrad * 1e-3)  # outer angle inside 1/(3 dx)
    dx = min(float(settings.max_potential_sampling_A), 0.98 * band_dx)
    interpolation = 1
    if settings.method == "prism":
        interpolation = max(1, int(box // float(settings.prism_window_A)))
    gpts = interpolation * fft_friendly_size(math.ceil(box / dx / interpolation))
    if len(atoms) and settings.num_phonons > 0:
        specimen = abtem.FrozenPhonons(
            atoms,
            num_configs=int(settings.num_phonons),
            sigmas=float(settings.rms_displacement_A) / math.sqrt(3.0),
            directions="xy",
            seed=int(seed),
        )
    else:
        specimen = atoms
    potential = abtem.Potential(
        specimen,
        gpts=(gpts, gpts),
        slice_thickness=float(settings.slice_thickness_A),
        parametrization="lobato",
        projection="infinite",
    )
    step_max = float(settings.nyquist_fraction) / (2.0 * optics.band_limit_invA)
    scan_gpts = math.ceil(box / step_max)
    scan = abtem.GridScan(start=(0.0, 0.0), end=(box, box), gpts=(scan_gpts, scan_gpts), endpoint=False)
    detector = abtem.AnnularDetector(inner=optics.detector_inner_mrad, outer=optics.detector_outer_mrad)
    aberrations = {"C10": -optics.defocus_A, "C30": optics.Cs_A, "C50": optics.C5_A}
    if settings.method == "prism":
        s_matrix = abtem.SMatrix(
            potential=potential,
            energy=optics.energy_eV,
            semiangle_cutoff=optics.semiangle_mrad,
            interpolation=interpolation,
        )
        ctf = abtem.CTF(
            energy=optics.energy_eV, semiangle_cutoff=optics.semiangle_mrad, soft=False, **aberrations
        )
        measurement = s_matrix.scan(scan=scan, detectors=detector, ctf=ctf)
    else:
        beam = abtem.Probe(
            energy=optics.energy_eV, semiangle_cutoff=optics.semiangle_mrad, soft=False, **aberrations
        )
        measurement = beam.scan(potential, scan=scan, detectors=detector)
    measurement = measurement.compute(scheduler=settings.scheduler)
    array = np.asarray(measurement.array.get() if hasattr(measurement.array, "get") else measurement.array)
    while array.ndim > 2:  # a phonon axis abTEM did not average
        array = array.mean(0)
    image = _fourier_resample(array.astype(np.float64), geometry.cell_px)
    envelope = _source_envelope(geometry.cell_px, geometry.pixel_size_A, optics.source_fwhm_A)
    image = np.fft.ifft2(np.fft.fft2(image) * envelope).real
    return np.clip(geometry.crop(image), 0.0, None)
