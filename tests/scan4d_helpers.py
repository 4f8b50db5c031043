"""A small simulated 4D-STEM scan of a known weak phase object (POA), for the reference and CLI tests.

The object is a periodic field of Gaussian "atoms" (two species, jittered positions) whose period equals
the scan field, so every method sees periodic data and the answer is known analytically. CBEDs are
``|FFT(probe * T)|^2`` with the probe from :func:`physics.probe` and ``T`` the transmission function of
:func:`physics.transmission_function`, exact (no interpolation) because scan positions fall on object
pixels (``step = 2`` object pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from physics import interaction_parameter, probe, transmission_function, wavelength


@dataclass
class SimulatedScan:
    data: np.ndarray  # (Rx, Ry, Kx, Ky) float32, fraction of incident electrons per pixel
    energy_eV: float
    semiangle_mrad: float
    scan_step_A: float
    k_pixel_invA: float
    object_pixel_A: float
    phase: np.ndarray  # true phase (rad) on the object grid, periodic, pixel (0, 0) at scan position (0, 0)
    scan_rotation_deg: float = 0.0

    @property
    def truth_on_scan(self) -> np.ndarray:
        """The true phase at the probe positions (pixel = scan step, pixel (0, 0) = first position)."""
        step_px = round(self.scan_step_A / self.object_pixel_A)
        return self.phase[::step_px, ::step_px]


def atom_phase(
    num_px: int, pixel_A: float, atoms_per_side: int = 4, max_phase_rad: float = 0.3, seed: int = 0
) -> np.ndarray:
    """Periodic phase (rad) of Gaussian atoms (sigma 0.45 A) on a jittered square lattice, two species."""
    rng = np.random.default_rng(seed)
    extent = num_px * pixel_A
    spacing = extent / atoms_per_side
    x = np.arange(num_px) * pixel_A
    phase = np.zeros((num_px, num_px))
    sigma = 0.45
    for i in range(atoms_per_side):
        for j in range(atoms_per_side):
            for centre_frac, weight in (((0.25, 0.25), 1.0), ((0.75, 0.75), 0.45 + 0.3 * rng.random())):
                cx = (i + centre_frac[0]) * spacing + rng.normal(0, 0.2)
                cy = (j + centre_frac[1]) * spacing + rng.normal(0, 0.2)
                dx = (x - cx + extent / 2) % extent - extent / 2
                dy = (x - cy + extent / 2) % extent - extent / 2
                phase += weight * np.exp(-(dx[:, None] ** 2 + dy[None, :] ** 2) / (2 * sigma**2))
    return phase * (max_phase_rad / phase.max())


def simulate_scan(
    scan_px: int = 24,
    cbed_px: int = 48,
    energy_eV: float = 80e3,
    semiangle_mrad: float = 20.0,
    gmax_over_alpha: float = 4.0,
    defocus_A: float = 0.0,
    scan_rotation_deg: float = 0.0,
    dose_per_cbed: float | None = None,
    seed: int = 0,
    noise_seed: int | None = None,
) -> SimulatedScan:
    """Noise-free (or Poisson, ``dose_per_cbed`` electrons) scan of :func:`atom_phase`.

    ``seed`` fixes the object, ``noise_seed`` (default ``seed + 1``) the Poisson noise.

    ``scan_rotation_deg`` rotates every CBED by that angle about its centre, so the detector axes are
    rotated relative to the scan: a detector vector ``v_det`` corresponds to the scan-frame vector
    ``R(scan_rotation_deg) v_det`` (the convention of :mod:`evaluation.references`).
    """
    alpha_invA = semiangle_mrad * 1e-3 / wavelength(energy_eV)
    gmax_invA = gmax_over_alpha * alpha_invA
    pixel_A = 1.0 / (2.0 * gmax_invA)
    step_px = 2
    object_px = scan_px * step_px
    phase = atom_phase(object_px, pixel_A, seed=seed)
    transmission = transmission_function(phase / interaction_parameter(energy_eV), energy_eV)
    psi = probe(energy_eV, semiangle_mrad, cbed_px, gmax_invA=gmax_invA, defocus_A=defocus_A)
    centre = cbed_px // 2
    # object pixels seen by the probe window at each position (periodic object, integer positions)
    u = np.arange(cbed_px) - centre
    data = np.empty((scan_px, scan_px, cbed_px, cbed_px), dtype=np.float32)
    for i in range(scan_px):
        rows = (i * step_px + u) % object_px
        exit_waves = np.stack(
            [psi * transmission[np.ix_(rows, (j * step_px + u) % object_px)] for j in range(scan_px)]
        )
        cbed = np.abs(np.fft.fftshift(np.fft.fft2(exit_waves, norm="ortho"), axes=(-2, -1))) ** 2
        data[i] = cbed
    if scan_rotation_deg:
        # rotating the pattern content by -theta (ndimage's sense) gives v_scan = R(theta) v_det, the
        # convention of evaluation.references (checked by test_scan_rotation_is_recovered)
        data = ndimage.rotate(data, -scan_rotation_deg, axes=(2, 3), reshape=False, order=1)
        data = np.clip(data, 0, None).astype(np.float32)
    if dose_per_cbed is not None:
        rng = np.random.default_rng(seed + 1 if noise_seed is None else noise_seed)
        data = rng.poisson(data * dose_per_cbed).astype(np.float32)
    return SimulatedScan(
        data=data,
        energy_eV=energy_eV,
        semiangle_mrad=semiangle_mrad,
        scan_step_A=step_px * pixel_A,
        k_pixel_invA=2.0 * gmax_invA / cbed_px,
        object_pixel_A=pixel_A,
        phase=phase,
        scan_rotation_deg=scan_rotation_deg,
    )


def as_scan4d(s: SimulatedScan, data: np.ndarray | None = None, **calibration):
    """The :class:`evaluation.io.Scan4D` of a :func:`simulate_scan` result (its data, or ``data``), with its
    calibration plus ``calibration`` (e.g. ``defocus_A``, ``Cs_A``)."""
    from evaluation.io import Scan4D

    return Scan4D(
        data=s.data if data is None else data,
        energy_eV=s.energy_eV,
        semiangle_mrad=s.semiangle_mrad,
        scan_step_A=(s.scan_step_A, s.scan_step_A),
        k_pixel_invA=(s.k_pixel_invA, s.k_pixel_invA),
        **calibration,
    )


def truth_at(s: SimulatedScan, x_A: np.ndarray, y_A: np.ndarray) -> np.ndarray:
    """The periodic true phase of :func:`simulate_scan` at arbitrary points (linear interpolation; exact on
    its pixels)."""
    return ndimage.map_coordinates(
        s.phase,
        [np.asarray(x_A) / s.object_pixel_A, np.asarray(y_A) / s.object_pixel_A],
        order=1,
        mode="grid-wrap",
    )


def truth_on(s: SimulatedScan, recon) -> np.ndarray:
    """The true phase on the pixels of a reconstruction (its ``origin_A`` and ``pixel_size_A``)."""
    x = recon.origin_A[0] + np.arange(recon.phase.shape[0]) * recon.pixel_size_A[0]
    y = recon.origin_A[1] + np.arange(recon.phase.shape[1]) * recon.pixel_size_A[1]
    return truth_at(s, *np.meshgrid(x, y, indexing="ij"))
