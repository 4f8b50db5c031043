"""Bundled structure source: content checked against crystallography, filters, config and errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import spglib
import yaml
from ase.build import bulk
from ase.data import reference_states
from ase.neighborlist import neighbor_list
from omegaconf import OmegaConf
from pymatgen.core import Composition

from datagen.sources import StructureRecord, StructureSourceError, load_structures
from datagen.sources.bundled import bundled_entries

CONF = Path(__file__).resolve().parents[1] / "conf" / "source"


@pytest.fixture(scope="module")
def records() -> list[StructureRecord]:
    return load_structures(OmegaConf.load(CONF / "bundled.yaml"))


@pytest.fixture(scope="module")
def by_id(records) -> dict[str, StructureRecord]:
    return {r.source_id: r for r in records}


def density(atoms) -> float:
    return len(atoms) / abs(np.linalg.det(atoms.cell[:]))


def shortest_distance(atoms, a: str | None = None, b: str | None = None) -> float:
    i, j, d = neighbor_list("ijd", atoms, 6.0)
    symbols = np.array(atoms.get_chemical_symbols())
    mask = np.ones(len(d), bool)
    if a is not None:
        mask &= (symbols[i] == a) & (symbols[j] == b)
    return float(d[mask].min())


def test_default_config_loads_the_whole_curated_set(records):
    assert len(records) == len(bundled_entries()) == 160
    assert len({r.source_id for r in records}) == len(records)  # ids are unique
    for record in records:
        assert isinstance(record, StructureRecord)
        assert record.atoms.pbc.all() and len(record.atoms) > 0
        assert record.source_id.startswith(("mp-", "bundled:"))


def test_paper_materials_carry_their_materials_project_ids(by_id):
    expected = {"mp-81": "Au", "mp-48": "C", "mp-1265": "MgO", "mp-2815": "MoS2", "mp-5229": "SrTiO3"}
    for source_id, formula in expected.items():
        assert by_id[source_id].formula == formula
    assert by_id["mp-48"].atoms.info["prototype"] == "graphite"
    # Au fcc a = 4.08 A; SrTiO3 cubic perovskite a = 3.905 A; MoS2 2H a = 3.16, c = 12.295 A
    assert by_id["mp-81"].atoms.cell.cellpar()[:3] == pytest.approx([4.08] * 3)
    assert shortest_distance(by_id["mp-5229"].atoms, "Ti", "O") == pytest.approx(3.905 / 2)
    assert shortest_distance(by_id["mp-1265"].atoms, "Mg", "O") == pytest.approx(4.212 / 2)
    assert shortest_distance(by_id["mp-48"].atoms) == pytest.approx(2.464 / np.sqrt(3), abs=1e-3)  # C-C 1.42
    assert shortest_distance(by_id["mp-2815"].atoms, "Mo", "S") == pytest.approx(2.41, abs=0.02)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # spglib 2.x error-handling notice
def test_every_entry_has_its_space_group_formula_and_a_reference(records):
    entries = {e["source_id"]: e for e in bundled_entries()}
    text = resources.files("datagen.sources").joinpath("structures.json").read_text(encoding="utf-8")
    references = set(json.loads(text)["references"])
    for record in records:
        entry = entries[record.source_id]
        atoms = record.atoms
        cell = (atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers)
        assert spglib.get_symmetry_dataset(cell, symprec=1e-3).number == entry["spacegroup"], record.source_id
        assert (
            Composition(atoms.get_chemical_formula()).reduced_composition
            == Composition(record.formula).reduced_composition
        )
        assert entry["reference"] in references
        assert shortest_distance(atoms) > 1.4, record.source_id  # no overlapping sites (shortest: B-N 1.45)


def test_elements_agree_with_ase_reference_states(records):
    elements = [
        r for r in records if len(set(r.atoms.numbers)) == 1 and r.atoms.info["prototype"] != "graphite"
    ]
    assert len(elements) == 65
    for record in elements:
        symbol = record.formula
        assert reference_states[record.atoms.numbers[0]] is not None
        reference = bulk(symbol)  # ASE's own construction of the same reference state
        assert density(record.atoms) == pytest.approx(density(reference), rel=1e-3), symbol
        assert shortest_distance(record.atoms) == pytest.approx(shortest_distance(reference), rel=1e-3), (
            symbol
        )
    symbols = {r.formula for r in elements}
    assert {"Si", "Ge", "C", "Cu", "Fe", "W", "Mg", "Ti", "Zn", "Au", "Pt", "Bi", "Sn"} <= symbols
    assert not symbols & {"H", "He", "N", "O", "F", "Ne", "Ar", "Kr", "Xe", "Hg"}  # gases, liquid Hg


@pytest.mark.parametrize(
    ("source_id", "pair", "bond_A"),
    [
        ("bundled:GaAs-zincblende", ("Ga", "As"), 5.6533 * np.sqrt(3) / 4),
        ("bundled:GaN-wurtzite", ("Ga", "N"), 1.95),
        ("bundled:ZnO-wurtzite", ("Zn", "O"), 1.98),
        ("bundled:TiO2-rutile", ("Ti", "O"), 1.95),
        ("bundled:TiO2-anatase", ("Ti", "O"), 1.93),
        ("bundled:CaF2", ("Ca", "F"), 5.4631 * np.sqrt(3) / 4),
        ("bundled:CsCl", ("Cs", "Cl"), 4.123 * np.sqrt(3) / 2),
        ("bundled:BN-hexagonal", ("B", "N"), 1.446),
        ("bundled:SiO2-quartz", ("Si", "O"), 1.61),
        ("bundled:Al2O3", ("Al", "O"), 1.86),
        ("bundled:MgAl2O4", ("Al", "O"), 1.93),
        ("bundled:Cu2O", ("Cu", "O"), 1.85),
        ("bundled:FeS2", ("S", "S"), 2.16),
        ("bundled:WS2-2H", ("W", "S"), 2.41),
        ("bundled:TiS2-1T", ("Ti", "S"), 2.43),
    ],
)
def test_prototype_bond_lengths(by_id, source_id, pair, bond_A):
    assert shortest_distance(by_id[source_id].atoms, *pair) == pytest.approx(bond_A, abs=0.02)


def test_prototypes_requested_by_the_issue_are_present(records):
    prototypes = {r.atoms.info["prototype"] for r in records}
    assert {
        "rocksalt",
        "perovskite",
        "zincblende",
        "wurtzite",
        "rutile",
        "fluorite",
        "CsCl",
        "2H-MX2",
    } <= prototypes
    assert {"graphite", "hBN", "fcc", "bcc", "hcp", "diamond"} <= prototypes
    assert {r.formula for r in records if r.atoms.info["prototype"] == "2H-MX2"} >= {"MoS2", "WS2", "MoSe2"}


def test_filters_combine(records):
    oxides = load_structures({"name": "bundled", "elements": ["O"], "num_elements": [2, 2]})
    assert oxides and all(
        set(r.atoms.get_chemical_symbols()) == {"O", r.atoms.get_chemical_symbols()[0]}
        or len(set(r.atoms.get_chemical_symbols())) == 2
        for r in oxides
    )
    assert all("O" in r.atoms.get_chemical_symbols() for r in oxides)
    assert "mp-1265" in {r.source_id for r in oxides} and "mp-5229" not in {r.source_id for r in oxides}
    small = load_structures({"name": "bundled", "num_sites": [1, 2], "exclude_elements": ["Cs"]})
    assert small and all(len(r.atoms) <= 2 and "Cs" not in r.atoms.get_chemical_symbols() for r in small)
    chosen = load_structures({"ids": ["mp-81", "SrTiO3", "GaAs-zincblende"]})
    assert [r.source_id for r in chosen] == ["mp-81", "mp-5229", "bundled:GaAs-zincblende"]
    perovskites = load_structures({"prototypes": ["perovskite"]})
    assert {r.formula for r in perovskites} >= {"SrTiO3", "BaTiO3"} and all(
        len(r.atoms) == 5 for r in perovskites
    )
    held_out = load_structures({"exclude_ids": ["MoS2", "mp-5229", "GaAs-zincblende"]})
    assert len(held_out) == len(records) - 3
    assert not {"mp-2815", "mp-5229", "bundled:GaAs-zincblende"} & {r.source_id for r in held_out}
    # the default (no filters) is the whole set, in a reproducible order
    assert [r.source_id for r in load_structures({})] == [r.source_id for r in records]


def test_records_are_independent_copies():
    first = load_structures({"ids": ["mp-81"]})[0]
    first.atoms.positions += 1.0
    again = load_structures({"ids": ["mp-81"]})[0]
    assert np.allclose(again.atoms.positions[0], 0.0)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"elements": ["Xx"]}, r"source\.elements: unknown element 'Xx'"),
        ({"exclude_elements": ["O", "Qq"]}, r"source\.exclude_elements: unknown element 'Qq'"),
        ({"num_sites": [10, 2]}, r"source\.num_sites"),
        ({"num_sites": [1.5, 3]}, r"source\.num_sites"),
        ({"num_elements": "two"}, r"source\.num_elements"),
        ({"prototypes": ["perovskyte"]}, r"source\.prototypes: unknown prototype 'perovskyte'"),
        ({"num_site": [1, 2]}, r"source\.num_site: unknown parameter"),
        ({"api_key": "abcdef"}, r"source\.api_key: do not put"),
        ({"name": "icsd"}, r"source\.name: unknown structure source 'icsd'"),
    ],
)
def test_bad_filters_name_the_parameter(cfg, message):
    with pytest.raises(ValueError, match=message):
        load_structures({"name": "bundled", **cfg} if "name" not in cfg else cfg)


def test_filters_that_match_nothing_raise_one_clear_error():
    with pytest.raises(StructureSourceError, match="no bundled structure passes"):
        load_structures({"elements": ["Au", "O"]})


def test_config_files_document_every_parameter():
    for name in ("bundled", "materials_project"):
        path = CONF / f"{name}.yaml"
        cfg = yaml.safe_load(path.read_text())
        assert cfg["name"] == name
        lines = [line for line in path.read_text().splitlines() if line and not line.startswith((" ", "#"))]
        for line in lines:  # every top-level key carries a comment (units, meaning)
            key = line.split(":")[0]
            assert "#" in line or key == "name", f"{path.name}: {key} has no comment"
