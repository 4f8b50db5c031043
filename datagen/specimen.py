"""Specimens for multislice: a bulk crystal in a zone axis, rotated in plane, cut to a square slab.

Conventions (Angstrom, degrees):

- The beam travels along +z. The zone axis [uvw] is the lattice direction ``u a + v b + w c`` of the cell
  given to :func:`build_specimen` (for bundled and Materials Project structures: the conventional cell, so
  [111] of a cubic crystal is its body diagonal); it ends up along +z. Indices are reduced by their common
  divisor ([220] is [110]).
- Before any in-plane rotation, the shortest lattice vector perpendicular to the zone axis lies along +x
  (ties: the one with the largest indices first in (u, v, w) order, so [100] for cubic [001] and [001] for
  cubic [110]). ``rotation_deg`` then turns the crystal counter-clockwise about +z (x towards y), about the
  centre of the box.

How the cell is made (``build_specimen``):

1. Orthogonal periodic cell: the crystal is rotated so the zone vector lies on z and the in-plane vector on x,
   then repeated until lattice vectors lie along x, y and z (abTEM's orthogonal-cell search, at most
   ``max_repetitions`` repeats of each original vector, raised to what z and x need; see
   :func:`orthogonal_cell`). Where no exactly
   orthogonal repeat exists (e.g. hexagonal crystals in [111] with an irrational c/a) abTEM strains the cell;
   the strain (largest component of the symmetric stretch minus identity) above ``max_strain`` rejects the
   specimen with :class:`SpecimenRejected`. The cubic, tetragonal and hexagonal low-index cases used in
   training come out with zero strain.
2. Slab: the orthogonal cell is tiled over a square larger than the box, rotated by ``rotation_deg`` about
   the box centre, and cut to the box ``[0, L) x [0, L) x [0, t)``, with L = ``lateral_size_A`` and
   t = ``thickness_A``. The thickness is therefore exact (the slab holds every atomic plane whose height lies
   in [0, t), the lowest plane of the repeat at z = 0), not rounded to whole repeats.
3. Vacuum: the atoms are shifted up by ``vacuum_A`` and the cell is ``L x L x (t + 2 vacuum_A)``, so frozen
   phonon displacements (rms ~0.05 A per axis) never wrap through the periodic z boundary.

Consequence of the in-plane rotation: an arbitrary rotation of a crystal is not periodic in a square box,
so the lateral cell edges are seams (atoms closer than bulk or missing across the edge); with rotation 0 the
box is seamless only when L is a multiple of both in-plane repeats. The multislice still treats the cell as
periodic. This is harmless as long as the probes stay well inside the box: the kernel's 3x3 probe positions
sit near the centre, at least L/2 - (scan extent) from the seams, so L should exceed the probe's extent (its
diameter plus its spreading through the slab) by a comfortable margin, as with the published ~70 A cells.
The alternative, rotating the scan and detector frame instead of the crystal, would need the CBEDs
interpolated onto a rotated grid; cutting a rotated crystal keeps every output on its native pixel grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from numbers import Integral, Real

import ase
import numpy as np

__all__ = [
    "DEFAULT_ZONE_AXES",
    "Specimen",
    "SpecimenRejected",
    "build_specimen",
    "orient_crystal",
    "orthogonal_cell",
    "parse_zone_axis",
]

DEFAULT_ZONE_AXES: tuple[tuple[int, int, int], ...] = (
    (1, 1, 0),
    (0, 1, 1),
    (1, 0, 1),
    (0, 0, 1),
    (1, 0, 0),
    (0, 1, 0),
    (1, 1, 1),
)
"""The seven zone axes of table 1 of the AIRPI paper."""

_EPS_A = 1e-6  # Angstrom: positions this close to a box face count as inside the lower face


@dataclass
class Specimen:
    """A specimen ready for multislice.

    Attributes:
        atoms: orthogonal periodic cell ``L x L x (thickness_A + 2 vacuum)``, beam along +z, in-plane rotation
            applied, atoms at heights ``[vacuum, vacuum + thickness_A)``; ``atoms.info`` repeats the fields
            below plus ``vacuum_A`` and ``orthogonal_cell_A`` (the periodic repeat of the oriented crystal).
        zone_axis: [uvw] along the beam, reduced by the common divisor, in the input cell's lattice basis.
        rotation_deg: in-plane rotation about +z (counter-clockwise, x towards y).
        thickness_A: slab thickness along z.
        strain: orthogonalisation strain (largest absolute component, dimensionless).
    """

    atoms: ase.Atoms
    zone_axis: tuple[int, int, int]
    rotation_deg: float
    thickness_A: float
    strain: float


class SpecimenRejected(ValueError):
    """This crystal cannot give an acceptable specimen in this zone axis; the message says why.

    ``reason`` is a short tag for counting rejections: ``"strain"``, ``"size"`` or ``"empty"``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_zone_axis(zone_axis: Sequence[int]) -> tuple[int, int, int]:
    """Validated zone axis as three Python ints reduced by their greatest common divisor.

    Raises ValueError (naming ``zone_axis``) unless it is three integers, not all zero.
    """
    try:
        if isinstance(zone_axis, str | bytes):
            raise TypeError
        values = list(zone_axis)  # any sequence: tuple, list, numpy array, OmegaConf ListConfig
    except TypeError:
        raise ValueError(f"zone_axis: expected three integers [u, v, w], got {zone_axis!r}") from None
    if len(values) != 3 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
        raise ValueError(f"zone_axis: expected three integers [u, v, w], got {zone_axis!r}")
    ints = [int(v) for v in values]
    divisor = reduce(math.gcd, (abs(v) for v in ints))
    if divisor == 0:
        raise ValueError("zone_axis: [0, 0, 0] is not a direction")
    u, v, w = (i // divisor for i in ints)
    return u, v, w


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{name}: expected a {'non-negative' if allow_zero else 'positive'} value, got {value}"
        )
    return float(value)


def _check_atoms(atoms: ase.Atoms) -> None:
    if not isinstance(atoms, ase.Atoms) or len(atoms) == 0:
        raise ValueError("atoms: expected a non-empty ase.Atoms crystal cell")
    numbers = atoms.numbers
    if np.any(numbers < 1) or np.any(numbers > 118):
        bad = sorted(
            set(atoms.get_chemical_symbols()[i] for i in np.flatnonzero((numbers < 1) | (numbers > 118)))
        )
        raise ValueError(f"atoms: unknown element(s) {bad}")
    if abs(np.linalg.det(atoms.cell[:])) < 1e-6:
        raise ValueError("atoms: the cell must be a full 3D periodic cell (non-zero volume)")


def _in_plane_vector(cell: np.ndarray, zone: np.ndarray, search: int) -> np.ndarray:
    """Integer indices of the shortest lattice vector (most) perpendicular to ``zone``."""
    r = np.arange(-search, search + 1)
    n = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    n = n[np.any(n != 0, axis=1)]
    vectors = n @ cell
    lengths = np.linalg.norm(vectors, axis=1)
    cosine = np.abs(vectors @ (zone / np.linalg.norm(zone))) / lengths
    order = np.lexsort((-n[:, 2], -n[:, 1], -n[:, 0], np.round(lengths, 6), np.round(cosine, 9)))
    return n[order[0]]


def orient_crystal(atoms: ase.Atoms, zone_axis: Sequence[int]) -> tuple[ase.Atoms, np.ndarray]:
    """Copy of the crystal rotated so ``zone_axis`` is along +z and the in-plane vector along +x.

    Returns the rotated atoms (cell rotated with them) and the integer indices of the in-plane vector.
    """
    uvw = np.array(parse_zone_axis(zone_axis))
    cell = np.array(atoms.cell[:], dtype=float)
    zone = uvw @ cell
    x_indices = _in_plane_vector(cell, zone, max(3, 2 * int(np.abs(uvw).max())))
    e_z = zone / np.linalg.norm(zone)
    x = x_indices @ cell
    x = x - (x @ e_z) * e_z
    e_x = x / np.linalg.norm(x)
    e_y = np.cross(e_z, e_x)
    rotation = np.array([e_x, e_y, e_z])  # rows: new axes in old coordinates (proper rotation)
    oriented = atoms.copy()
    oriented.set_cell(cell @ rotation.T, scale_atoms=False)
    oriented.positions = atoms.positions @ rotation.T
    oriented.pbc = True
    return oriented, x_indices


def _stretch_strain(transform: np.ndarray) -> float:
    """Largest component of the symmetric stretch minus identity of ``p -> p @ transform``."""
    w, s, _ = np.linalg.svd(transform)
    stretch = w @ np.diag(s) @ w.T
    return float(np.abs(stretch - np.eye(3)).max())


def _supercell(oriented: ase.Atoms, box: np.ndarray) -> tuple[ase.Atoms, np.ndarray]:
    """Exact supercell of ``oriented`` whose vectors are closest to ``diag(box)``, mapped onto that box.

    The supercell vectors are the integer combinations ``P = round(diag(box) inv(cell))``; every atom of the
    periodic crystal inside the supercell is kept once (fractional coordinates in [0, 1) after snapping
    values within 1e-8 of an integer). Returns the atoms in the orthogonal box and the affine map
    ``p -> p @ transform`` that was applied (identity when the supercell is exactly orthogonal).
    """
    cell = np.array(oriented.cell[:], dtype=float)
    combos = np.round(np.diag(box) @ np.linalg.inv(cell)).astype(int)
    multiplicity = round(abs(np.linalg.det(combos)))
    if multiplicity == 0:
        raise SpecimenRejected("no orthogonal repeat of the lattice found", reason="strain")
    super_cell = combos @ cell
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) @ combos
    ranges = [np.arange(corners[:, i].min() - 1, corners[:, i].max() + 2) for i in range(3)]
    translations = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    scaled = oriented.get_scaled_positions(wrap=True)
    cartesian = ((scaled[None, :, :] + translations[:, None, :]) @ cell).reshape(-1, 3)
    fractional = cartesian @ np.linalg.inv(super_cell)
    nearest = np.round(fractional)
    fractional = np.where(np.abs(fractional - nearest) < 1e-8, nearest, fractional)
    inside = np.all((fractional >= 0) & (fractional < 1), axis=1)
    if inside.sum() != multiplicity * len(oriented):  # pragma: no cover - guards the construction itself
        raise RuntimeError(
            f"supercell construction found {inside.sum()} atoms instead of {multiplicity * len(oriented)}"
        )
    numbers = np.tile(oriented.numbers, len(translations))[inside]
    orthogonal = ase.Atoms(
        numbers=numbers, positions=fractional[inside] @ np.diag(box), cell=np.diag(box), pbc=True
    )
    return orthogonal, np.linalg.inv(super_cell) @ np.diag(box)


def orthogonal_cell(
    atoms: ase.Atoms, zone_axis: Sequence[int], max_repetitions: int = 8, max_atoms: int = 200_000
) -> tuple[ase.Atoms, float]:
    """The crystal as an orthogonal periodic cell with ``zone_axis`` along z; returns (cell, strain).

    After :func:`orient_crystal`, ``abtem.atoms.best_orthogonal_cell`` (the search behind
    ``abtem.orthogonalize_cell``) picks, for each of x, y, z, the shortest repeat of the lattice most aligned
    with that axis, using at most ``max_repetitions`` repeats of each original vector (raised to what the zone
    and in-plane vectors need). The atoms are then placed by an exact supercell construction instead of
    ``abtem.orthogonalize_cell``'s cut, which in abTEM 1.0.11 loses an atom in some cells (observed for fcc,
    rock-salt, zincblende and perovskite crystals in [111]); the tests check both agree where abTEM's cut
    works. Where the repeat is not exactly orthogonal the cell is strained onto the box; the strain is the
    largest component of the symmetric stretch minus identity. Raises :class:`SpecimenRejected` (reason
    ``"size"``) when the cell would hold more than ``max_atoms`` atoms. The strain is not checked here.
    """
    from abtem.atoms import best_orthogonal_cell

    _check_atoms(atoms)
    uvw = parse_zone_axis(zone_axis)
    oriented, x_indices = orient_crystal(atoms, uvw)
    repetitions = max(int(max_repetitions), int(np.abs(uvw).max()), int(np.abs(x_indices).max()))
    cell = np.array(oriented.cell[:])
    cell[np.abs(cell) < 1e-9] = 0.0
    oriented.set_cell(cell, scale_atoms=False)
    box = np.asarray(best_orthogonal_cell(cell, max_repetitions=repetitions), dtype=float)
    expected = len(atoms) * float(np.prod(box)) / abs(np.linalg.det(cell))
    if expected > max_atoms:
        raise SpecimenRejected(
            f"orthogonal cell of zone axis {list(uvw)} would hold ~{expected:.0f} atoms "
            f"(box {np.round(box, 2).tolist()} A) > max_atoms={max_atoms}",
            reason="size",
        )
    orthogonal, transform = _supercell(oriented, box)
    return orthogonal, _stretch_strain(transform)


def build_specimen(
    atoms: ase.Atoms,
    zone_axis: Sequence[int],
    rotation_deg: float,
    thickness_A: float,
    lateral_size_A: float,
    max_strain: float = 0.02,
    vacuum_A: float = 2.0,
    max_repetitions: int = 8,
    max_atoms: int = 200_000,
) -> Specimen:
    """Bulk crystal ``atoms`` as a square slab in ``zone_axis`` (see the module docstring for the method).

    Args:
        atoms: periodic crystal cell (Angstrom); ``zone_axis`` refers to its lattice vectors.
        zone_axis: [uvw], three integers not all zero.
        rotation_deg: in-plane rotation about +z, counter-clockwise, about the box centre.
        thickness_A: slab thickness along the beam (> 0).
        lateral_size_A: side L of the square box (> 0), e.g. 20-70 A.
        max_strain: largest accepted orthogonalisation strain (dimensionless, 0.02 = 2 %).
        vacuum_A: vacuum added above and below the slab (>= 0).
        max_repetitions: repeats of each lattice vector abTEM may use to find an orthogonal cell.
        max_atoms: largest orthogonal cell accepted (atoms), against runaway high-index zone axes.

    Raises:
        ValueError: a malformed argument; the message starts with the parameter's name.
        SpecimenRejected: strain above ``max_strain``, cell too large, or an empty slab.
    """
    _check_atoms(atoms)
    uvw = parse_zone_axis(zone_axis)
    if (
        isinstance(rotation_deg, bool)
        or not isinstance(rotation_deg, Real)
        or not math.isfinite(rotation_deg)
    ):
        raise ValueError(f"rotation_deg: expected a finite number, got {rotation_deg!r}")
    thickness = _positive("thickness_A", thickness_A)
    size = _positive("lateral_size_A", lateral_size_A)
    max_strain = _positive("max_strain", max_strain, allow_zero=True)
    vacuum = _positive("vacuum_A", vacuum_A, allow_zero=True)
    if isinstance(max_repetitions, bool) or not isinstance(max_repetitions, Integral) or max_repetitions < 1:
        raise ValueError(f"max_repetitions: expected a positive integer, got {max_repetitions!r}")

    orthogonal, strain = orthogonal_cell(atoms, uvw, int(max_repetitions), max_atoms)
    if strain > max_strain:
        raise SpecimenRejected(
            f"zone axis {list(uvw)}: orthogonalisation strain {strain:.4f} exceeds max_strain={max_strain:g}",
            reason="strain",
        )
    repeat = np.diag(orthogonal.cell[:]).copy()
    base = orthogonal.positions.copy()
    base[:, 2] -= base[:, 2].min()  # the lowest atomic plane of the repeat becomes the entrance surface

    # tile the periodic crystal over the square that covers the rotated box, then rotate and cut
    centre = size / 2
    half = size / math.sqrt(2) + _EPS_A
    ranges = [
        np.arange(math.floor((centre - half) / repeat[i]) - 1, math.ceil((centre + half) / repeat[i]) + 1)
        for i in (0, 1)
    ]
    ranges.append(np.arange(-1, math.ceil(thickness / repeat[2]) + 1))
    shifts = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3) * repeat
    positions = (base[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    numbers = np.tile(orthogonal.numbers, len(shifts))

    angle = math.radians(float(rotation_deg))
    cos, sin = math.cos(angle), math.sin(angle)
    x, y = positions[:, 0] - centre, positions[:, 1] - centre
    positions[:, 0] = cos * x - sin * y + centre
    positions[:, 1] = sin * x + cos * y + centre

    inside = np.all((positions >= -_EPS_A) & (positions < np.array([size, size, thickness]) - _EPS_A), axis=1)
    if not np.any(inside):
        raise SpecimenRejected(
            f"zone axis {list(uvw)}: no atom in a {thickness:g} A thick slab (repeat {repeat[2]:.2f} A)",
            reason="empty",
        )
    positions = positions[inside]
    positions[:, :2] = np.clip(positions[:, :2], 0.0, None)
    positions[:, 2] = np.clip(positions[:, 2], 0.0, None) + vacuum
    specimen_atoms = ase.Atoms(
        numbers=numbers[inside], positions=positions, cell=[size, size, thickness + 2 * vacuum], pbc=True
    )
    specimen_atoms.info.update(
        {
            "zone_axis": uvw,
            "rotation_deg": float(rotation_deg),
            "thickness_A": thickness,
            "strain": strain,
            "vacuum_A": vacuum,
            "orthogonal_cell_A": tuple(float(v) for v in repeat),
        }
    )
    return Specimen(specimen_atoms, uvw, float(rotation_deg), thickness, strain)
