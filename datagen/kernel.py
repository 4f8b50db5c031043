"""Frozen-phonon multislice of one AIRPI training sample: a 3x3 kernel of CBEDs, the exit wave and the probe.

Conventions (see also ``physics.optics`` and ARCHITECTURE.md, "Kernel training shards"):

* Units: eV, mrad, Angstrom, 1/Angstrom. Arrays are indexed ``[x, y]``.
* Output grid: ``K x K`` pixels covering ``-gmax .. +gmax`` in reciprocal space (pixel ``2 gmax / K``,
  zero frequency at pixel ``K // 2``); in real space the pixel is ``1 / (2 gmax)`` and the window is
  ``L_out = K / (2 gmax)`` wide, periodic (the output spectrum samples the exit wave's spectrum at the
  CBED pixel centres). The centre probe position sits at real-space pixel ``K // 2``, like
  :func:`physics.probe`'s default.
* Kernel order: position ``n = 3 i + j`` (row-major, ``n = 4`` the centre) is offset by
  ``((i - 1) step, (j - 1) step)`` along ``(x, y)`` from the centre position.
* ``cbed`` is the incoherent phonon mean of ``|psi(k)|^2`` as a fraction of the incident electrons per
  output pixel: each output pixel is the exact area-weighted sum of the simulation's reciprocal pixels
  inside it, so the total is preserved (it is 1 minus what leaves the ``+-gmax`` square, and never above
  1: the multislice runs with :class:`datagen.unitary_potential.UnitaryPotential`, whose slices conserve
  the flux that abTEM's band-limited transmission functions would otherwise raise by up to ~2 %).
* ``wave`` is the coherent phonon mean of the centre position's exit wave, normalised like the CBED
  (``sum |wave|^2`` is the coherently scattered fraction inside ``+-gmax``), by default referred back
  to the probe's plane (``wave_plane``); ``probe`` is :func:`physics.probe` on the same grid
  (``sum |probe|^2 = 1``, hard aperture, the defocus of the sample).

Speed: the simulation cell is not the specimen's supercell but a square box of ``p * L_out`` (integer
``p``, the smallest that holds the nine probes with a margin of ``probe_window_diameters`` probe
diameters, at least ``min_period_factor``), cut from the specimen around the probes; its pixel is the
coarsest that keeps the anti-aliased band above ``gmax`` (and below ``max_sampling_A``) on an FFT-friendly
grid.
Because the box is an integer multiple of ``L_out``, the output spectrum falls exactly on simulation
pixels (no interpolation). All outputs come from one abTEM graph computed once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from physics import (
    Grid,
    fft_friendly_size,
    fresnel_propagator,
    phase_ramp,
    probe,
    probe_diameter_A,
    wavelength,
)

__all__ = [
    "KernelParameters",
    "KernelResult",
    "KernelSimulator",
    "SimulationGrid",
    "SimulationSettings",
    "cut_window",
    "kernel_positions_A",
    "plan_grid",
    "rebin_matrix",
]


@dataclass(frozen=True)
class KernelParameters:
    """Optics and sampling of one sample (all plain Python floats/ints)."""

    energy_eV: float
    semiangle_mrad: float
    gmax_invA: float
    step_A: float
    Cs_A: float
    defocus_A: float
    num_phonons: int
    rms_displacement_A: float
    """3D rms displacement of the frozen phonons; abTEM gets ``rms / sqrt(3)`` per Cartesian axis."""
    phonon_seed: int

    def __post_init__(self) -> None:
        for name in ("energy_eV", "semiangle_mrad", "gmax_invA", "step_A", "Cs_A", "defocus_A"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("num_phonons", "phonon_seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "rms_displacement_A", float(self.rms_displacement_A))

    @property
    def aperture_invA(self) -> float:
        """Aperture radius ``alpha / lambda`` in 1/Angstrom."""
        return self.semiangle_mrad * 1e-3 / wavelength(self.energy_eV)


@dataclass(frozen=True)
class SimulationSettings:
    """How a sample is simulated (not what): grid, potential and phonon numerics."""

    pixels: int = 64
    """K: output pixels per side."""
    slice_thickness_A: float = 1.0
    parametrization: str = "lobato"
    projection: str = "infinite"
    antialias_margin: float = 1.0
    """Anti-aliased band ``1 / (3 dx)`` >= ``antialias_margin * gmax`` (sqrt(2) fills the corners)."""
    max_sampling_A: float = 0.1
    """Largest simulation pixel (potential sampling), unless that needs more than ``max_gpts`` pixels."""
    max_gpts: int = 1024
    probe_window_diameters: float = 6.0
    """The box holds 2 steps + this many probe diameters (first Airy zero)."""
    z_margin_A: float = 0.25
    """Vacuum kept above and below the atoms: the exit wave is taken this close to the exit surface."""
    wave_plane: str = "entrance"
    """Plane of the ``wave`` label: ``"entrance"`` (the multislice exit wave propagated back by the box
    height to the probe's focus plane, so that vacuum gives exactly the probe and ``wave / probe`` is the
    object's effective transmission, as AIRPI's POA stitching assumes) or ``"exit"`` (the exit surface)."""
    min_period_factor: int = 1
    """Smallest p: with p >= 2 every CBED pixel integrates p x p simulated pixels, so the aperture edge is
    area-weighted like a detector pixel; with p = 1 it is point-sampled (the disc's area is then off by
    the lattice-point count of a disc of that radius in pixels, ~5 % for a 6 px radius)."""

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> SimulationSettings:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in mapping.items() if k in names})


@dataclass(frozen=True)
class SimulationGrid:
    """The simulation box chosen by :func:`plan_grid`."""

    pixels: int
    gpts: int
    period_factor: int
    """p: the box is ``p * L_out`` wide, so output frequency ``u / L_out`` is simulation pixel ``u p``."""
    extent_A: float
    atom_window_A: float

    @property
    def sampling_A(self) -> float:
        return self.extent_A / self.gpts

    @property
    def output_extent_A(self) -> float:
        return self.extent_A / self.period_factor


def plan_grid(params: KernelParameters, settings: SimulationSettings) -> SimulationGrid:
    """Choose the simulation box (see the module docstring)."""
    K = int(settings.pixels)
    output_extent = K / (2.0 * params.gmax_invA)
    diameter = probe_diameter_A(params.semiangle_mrad, params.energy_eV)
    needed = 2.0 * params.step_A + settings.probe_window_diameters * diameter
    p = max(int(settings.min_period_factor), 1, math.ceil(needed / output_extent - 1e-9))
    extent = p * output_extent
    dx_band = 1.0 / (3.0 * params.gmax_invA * settings.antialias_margin)
    minimum = fft_friendly_size(math.ceil(extent / dx_band - 1e-9))
    wanted = fft_friendly_size(math.ceil(extent / min(dx_band, settings.max_sampling_A) - 1e-9))
    if wanted > settings.max_gpts:
        wanted = max(minimum, _friendly_at_most(settings.max_gpts))
    return SimulationGrid(pixels=K, gpts=wanted, period_factor=p, extent_A=extent, atom_window_A=extent)


def _friendly_at_most(n: int) -> int:
    while fft_friendly_size(n) != n:
        n -= 1
    return n


def kernel_positions_A(centre_A: Sequence[float], step_A: float) -> np.ndarray:
    """The 3x3 probe positions (9, 2) in Angstrom: index ``3 i + j`` at offset ``(i-1, j-1) step``."""
    offsets = np.array([(i - 1, j - 1) for i in range(3) for j in range(3)], dtype=np.float64)
    return np.asarray(centre_A, dtype=np.float64)[None, :] + float(step_A) * offsets


def cut_window(
    atoms: Any, centre_xy_A: Sequence[float], window_A: float, box_A: float, z_margin_A: float
) -> Any:
    """Atoms of a laterally periodic orthogonal cell inside a ``window_A`` square around ``centre_xy_A``.

    The window may be larger than the cell (periodic images are used). The result sits in a
    ``box_A x box_A`` cell (``box_A >= window_A``) with the window centre at the box centre, z packed to
    the atoms' extent plus ``z_margin_A`` above and below; periodic in all directions.
    """
    import ase

    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    off_diagonal = cell - np.diag(np.diag(cell))
    if np.abs(off_diagonal).max(initial=0.0) > 1e-6:
        raise ValueError("cut_window: the specimen cell must be orthogonal")
    lx, ly = cell[0, 0], cell[1, 1]
    positions = np.asarray(atoms.positions, dtype=np.float64)
    numbers = np.asarray(atoms.numbers)
    half = 0.5 * float(window_A)
    cx, cy = (float(c) for c in centre_xy_A)
    if len(atoms):
        nx = range(math.floor((cx - half) / lx) - 1, math.ceil((cx + half) / lx) + 1)
        ny = range(math.floor((cy - half) / ly) - 1, math.ceil((cy + half) / ly) + 1)
        shifts = np.array([(i * lx, j * ly) for i in nx for j in ny])
        xy = (positions[None, :, :2] + shifts[:, None, :]).reshape(-1, 2)
        z = np.tile(positions[:, 2], len(shifts))
        z_numbers = np.tile(numbers, len(shifts))
        inside = np.all(np.abs(xy - [cx, cy]) < half, axis=1)
        xy, z, z_numbers = xy[inside], z[inside], z_numbers[inside]
    else:
        xy, z, z_numbers = np.zeros((0, 2)), np.zeros(0), numbers
    if len(z):
        z = z - z.min() + float(z_margin_A)
        height = float(z.max()) + float(z_margin_A)
    else:
        height = max(2.0 * float(z_margin_A), 1.0)
    xy = xy - [cx, cy] + 0.5 * float(box_A)
    out = ase.Atoms(
        numbers=z_numbers,
        positions=np.column_stack([xy, z]) if len(z) else np.zeros((0, 3)),
        cell=[float(box_A), float(box_A), height],
        pbc=True,
    )
    return out


def rebin_matrix(n_in: int, pixel_in: float, n_out: int, pixel_out: float) -> np.ndarray:
    """Area-overlap matrix ``(n_out, n_in)`` between two centred 1D grids (zero at pixel ``n // 2``).

    ``R @ x`` sums the input pixels into the output bins weighted by the overlapping fraction of each
    input pixel, so a pattern's total inside the output range is preserved exactly.
    """
    centres_in = (np.arange(n_in) - n_in // 2) * pixel_in
    centres_out = (np.arange(n_out) - n_out // 2) * pixel_out
    lo = np.maximum(centres_in[None, :] - pixel_in / 2, centres_out[:, None] - pixel_out / 2)
    hi = np.minimum(centres_in[None, :] + pixel_in / 2, centres_out[:, None] + pixel_out / 2)
    return np.clip(hi - lo, 0.0, None) / pixel_in


@dataclass
class KernelResult:
    """One simulated sample: ``cbed`` (9, K, K) float32, ``wave`` and ``probe`` (K, K) complex64."""

    cbed: np.ndarray
    wave: np.ndarray
    probe: np.ndarray
    grid: SimulationGrid
    num_atoms: int
    box_height_A: float
    """Height of the simulated box: the exit plane is this far below the entrance (probe focus) plane."""


class KernelSimulator:
    """Simulates kernel samples with abTEM; keep one per process so numba and FFTW stay warm.

    ``device`` is ``"cpu"`` or ``"gpu"`` (abTEM on CuPy); ``scheduler`` is a dask scheduler name
    (``"threads"`` by default; ``"synchronous"`` when several processes share a machine).
    """

    def __init__(
        self,
        settings: SimulationSettings,
        device: str = "cpu",
        scheduler: str = "threads",
        fftw_planning: str | None = None,
    ) -> None:
        import abtem

        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu":
            try:
                import cupy  # noqa: F401
            except ImportError:
                raise ValueError("device=gpu needs CuPy (pip install cupy-cuda12x) and a CUDA GPU") from None
        options: dict[str, Any] = {
            "device": device,
            "precision": "float32",
            "diagnostics.progress_bar": False,
        }
        if fftw_planning:
            options["fftw.planning_effort"] = fftw_planning
        abtem.config.set(options)
        self._abtem = abtem
        self.settings = settings
        self.device = device
        self.scheduler = scheduler

    def build_graph(self, atoms: Any, params: KernelParameters, centre_A: Sequence[float]) -> tuple:
        """Lazy abTEM objects ``(diffraction_patterns, centre_wave, potential, probe)`` for a cut box."""
        abtem = self._abtem
        s = self.settings
        if len(atoms) and params.num_phonons > 0:
            sigma = params.rms_displacement_A / math.sqrt(3.0)
            phonons = abtem.FrozenPhonons(
                atoms, num_configs=params.num_phonons, sigmas=float(sigma), seed=params.phonon_seed
            )
        else:
            phonons = atoms
        grid = plan_grid(params, s)
        from datagen.unitary_potential import UnitaryPotential

        potential = UnitaryPotential(  # abTEM's band-limited slices made |t| = 1: no CBED above 1
            phonons,
            gpts=(grid.gpts, grid.gpts),
            slice_thickness=float(s.slice_thickness_A),
            parametrization=s.parametrization,
            projection=s.projection,
        )
        beam = abtem.Probe(
            energy=params.energy_eV,
            semiangle_cutoff=params.semiangle_mrad,
            Cs=params.Cs_A,
            defocus=params.defocus_A,
            soft=False,  # hard aperture, as physics.probe: the output probe samples the same disc
        )
        positions = kernel_positions_A(centre_A, params.step_A)
        detectors = [abtem.PixelatedDetector(max_angle=None), abtem.WavesDetector(to_cpu=True)]
        patterns, waves = beam.multislice(potential, scan=abtem.CustomScan(positions), detectors=detectors)
        if len(waves.shape) == 4:  # (phonons, positions, x, y): the coherent mean of the centre position
            centre = waves[:, 4].mean(0)
        else:
            centre = waves[4]
        return patterns, centre, potential, beam

    def simulate(self, atoms: Any, params: KernelParameters, centre_xy_A: Sequence[float]) -> KernelResult:
        """Simulate the kernel centred at ``centre_xy_A`` (Angstrom, in the laterally periodic cell)."""
        grid = plan_grid(params, self.settings)
        box = cut_window(atoms, centre_xy_A, grid.atom_window_A, grid.extent_A, self.settings.z_margin_A)
        centre = (0.5 * grid.extent_A, 0.5 * grid.extent_A)
        patterns, waves, _, _ = self.build_graph(box, params, centre)
        computed = self._abtem.array.ComputableList([patterns, waves]).compute(scheduler=self.scheduler)
        pattern_array = _to_numpy(computed[0].array)
        wave_array = _to_numpy(computed[1].array)
        height = float(box.cell[2, 2])
        back = height if self.settings.wave_plane == "entrance" else 0.0
        cbed, wave = self.resample(pattern_array, wave_array, params, grid, centre, back_propagate_A=back)
        return KernelResult(
            cbed=cbed,
            wave=wave,
            probe=self.probe(params),
            grid=grid,
            num_atoms=len(box),
            box_height_A=height,
        )

    def probe(self, params: KernelParameters) -> np.ndarray:
        """The incident probe on the output grid (``physics.probe``, centred at pixel ``K // 2``)."""
        return probe(
            params.energy_eV,
            params.semiangle_mrad,
            self.settings.pixels,
            gmax_invA=params.gmax_invA,
            defocus_A=params.defocus_A,
            Cs_A=params.Cs_A,
            soft_aperture=False,
            dtype=np.complex64,
        )

    @staticmethod
    def resample(
        patterns: np.ndarray,
        wave: np.ndarray,
        params: KernelParameters,
        grid: SimulationGrid,
        centre_A: Sequence[float],
        back_propagate_A: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Simulation-grid outputs -> output grid (see the module docstring).

        ``patterns`` (9, N, N): abTEM diffraction patterns, centred, summing to 1 in vacuum; ``wave``
        (N, N): abTEM exit wave (``sum |fft2(wave)|^2 = 1`` in vacuum) of the centre position, which is
        propagated back by ``back_propagate_A`` (exact on the sampled frequencies).
        """
        K, N, p = grid.pixels, grid.gpts, grid.period_factor
        if patterns.shape[-2:] != (N, N) or wave.shape != (N, N):
            raise RuntimeError(f"unexpected abTEM output shapes {patterns.shape}, {wave.shape} for N={N}")
        rebin = rebin_matrix(N, 1.0, K, float(p))
        cbed = np.einsum("ij,njk,lk->nil", rebin, patterns.astype(np.float64), rebin)
        spectrum = np.fft.fft2(wave.astype(np.complex128))
        index = (np.rint(np.fft.fftfreq(K) * K).astype(int) * p) % N
        # normalise by the incident probe sampled at the same frequencies, so that the vacuum exit wave
        # is the output-grid probe with sum |probe|^2 = 1 however coarsely the output samples the disc
        incident = probe(
            params.energy_eV,
            params.semiangle_mrad,
            N,
            sampling_A=grid.sampling_A,
            defocus_A=params.defocus_A,
            Cs_A=params.Cs_A,
            soft_aperture=False,
            space="reciprocal",
            dtype=np.complex128,
        )
        incident = np.fft.ifftshift(incident)[np.ix_(index, index)]
        sampled = spectrum[np.ix_(index, index)] / np.sqrt(np.sum(np.abs(incident) ** 2))
        output_pixel = grid.output_extent_A / K
        shift_px = (
            np.array([K // 2, K // 2]) * output_pixel - np.asarray(centre_A, dtype=float)
        ) / output_pixel
        sampled = sampled * phase_ramp((K, K), shift_px)
        if back_propagate_A:
            output_grid = Grid.from_gmax(params.gmax_invA, K)
            sampled = sampled * fresnel_propagator(output_grid, params.energy_eV, -float(back_propagate_A))
        real = np.fft.ifft2(sampled, norm="ortho")
        return cbed.astype(np.float32), real.astype(np.complex64)


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "get"):  # CuPy
        array = array.get()
    return np.asarray(array)
