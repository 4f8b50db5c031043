"""The incoherent imaging model (:mod:`datagen.haadf`, ``incoherent``): kinematic ADF cross-sections from
Lobato scattering factors, the power-law fit ``c Z^n``, the probe-intensity spectrum and
:func:`render_incoherent`."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from datagen.haadf.optics import FWHM_PER_SIGMA, HaadfOptics, ImageGeometry
from physics import probe, wavelength

__all__ = [
    "cross_sections_A2",
    "electron_scattering_factor_A",
    "kinematic_cross_section_A2",
    "power_law_prefactor_A2",
    "probe_psf_spectrum",
    "render_incoherent",
]


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
