"""Electron optics: wavelength, interaction parameter, aberrations and the STEM probe.

Conventions (one place for the whole project):

* Units: energy in eV, lengths in Angstrom, spatial frequencies in 1/Angstrom, aperture semi-angles in
  mrad, aberration angles ``phiNM`` in radians.
* Aberrations use Krivanek's polar notation. With ``alpha = lambda |k|`` and ``phi = atan2(ky, kx)``

      chi(k) = 2 pi / lambda * sum_nm C_nm alpha^(n+1) cos(m (phi - phi_nm)) / (n + 1)

  so that ``C10`` and ``C30`` alone give ``chi = pi lambda k^2 (0.5 Cs lambda^2 k^2 - defocus)``.
* Defocus sign (abTEM's): ``defocus_A = -C10``. A positive defocus focuses the probe at a depth
  ``defocus_A`` *below* the entrance plane: propagating the probe forward by ``defocus_A`` with the
  Fresnel propagator ``exp(-i pi lambda k^2 dz)`` brings it to focus. Scherzer defocus is positive for
  positive Cs.
* The probe is ``psi(r) = IFFT[A(k) exp(-i chi(k))]``, normalised to ``sum |psi|^2 = 1`` over the grid in
  real and in reciprocal space alike (orthonormal FFTs).
* Real-space arrays are indexed ``[x, y]``; reciprocal-space arrays returned to users are centred (zero
  frequency at pixel ``n // 2``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from physics.constants import (
    ELEMENTARY_CHARGE_C,
    ANGSTROM_m,
    ELECTRON_MASS_kg,
    PLANCK_Js,
    SPEED_OF_LIGHT_m_per_s,
)
from physics.fourier import phase_ramp
from physics.sampling import Grid, polar_frequencies

__all__ = [
    "POLAR_ABERRATIONS",
    "aberration_phase",
    "aperture",
    "fresnel_propagator",
    "interaction_parameter",
    "probe",
    "probe_diameter_A",
    "rayleigh_radius_A",
    "relativistic_mass_kg",
    "scherzer_defocus",
    "wavelength",
]

# Polar aberration coefficients (n, m) up to fifth order. Symmetric ones (m = 0) have no angle.
POLAR_ABERRATIONS: tuple[tuple[int, int], ...] = (
    (1, 0), (1, 2),
    (2, 1), (2, 3),
    (3, 0), (3, 2), (3, 4),
    (4, 1), (4, 3), (4, 5),
    (5, 0), (5, 2), (5, 4), (5, 6),
)  # fmt: skip
_ABERRATION_NAME = re.compile(r"^(C|phi)(\d)(\d)$")


def _check_energy(energy_eV: float) -> float:
    energy = float(energy_eV)
    if not energy > 0:
        raise ValueError(f"energy_eV must be positive, got {energy_eV}")
    return energy


def relativistic_mass_kg(energy_eV: float) -> float:
    """Relativistic electron mass ``m0 (1 + e E / (m0 c^2))`` in kg."""
    energy = _check_energy(energy_eV)
    rest_energy_J = ELECTRON_MASS_kg * SPEED_OF_LIGHT_m_per_s**2
    return ELECTRON_MASS_kg * (1.0 + ELEMENTARY_CHARGE_C * energy / rest_energy_J)


def wavelength(energy_eV: float) -> float:
    """Relativistic electron wavelength in Angstrom: ``h / sqrt(2 m0 e E (1 + e E / (2 m0 c^2)))``.

    >>> round(wavelength(300e3), 6)
    0.019687
    """
    energy = _check_energy(energy_eV)
    eE = ELEMENTARY_CHARGE_C * energy
    momentum = math.sqrt(
        2.0 * ELECTRON_MASS_kg * eE * (1.0 + eE / (2.0 * ELECTRON_MASS_kg * SPEED_OF_LIGHT_m_per_s**2))
    )
    return PLANCK_Js / momentum / ANGSTROM_m


def interaction_parameter(energy_eV: float) -> float:
    """Interaction parameter ``sigma = 2 pi m e lambda / h^2`` (relativistic m) in rad / (V Angstrom).

    A projected potential ``v_z`` (V Angstrom) gives the phase-object transmission ``exp(i sigma v_z)``.
    """
    lam_m = wavelength(energy_eV) * ANGSTROM_m
    sigma_per_V_per_m = (
        2.0 * math.pi * relativistic_mass_kg(energy_eV) * ELEMENTARY_CHARGE_C * lam_m / PLANCK_Js**2
    )
    return sigma_per_V_per_m * ANGSTROM_m


def scherzer_defocus(Cs_A: float, energy_eV: float) -> float:
    """Scherzer defocus ``sqrt(1.5 Cs lambda)`` in Angstrom (positive for positive Cs; ``C10 = -defocus``).

    A negative Cs returns the mirrored (negative) defocus.
    """
    Cs = float(Cs_A)
    return math.copysign(math.sqrt(1.5 * abs(Cs) * wavelength(energy_eV)), Cs)


def probe_diameter_A(semiangle_mrad: float, energy_eV: float) -> float:
    """Diameter of the aberration-free probe at the first zero of its Airy pattern, in Angstrom.

    ``d = 2 * 3.8317 / (pi * 2 alpha_k) = 3.8317 / (pi alpha_k)`` with ``alpha_k = alpha / lambda`` the
    aperture *radius* in 1/Angstrom. Paper 002 eq. 16 writes ``d = 2 * 3.8317 / (alpha pi)`` with the
    convergence angle ``alpha`` in 1/Angstrom; its worked example (MgO, 300 kV, 20 mrad semi-angle:
    probe diameter 1.2 A) fixes that ``alpha`` as the full angle, which is what is implemented here.
    Equal to twice :func:`rayleigh_radius_A` to 0.1 %.
    """
    alpha_k = float(semiangle_mrad) * 1e-3 / wavelength(energy_eV)
    return 3.8317 / (math.pi * alpha_k)


def rayleigh_radius_A(semiangle_mrad: float, energy_eV: float) -> float:
    """Rayleigh resolution ``0.61 lambda / sin(alpha)`` in Angstrom."""
    return 0.61 * wavelength(energy_eV) / math.sin(float(semiangle_mrad) * 1e-3)


def _parse_aberrations(
    aberrations: Mapping[str, ArrayLike] | None,
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Map ``{"C12": 20.0, "phi12": 0.3, ...}`` to ``{(1, 2): (20.0, 0.3)}``, rejecting unknown names.

    Values may be scalars or 1D arrays of per-sample values (a batch); they are returned as float64 arrays.
    """
    parsed: dict[tuple[int, int], list[np.ndarray]] = {}
    for name, value in (aberrations or {}).items():
        match = _ABERRATION_NAME.match(name)
        if match is None or (int(match[2]), int(match[3])) not in POLAR_ABERRATIONS:
            known = ", ".join(f"C{n}{m}" for n, m in POLAR_ABERRATIONS)
            raise ValueError(f"unknown aberration coefficient {name!r}; known: {known} (and phiNM angles)")
        kind, order = match[1], (int(match[2]), int(match[3]))
        if kind == "phi" and order[1] == 0:
            raise ValueError(f"aberration {name!r}: C{order[0]}0 is rotationally symmetric, it has no angle")
        array = np.asarray(value, dtype=np.float64)
        if array.ndim > 1 or not np.all(np.isfinite(array)):
            raise ValueError(f"aberration {name!r} must be a finite number or a 1D array of numbers")
        entry = parsed.setdefault(order, [np.zeros(()), np.zeros(())])
        entry[0 if kind == "C" else 1] = array
    return {order: (c, phi) for order, (c, phi) in parsed.items()}


def aberration_phase(
    k_invA: np.ndarray,
    phi_rad: np.ndarray,
    energy_eV: float,
    aberrations: Mapping[str, ArrayLike] | None = None,
) -> np.ndarray:
    """Aberration function ``chi`` (rad) at spatial frequency ``|k|`` (1/A) and azimuth ``phi`` (rad).

    ``aberrations`` holds polar coefficients ``C10, C12, C21, C23, C30, ...`` in Angstrom and angles
    ``phi12, phi21, phi23, ...`` in radians (missing entries are zero). A coefficient given as an array
    of B values gives a batch: the result then has shape ``(B, *k.shape)``.
    """
    lam = wavelength(energy_eV)
    alpha = lam * np.asarray(k_invA, dtype=np.float64)
    phi = np.asarray(phi_rad, dtype=np.float64)
    grid_shape = np.broadcast_shapes(alpha.shape, phi.shape)
    trailing = (1,) * len(grid_shape)
    chi = np.zeros(grid_shape)
    for (n, m), (coefficient, angle) in _parse_aberrations(aberrations).items():
        if not np.any(coefficient):
            continue
        c = coefficient.reshape(coefficient.shape + trailing)
        angular = 1.0 if m == 0 else np.cos(m * (phi - angle.reshape(angle.shape + trailing)))
        chi = chi + c * alpha ** (n + 1) * angular / (n + 1)
    return 2.0 * np.pi / lam * chi


def aperture(
    k_invA: np.ndarray,
    energy_eV: float,
    semiangle_mrad: float,
    soft_edge_invA: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Condenser aperture transmission at spatial frequency ``|k|`` (1/A).

    Hard (``soft_edge_invA = 0``): 1 where ``lambda |k| <= alpha``, else 0. Soft: a linear ramp of width
    ``soft_edge_invA`` centred on the cut-off (the pixel's extent along the radial direction is the usual
    choice, see :func:`probe`), which anti-aliases the edge while keeping the transmitted area the same.
    """
    if not float(semiangle_mrad) > 0:
        raise ValueError(f"semiangle_mrad must be positive, got {semiangle_mrad}")
    cutoff_invA = float(semiangle_mrad) * 1e-3 / wavelength(energy_eV)
    k = np.asarray(k_invA, dtype=np.float64)
    edge = np.asarray(soft_edge_invA, dtype=np.float64)
    if not np.any(edge > 0):
        return (k <= cutoff_invA).astype(np.float64)
    ramp = np.clip((cutoff_invA - k) / np.where(edge > 0, edge, 1.0) + 0.5, 0.0, 1.0)
    return np.where(edge > 0, ramp, (k <= cutoff_invA).astype(np.float64))


def _probe_grid(
    gpts: int | Sequence[int] | None, sampling_A: float | Sequence[float] | None, gmax_invA: float | None
) -> Grid:
    if gpts is None:
        raise ValueError("probe: gpts (the number of pixels N) is required")
    if (sampling_A is None) == (gmax_invA is None):
        raise ValueError("probe: give exactly one of sampling_A (real-space pixel) or gmax_invA")
    if gmax_invA is not None:
        return Grid.from_gmax(gmax_invA, gpts)
    return Grid.from_sampling(sampling_A, gpts)  # type: ignore[arg-type]


def probe(
    energy_eV: float,
    semiangle_mrad: float,
    gpts: int | Sequence[int] | None = None,
    *,
    sampling_A: float | Sequence[float] | None = None,
    gmax_invA: float | None = None,
    defocus_A: ArrayLike = 0.0,
    Cs_A: ArrayLike = 0.0,
    aberrations: Mapping[str, ArrayLike] | None = None,
    soft_aperture: bool = False,
    aperture_edge_invA: ArrayLike = 0.0,
    position_A: ArrayLike | None = None,
    space: Literal["real", "reciprocal"] = "real",
    dtype: np.dtype | type = np.complex64,
) -> np.ndarray:
    """The STEM probe on an ``gpts`` grid given by its real-space pixel or by ``gmax_invA``.

    Parameters
    ----------
    energy_eV, semiangle_mrad
        Beam energy and convergence semi-angle of the condenser aperture.
    gpts
        Number of pixels N (or a pair).
    sampling_A, gmax_invA
        Exactly one: the real-space pixel size, or the reciprocal half-width (pixel ``1 / (2 gmax)``).
    defocus_A, Cs_A
        Convenience for ``C10 = -defocus_A`` and ``C30 = Cs_A``; they must not also appear in
        ``aberrations``.
    aberrations
        Further polar coefficients (``C12``, ``phi12``, ``C21``, ...); see :func:`aberration_phase`.
    soft_aperture
        Smooth the aperture edge over one reciprocal pixel instead of a hard cut.
    aperture_edge_invA
        Or smooth it over this width (1/A; a number or one per sample, shape ``(B,)``): the linear ramp of
        :func:`aperture`. A measured disc edge is softer than a hard cut (abTEM's anti-aliased aperture,
        partial spatial coherence, the detector's point spread); the wider of this and ``soft_aperture``'s
        pixel wins.
    position_A
        Probe centre in Angstrom from pixel (0, 0) (sub-pixel positions are exact Fourier shifts);
        default the grid centre ``(N // 2) * sampling`` (the centre pixel for even N).

    Batches: ``defocus_A``, ``Cs_A``, the ``aberrations`` values and ``position_A`` (shape ``(B, 2)``) may
    carry per-sample values; the result then has shape ``(B, N, N)``, each probe normalised on its own.
    space
        ``"real"``: ``psi(r)``; ``"reciprocal"``: ``A(k) exp(-i chi)`` times the position ramp, centred.
    """
    grid = _probe_grid(gpts, sampling_A, gmax_invA)
    coefficients = dict(aberrations or {})
    for name, value in (("C10", -np.asarray(defocus_A, float)), ("C30", np.asarray(Cs_A, float))):
        if np.any(value != 0.0):
            if name in coefficients:
                raise ValueError(f"probe: {name} given twice (keyword and aberrations)")
            coefficients[name] = value
    cutoff_invA = float(semiangle_mrad) * 1e-3 / wavelength(energy_eV)
    dk_invA = max(grid.reciprocal_sampling_invA)
    if cutoff_invA < dk_invA:
        raise ValueError(
            f"probe: the aperture radius ({cutoff_invA:.4g} 1/A for {semiangle_mrad} mrad at "
            f"{energy_eV} eV) is smaller than one reciprocal pixel ({dk_invA:.4g} 1/A); "
            "enlarge the grid extent (more gpts or a larger sampling_A)"
        )
    k, phi = polar_frequencies(grid)
    soft_edge = 0.0
    if soft_aperture:
        # the reciprocal pixel's extent along the radial direction
        dkx, dky = grid.reciprocal_sampling_invA
        soft_edge = np.hypot(np.cos(phi) * dkx, np.sin(phi) * dky)
    edge_invA = np.asarray(aperture_edge_invA, dtype=np.float64)
    if edge_invA.ndim > 1 or np.any(edge_invA < 0) or not np.all(np.isfinite(edge_invA)):
        raise ValueError(
            f"probe: aperture_edge_invA must be >= 0 (a number or (B,)), got {aperture_edge_invA!r}"
        )
    if np.any(edge_invA > 0):
        soft_edge = np.maximum(soft_edge, edge_invA.reshape((*edge_invA.shape, 1, 1)))
    wave_k = aperture(k, energy_eV, semiangle_mrad, soft_edge) * np.exp(
        -1j * aberration_phase(k, phi, energy_eV, coefficients)
    )
    if position_A is None:
        position_A = tuple((n // 2) * d for n, d in zip(grid.gpts, grid.sampling_A, strict=True))
    shift_px = np.asarray(position_A, dtype=np.float64) / np.asarray(grid.sampling_A)
    wave_k = wave_k * phase_ramp(grid.gpts, shift_px)
    wave_k = wave_k / np.sqrt(np.sum(np.abs(wave_k) ** 2, axis=(-2, -1), keepdims=True))
    if space == "reciprocal":
        return np.fft.fftshift(wave_k, axes=(-2, -1)).astype(dtype)
    if space != "real":
        raise ValueError(f"probe: space must be 'real' or 'reciprocal', got {space!r}")
    return np.fft.ifft2(wave_k, norm="ortho").astype(dtype)


def fresnel_propagator(grid: Grid, energy_eV: float, distance_A: float) -> np.ndarray:
    """Paraxial Fresnel propagator ``exp(-i pi lambda k^2 dz)`` in FFT order (forward for dz > 0)."""
    k, _ = polar_frequencies(grid)
    return np.exp(-1j * np.pi * wavelength(energy_eV) * float(distance_A) * k**2)
