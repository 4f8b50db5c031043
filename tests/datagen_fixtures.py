"""Test helpers for the datagen tests: a tiny structure list and a simple [001] specimen builder.

They stand in for ``datagen.sources`` / ``datagen.specimen`` where a test must not depend on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Record:
    source_id: str
    formula: str
    atoms: Any


@dataclass
class SimpleSpecimen:
    atoms: Any
    zone_axis: tuple
    rotation_deg: float
    thickness_A: float
    strain: float = 0.0


def _rejected_base():
    from datagen.specimen import SpecimenRejected

    return SpecimenRejected


class Rejected(_rejected_base()):
    def __init__(self, message: str) -> None:
        super().__init__(message, "thickness")


def structures() -> list[Record]:
    from ase.build import bulk

    return [
        Record("test-Si", "Si", bulk("Si", "diamond", a=5.431, cubic=True)),
        Record("test-MgO", "MgO", bulk("MgO", "rocksalt", a=4.212, cubic=True)),
    ]


def simple_specimen(
    atoms, zone_axis, rotation_deg, thickness_A, lateral_size_A, max_strain=0.02, vacuum_A=2.0
):
    """Cubic cell repeated along z to ``thickness_A`` (beam along [001] whatever ``zone_axis``)."""
    if thickness_A > 25:
        raise Rejected(f"thickness {thickness_A:.1f} A too thick for the test builder")
    cell = np.diag(atoms.cell.array)
    reps = (max(1, math.ceil(lateral_size_A / cell[0])), max(1, math.ceil(lateral_size_A / cell[1])))
    nz = max(1, round(thickness_A / cell[2]))
    slab = atoms.repeat((reps[0], reps[1], nz))
    slab.cell[2, 2] += 2 * vacuum_A
    slab.positions[:, 2] += vacuum_A
    return SimpleSpecimen(slab, tuple(zone_axis), rotation_deg, nz * cell[2])
