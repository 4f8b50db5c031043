"""Simulated 4D-STEM scans with ground truth (``simulation=scan4d``): the evaluation benchmarks.

A raster scan of a specimen with frozen-phonon multislice (abTEM 1.0.11), written as
``deepstem.4dstem/1`` with the ``truth`` group.

Conventions:

* Scan coordinates: the first probe position is (0, 0); position ``(i, j)`` is at
  ``(i * step, j * step)`` along (x, y); the scan is not rotated against the detector.
* ``data`` (Rx, Ry, K, K) float32 is the noise-free incoherent phonon mean of ``|psi(k)|^2``, a fraction
  of the incident electrons per detector pixel (sum-preserving rebinning onto K x K pixels covering
  ``-k_max .. +k_max``, ``k_max = detector_max_angle_mrad / lambda``); dose is applied at evaluation time.
* ``truth/phase`` is ``sigma * v_z`` of the phonon-averaged projected potential on the potential's
  grid (rad), ``truth/pixel_size_A`` its pixel and ``truth/origin_A`` the scan position of its pixel
  (0, 0), i.e. ``-scan_start``. For thick specimens this transmission-function phase is the POA object
  that phase-retrieval methods aim at, not an exact description of the exit wave.
* Twisted bilayers are cut from large monolayers into a square box: the box edges are not periodic,
  so the scan keeps ``edge_margin_A`` away from them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from physics import interaction_parameter, scherzer_defocus, wavelength

__all__ = [
    "ScanResult",
    "ScanSettings",
    "simulate_scan",
    "twisted_bilayer",
    "with_point_defect",
    "write_scan",
]


@dataclass(frozen=True)
class ScanSettings:
    """Optics, scan and detector of a simulated 4D-STEM scan (units in the names)."""

    energy_eV: float = 300e3
    semiangle_mrad: float = 20.0
    Cs_A: float = 0.0
    defocus_A: float | str = 0.0  # Angstrom, or "scherzer"
    scan_step_A: float = 0.2
    scan_gpts: tuple[int, int] = (32, 32)
    scan_start_A: tuple[float, float] | None = None  # default: the scan is centred in the cell
    detector_px: int = 64
    detector_max_angle_mrad: float = 40.0  # half-width of the detector
    sampling_A: float = 0.05  # potential / wave pixel
    slice_thickness_A: float = 1.0
    num_phonons: int = 4
    rms_displacement_A: float = 0.08  # 3D rms; abTEM's sigmas are per axis (divided by sqrt 3)
    seed: int = 0
    parametrization: str = "lobato"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "energy_eV": self.energy_eV,
            "semiangle_mrad": self.semiangle_mrad,
            "scan_step_A": self.scan_step_A,
            "detector_max_angle_mrad": self.detector_max_angle_mrad,
            "sampling_A": self.sampling_A,
            "slice_thickness_A": self.slice_thickness_A,
        }
        for name, value in checks.items():
            if not float(value) > 0:
                raise ValueError(f"scan4d: {name} must be positive, got {value}")
        if len(self.scan_gpts) != 2 or min(self.scan_gpts) < 3:
            raise ValueError(f"scan4d: scan_gpts must be two integers >= 3, got {list(self.scan_gpts)}")
        if self.detector_px < 8:
            raise ValueError(f"scan4d: detector_px must be >= 8, got {self.detector_px}")
        if self.num_phonons < 0 or self.rms_displacement_A < 0:
            raise ValueError("scan4d: num_phonons and rms_displacement_A must be >= 0")
        cutoff_mrad = wavelength(self.energy_eV) / (3 * self.sampling_A) * 1e3
        if self.detector_max_angle_mrad > cutoff_mrad:
            raise ValueError(
                f"scan4d: detector_max_angle_mrad={self.detector_max_angle_mrad} exceeds the anti-aliased "
                f"limit {cutoff_mrad:.1f} mrad of sampling_A={self.sampling_A}; use a finer sampling_A"
            )

    @property
    def resolved_defocus_A(self) -> float:
        if isinstance(self.defocus_A, str):
            if self.defocus_A != "scherzer":
                raise ValueError(f"scan4d: defocus_A must be a number or 'scherzer', got {self.defocus_A!r}")
            return scherzer_defocus(self.Cs_A, self.energy_eV)
        return float(self.defocus_A)

    @property
    def k_pixel_invA(self) -> float:
        return 2 * self.detector_max_angle_mrad * 1e-3 / wavelength(self.energy_eV) / self.detector_px


@dataclass
class ScanResult:
    data: np.ndarray  # (Rx, Ry, K, K) float32
    truth_phase: np.ndarray  # (Nx, Ny) float32, rad
    truth_pixel_size_A: tuple[float, float]
    truth_origin_A: tuple[float, float]
    settings: ScanSettings
    scan_start_A: tuple[float, float]
    seconds: float


def _monolayer(material: str):
    from ase import Atoms
    from ase.build import graphene, mx2

    material = material.lower()
    if material == "graphene":
        return graphene(formula="C2", a=2.46, vacuum=None)
    if material == "hbn":
        layer = graphene(formula="C2", a=2.504, vacuum=None)
        layer.set_chemical_symbols(["B", "N"])
        return layer
    if material in ("mos2", "ws2", "mose2", "wse2"):
        lattice = {"mos2": 3.16, "ws2": 3.15, "mose2": 3.29, "wse2": 3.28}[material]
        formula = {"mos2": "MoS2", "ws2": "WS2", "mose2": "MoSe2", "wse2": "WSe2"}[material]
        layer = mx2(formula=formula, kind="2H", a=lattice, thickness=3.17, vacuum=None)
        layer.positions[:, 2] -= layer.positions[:, 2].min()
        return Atoms(layer)
    raise ValueError(
        f"scan4d: unknown 2D material {material!r}; known: graphene, hBN, MoS2, WS2, MoSe2, WSe2"
    )


def _square_cut(layer, size_A: float, angle_deg: float):
    """Atoms of a monolayer rotated by ``angle_deg`` about z, inside the square [0, size_A)^2."""
    cell = layer.cell
    reach = size_A * math.sqrt(2) + 2 * max(cell.lengths()[:2])
    sin_gamma = abs(math.sin(math.radians(cell.angles()[2])))
    repeats = [math.ceil(reach / (cell.lengths()[i] * sin_gamma)) for i in range(2)]
    big = layer.repeat((2 * repeats[0] + 1, 2 * repeats[1] + 1, 1))
    big.translate(-(repeats[0] * cell[0] + repeats[1] * cell[1]) - 0.5 * (cell[0] + cell[1]))
    big.rotate(angle_deg, "z")
    big.translate((size_A / 2, size_A / 2, 0))
    xy = big.positions[:, :2]
    inside = np.all((xy >= 0) & (xy < size_A), axis=1)
    return big[inside]


def twisted_bilayer(
    material: str = "MoS2",
    twist_deg: float = 5.0,
    size_A: float = 30.0,
    interlayer_A: float | None = None,
    vacuum_A: float = 2.0,
):
    """Two monolayers, the upper rotated by ``twist_deg`` about the box centre, in a square box.

    ``interlayer_A`` is the layer period (graphene 3.35, hBN 3.33, MX2 6.15 A by default).
    """
    from ase import Atoms

    if not size_A > 0 or not vacuum_A >= 0:
        raise ValueError(f"scan4d: size_A must be positive and vacuum_A >= 0, got {size_A}, {vacuum_A}")
    layer = _monolayer(material)
    if interlayer_A is None:
        interlayer_A = {"graphene": 3.35, "hbn": 3.33}.get(material.lower(), 6.15)
    bottom = _square_cut(layer, size_A, 0.0)
    top = _square_cut(layer, size_A, float(twist_deg))
    top.positions[:, 2] += interlayer_A
    both = bottom + top
    both.positions[:, 2] += vacuum_A - both.positions[:, 2].min()
    height = both.positions[:, 2].max() + vacuum_A
    return Atoms(both, cell=[size_A, size_A, height], pbc=True)


def with_point_defect(
    atoms,
    position_A: Sequence[float],
    kind: str = "vacancy",
    element: str | None = None,
):
    """Copy of ``atoms`` with the atom column nearest to ``position_A`` (x, y) emptied or substituted.

    ``kind="vacancy"`` removes every atom of that column (within 0.3 A laterally); ``kind="substitution"``
    replaces them by ``element``.
    """
    from ase.data import atomic_numbers

    atoms = atoms.copy()
    xy = atoms.positions[:, :2]
    distance = np.linalg.norm(xy - np.asarray(position_A, dtype=float)[:2], axis=1)
    column = np.flatnonzero(distance <= distance.min() + 0.3)
    if kind == "vacancy":
        del atoms[column.tolist()]
    elif kind == "substitution":
        if element not in atomic_numbers:
            raise ValueError(f"scan4d: substitution needs a valid element, got {element!r}")
        symbols = atoms.get_chemical_symbols()
        for index in column:
            symbols[index] = element
        atoms.set_chemical_symbols(symbols)
    else:
        raise ValueError(f"scan4d: defect kind must be 'vacancy' or 'substitution', got {kind!r}")
    return atoms


def simulate_scan(atoms, settings: ScanSettings, edge_margin_A: float = 0.0) -> ScanResult:
    """Simulate the scan; the scan window must stay ``edge_margin_A`` inside the cell."""
    import abtem

    from datagen.kernel import rebin_matrix

    start_time = time.perf_counter()
    abtem.config.set({"precision": "float32", "device": settings.device, "diagnostics.progress_bar": False})
    extent = np.asarray(atoms.cell.lengths()[:2], dtype=float)
    span = (np.asarray(settings.scan_gpts) - 1) * settings.scan_step_A
    start = (extent - span) / 2 if settings.scan_start_A is None else np.asarray(settings.scan_start_A, float)
    if np.any(start < edge_margin_A) or np.any(start + span > extent - edge_margin_A):
        raise ValueError(
            f"scan4d: the scan window {start.round(2).tolist()} + {span.round(2).tolist()} A leaves the cell "
            f"{extent.round(2).tolist()} A minus a margin of {edge_margin_A} A; "
            "enlarge the specimen or shrink the scan"
        )
    if settings.num_phonons > 0 and len(atoms):
        sigma = settings.rms_displacement_A / math.sqrt(3.0)
        specimen = abtem.FrozenPhonons(
            atoms, num_configs=int(settings.num_phonons), sigmas=float(sigma), seed=int(settings.seed)
        )
    else:
        specimen = atoms
    potential = abtem.Potential(
        specimen,
        sampling=float(settings.sampling_A),
        slice_thickness=float(settings.slice_thickness_A),
        parametrization=settings.parametrization,
        projection="infinite",
    )
    beam = abtem.Probe(
        energy=float(settings.energy_eV),
        semiangle_cutoff=float(settings.semiangle_mrad),
        Cs=float(settings.Cs_A),
        defocus=float(settings.resolved_defocus_A),
    )
    scan = abtem.GridScan(
        start=tuple(float(s) for s in start),
        end=tuple(
            float(s + n * settings.scan_step_A) for s, n in zip(start, settings.scan_gpts, strict=True)
        ),
        gpts=tuple(int(n) for n in settings.scan_gpts),
        endpoint=False,
    )
    margin_mrad = settings.detector_max_angle_mrad * 1.05
    patterns = beam.multislice(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=margin_mrad))
    projected = potential.build().project()
    computed = abtem.array.ComputableList([patterns, projected]).compute()
    pattern_array = _to_numpy(computed[0].array)
    v_z = _to_numpy(computed[1].array)
    if v_z.ndim == 3:
        v_z = v_z.mean(axis=0)  # phonon-averaged projected potential
    native_invA = np.asarray(computed[0].sampling, dtype=float)  # reciprocal pixel of the simulation
    k_pixel = settings.k_pixel_invA
    rebin_x = rebin_matrix(pattern_array.shape[-2], native_invA[0], settings.detector_px, k_pixel)
    rebin_y = rebin_matrix(pattern_array.shape[-1], native_invA[1], settings.detector_px, k_pixel)
    data = np.einsum("ij,abjk,lk->abil", rebin_x, pattern_array.astype(np.float64), rebin_y).astype(
        np.float32
    )
    return ScanResult(
        data=data,
        truth_phase=(interaction_parameter(settings.energy_eV) * v_z).astype(np.float32),
        truth_pixel_size_A=tuple(float(s) for s in computed[1].sampling),
        truth_origin_A=(-float(start[0]), -float(start[1])),
        settings=settings,
        scan_start_A=(float(start[0]), float(start[1])),
        seconds=time.perf_counter() - start_time,
    )


def write_scan(path: str | Path, result: ScanResult, config: Any = None, overwrite: bool = False) -> Path:
    """Write ``result`` as ``deepstem.4dstem/1`` with its ``truth`` group (atomic, via evaluation.io)."""
    from evaluation.io import save_4dstem

    s = result.settings
    return save_4dstem(
        path,
        result.data,
        energy_eV=s.energy_eV,
        semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A,
        k_pixel_invA=s.k_pixel_invA,
        scan_rotation_deg=0.0,
        Cs_A=s.Cs_A,
        defocus_A=s.resolved_defocus_A,
        truth_phase=result.truth_phase,
        truth_pixel_size_A=result.truth_pixel_size_A,
        truth_origin_A=result.truth_origin_A,
        config=config,
        overwrite=overwrite,
    )


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "get"):  # CuPy
        array = array.get()
    return np.asarray(array)
