"""Structure sources for training data: which crystals ``python datagen.py`` simulates.

``load_structures(cfg.source)`` returns a list of :class:`StructureRecord` (source id, reduced formula,
periodic ``ase.Atoms`` in Angstrom) for the Hydra ``source`` group:

- ``source=bundled`` (default, offline): the curated set in ``datagen/sources/structures.json``
  (:mod:`datagen.sources.bundled`);
- ``source=materials_project``: Materials Project structures from a cache on disk filled once by the fetch
  step ``python scripts/fetch_materials_project.py`` with ``MP_API_KEY`` set
  (:mod:`datagen.sources.materials_project`).

The list order is deterministic (file order; material id order), so sample ``i`` of a dataset can pick its
structure from (seed, i) alone. Bad filters raise :class:`ValueError` naming the parameter
(``source.elements: unknown element 'Xx'``); a source that cannot deliver raises
:class:`StructureSourceError` (:class:`MaterialsProjectUnavailable` for a missing cache / key / network).
"""

from __future__ import annotations

from typing import Any

from datagen.sources._common import StructureRecord, StructureSourceError, as_dict
from datagen.sources.bundled import load_bundled
from datagen.sources.materials_project import MaterialsProjectUnavailable, load_materials_project

__all__ = [
    "SOURCES",
    "MaterialsProjectUnavailable",
    "StructureRecord",
    "StructureSourceError",
    "load_structures",
]

SOURCES = ("bundled", "materials_project")


def load_structures(source_cfg: Any) -> list[StructureRecord]:
    """Structures of the configured source (``source_cfg``: the Hydra ``source`` node, or a dict).

    ``source_cfg.name`` selects the source (``bundled`` when missing); the other keys are its filters, see
    ``conf/source/<name>.yaml``.
    """
    cfg = as_dict(source_cfg)
    name = cfg.get("name", "bundled")
    if name == "bundled":
        return load_bundled(cfg)
    if name == "materials_project":
        return load_materials_project(cfg)
    raise ValueError(f"source.name: unknown structure source {name!r} (known: {', '.join(SOURCES)})")
