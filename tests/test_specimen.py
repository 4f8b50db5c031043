"""Specimens: zone axis, orthogonal cell, density, thickness, rotation, strain check, input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from omegaconf import OmegaConf
from scipy.spatial import cKDTree

from datagen.sources import load_structures
from datagen.specimen import (
    DEFAULT_ZONE_AXES,
    Specimen,
    SpecimenRejected,
    build_specimen,
    orthogonal_cell,
    parse_zone_axis,
)

A_SI, A_STO, A_AU = 5.43, 3.905, 4.08  # Angstrom, the bundled lattice constants
A_GR, C_GR = 2.464, 6.711


@pytest.fixture(scope="module")
def crystals() -> dict[str, Atoms]:
    records = load_structures({"name": "bundled", "ids": ["Si", "mp-5229", "mp-48", "mp-81", "mp-2815"]})
    return {r.source_id.removeprefix("bundled:"): r.atoms for r in records}


def density(atoms: Atoms) -> float:
    return len(atoms) / abs(np.linalg.det(atoms.cell[:]))


def columns(positions: np.ndarray, period: tuple[float, float], size: float, tol: float = 0.05) -> dict:
    """Projected columns folded into one in-plane repeat: {(x, y): list of z}, atoms within ``tol`` merged.

    Only atoms in the largest window of whole repeats inside the box ``[0, size)^2`` count, and the lists are
    thinned to one repeat's share (every n-th z), so each list holds the atoms of one column of one repeat.
    """
    cell = np.array(period)
    n = np.floor(size / cell)
    window = np.all(positions[:, :2] < n * cell - 1e-6, axis=1)
    out: dict = {}
    for x, y, z in positions[window]:
        xy = np.array([x, y]) % cell
        for key in out:
            d = xy - np.array(key)
            d -= np.round(d / cell) * cell
            if np.hypot(*d) < tol:
                out[key].append(z)
                break
        else:
            out[(float(xy[0]), float(xy[1]))] = [z]
    cells = int(n.prod())
    assert all(len(z) % cells == 0 for z in out.values())
    return {key: sorted(z)[::cells] for key, z in out.items()}


def min_projected_distance(points: np.ndarray, period: tuple[float, float]) -> float:
    best = np.inf
    for i in range(len(points)):
        d = points[i + 1 :] - points[i]
        d -= np.round(d / period) * period
        r = np.hypot(d[:, 0], d[:, 1])
        if len(r):
            best = min(best, r.min())
    return best


# (name, zone axis, expected orthogonal repeat along x, y, z in Angstrom)
KNOWN = [
    ("Si", (1, 1, 0), (A_SI, A_SI * math.sqrt(2), A_SI * math.sqrt(2))),
    ("mp-5229", (0, 0, 1), (A_STO, A_STO, A_STO)),
    ("mp-48", (0, 0, 1), (A_GR, A_GR * math.sqrt(3), C_GR)),
    ("mp-81", (1, 1, 1), (A_AU * math.sqrt(2), A_AU * math.sqrt(6), A_AU * math.sqrt(3))),
]


@pytest.mark.parametrize(("name", "zone", "repeat"), KNOWN)
def test_orthogonal_cell_of_known_zone_axes(crystals, name, zone, repeat):
    bulk_atoms = crystals[name]
    cell, strain = orthogonal_cell(bulk_atoms, zone)
    assert strain < 1e-9
    np.testing.assert_allclose(cell.cell[:], np.diag(repeat), atol=1e-6)  # orthogonal, known repeats
    assert density(cell) == pytest.approx(density(bulk_atoms), rel=1e-9)
    # the zone vector u a + v b + w c is the repeat along z
    assert np.linalg.norm(np.array(zone) @ bulk_atoms.cell[:]) == pytest.approx(repeat[2], rel=1e-9)
    # every atom of the cell is a bulk site: same nearest-neighbour distance as the bulk crystal
    assert np.sort(cell.get_all_distances(mic=True)[0])[1] == pytest.approx(
        np.sort(bulk_atoms.repeat(3).get_all_distances(mic=True)[0])[1], abs=1e-6
    )


@pytest.mark.parametrize(("name", "zone", "repeat"), KNOWN)
def test_unrotated_slab_is_the_periodic_crystal(crystals, name, zone, repeat):
    thickness = 3 * repeat[2]
    specimen = build_specimen(crystals[name], zone, 0.0, thickness, 40.0, vacuum_A=2.5)
    assert isinstance(specimen, Specimen)
    assert specimen.strain < 1e-9 and specimen.zone_axis == zone and specimen.thickness_A == thickness
    atoms = specimen.atoms
    np.testing.assert_allclose(atoms.cell[:], np.diag([40.0, 40.0, thickness + 5.0]))
    assert atoms.pbc.all()
    z = atoms.positions[:, 2]
    assert z.min() == pytest.approx(2.5, abs=1e-6)  # a lattice plane at the entrance surface
    assert thickness - repeat[2] < z.max() - z.min() < thickness  # thickness within one repeat
    # a window of whole repeats holds exactly the atoms of that many orthogonal cells (no loss, no duplicate)
    nx, ny = int(40 // repeat[0]), int(40 // repeat[1])
    window = np.all(atoms.positions[:, :2] < np.array([nx * repeat[0], ny * repeat[1]]) - 1e-6, axis=1)
    cell, _ = orthogonal_cell(crystals[name], zone)
    assert window.sum() == nx * ny * 3 * len(cell)
    assert window.sum() / (nx * repeat[0] * ny * repeat[1] * thickness) == pytest.approx(
        density(crystals[name])
    )
    # translation symmetry: shifting by the x repeat maps atoms onto atoms of the same element
    shifted = atoms.positions + np.array([repeat[0], 0.0, 0.0])
    keep = shifted[:, 0] < 40 - 1
    distance, partner = cKDTree(atoms.positions).query(shifted[keep])
    assert distance.max() < 1e-6
    assert np.array_equal(atoms.numbers[keep], atoms.numbers[partner])


def test_si_110_shows_dumbbells(crystals):
    specimen = build_specimen(crystals["Si"], (1, 1, 0), 0.0, 4 * A_SI * math.sqrt(2), 30.0)
    period = (A_SI, A_SI * math.sqrt(2))
    cols = columns(specimen.atoms.positions, period, 30.0)
    assert len(cols) == 8  # 4 dumbbells per a x a sqrt(2) projected cell
    assert {len(z) for z in cols.values()} == {8}  # one atom per a/sqrt(2) along every column
    points = np.array(list(cols))
    assert min_projected_distance(points, period) == pytest.approx(A_SI / 4, abs=0.06)  # 1.36 A dumbbell
    # x lies along [001]: dumbbells are split along x (projected (004) spacing a/4)
    xs = np.unique(np.round(points[:, 0] % A_SI, 2))
    assert len(xs) == 4 and np.allclose(np.diff(xs), A_SI / 4, atol=0.06)


def test_srtio3_001_columns_have_the_perovskite_composition(crystals):
    specimen = build_specimen(crystals["mp-5229"], (0, 0, 1), 0.0, 4 * A_STO, 10 * A_STO)
    atoms = specimen.atoms
    xy = atoms.positions[:, :2] / (A_STO / 2)
    assert np.allclose(
        xy, np.round(xy), atol=1e-6
    )  # all columns on the a/2 grid: [001] along z, [100] along x
    kind = np.round(xy).astype(int) % 2
    symbols = np.array(atoms.get_chemical_symbols())
    assert set(symbols[(kind == [0, 0]).all(1)]) == {"Sr"}
    assert set(symbols[(kind == [1, 1]).all(1)]) == {"Ti", "O"}
    assert set(symbols[(kind == [1, 0]).all(1)]) == {"O"} == set(symbols[(kind == [0, 1]).all(1)])
    assert (symbols == "Sr").sum() * 3 == (symbols == "O").sum()


def test_graphite_001_projects_to_a_honeycomb(crystals):
    specimen = build_specimen(crystals["mp-48"], (0, 0, 1), 0.0, 2 * C_GR, 30.0)
    period = (A_GR, A_GR * math.sqrt(3))
    cols = columns(specimen.atoms.positions, period, 30.0)
    points = np.array(list(cols))
    assert min_projected_distance(points, period) == pytest.approx(A_GR / math.sqrt(3), abs=0.03)  # C-C 1.42
    # Bernal stacking: per projected cell 2 columns with an atom in every layer, 4 with every other layer
    occupancy = sorted(len(z) for z in cols.values())
    assert len(cols) == 6 and occupancy == [2, 2, 2, 2, 4, 4]


def test_au_111_projects_to_a_triangular_lattice(crystals):
    specimen = build_specimen(crystals["mp-81"], (1, 1, 1), 0.0, 2 * A_AU * math.sqrt(3), 30.0)
    period = (A_AU * math.sqrt(2), A_AU * math.sqrt(6))
    cols = columns(specimen.atoms.positions, period, 30.0)
    points = np.array(list(cols))
    assert min_projected_distance(points, period) == pytest.approx(A_AU / math.sqrt(6), abs=0.03)  # 1.67 A
    assert {len(z) for z in cols.values()} == {2}  # ABC stacking: each column hit once per a sqrt(3)
    # the (111) planes are a / sqrt(3) apart along the beam
    planes = np.unique(np.round(specimen.atoms.positions[:, 2], 3))
    assert np.allclose(np.diff(planes), A_AU / math.sqrt(3), atol=1e-3)


def test_rotation_turns_the_crystal_counter_clockwise_about_the_box_centre(crystals):
    size, angle = 40.0, 27.0
    flat = build_specimen(crystals["mp-5229"], (0, 0, 1), 0.0, 2 * A_STO, size)
    turned = build_specimen(crystals["mp-5229"], (0, 0, 1), angle, 2 * A_STO, size)
    assert turned.rotation_deg == angle
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rel = flat.atoms.positions[:, :2] - size / 2
    expected = np.c_[c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1]] + size / 2
    central = np.hypot(*(expected - size / 2).T) < 14  # away from the seams at the box edges
    expected = np.c_[expected, flat.atoms.positions[:, 2]][central]
    distance, partner = cKDTree(turned.atoms.positions).query(expected)
    assert distance.max() < 1e-6
    assert np.array_equal(flat.atoms.numbers[central], turned.atoms.numbers[partner])
    # the whole square box is filled: the number of atoms agrees with the bulk density
    inside = turned.atoms.positions
    assert np.all((inside[:, :2] >= 0) & (inside[:, :2] < size))
    assert len(turned.atoms) / (size * size * 2 * A_STO) == pytest.approx(
        density(crystals["mp-5229"]), rel=0.03
    )


def test_strain_is_reported_and_rejected_above_the_limit(crystals):
    # graphite [111]: no exactly orthogonal repeat; abTEM's search gives about 1 % strain
    specimen = build_specimen(crystals["mp-48"], (1, 1, 1), 0.0, 10.0, 30.0, max_strain=0.02)
    assert 0.001 < specimen.strain < 0.02
    with pytest.raises(SpecimenRejected, match="strain") as info:
        build_specimen(crystals["mp-48"], (1, 1, 1), 0.0, 10.0, 30.0, max_strain=specimen.strain / 2)
    assert info.value.reason == "strain"
    # 2H-MoS2 [111] needs ~12 % within 8 repetitions: rejected by default
    with pytest.raises(SpecimenRejected, match=r"strain 0\.1"):
        build_specimen(crystals["mp-2815"], (1, 1, 1), 0.0, 10.0, 30.0)
    cell, strain = orthogonal_cell(crystals["mp-48"], (1, 1, 1))
    assert density(cell) == pytest.approx(density(crystals["mp-48"]), rel=3 * strain)


def test_matches_abtem_orthogonalize_cell_where_that_works(crystals):
    import abtem

    from datagen.specimen import orient_crystal

    for name, zone, _ in KNOWN:
        oriented, _ = orient_crystal(crystals[name], zone)
        reference = abtem.orthogonalize_cell(oriented, max_repetitions=8)
        ours, _ = orthogonal_cell(crystals[name], zone)
        np.testing.assert_allclose(ours.cell[:], reference.cell[:], atol=1e-6)
        assert len(ours) == len(reference)
        box = np.diag(ours.cell[:])
        distance, _ = cKDTree(reference.positions % box, boxsize=box + 1e-9).query(ours.positions % box)
        assert distance.max() < 1e-4


def test_no_atom_lost_for_every_default_zone_axis():
    for record in load_structures(
        {"name": "bundled", "prototypes": ["fcc", "rocksalt", "perovskite", "hcp"]}
    )[::3]:
        for zone in DEFAULT_ZONE_AXES:
            cell, strain = orthogonal_cell(record.atoms, zone)
            assert density(cell) == pytest.approx(density(record.atoms), rel=max(3 * strain, 1e-9)), (
                record,
                zone,
            )


def test_vacuum_keeps_frozen_phonon_displacements_inside_the_cell(crystals):
    specimen = build_specimen(crystals["mp-81"], (1, 1, 0), 10.0, 12.0, 25.0, vacuum_A=2.0)
    z = specimen.atoms.positions[:, 2]
    height = specimen.atoms.cell[2, 2]
    assert height == pytest.approx(16.0)
    sigma = 0.08 / math.sqrt(3)  # the paper's 0.08 A rms, per axis
    assert z.min() - 10 * sigma > 0 and z.max() + 10 * sigma < height
    assert specimen.atoms.info["vacuum_A"] == 2.0 and specimen.atoms.info["zone_axis"] == (1, 1, 0)


def test_zone_axis_parsing():
    assert parse_zone_axis([2, 2, 0]) == (1, 1, 0)
    assert parse_zone_axis(np.array([0, 0, -3])) == (0, 0, -1)
    assert all(type(i) is int for i in parse_zone_axis(np.array([1, 2, 3])))
    assert parse_zone_axis(OmegaConf.create({"axis": [1, 0, 1]}).axis) == (1, 0, 1)  # straight from a config


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"thickness_A": -5.0}, "thickness_A"),
        ({"thickness_A": 0.0}, "thickness_A"),
        ({"thickness_A": float("nan")}, "thickness_A"),
        ({"zone_axis": (0, 0, 0)}, "zone_axis"),
        ({"zone_axis": (1, 1)}, "zone_axis"),
        ({"zone_axis": (1.5, 0, 0)}, "zone_axis"),
        ({"zone_axis": "110"}, "zone_axis"),
        ({"zone_axis": (True, 0, 0)}, "zone_axis"),
        ({"lateral_size_A": 0.0}, "lateral_size_A"),
        ({"rotation_deg": float("inf")}, "rotation_deg"),
        ({"vacuum_A": -1.0}, "vacuum_A"),
        ({"max_strain": -0.1}, "max_strain"),
        ({"max_repetitions": 0}, "max_repetitions"),
        ({"atoms": Atoms("X", cell=[3, 3, 3], pbc=True)}, "atoms"),
        ({"atoms": Atoms()}, "atoms"),
        ({"atoms": Atoms("Si", cell=[3, 3, 0], pbc=True)}, "atoms"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, parameter):
    args = {
        "atoms": bulk("Si", cubic=True),
        "zone_axis": (1, 1, 0),
        "rotation_deg": 0.0,
        "thickness_A": 10.0,
        "lateral_size_A": 20.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{parameter}:") as info:
        build_specimen(**args)
    assert not isinstance(info.value, SpecimenRejected)


def test_too_large_cells_are_rejected_not_built(crystals):
    with pytest.raises(SpecimenRejected, match="max_atoms") as info:
        build_specimen(crystals["Si"], (7, 5, 3), 0.0, 10.0, 20.0, max_atoms=1000)
    assert info.value.reason == "size"
