"""The bundled structure set (``source=bundled``, offline): ``datagen/sources/structures.json``.

The file lists each crystal as an International Tables space-group number, lattice parameters (Angstrom,
degrees) and the asymmetric unit in fractional coordinates, with a literature reference;
:func:`ase.spacegroup.crystal` expands it to the conventional cell. It holds

- the elemental crystals for which ASE's ``ase.data.reference_states`` gives a complete structure (fcc, bcc,
  hcp, diamond, simple cubic, bct / beta-Sn, A7 and Sm-type rhombohedral, the latter in hexagonal axes), with
  ASE's lattice constants; skipped: molecular and noble-gas elements, liquid Hg, and entries without an
  atomic basis (B, P, S, Mn, Ga, Se, Te, U, Np, Pa, Pu; see ``skipped_elements`` in the file);
- prototype compounds with experimental room-temperature lattice constants: rock salt, cubic perovskite,
  zincblende, wurtzite, rutile, fluorite / antifluorite, CsCl, L1_2, 2H-MX2 (MoS2, WS2, MoSe2, WSe2, MoTe2),
  1T-MX2, graphite, hexagonal BN, NiAs, AlB2, corundum, spinel, pyrite, cuprite, anatase, Bi2Te3,
  alpha-quartz.

The published AIRPI materials carry their Materials Project ids as ``source_id``: Au ``mp-81``, graphite
``mp-48``, MgO ``mp-1265``, MoS2 ``mp-2815``, SrTiO3 ``mp-5229``; all others are ``bundled:<name>``.

Config (``conf/source/bundled.yaml``; all filters combine with AND, empty / null means no restriction):
``ids`` (source ids, names after ``bundled:``, or formulas), ``exclude_ids`` (the same kinds of names:
held-out structures, e.g. the evaluation scans' crystals), ``prototypes``, ``elements`` (must contain all),
``exclude_elements`` (must contain none), ``num_elements`` and ``num_sites`` ([min, max], sites of the
conventional cell).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from functools import cache, lru_cache
from importlib import resources
from typing import Any

import ase
from ase.spacegroup import crystal

from datagen.sources._common import StructureRecord, StructureSourceError, check_keys, element_list, int_range

__all__ = ["BUNDLED_FORMAT", "bundled_entries", "load_bundled"]

BUNDLED_FORMAT = "deepstem.structures/1"
_KEYS = {
    "name",
    "ids",
    "exclude_ids",
    "prototypes",
    "elements",
    "exclude_elements",
    "num_elements",
    "num_sites",
}


@lru_cache(maxsize=1)
def bundled_entries() -> tuple[dict[str, Any], ...]:
    """The entries of ``datagen/sources/structures.json``, in file order."""
    text = resources.files("datagen.sources").joinpath("structures.json").read_text(encoding="utf-8")
    document = json.loads(text)
    if document.get("format") != BUNDLED_FORMAT:
        raise StructureSourceError(f"datagen/sources/structures.json: expected format {BUNDLED_FORMAT!r}")
    return tuple(document["structures"])


@cache
def _build(index: int) -> ase.Atoms:
    entry = bundled_entries()[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a duplicate site would mean a wrong entry: fail loudly
        atoms = crystal(
            [symbol for symbol, _ in entry["basis"]],
            [position for _, position in entry["basis"]],
            spacegroup=entry["spacegroup"],
            setting=entry.get("setting", 1),
            cellpar=entry["cellpar"],
            pbc=True,
        )
    atoms.info = {"source_id": entry["source_id"], "prototype": entry["prototype"]}
    return atoms


def _names(entry: Mapping[str, Any]) -> set[str]:
    sid = entry["source_id"]
    return {sid, sid.removeprefix("bundled:"), entry["formula"]}


def _wanted(entry: Mapping[str, Any], atoms: ase.Atoms, cfg: Mapping[str, Any]) -> bool:
    ids = cfg.get("ids") or []
    if ids and not _names(entry).intersection(str(i) for i in ids):
        return False
    if _names(entry).intersection(str(i) for i in cfg.get("exclude_ids") or []):
        return False
    prototypes = cfg.get("prototypes") or []
    if prototypes and entry["prototype"] not in prototypes:
        return False
    symbols = set(atoms.get_chemical_symbols())
    if not set(element_list(cfg, "elements")) <= symbols:
        return False
    if symbols & set(element_list(cfg, "exclude_elements")):
        return False
    num_elements = int_range(cfg, "num_elements")
    if num_elements and not num_elements[0] <= len(symbols) <= num_elements[1]:
        return False
    num_sites = int_range(cfg, "num_sites")
    return not (num_sites and not num_sites[0] <= len(atoms) <= num_sites[1])


def load_bundled(cfg: Mapping[str, Any]) -> list[StructureRecord]:
    """Bundled structures passing the filters of ``cfg`` (file order, so the list is reproducible).

    Each record holds a fresh copy of the atoms: callers may modify them.
    """
    check_keys(cfg, _KEYS)
    # validate every filter up front, so a typo fails even when an earlier filter already rejects all
    element_list(cfg, "elements"), element_list(cfg, "exclude_elements")
    int_range(cfg, "num_elements"), int_range(cfg, "num_sites")
    entries = bundled_entries()
    known_prototypes = {entry["prototype"] for entry in entries}
    for prototype in cfg.get("prototypes") or []:
        if prototype not in known_prototypes:
            raise ValueError(
                f"source.prototypes: unknown prototype {prototype!r} "
                f"(known: {', '.join(sorted(known_prototypes))})"
            )
    records = []
    for index, entry in enumerate(entries):
        atoms = _build(index)
        if _wanted(entry, atoms, cfg):
            records.append(StructureRecord(entry["source_id"], entry["formula"], atoms.copy()))
    if not records:
        raise StructureSourceError(f"source=bundled: no bundled structure passes the filters {dict(cfg)}")
    return records
