"""Structures from the Materials Project (``source=materials_project``), through a cache on disk.

Two steps, so that cluster array jobs never query the API (concurrently or at all):

1. **Fetch** (once, on a machine with network access)::

       export MP_API_KEY=<your key>     # from https://next-gen.materialsproject.org/api
       python scripts/fetch_materials_project.py [source.<key>=<value> ...]
       # same as: python -m datagen.sources.fetch [source.<key>=<value> ...]

   runs ``MPRester(api_key=$MP_API_KEY, endpoint=...).materials.summary.search(<filters>)`` with the filters
   of ``conf/source/materials_project.yaml`` (plus the overrides, written exactly as for ``datagen.py``) and
   writes ``<cache_dir>/summary-<hash>.json.gz``, where ``<hash>`` is a digest of the endpoint, the filters
   and the cell choice.
2. **Load**: ``load_structures(cfg.source)`` reads the cache file of the configured query. Without it, one
   :class:`MaterialsProjectUnavailable` says how to set the key and run the fetch step, or to use
   ``source=bundled``. With ``fetch_if_missing: true`` (single-process runs only) the load fetches first.

The key is read from the environment variable ``MP_API_KEY`` only. It is never written to the cache, a
config, a log or an exception message (messages go through :func:`datagen.provenance.redact_secrets`).

Cache format ``deepstem.mp_cache/1`` (gzip-compressed JSON): ``query`` (the filters), ``endpoint``,
``db_version``, ``cell``, ``fetched`` (UTC), ``deepstem_version`` and ``structures``: a list of
``{material_id, formula, cell (3x3, Angstrom, rows = lattice vectors), numbers (atomic numbers),
scaled_positions (fractional), energy_above_hull (eV/atom), spacegroup}``. This compact form loads as
``ase.Atoms`` without pymatgen, so an array job reads ~10^5 structures in seconds.

``cell: conventional`` (default) stores pymatgen's conventional standard cell, so that zone axes [uvw] mean
the usual crystallographic directions (e.g. [111] of a cubic crystal); ``primitive`` stores the primitive
standard cell and ``as_is`` the structure exactly as the database holds it. Disordered structures are skipped.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ase
import numpy as np

from datagen.provenance import package_version, redact_secrets
from datagen.sources._common import (
    StructureRecord,
    StructureSourceError,
    as_dict,
    check_keys,
    element_list,
    float_range,
    int_range,
)

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_ENDPOINT",
    "MP_API_KEY_ENV",
    "MaterialsProjectUnavailable",
    "cache_path",
    "fetch_materials_project",
    "load_materials_project",
    "main",
    "search_kwargs",
]

log = logging.getLogger(__name__)

MP_API_KEY_ENV = "MP_API_KEY"
DEFAULT_ENDPOINT = "https://api.materialsproject.org/"
CACHE_FORMAT = "deepstem.mp_cache/1"
KEY_URL = "https://next-gen.materialsproject.org/api"
_CELLS = ("conventional", "primitive", "as_is")
_FIELDS = ["material_id", "formula_pretty", "structure", "energy_above_hull", "symmetry"]
_KEYS = {
    "name",
    "endpoint",
    "cache_dir",
    "fetch_if_missing",
    "cell",
    "symprec_A",
    "elements",
    "exclude_elements",
    "chemsys",
    "formula",
    "material_ids",
    "num_elements",
    "num_sites",
    "energy_above_hull",
    "band_gap",
    "is_stable",
    "theoretical",
    "deprecated",
    "include_gnome",
}
_DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "source" / "materials_project.yaml"


class MaterialsProjectUnavailable(StructureSourceError):
    """No cached structures for the configured query, and no way to fetch them (key, network, server)."""


def _how_to(path: Path | None = None) -> str:
    where = f" into {path}" if path is not None else ""
    return (
        f"set your API key ({KEY_URL}) with `export {MP_API_KEY_ENV}=<key>` and fill the cache{where} "
        "once with `python scripts/fetch_materials_project.py` followed by the same source.* overrides "
        "as for datagen.py; or use the offline structures with `source=bundled`"
    )


def _scrub(text: str, *secrets: str | None) -> str:
    text = str(redact_secrets(text))
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    return text


def _bool_or_none(cfg: Mapping[str, Any], key: str) -> bool | None:
    value = cfg.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"source.{key}: expected true, false or null, got {value!r}")
    return value


def _str_list(cfg: Mapping[str, Any], key: str) -> list[str]:
    value = cfg.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"source.{key}: expected a list of strings, got {value!r}")
    return list(value)


def search_kwargs(source_cfg: Any) -> dict[str, Any]:
    """Keyword arguments of ``MPRester().materials.summary.search`` for the config's filters (validated).

    Ranges are ``(min, max)`` tuples: ``num_elements``, ``num_sites`` (integers), ``energy_above_hull``
    (eV/atom), ``band_gap`` (eV). Lists: ``elements`` (must contain all), ``exclude_elements``, ``chemsys``
    (e.g. ``Si-O``), ``formula``, ``material_ids``. Flags: ``is_stable``, ``theoretical``, ``deprecated``,
    ``include_gnome``. Filters that are null or empty are left out of the query.
    """
    cfg = as_dict(source_cfg)
    check_keys(cfg, _KEYS)
    query: dict[str, Any] = {}
    for key in ("elements", "exclude_elements"):
        if values := element_list(cfg, key):
            query[key] = values
    for key in ("chemsys", "formula", "material_ids"):
        if values := _str_list(cfg, key):
            query[key] = values
    for key in ("num_elements", "num_sites"):
        if (bounds := int_range(cfg, key)) is not None:
            query[key] = bounds
    for key in ("energy_above_hull", "band_gap"):
        if (bounds := float_range(cfg, key)) is not None:
            query[key] = bounds
    for key in ("is_stable", "theoretical", "deprecated"):
        if (flag := _bool_or_none(cfg, key)) is not None:
            query[key] = flag
    include_gnome = _bool_or_none(cfg, "include_gnome")
    query["include_gnome"] = bool(include_gnome)
    return query


def _endpoint(cfg: Mapping[str, Any]) -> str:
    endpoint = str(cfg.get("endpoint") or DEFAULT_ENDPOINT)
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"source.endpoint: expected an http(s) URL, got {endpoint!r}")
    return endpoint.rstrip("/") + "/"


def _cell_choice(cfg: Mapping[str, Any]) -> str:
    cell = cfg.get("cell", "conventional")
    if cell not in _CELLS:
        raise ValueError(f"source.cell: expected one of {', '.join(_CELLS)}, got {cell!r}")
    return cell


def _symprec(cfg: Mapping[str, Any]) -> float:
    symprec = cfg.get("symprec_A", 0.1)
    if isinstance(symprec, bool) or not isinstance(symprec, int | float) or not 0 < symprec < 1:
        raise ValueError(f"source.symprec_A: expected a tolerance in (0, 1) Angstrom, got {symprec!r}")
    return float(symprec)


def _identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that determines the cached content (the cache file name is its digest)."""
    query = {k: list(v) if isinstance(v, tuple) else v for k, v in search_kwargs(cfg).items()}
    identity = {"endpoint": _endpoint(cfg), "query": query, "cell": _cell_choice(cfg)}
    if identity["cell"] != "as_is":
        identity["symprec_A"] = _symprec(cfg)
    return identity


def cache_path(source_cfg: Any) -> Path:
    """Cache file of the configured query: ``<cache_dir>/summary-<16 hex digits>.json.gz``."""
    cfg = as_dict(source_cfg)
    cache_dir = cfg.get("cache_dir")
    if not cache_dir:
        raise ValueError("source.cache_dir: a folder for the Materials Project cache is required")
    digest = hashlib.sha256(json.dumps(_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return Path(str(cache_dir)).expanduser() / f"summary-{digest}.json.gz"


def _to_entry(doc: Any, cell: str, symprec: float) -> dict[str, Any] | None:
    from pymatgen.core import Structure

    get = doc.get if isinstance(doc, Mapping) else lambda key, default=None: getattr(doc, key, default)
    structure = get("structure")
    if isinstance(structure, Mapping):
        structure = Structure.from_dict(structure)
    if structure is None or not structure.is_ordered:
        return None
    if cell != "as_is":
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        with warnings.catch_warnings():  # spglib 2.x notices about its error handling
            warnings.simplefilter("ignore", DeprecationWarning)
            analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
            if cell == "conventional":
                structure = analyzer.get_conventional_standard_structure()
            else:
                structure = analyzer.get_primitive_standard_structure()
    symmetry = get("symmetry")
    if isinstance(symmetry, Mapping):
        spacegroup = symmetry.get("number")
    else:
        spacegroup = getattr(symmetry, "number", None)
    e_hull = get("energy_above_hull")
    return {
        "material_id": str(get("material_id")),
        "formula": str(get("formula_pretty") or structure.composition.reduced_formula),
        "cell": np.round(structure.lattice.matrix, 8).tolist(),
        "numbers": [int(site.specie.Z) for site in structure],
        "scaled_positions": np.round(structure.frac_coords, 8).tolist(),
        "energy_above_hull": None if e_hull is None else float(e_hull),
        "spacegroup": None if spacegroup is None else int(spacegroup),
    }


def _id_key(material_id: str) -> tuple[str, int, str]:
    prefix, _, number = material_id.partition("-")
    return (prefix, int(number), "") if number.isdigit() else (prefix, -1, material_id)


def fetch_materials_project(source_cfg: Any, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Query the Materials Project with the config's filters and write the cache file; return its path.

    The key comes from the environment variable ``MP_API_KEY``. An existing cache file is kept unless
    ``overwrite``. Raises :class:`MaterialsProjectUnavailable` without a key or when the query fails
    (network, server, refused key); the message never contains the key.
    """
    cfg = as_dict(source_cfg)
    path = cache_path(cfg)
    if path.exists() and not overwrite:
        log.info("Materials Project cache already present: %s", path)
        return path
    identity = _identity(cfg)
    symprec = _symprec(cfg)
    api_key = os.environ.get(MP_API_KEY_ENV, "").strip()
    if not api_key:
        raise MaterialsProjectUnavailable(
            f"the environment variable {MP_API_KEY_ENV} is not set: {_how_to(path)}"
        )
    try:
        from mp_api.client import MPRester
    except ImportError:  # pragma: no cover - mp-api is a dependency
        raise MaterialsProjectUnavailable(
            "the mp-api package is not installed (pip install mp-api)"
        ) from None

    endpoint = identity["endpoint"]
    log.info("querying the Materials Project at %s with %s", endpoint, identity["query"])
    try:
        with MPRester(api_key=api_key, endpoint=endpoint, mute_progress_bars=not progress) as rester:
            docs = rester.materials.summary.search(**search_kwargs(cfg), fields=list(_FIELDS))
            db_version = getattr(rester, "db_version", None)
    except Exception as exc:  # network, HTTP, refused key, malformed answer: one clear error, key scrubbed
        reason = _scrub(f"{type(exc).__name__}: {exc}", api_key)
        raise MaterialsProjectUnavailable(
            f"the Materials Project query to {endpoint} failed ({reason}); check the key and the network, "
            "or use `source=bundled`"
        ) from None

    entries, skipped = [], 0
    for doc in docs:
        entry = _to_entry(doc, identity["cell"], symprec)
        if entry is None:
            skipped += 1
        else:
            entries.append(entry)
    entries.sort(key=lambda e: _id_key(e["material_id"]))
    document = {
        "format": CACHE_FORMAT,
        **identity,
        "db_version": None if db_version is None else str(db_version),
        "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "deepstem_version": package_version(),
        "skipped_disordered": skipped,
        "structures": entries,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(document, f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("cached %d structures (%d disordered skipped) in %s", len(entries), skipped, path)
    return path


def _read_cache(path: Path, identity: Mapping[str, Any]) -> list[StructureRecord]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise StructureSourceError(
            f"{path}: unreadable Materials Project cache ({exc}); delete it and fetch again"
        ) from None
    if document.get("format") != CACHE_FORMAT:
        raise StructureSourceError(
            f"{path}: expected format {CACHE_FORMAT!r}, found {document.get('format')!r}"
        )
    stored = {key: document.get(key) for key in identity}
    if json.dumps(stored, sort_keys=True) != json.dumps(dict(identity), sort_keys=True):
        raise StructureSourceError(
            f"{path}: the cache holds another query ({stored}); delete it and fetch again"
        )
    records = []
    for entry in document["structures"]:
        atoms = ase.Atoms(
            numbers=entry["numbers"], scaled_positions=entry["scaled_positions"], cell=entry["cell"], pbc=True
        )
        atoms.info = {"source_id": entry["material_id"], "spacegroup": entry.get("spacegroup")}
        records.append(StructureRecord(entry["material_id"], entry["formula"], atoms))
    return records


def load_materials_project(source_cfg: Any) -> list[StructureRecord]:
    """Structures of the configured query from the cache (sorted by material id).

    Raises :class:`MaterialsProjectUnavailable` when the cache file is missing (after trying to fetch it
    when ``fetch_if_missing`` is true) and :class:`StructureSourceError` when it matches nothing.
    """
    cfg = as_dict(source_cfg)
    path = cache_path(cfg)
    identity = _identity(cfg)
    if not path.exists():
        fetch = _bool_or_none(cfg, "fetch_if_missing")
        if not fetch:
            key_state = "" if os.environ.get(MP_API_KEY_ENV) else f" and {MP_API_KEY_ENV} is not set"
            raise MaterialsProjectUnavailable(
                f"no Materials Project structures are cached for this query (expected {path}){key_state}: "
                f"{_how_to()}"
            )
        fetch_materials_project(cfg)
    records = _read_cache(path, identity)
    if not records:
        raise StructureSourceError(f"{path}: the Materials Project query matched no ordered structure")
    return records


def _load_config(config: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = Path(config) if config else _DEFAULT_CONFIG
    if not path.exists():
        raise ValueError(f"--config: no such file {path}")
    base = OmegaConf.load(path)
    dotlist = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        key = key.lstrip("+").removeprefix("source.")
        if key == "source":
            continue  # `source=materials_project`, as typed for datagen.py
        dotlist.append(f"{key}={value}")
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist))
    return as_dict(merged)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the fetch step (``python -m datagen.sources.fetch --help``)."""
    parser = argparse.ArgumentParser(
        prog="fetch_materials_project",
        description="Fill the Materials Project structure cache once, before datagen jobs read it. "
        f"The API key is read from ${MP_API_KEY_ENV}.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides as for datagen.py, e.g. source.num_sites=[1,20]"
    )
    parser.add_argument("--config", help=f"source config YAML (default {_DEFAULT_CONFIG})")
    parser.add_argument("--overwrite", action="store_true", help="query again even if the cache file exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = _load_config(args.config, args.overrides)
        path = fetch_materials_project(cfg, overwrite=args.overwrite)
        count = len(_read_cache(path, _identity(cfg)))
    except (ValueError, StructureSourceError) as exc:
        print(
            f"fetch_materials_project: error: {_scrub(str(exc), os.environ.get(MP_API_KEY_ENV))}",
            file=sys.stderr,
        )
        return 1
    print(f"{count} structures cached in {path}")
    return 0
