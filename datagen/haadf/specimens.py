"""Specimen builders of the HAADF images: crystals, grain boundaries, nanoparticles on amorphous supports,
point defects (:mod:`datagen.haadf`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "AMORPHOUS_MATERIALS",
    "NANOPARTICLE_SHAPES",
    "add_point_defects",
    "amorphous_slab",
    "crystal_specimen",
    "grain_boundary_specimen",
    "nanoparticle_specimen",
]


AMORPHOUS_MATERIALS: dict[str, dict[str, Any]] = {
    # composition (element: atoms per formula unit), mass density, minimum interatomic distance
    "carbon": {"composition": {"C": 1}, "density_g_cm3": 2.0, "min_distance_A": 1.3},
    "silica": {"composition": {"Si": 1, "O": 2}, "density_g_cm3": 2.2, "min_distance_A": 1.5},
}
NANOPARTICLE_SHAPES = ("octahedron", "decahedron", "icosahedron", "sphere")


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
