"""Clean (HA)ADF-STEM images for restoration training (``simulation=haadf``, CGRDN data; issue 4 section 2).

Two imaging models write the same kind of image, ``deepstem.image/1`` (ARCHITECTURE.md contract 2):

* ``incoherent`` (volume): the incoherent-imaging model ``I(r) = [P_eff * S](r)`` with ``P_eff`` the
  probe intensity ``|psi|^2`` of :func:`physics.probe` blurred by a Gaussian source and ``S`` a column
  model: every atom contributes a normalised 2D Gaussian of standard deviation ``atom_sigma_A`` (thermal
  vibration plus the extent of high-angle scattering) weighted by its ADF cross-section
  ``sigma(Z) = c Z^n``. The exponent ``n`` is configured (1.6-2); the prefactor ``c`` is fitted (with ``n``
  fixed, least squares in log space over Z = 3..83) to the kinematic cross-sections
  ``int |f_e(q)|^2 dOmega`` over the detector annulus, with abTEM's Lobato electron scattering factors
  ``f_e`` (relativistically scaled). The convolution is done in Fourier space: the atoms are spread on a
  grid ``s`` times finer than the image (fine enough that the Gaussians do not alias inside the probe's
  band ``2 alpha / lambda``), Fourier-cropped to the image grid and multiplied by the probe-intensity
  spectrum, so sub-pixel positions are exact.
* ``abtem`` (accuracy): frozen-phonon multislice (or PRISM, ``abtem.SMatrix``) with Lobato potentials
  and an ``abtem.AnnularDetector``, scanned on a grid at or below the Nyquist step of the image band
  ``2 alpha / lambda`` and Fourier-interpolated to the image pixel (an ADF image is exactly band-limited
  to ``2 alpha / lambda``, so this is exact on the periodic cell), then blurred by the same source.

Conventions (units: eV, mrad, Angstrom):

* Image pixel ``(i, j)`` is the probe position ``(i, j) * pixel_size_A`` along ``(x, y)`` from the
  field's origin; arrays are indexed ``[x, y]``. The field is ``pixels * pixel_size_A`` wide.
* Specimens are built in an orthogonal periodic cell of side ``box = (pixels + 2 margin_px) * pixel``:
  the field is the central square, field origin at ``(margin_px * pixel, margin_px * pixel)`` in the cell.
  Seams of the rotated crystals and the cell's periodic wrap lie in the margin, which is cut away; the
  margin (``margin_A``, >= the probe's reach) keeps the wrap-around of the convolution out of the field.
* Intensity: the fraction of the incident electrons that reach the detector for a probe at that pixel
  (abTEM's normalisation of ``AnnularDetector``; the incoherent model uses the same absolute scale via
  ``sigma(Z)``), so the distortion models' shot noise is ``lambda = I * dose * dx * dy``. The
  probe-integrated cross-section of a column, ``sum(I) * pixel^2`` over its peak, is ``sum sigma(Z)`` in
  A^2 for the incoherent model.
* The source size is a FWHM (thesis table 2.1: 0.7 A): a normalised Gaussian of that FWHM blurs the image.

Reproducibility: sample ``i`` is a pure function of ``(seed, i)``: everything is drawn from
``numpy.random.default_rng([seed, i])`` (:func:`datagen.parameters.sample_rng`); the stored ``seed`` seeds
the specimen's randomness and abTEM's frozen phonons. Shards, checkpoints and resume follow the kernel
pipeline (:mod:`datagen.shards`, :mod:`datagen.cli`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from datagen import store
from datagen.parameters import ConfigError, Uniform, sample_rng
from datagen.shards import ShardLayout, write_index
from physics import fft_friendly_size, probe, scherzer_defocus, wavelength

__all__ = [
    "IMAGE_LAYOUT",
    "AbtemSettings",
    "HaadfOptics",
    "HaadfSampleMaker",
    "HaadfSpace",
    "ImageGeometry",
    "add_point_defects",
    "amorphous_slab",
    "cross_sections_A2",
    "crystal_specimen",
    "electron_scattering_factor_A",
    "grain_boundary_specimen",
    "image_layout",
    "kinematic_cross_section_A2",
    "nanoparticle_specimen",
    "plan_geometry",
    "power_law_prefactor_A2",
    "render_incoherent",
    "run",
    "simulate_abtem",
    "write_image_index",
]

log = logging.getLogger("deepstem.datagen")

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
IMAGE_STRING_FIELDS = ("model", "specimen_kind", "source_id", "formula", "description")
IMAGE_NUMERIC_FIELDS = (
    "image",
    "pixel_size_A",
    "energy_eV",
    "semiangle_mrad",
    "Cs_A",
    "C5_A",
    "defocus_A",
    "detector_inner_mrad",
    "detector_outer_mrad",
    "source_size_A",
    "z_exponent",
    "atom_sigma_A",
    "num_phonons",
    "thickness_A",
    "zone_axis",
    "rotation_deg",
    "num_atoms",
    "seed",
    "sample_index",
)
_DTYPES = {
    "image": np.float32,
    "zone_axis": np.int32,
    "num_phonons": np.int32,
    "num_atoms": np.int64,
    "seed": np.int64,
    "sample_index": np.int64,
}
AMORPHOUS_MATERIALS: dict[str, dict[str, Any]] = {
    # composition (element: atoms per formula unit), mass density, minimum interatomic distance
    "carbon": {"composition": {"C": 1}, "density_g_cm3": 2.0, "min_distance_A": 1.3},
    "silica": {"composition": {"Si": 1, "O": 2}, "density_g_cm3": 2.2, "min_distance_A": 1.5},
}
NANOPARTICLE_SHAPES = ("octahedron", "decahedron", "icosahedron", "sphere")
SPECIMEN_KINDS = ("crystal", "grain_boundary", "nanoparticle")


# --------------------------------------------------------------------------------------------------
# optics and geometry


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


# --------------------------------------------------------------------------------------------------
# cross-sections


@lru_cache(maxsize=1)
def _lobato_parameters() -> dict[str, np.ndarray]:
    """Lobato & Van Dyck (2014) electron scattering-factor parameters ``(a_1..5, b_1..5)`` per element.

    Read from the table abTEM ships (``abtem/parametrizations/data/lobato.json``) without importing
    abTEM (its import costs seconds).
    """
    import importlib.util

    spec = importlib.util.find_spec("abtem")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "abtem is needed for the Lobato scattering-factor table (pip install abtem==1.0.11)"
        )
    path = Path(spec.submodule_search_locations[0]) / "parametrizations" / "data" / "lobato.json"
    return {
        symbol: np.asarray(value, dtype=np.float64) for symbol, value in json.loads(path.read_text()).items()
    }


def electron_scattering_factor_A(Z: int, q_invA: np.ndarray) -> np.ndarray:
    """Lobato's electron scattering factor ``f_e(q) = sum_i a_i (2 + b_i q^2) / (1 + b_i q^2)^2`` in A.

    ``q = 2 sin(theta / 2) / lambda`` in 1/A; non-relativistic (multiply by ``gamma`` for a beam).
    """
    from ase.data import chemical_symbols

    a, b = _lobato_parameters()[chemical_symbols[int(Z)]]
    q2 = np.asarray(q_invA, dtype=np.float64)[..., None] ** 2
    return np.sum(a * (2.0 + b * q2) / (1.0 + b * q2) ** 2, axis=-1)


@lru_cache(maxsize=4096)
def kinematic_cross_section_A2(Z: int, energy_eV: float, inner_mrad: float, outer_mrad: float) -> float:
    """Kinematic cross-section (A^2) of one atom for scattering into the annulus ``inner..outer`` (mrad).

    ``int |gamma f_e(q)|^2 2 pi sin(theta) dtheta`` with ``q = 2 sin(theta / 2) / lambda``,
    :func:`electron_scattering_factor_A` and ``gamma`` the relativistic mass ratio.
    """
    from physics.constants import ELECTRON_MASS_kg
    from physics.optics import relativistic_mass_kg

    lam = wavelength(energy_eV)
    gamma = relativistic_mass_kg(energy_eV) / ELECTRON_MASS_kg
    theta = np.linspace(float(inner_mrad) * 1e-3, float(outer_mrad) * 1e-3, 1001)
    f = gamma * electron_scattering_factor_A(Z, 2.0 * np.sin(theta / 2.0) / lam)
    return float(np.trapezoid(f**2 * 2.0 * np.pi * np.sin(theta), theta))


@lru_cache(maxsize=256)
def power_law_prefactor_A2(
    z_exponent: float, energy_eV: float, inner_mrad: float, outer_mrad: float
) -> float:
    """``c`` (A^2) of ``sigma(Z) = c Z^n`` fitted in log space to the kinematic cross-sections, Z = 3..83."""
    Z = np.arange(3, 84)
    sigma = np.array([kinematic_cross_section_A2(int(z), energy_eV, inner_mrad, outer_mrad) for z in Z])
    return float(np.exp(np.mean(np.log(sigma) - float(z_exponent) * np.log(Z))))


def cross_sections_A2(numbers: np.ndarray, optics: HaadfOptics, z_exponent: float) -> np.ndarray:
    """ADF cross-section per atom, ``c Z^n`` in A^2 (see :func:`power_law_prefactor_A2`)."""
    c = power_law_prefactor_A2(
        round(float(z_exponent), 6), optics.energy_eV, optics.detector_inner_mrad, optics.detector_outer_mrad
    )
    return c * np.asarray(numbers, dtype=np.float64) ** float(z_exponent)


# --------------------------------------------------------------------------------------------------
# the incoherent model


def _source_envelope(gpts: int, pixel_size_A: float, source_fwhm_A: float) -> np.ndarray:
    """Fourier transform of the normalised Gaussian source (FFT order)."""
    k = np.fft.fftfreq(gpts, d=pixel_size_A)
    sigma = float(source_fwhm_A) / FWHM_PER_SIGMA
    envelope = np.exp(-2.0 * np.pi**2 * sigma**2 * k**2)
    return envelope[:, None] * envelope[None, :]


def probe_psf_spectrum(optics: HaadfOptics, gpts: int, pixel_size_A: float) -> np.ndarray:
    """Spectrum (FFT order) of the source-blurred probe intensity, for the correlation ``I = P_eff (x) S``.

    ``P`` is ``|physics.probe|^2`` centred at pixel (0, 0) (sum 1); returned is ``conj(FFT(P))`` times the
    source envelope, since ``I(r) = sum_r' P(r' - r) S(r')``.
    """
    psi = probe(
        optics.energy_eV,
        optics.semiangle_mrad,
        gpts,
        sampling_A=pixel_size_A,
        defocus_A=optics.defocus_A,
        Cs_A=optics.Cs_A,
        aberrations=optics.aberrations,
        position_A=(0.0, 0.0),
        dtype=np.complex128,
    )
    intensity = np.abs(psi) ** 2
    return np.conj(np.fft.fft2(intensity)) * _source_envelope(gpts, pixel_size_A, optics.source_fwhm_A)


def _fine_factor(pixel_size_A: float, band_invA: float, atom_sigma_A: float) -> int:
    """Oversampling s such that Gaussians of ``atom_sigma_A`` on pixel/s alias < 1e-4 inside the band."""
    finest = 1.0 / (band_invA + math.sqrt(math.log(1e4) / (2.0 * math.pi**2)) / atom_sigma_A)
    return max(1, math.ceil(pixel_size_A / finest - 1e-9))


def _splat(
    xy_A: np.ndarray, weights: np.ndarray, gpts: int, pixel_A: float, sigma_A: float, period_A: float
) -> np.ndarray:
    """``sum_a w_a g(r - r_a)`` on a periodic ``gpts`` grid; ``g`` a normalised Gaussian (1/A^2)."""
    half = max(1, math.ceil(5.0 * sigma_A / pixel_A))
    offsets = np.arange(-half, half + 1)
    xy = np.mod(np.asarray(xy_A, dtype=np.float64), period_A) / pixel_A
    base = np.floor(xy).astype(np.int64)
    frac = xy - base
    norm = 1.0 / (math.sqrt(2.0 * math.pi) * sigma_A)
    gx = norm * np.exp(-0.5 * ((offsets[None, :] - frac[:, :1]) * pixel_A / sigma_A) ** 2)
    gy = norm * np.exp(-0.5 * ((offsets[None, :] - frac[:, 1:2]) * pixel_A / sigma_A) ** 2)
    ix = np.mod(base[:, :1] + offsets[None, :], gpts)
    iy = np.mod(base[:, 1:2] + offsets[None, :], gpts)
    values = (weights[:, None, None] * gx[:, :, None] * gy[:, None, :]).ravel()
    flat = (ix[:, :, None] * gpts + iy[:, None, :]).ravel()
    return np.bincount(flat, weights=values, minlength=gpts * gpts).reshape(gpts, gpts)


def _fourier_crop(spectrum: np.ndarray, gpts: int) -> np.ndarray:
    """The ``gpts`` lowest frequencies (FFT order) of a larger FFT-order spectrum."""
    n = spectrum.shape[-1]
    keep = np.fft.fftfreq(gpts) * gpts
    index = np.rint(keep).astype(np.int64) % n
    return spectrum[np.ix_(index, index)]


def render_incoherent(
    xy_A: np.ndarray,
    numbers: np.ndarray,
    optics: HaadfOptics,
    geometry: ImageGeometry,
    z_exponent: float = 1.7,
    atom_sigma_A: float = 0.08,
) -> np.ndarray:
    """Incoherent ADF image (pixels, pixels) float64 of atoms at ``xy_A`` (cell coordinates, (N, 2), A).

    Atoms outside the cell ``[0, box_A)^2`` are ignored; the cell is treated as periodic (its margin keeps
    the wrap-around out of the field).

    See the module docstring for the model and normalisation (fraction of incident electrons).
    """
    if not atom_sigma_A > 0:
        raise ValueError(f"atom_sigma_A must be positive, got {atom_sigma_A}")
    n = geometry.cell_px
    p = geometry.pixel_size_A
    s = _fine_factor(p, optics.band_limit_invA, atom_sigma_A)
    xy = np.asarray(xy_A, dtype=np.float64).reshape(-1, 2)
    inside = np.all((xy >= 0.0) & (xy < geometry.box_A), axis=1)  # the cell; atoms outside are ignored
    xy = xy[inside]
    weights = cross_sections_A2(np.asarray(numbers).reshape(-1)[inside], optics, z_exponent)
    density = _splat(xy, weights, n * s, p / s, float(atom_sigma_A), geometry.box_A)  # dimensionless
    spectrum = _fourier_crop(np.fft.fft2(density), n) / s**2  # the density sampled on the image grid
    image = np.fft.ifft2(spectrum * probe_psf_spectrum(optics, n, p)).real
    return np.clip(geometry.crop(image), 0.0, None)


# --------------------------------------------------------------------------------------------------
# abTEM


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


# --------------------------------------------------------------------------------------------------
# specimens


def amorphous_slab(
    rng: np.random.Generator,
    size_xy_A: tuple[float, float],
    thickness_A: float,
    material: str = "carbon",
    z0_A: float = 0.0,
    density_g_cm3: float | None = None,
    min_distance_A: float | None = None,
) -> Any:
    """Random amorphous slab ``[0, Lx) x [0, Ly) x [z0, z0 + t)`` (ase.Atoms, no cell set).

    Random sequential addition: uniform candidates are accepted when no accepted atom lies within
    ``min_distance_A`` (3D), until the atom count of the mass density is reached. ``material`` is a key of
    :data:`AMORPHOUS_MATERIALS` (``carbon``: a-C, 2.0 g/cm^3, 1.3 A; ``silica``: a-SiO2, 2.2 g/cm^3, 1.5 A).
    """
    import ase
    from ase.data import atomic_masses, atomic_numbers
    from scipy.spatial import cKDTree

    if material not in AMORPHOUS_MATERIALS:
        raise ValueError(f"amorphous material must be one of {sorted(AMORPHOUS_MATERIALS)}, got {material!r}")
    spec = AMORPHOUS_MATERIALS[material]
    density = float(spec["density_g_cm3"] if density_g_cm3 is None else density_g_cm3)
    d_min = float(spec["min_distance_A"] if min_distance_A is None else min_distance_A)
    composition = spec["composition"]
    symbols = list(composition)
    counts = np.array([composition[s] for s in symbols], dtype=float)
    unit_mass_amu = float(
        sum(atomic_masses[atomic_numbers[s]] * c for s, c in zip(symbols, counts, strict=True))
    )
    lx, ly = float(size_xy_A[0]), float(size_xy_A[1])
    volume = lx * ly * float(thickness_A)
    # atoms per A^3 = rho [g/cm^3] * 0.6022 / (mass per formula unit [amu]) * atoms per formula unit
    target = round(density * 0.602214076 / unit_mass_amu * counts.sum() * volume)
    lower, upper = np.array([0.0, 0.0, z0_A]), np.array([lx, ly, z0_A + float(thickness_A)])
    accepted = np.zeros((0, 3))
    for _ in range(200):
        missing = target - len(accepted)
        if missing <= 0:
            break
        candidates = rng.uniform(lower, upper, size=(int(missing * 1.3) + 16, 3))
        if len(accepted):
            distance, _ = cKDTree(accepted).query(candidates, k=1, distance_upper_bound=d_min)
            candidates = candidates[~np.isfinite(distance)]
        pairs = cKDTree(candidates).query_pairs(d_min, output_type="ndarray")
        keep = np.ones(len(candidates), dtype=bool)
        for i, j in pairs:  # greedy: the earlier candidate wins
            if keep[i]:
                keep[j] = False
        accepted = np.concatenate([accepted, candidates[keep][:missing]])
    species = rng.choice(len(symbols), size=len(accepted), p=counts / counts.sum())
    numbers = np.array([atomic_numbers[symbols[k]] for k in species], dtype=int)
    return ase.Atoms(numbers=numbers, positions=accepted)


def add_point_defects(
    atoms: Any,
    rng: np.random.Generator,
    region_A: tuple[float, float, float, float],
    column_vacancies: int = 0,
    column_substitutions: int = 0,
    substitution_elements: Sequence[str] = ("Pt",),
    atom_vacancy_fraction: float = 0.0,
    dopant_fraction: float = 0.0,
) -> Any:
    """Copy of ``atoms`` with point defects inside ``region_A = (x0, x1, y0, y1)``.

    Whole columns (emptied or substituted, by :func:`datagen.scan4d.with_point_defect`) at atoms drawn at
    random, then single-atom vacancies and substitutions (dopants) with the given per-atom probabilities.
    """
    from datagen.scan4d import with_point_defect

    out = atoms.copy()
    x0, x1, y0, y1 = region_A

    def random_site() -> np.ndarray | None:
        xy = out.positions[:, :2]
        inside = np.flatnonzero((xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1))
        return None if not len(inside) else xy[int(rng.choice(inside))]

    for kind, count in (("vacancy", column_vacancies), ("substitution", column_substitutions)):
        for _ in range(int(count)):
            site = random_site()
            if site is None:
                break
            element = str(rng.choice(list(substitution_elements))) if kind == "substitution" else None
            out = with_point_defect(out, site, kind=kind, element=element)
    if dopant_fraction > 0 and len(out):
        chosen = np.flatnonzero(rng.uniform(size=len(out)) < dopant_fraction)
        if len(chosen):
            symbols = out.get_chemical_symbols()
            for index in chosen:
                symbols[index] = str(rng.choice(list(substitution_elements)))
            out.set_chemical_symbols(symbols)
    if atom_vacancy_fraction > 0 and len(out):
        out = out[rng.uniform(size=len(out)) >= atom_vacancy_fraction]
    return out


def _in_box(atoms: Any, box_A: float) -> Any:
    xy = atoms.positions[:, :2]
    return atoms[np.all((xy >= 0.0) & (xy < box_A), axis=1)]


def _finish(atoms: Any, box_A: float, vacuum_A: float = 2.0) -> Any:
    """Atoms in the periodic cell ``box x box x (extent + 2 vacuum)``, the lowest atom at ``vacuum``."""
    import ase

    atoms = _in_box(atoms, box_A)
    positions = atoms.positions.copy()
    if len(positions):
        positions[:, 2] += vacuum_A - positions[:, 2].min()
        height = float(positions[:, 2].max()) + vacuum_A
    else:
        height = 2.0 * vacuum_A
    return ase.Atoms(numbers=atoms.numbers, positions=positions, cell=[box_A, box_A, height], pbc=True)


def crystal_specimen(
    crystal: Any,
    zone_axis: Sequence[int],
    rotation_deg: float,
    thickness_A: float,
    box_A: float,
    max_strain: float = 0.02,
) -> Any:
    """The crystal in ``zone_axis`` filling the ``box_A`` cell (:func:`datagen.specimen.build_specimen`)."""
    from datagen.specimen import build_specimen

    specimen = build_specimen(
        crystal,
        zone_axis=zone_axis,
        rotation_deg=float(rotation_deg),
        thickness_A=float(thickness_A),
        lateral_size_A=float(box_A),
        max_strain=float(max_strain),
        vacuum_A=2.0,
    )
    return specimen.atoms


def grain_boundary_specimen(
    crystal: Any,
    zone_axes: tuple[Sequence[int], Sequence[int]],
    rotations_deg: tuple[float, float],
    thickness_A: float,
    box_A: float,
    point_A: Sequence[float],
    normal_deg: float,
    min_distance_A: float = 1.0,
    max_strain: float = 0.02,
) -> Any:
    """Two differently oriented grains of ``crystal`` meeting at a straight boundary (beam along z).

    Grain 1 (``zone_axes[0]``, ``rotations_deg[0]``) fills the half-plane ``(r - point) . n < 0`` with
    ``n = (cos normal_deg, sin normal_deg)``, grain 2 the rest; atoms of grain 2 closer than
    ``min_distance_A`` (3D) to an atom of grain 1 are removed.
    """
    from scipy.spatial import cKDTree

    first = crystal_specimen(crystal, zone_axes[0], rotations_deg[0], thickness_A, box_A, max_strain)
    second = crystal_specimen(crystal, zone_axes[1], rotations_deg[1], thickness_A, box_A, max_strain)
    normal = np.array([math.cos(math.radians(normal_deg)), math.sin(math.radians(normal_deg))])
    point = np.asarray(point_A, dtype=np.float64)[:2]
    first = first[(first.positions[:, :2] - point) @ normal < 0]
    second = second[(second.positions[:, :2] - point) @ normal >= 0]
    if len(first) and len(second):
        distance, _ = cKDTree(first.positions).query(second.positions, k=1)
        second = second[distance >= float(min_distance_A)]
    both = first + second
    return _finish(both, box_A)


def _cluster(element: str, shape: str, diameter_A: float, rng: np.random.Generator) -> Any:
    """An fcc nanoparticle of about ``diameter_A`` (ASE cluster builders), centred at the origin."""
    from ase.build import bulk
    from ase.cluster import Decahedron, Icosahedron, Octahedron
    from ase.data import atomic_numbers, reference_states

    state = reference_states[atomic_numbers[element]]
    if not state or state.get("symmetry") != "fcc":
        raise ValueError(f"nanoparticle element {element!r} is not fcc (ASE reference state)")
    a = float(state["a"])
    nn = a / math.sqrt(2.0)  # nearest-neighbour distance
    if shape == "octahedron":
        length = max(3, round(diameter_A / nn) + 1)
        cluster = Octahedron(
            element, length, cutoff=int(rng.integers(0, max(1, length // 3) + 1)), latticeconstant=a
        )
    elif shape == "decahedron":
        p = max(2, round(diameter_A / (2.0 * nn)))
        cluster = Decahedron(
            element, p, int(rng.integers(1, max(1, p // 2) + 1)), int(rng.integers(0, 2)), latticeconstant=a
        )
    elif shape == "icosahedron":
        cluster = Icosahedron(element, max(2, round(diameter_A / (2.0 * nn)) + 1), latticeconstant=a)
    elif shape == "sphere":
        n = math.ceil(diameter_A / a) + 2
        crystal = bulk(element, "fcc", a=a, cubic=True).repeat((n, n, n))
        crystal.positions -= crystal.positions.mean(0)
        cluster = crystal[np.linalg.norm(crystal.positions, axis=1) <= diameter_A / 2.0]
    else:
        raise ValueError(f"nanoparticle shape must be one of {NANOPARTICLE_SHAPES}, got {shape!r}")
    cluster = cluster.copy()
    cluster.positions -= cluster.positions.mean(0)
    return cluster


def nanoparticle_specimen(
    rng: np.random.Generator,
    box_A: float,
    element: str,
    shape: str,
    diameter_A: float,
    zone_axis: Sequence[int],
    rotation_deg: float,
    tilt_deg: float,
    centre_A: Sequence[float],
    support: str | None = "carbon",
    support_thickness_A: float = 30.0,
) -> Any:
    """An fcc nanoparticle of ``element`` on an amorphous support, in the ``box_A`` cell.

    The particle's cubic ``zone_axis`` (for the twinned decahedra and icosahedra: their built axes, z or
    [110]-like for ``zone_axis`` not [001]) is turned onto z, tilted by ``tilt_deg`` about a random
    in-plane axis and rotated by ``rotation_deg`` about z; it sits on top of the support (below it in z:
    the beam enters the particle first), centred at ``centre_A`` (x, y).
    """
    cluster = _cluster(element, shape, diameter_A, rng)
    if shape in ("octahedron", "sphere"):
        cluster.rotate(np.asarray(zone_axis, dtype=float), (0.0, 0.0, 1.0), center=(0.0, 0.0, 0.0))
    elif tuple(int(v) for v in zone_axis) != (0, 0, 1):
        cluster.rotate(90.0, "x", center=(0.0, 0.0, 0.0))
    if tilt_deg:
        axis_angle = rng.uniform(0.0, 2.0 * math.pi)
        cluster.rotate(float(tilt_deg), (math.cos(axis_angle), math.sin(axis_angle), 0.0), center=(0, 0, 0))
    cluster.rotate(float(rotation_deg), "z", center=(0.0, 0.0, 0.0))
    cluster.positions[:, 0] += float(centre_A[0])
    cluster.positions[:, 1] += float(centre_A[1])
    cluster.positions[:, 2] -= cluster.positions[:, 2].max()
    parts = cluster
    if support:
        gap_A = 1.8  # particle-support spacing
        slab = amorphous_slab(rng, (box_A, box_A), support_thickness_A, support, z0_A=gap_A)
        parts = cluster + slab
    return _finish(parts, box_A)


# --------------------------------------------------------------------------------------------------
# configuration


def _uniform(node: Any, path: str, lower: float = -math.inf, upper: float = math.inf) -> Uniform:
    if isinstance(node, bool) or node is None:
        raise ConfigError(path, f"must be a number or {{low: ..., high: ...}}, got {node!r}")
    if isinstance(node, int | float):
        node = {"low": node, "high": node}
    if not isinstance(node, Mapping) or set(node) != {"low", "high"}:
        raise ConfigError(path, f"must be a number or {{low: ..., high: ...}}, got {node!r}")
    try:
        low, high = float(node["low"]), float(node["high"])
    except (TypeError, ValueError):
        raise ConfigError(path, f"low and high must be numbers, got {dict(node)}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(path, f"needs finite low <= high, got [{low}, {high}]")
    if low < lower or high > upper:
        raise ConfigError(path, f"range [{low}, {high}] is outside [{lower}, {upper}]")
    return Uniform(low, high)


def _choices(node: Any, path: str, allowed: Sequence[str] | None = None) -> tuple:
    if isinstance(node, str | int | float):
        node = [node]
    if not isinstance(node, Sequence) or isinstance(node, str) or not node:
        raise ConfigError(path, f"must be a non-empty list, got {node!r}")
    values = tuple(node)
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConfigError(path, f"unknown value(s) {bad}; known: {', '.join(map(str, allowed))}")
    return values


def _weights(node: Any, path: str, names: Sequence[str]) -> np.ndarray:
    if not isinstance(node, Mapping):
        raise ConfigError(path, f"must map {', '.join(names)} to non-negative weights, got {node!r}")
    unknown = sorted(set(node) - set(names))
    if unknown:
        raise ConfigError(path, f"unknown key(s) {unknown}; known: {', '.join(names)}")
    try:
        weights = np.array([float(node.get(name, 0.0)) for name in names])
    except (TypeError, ValueError):
        raise ConfigError(path, f"weights must be numbers, got {dict(node)}") from None
    if np.any(weights < 0) or not weights.sum() > 0:
        raise ConfigError(path, f"weights must be >= 0 and not all zero, got {dict(node)}")
    return weights / weights.sum()


def _zone_axes(node: Any, path: str) -> tuple[tuple[int, int, int], ...]:
    from datagen.specimen import parse_zone_axis

    axes = []
    for axis in _choices(node, path):
        try:
            axes.append(parse_zone_axis(list(axis) if not isinstance(axis, str) else axis))
        except (TypeError, ValueError):
            raise ConfigError(
                path, f"zone axis {axis!r} is not three integers [u, v, w], not all 0"
            ) from None
    return tuple(axes)


def _node(cfg: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    node = cfg.get(name) or {}
    return node if isinstance(node, Mapping) else {}


@dataclass(frozen=True)
class HaadfDraw:
    """Everything random about one image (the specimen's own randomness comes from ``seed``)."""

    model: str
    seed: int
    optics: HaadfOptics
    pixel_size_A: float
    z_exponent: float
    atom_sigma_A: float
    kind: str
    structure_index: int
    zone_axis: tuple[int, int, int]
    rotation_deg: float
    thickness_A: float
    extra: dict = field(default_factory=dict)


class HaadfSpace:
    """The checked distributions of a ``simulation`` node of conf/simulation/haadf.yaml."""

    def __init__(self, cfg: Mapping[str, Any], path: str = "simulation") -> None:
        self.path = path
        p = path
        try:
            self.pixels = int(cfg.get("pixels", 256))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{p}.pixels", f"must be an even integer >= 8, got {cfg.get('pixels')!r}"
            ) from None
        if self.pixels < 8 or self.pixels % 2:
            raise ConfigError(f"{p}.pixels", f"must be an even integer >= 8, got {self.pixels}")
        self.pixel_size = _uniform(cfg.get("pixel_size_A"), f"{p}.pixel_size_A", 1e-3, 10.0)
        if self.pixel_size.low <= 0:
            raise ConfigError(f"{p}.pixel_size_A", f"must be positive, got {self.pixel_size}")
        try:
            self.abtem_fraction = float(cfg.get("abtem_fraction", 0.0))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{p}.abtem_fraction", f"must be a number, got {cfg.get('abtem_fraction')!r}"
            ) from None
        if not 0.0 <= self.abtem_fraction <= 1.0:
            raise ConfigError(f"{p}.abtem_fraction", f"must be in [0, 1], got {self.abtem_fraction}")

        o, op = _node(cfg, "optics"), f"{p}.optics"
        try:
            self.energies_eV = tuple(float(e) for e in _choices(o.get("energy_eV"), f"{op}.energy_eV"))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{op}.energy_eV", f"must be energies in eV, got {o.get('energy_eV')!r}"
            ) from None
        if any(not 1e3 <= e <= 5e6 for e in self.energies_eV):
            raise ConfigError(
                f"{op}.energy_eV", f"energies must lie in 1 keV .. 5 MeV, got {self.energies_eV}"
            )
        self.semiangle = _uniform(o.get("semiangle_mrad"), f"{op}.semiangle_mrad", 1.0, 100.0)
        self.Cs = _uniform(o.get("Cs_A", 0.0), f"{op}.Cs_A")
        self.C5 = _uniform(o.get("C5_A", 0.0), f"{op}.C5_A")
        defocus = o.get("defocus_A", "scherzer")
        self.defocus = "scherzer" if defocus == "scherzer" else _uniform(defocus, f"{op}.defocus_A")
        self.defocus_offset = _uniform(o.get("defocus_offset_A", 0.0), f"{op}.defocus_offset_A")
        self.inner = _uniform(o.get("detector_inner_mrad"), f"{op}.detector_inner_mrad", 0.0, 1000.0)
        self.outer = _uniform(o.get("detector_outer_mrad"), f"{op}.detector_outer_mrad", 0.0, 1000.0)
        if self.outer.low <= self.inner.high:
            raise ConfigError(
                f"{op}.detector_outer_mrad",
                f"must lie above detector_inner_mrad ({self.outer.low} <= {self.inner.high})",
            )
        self.source = _uniform(o.get("source_fwhm_A", 0.0), f"{op}.source_fwhm_A", 0.0, 10.0)

        i, ip = _node(cfg, "incoherent"), f"{p}.incoherent"
        self.z_exponent = _uniform(i.get("z_exponent", 1.7), f"{ip}.z_exponent", 0.5, 3.0)
        self.atom_sigma = _uniform(i.get("atom_sigma_A", 0.08), f"{ip}.atom_sigma_A", 0.01, 2.0)
        self.margin_A = float(i.get("margin_A", 4.0))
        if not self.margin_A > 0:
            raise ConfigError(f"{ip}.margin_A", f"must be positive, got {self.margin_A}")
        a = dict(_node(cfg, "abtem"))
        try:
            self.abtem = AbtemSettings.from_mapping(a)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{p}.abtem", str(err)) from None
        unknown = sorted(set(a) - set(AbtemSettings.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{p}.abtem", f"unknown key(s) {unknown}")

        s, sp = _node(cfg, "specimen"), f"{p}.specimen"
        self.kind_weights = _weights(s.get("kinds"), f"{sp}.kinds", SPECIMEN_KINDS)
        c, cp = _node(s, "crystal"), f"{sp}.crystal"
        self.zone_axes = _zone_axes(c.get("zone_axes"), f"{cp}.zone_axes")
        self.thickness = _uniform(c.get("thickness_A"), f"{cp}.thickness_A", 0.5, 1e4)
        self.rotation = _uniform(c.get("rotation_deg", {"low": 0.0, "high": 360.0}), f"{cp}.rotation_deg")
        self.max_strain = float(c.get("max_strain", 0.02))
        d, dp = _node(s, "defects"), f"{sp}.defects"
        self.vacancy_density = _uniform(
            d.get("column_vacancies_per_nm2", 0.0), f"{dp}.column_vacancies_per_nm2", 0
        )
        self.substitution_density = _uniform(
            d.get("column_substitutions_per_nm2", 0.0), f"{dp}.column_substitutions_per_nm2", 0
        )
        self.atom_vacancy = _uniform(d.get("atom_vacancy_fraction", 0.0), f"{dp}.atom_vacancy_fraction", 0, 1)
        self.dopants = _uniform(d.get("dopant_fraction", 0.0), f"{dp}.dopant_fraction", 0, 1)
        from ase.data import atomic_numbers

        self.substitution_elements = _choices(
            d.get("substitution_elements", ["Pt"]), f"{dp}.substitution_elements", list(atomic_numbers)[1:]
        )
        g, gp = _node(s, "grain_boundary"), f"{sp}.grain_boundary"
        self.misorientation = _uniform(
            g.get("misorientation_deg", {"low": 5.0, "high": 45.0}), f"{gp}.misorientation_deg"
        )
        self.other_zone_probability = _uniform(
            g.get("other_zone_axis_probability", 0.0), f"{gp}.other_zone_axis_probability", 0, 1
        ).high
        self.gb_min_distance = float(g.get("min_distance_A", 1.0))
        n, np_ = _node(s, "nanoparticle"), f"{sp}.nanoparticle"
        self.np_elements = _choices(n.get("elements", ["Au"]), f"{np_}.elements", list(atomic_numbers)[1:])
        from ase.data import reference_states

        not_fcc = [
            e
            for e in self.np_elements
            if (reference_states[atomic_numbers[e]] or {}).get("symmetry") != "fcc"
        ]
        if not_fcc:
            raise ConfigError(f"{np_}.elements", f"need fcc metals (ASE reference states), not {not_fcc}")
        self.np_shapes = _choices(
            n.get("shapes", list(NANOPARTICLE_SHAPES)), f"{np_}.shapes", NANOPARTICLE_SHAPES
        )
        self.np_diameter = _uniform(n.get("diameter_A"), f"{np_}.diameter_A", 3.0, 1e3)
        self.np_zone_axes = _zone_axes(
            n.get("zone_axes", [[0, 0, 1], [0, 1, 1], [1, 1, 1]]), f"{np_}.zone_axes"
        )
        self.np_tilt = _uniform(n.get("tilt_deg", 0.0), f"{np_}.tilt_deg", 0.0, 90.0)
        self.np_centre = _uniform(
            n.get("centre_fraction", {"low": 0.3, "high": 0.7}), f"{np_}.centre_fraction", 0, 1
        )
        sup, supp = _node(n, "support"), f"{np_}.support"
        self.support_probability = _uniform(sup.get("probability", 1.0), f"{supp}.probability", 0, 1).high
        self.support_materials = _choices(
            sup.get("materials", ["carbon"]), f"{supp}.materials", sorted(AMORPHOUS_MATERIALS)
        )
        self.support_thickness = _uniform(sup.get("thickness_A", 30.0), f"{supp}.thickness_A", 1.0, 1e3)

    def draw(self, rng: np.random.Generator, num_structures: int) -> HaadfDraw:
        """One image's parameters (the order of draws is part of the reproducibility contract)."""
        seed = int(rng.integers(2**31 - 1))
        model = "abtem" if rng.uniform() < self.abtem_fraction else "incoherent"
        energy = float(self.energies_eV[int(rng.integers(len(self.energies_eV)))])
        Cs, C5 = self.Cs.draw(rng), self.C5.draw(rng)
        base = scherzer_defocus(Cs, energy) if self.defocus == "scherzer" else self.defocus.draw(rng)
        inner = self.inner.draw(rng)
        optics = HaadfOptics(
            energy_eV=energy,
            semiangle_mrad=self.semiangle.draw(rng),
            defocus_A=base + self.defocus_offset.draw(rng),
            Cs_A=Cs,
            C5_A=C5,
            detector_inner_mrad=inner,
            detector_outer_mrad=max(self.outer.draw(rng), inner + 1.0),
            source_fwhm_A=self.source.draw(rng),
        )
        pixel = self.pixel_size.draw(rng)
        z_exponent, atom_sigma = self.z_exponent.draw(rng), self.atom_sigma.draw(rng)
        kind = SPECIMEN_KINDS[int(rng.choice(len(SPECIMEN_KINDS), p=self.kind_weights))]
        structure = int(rng.integers(num_structures))
        zone_axis = self.zone_axes[int(rng.integers(len(self.zone_axes)))]
        rotation = self.rotation.draw(rng)
        thickness = self.thickness.draw(rng)
        extra: dict[str, Any] = {}
        if kind == "grain_boundary":
            other = self.zone_axes[int(rng.integers(len(self.zone_axes)))]
            extra = {
                "zone_axis_2": other if rng.uniform() < self.other_zone_probability else zone_axis,
                "misorientation_deg": float(self.misorientation.draw(rng) * rng.choice([-1.0, 1.0])),
                "point_fraction": (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))),
                "normal_deg": float(rng.uniform(0.0, 360.0)),
            }
        elif kind == "nanoparticle":
            extra = {
                "element": str(self.np_elements[int(rng.integers(len(self.np_elements)))]),
                "shape": str(self.np_shapes[int(rng.integers(len(self.np_shapes)))]),
                "diameter_A": self.np_diameter.draw(rng),
                "np_zone_axis": self.np_zone_axes[int(rng.integers(len(self.np_zone_axes)))],
                "tilt_deg": self.np_tilt.draw(rng),
                "centre_fraction": (self.np_centre.draw(rng), self.np_centre.draw(rng)),
                "support": (
                    str(self.support_materials[int(rng.integers(len(self.support_materials)))])
                    if rng.uniform() < self.support_probability
                    else None
                ),
                "support_thickness_A": self.support_thickness.draw(rng),
            }
        if kind != "nanoparticle":
            extra.update(
                {
                    "vacancies_per_nm2": self.vacancy_density.draw(rng),
                    "substitutions_per_nm2": self.substitution_density.draw(rng),
                    "atom_vacancy_fraction": self.atom_vacancy.draw(rng),
                    "dopant_fraction": self.dopants.draw(rng),
                }
            )
        return HaadfDraw(
            model,
            seed,
            optics,
            pixel,
            z_exponent,
            atom_sigma,
            kind,
            structure,
            zone_axis,
            rotation,
            thickness,
            extra,
        )


# --------------------------------------------------------------------------------------------------
# one sample


class HaadfSampleMaker:
    """Makes the image of a global index: draws, builds the specimen, renders (one per process)."""

    def __init__(self, simulation_cfg: Mapping[str, Any], structures: Sequence[Any], seed: int) -> None:
        self.space = HaadfSpace(simulation_cfg)
        try:
            self.max_attempts = int(simulation_cfg.get("max_attempts", 20))
        except (TypeError, ValueError):
            raise ConfigError("simulation.max_attempts", "must be an integer") from None
        if self.max_attempts < 1:
            raise ConfigError("simulation.max_attempts", f"must be >= 1, got {self.max_attempts}")
        self.structures = list(structures)
        self.seed = int(seed)

    def geometry(self, draw: HaadfDraw) -> ImageGeometry:
        margin = self.space.margin_A
        return plan_geometry(self.space.pixels, draw.pixel_size_A, margin)

    def specimen(self, draw: HaadfDraw, geometry: ImageGeometry) -> tuple[Any, dict[str, Any]]:
        """The specimen cell and its metadata (``source_id``, ``formula``, ``description``)."""
        rng = np.random.default_rng(draw.seed)
        box = geometry.box_A
        extra = draw.extra
        if draw.kind == "nanoparticle":
            centre = [geometry.origin_A + f * geometry.field_A for f in extra["centre_fraction"]]
            atoms = nanoparticle_specimen(
                rng,
                box,
                extra["element"],
                extra["shape"],
                extra["diameter_A"],
                extra["np_zone_axis"],
                draw.rotation_deg,
                extra["tilt_deg"],
                centre,
                extra["support"],
                extra["support_thickness_A"],
            )
            support = (
                f" on {extra['support_thickness_A']:.0f} A amorphous {extra['support']}"
                if extra["support"]
                else ""
            )
            meta = {
                "source_id": f"cluster:{extra['element']}",
                "formula": extra["element"],
                "description": f"{extra['shape']} {extra['element']} d~{extra['diameter_A']:.0f} A "
                f"[{' '.join(map(str, extra['np_zone_axis']))}] tilt {extra['tilt_deg']:.1f} deg{support}",
                "zone_axis": extra["np_zone_axis"],
                "thickness_A": float(np.ptp(atoms.positions[:, 2])) if len(atoms) else 0.0,
            }
            return atoms, meta
        record = self.structures[draw.structure_index]
        if draw.kind == "crystal":
            atoms = crystal_specimen(
                record.atoms, draw.zone_axis, draw.rotation_deg, draw.thickness_A, box, self.space.max_strain
            )
            description = f"{record.formula} [{' '.join(map(str, draw.zone_axis))}]"
        else:
            point = [geometry.origin_A + f * geometry.field_A for f in extra["point_fraction"]]
            atoms = grain_boundary_specimen(
                record.atoms,
                (draw.zone_axis, extra["zone_axis_2"]),
                (draw.rotation_deg, draw.rotation_deg + extra["misorientation_deg"]),
                draw.thickness_A,
                box,
                point,
                extra["normal_deg"],
                self.space.gb_min_distance,
                self.space.max_strain,
            )
            description = (
                f"{record.formula} grain boundary [{' '.join(map(str, draw.zone_axis))}]/"
                f"[{' '.join(map(str, extra['zone_axis_2']))}] "
                f"misorientation {extra['misorientation_deg']:.1f} deg"
            )
        area_nm2 = (geometry.field_A / 10.0) ** 2
        o, f = geometry.origin_A, geometry.field_A
        atoms = add_point_defects(
            atoms,
            rng,
            (o, o + f, o, o + f),
            column_vacancies=int(rng.poisson(extra["vacancies_per_nm2"] * area_nm2)),
            column_substitutions=int(rng.poisson(extra["substitutions_per_nm2"] * area_nm2)),
            substitution_elements=self.space.substitution_elements,
            atom_vacancy_fraction=extra["atom_vacancy_fraction"],
            dopant_fraction=extra["dopant_fraction"],
        )
        meta = {
            "source_id": record.source_id,
            "formula": record.formula,
            "description": description,
            "zone_axis": draw.zone_axis,
            "thickness_A": float(draw.thickness_A),
        }
        return atoms, meta

    def render(self, draw: HaadfDraw, atoms: Any, geometry: ImageGeometry) -> np.ndarray:
        if draw.model == "abtem":
            return simulate_abtem(atoms, draw.optics, geometry, self.space.abtem, draw.seed)
        return render_incoherent(
            atoms.positions[:, :2], atoms.numbers, draw.optics, geometry, draw.z_exponent, draw.atom_sigma_A
        )

    def __call__(self, index: int, rejected: Counter | None = None) -> dict[str, Any]:
        """The record of image ``index``; rejected specimens are redrawn (then ``SampleFailed``)."""
        from datagen.cli import SampleFailed, rejection_reason
        from datagen.specimen import SpecimenRejected

        rng = sample_rng(self.seed, index)
        last = "no attempt"
        for _ in range(self.max_attempts):
            draw = self.space.draw(rng, len(self.structures))
            geometry = self.geometry(draw)
            try:
                atoms, meta = self.specimen(draw, geometry)
            except SpecimenRejected as err:
                last = str(getattr(err, "reason", "") or rejection_reason(err))
                if rejected is not None:
                    rejected[last] += 1
                continue
            image = self.render(draw, atoms, geometry)
            return self.record(index, draw, atoms, meta, image)
        raise SampleFailed(f"all {self.max_attempts} draws rejected (last: {last})")

    def record(
        self, index: int, draw: HaadfDraw, atoms: Any, meta: Mapping[str, Any], image: np.ndarray
    ) -> dict:
        o = draw.optics
        incoherent = draw.model == "incoherent"
        return {
            "image": image.astype(np.float32),
            "pixel_size_A": draw.pixel_size_A,
            "model": draw.model,
            "energy_eV": o.energy_eV,
            "semiangle_mrad": o.semiangle_mrad,
            "Cs_A": o.Cs_A,
            "C5_A": o.C5_A,
            "defocus_A": o.defocus_A,
            "detector_inner_mrad": o.detector_inner_mrad,
            "detector_outer_mrad": o.detector_outer_mrad,
            "source_size_A": o.source_fwhm_A,
            "z_exponent": draw.z_exponent if incoherent else math.nan,
            "atom_sigma_A": draw.atom_sigma_A if incoherent else math.nan,
            "num_phonons": 0 if incoherent else int(self.space.abtem.num_phonons),
            "thickness_A": float(meta["thickness_A"]),
            "zone_axis": np.asarray(meta["zone_axis"], dtype=np.int32),
            "rotation_deg": draw.rotation_deg,
            "num_atoms": len(atoms),
            "seed": draw.seed,
            "sample_index": int(index),
            "specimen_kind": draw.kind,
            "source_id": meta["source_id"],
            "formula": meta["formula"],
            "description": meta["description"],
        }


# --------------------------------------------------------------------------------------------------
# shards


IMAGE_LAYOUT = ShardLayout(
    store.IMAGE,
    IMAGE_NUMERIC_FIELDS,
    IMAGE_STRING_FIELDS,
    dtypes=_DTYPES,
    empty_shapes={"zone_axis": (3,)},
    chunked=("image",),
)
"""Image shards (``deepstem.image/1``); :func:`image_layout` adds the image size of a config."""


def image_layout(pixels: int) -> ShardLayout:
    """:data:`IMAGE_LAYOUT` with ``pixels x pixels`` images (the shape of a shard without images)."""
    return replace(IMAGE_LAYOUT, empty_shapes={**IMAGE_LAYOUT.empty_shapes, "image": (pixels, pixels)})


def write_image_index(out_dir: str | Path) -> Path:
    """``index.json`` over the finished image shards of a folder (:func:`datagen.shards.write_index`)."""
    return write_index(out_dir, IMAGE_LAYOUT)


def run(cfg: Any, maker: HaadfSampleMaker | None = None) -> Any:
    """``python datagen.py simulation=haadf``: compute (or resume, or skip) one image shard.

    Same contract as the kernel pipeline (:func:`datagen.cli.run_shard`: sharding, checkpoints, resume,
    summary, one-line :class:`ConfigError`); returns its :class:`datagen.cli.RunSummary`.
    """
    from datagen.cli import plain_config, run_shard, structures_of, validate_root

    container = plain_config(cfg)
    seed, _, _, _ = validate_root(container)
    simulation = container.get("simulation") or {}
    # abTEM runs on the root's device and dask scheduler
    abtem_node = {
        **(simulation.get("abtem") or {}),
        "device": str(container.get("device", "cpu")),
        "scheduler": str(container.get("scheduler", "threads")),
    }
    simulation = {**simulation, "abtem": abtem_node}
    space = HaadfSpace(simulation)  # check everything before anything is written

    def prepare() -> Any:
        nonlocal maker
        if maker is None:
            maker = HaadfSampleMaker(simulation, structures_of(container), seed)
        workers = int(container.get("workers", 1))
        return lambda todo: _results(maker, todo, workers, container, simulation, seed)

    attrs = {
        "seed_rule": "image i: numpy.random.default_rng([global_seed, i]); `seed` = specimen and phonon seed",
        "intensity_unit": "fraction of incident electrons reaching the detector",
        "source_size": "FWHM of a Gaussian, Angstrom",
    }
    return run_shard(cfg, image_layout(space.pixels), prepare, attrs, noun="images")


_WORKER: HaadfSampleMaker | None = None


def _init_worker(container: dict, simulation: dict, seed: int) -> None:
    """Pool initializer: one warm :class:`HaadfSampleMaker` per worker process.

    The workers are spawned, so none of the parent's abTEM configuration reaches them: the root
    ``fftw_planning`` (see :data:`datagen.cli.DEFAULT_FFTW_PLANNING`) is set here, as the kernel workers
    set it, if the worker will run abTEM at all.
    """
    global _WORKER
    from datagen.cli import DEFAULT_FFTW_PLANNING, structures_of

    logging.basicConfig(level=logging.WARNING)
    abtem = {
        **(simulation.get("abtem") or {}),
        "scheduler": "synchronous",
    }  # the processes are the parallelism
    _WORKER = HaadfSampleMaker({**simulation, "abtem": abtem}, structures_of(container), seed)
    if _WORKER.space.abtem_fraction > 0:
        import abtem as abtem_module

        planning = str(container.get("fftw_planning", DEFAULT_FFTW_PLANNING))
        abtem_module.config.set({"fftw.planning_effort": planning})


def _work(index: int) -> tuple:
    from datagen.cli import attempt

    assert _WORKER is not None
    return attempt(_WORKER, index)


def _results(
    maker: HaadfSampleMaker, todo: Sequence[int], workers: int, container: dict, simulation: dict, seed: int
) -> Any:
    """``(index, record, rejected, error)`` per index, in this process or from warm worker processes."""
    from datagen.cli import attempt

    if workers <= 1 or len(todo) <= 1:
        for index in todo:
            yield attempt(maker, index)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    initargs = (container, simulation, seed)
    with context.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=initargs) as pool:
        yield from pool.imap_unordered(_work, todo)
