"""What every structure source shares: the record type, the errors and the parsing of config filters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ase
from ase.data import chemical_symbols

__all__ = [
    "StructureRecord",
    "StructureSourceError",
    "as_dict",
    "check_keys",
    "element_list",
    "float_range",
    "int_range",
]

_SYMBOLS = frozenset(chemical_symbols[1:])


@dataclass(frozen=True)
class StructureRecord:
    """One crystal structure from a source.

    Attributes:
        source_id: where it came from: a Materials Project id (``"mp-81"``) or ``"bundled:<name>"``.
        formula: reduced chemical formula (``"SrTiO3"``).
        atoms: periodic crystal cell (conventional unless the source says otherwise), positions and cell in
            Angstrom, ``pbc`` True on all three axes. Zone axes [uvw] given to
            :func:`datagen.specimen.build_specimen` refer to this cell's lattice vectors.
    """

    source_id: str
    formula: str
    atoms: ase.Atoms


class StructureSourceError(RuntimeError):
    """A structure source cannot deliver structures (no cache, no key, no network, nothing matches)."""


def as_dict(source_cfg: Any) -> dict[str, Any]:
    """Plain ``dict`` of a Hydra/OmegaConf node or a mapping (interpolations resolved)."""
    if source_cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(source_cfg, DictConfig):
            return dict(OmegaConf.to_container(source_cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        pass
    if isinstance(source_cfg, Mapping):
        return dict(source_cfg)
    raise TypeError(f"source config must be a mapping or DictConfig, got {type(source_cfg).__name__}")


def check_keys(cfg: Mapping[str, Any], allowed: set[str], prefix: str = "source") -> None:
    """Reject unknown keys (typos would otherwise silently disable a filter)."""
    for key in cfg:
        if key in ("api_key", "mp_api_key", "key"):
            raise ValueError(
                f"{prefix}.{key}: do not put the Materials Project key in a config (configs are written "
                "next to every output); set the environment variable MP_API_KEY instead"
            )
        if key not in allowed:
            raise ValueError(f"{prefix}.{key}: unknown parameter (known: {', '.join(sorted(allowed))})")


def element_list(cfg: Mapping[str, Any], key: str, prefix: str = "source") -> list[str]:
    """Validated list of element symbols under ``key`` (empty list for null / missing)."""
    value = cfg.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    out = []
    for item in value:
        if not isinstance(item, str) or item not in _SYMBOLS:
            raise ValueError(f"{prefix}.{key}: unknown element {item!r}")
        out.append(item)
    return out


def _range(cfg: Mapping[str, Any], key: str, kind: type, prefix: str) -> tuple[Any, Any] | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value, value]
    try:
        lo, hi = value
        if isinstance(lo, bool) or isinstance(hi, bool):
            raise TypeError
        lo_v, hi_v = kind(lo), kind(hi)
        if lo_v != lo or hi_v != hi:
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(
            f"{prefix}.{key}: expected [min, max] of {kind.__name__}s or null, got {value!r}"
        ) from None
    if lo_v < 0 or hi_v < lo_v:
        raise ValueError(f"{prefix}.{key}: expected 0 <= min <= max, got [{lo}, {hi}]")
    return lo_v, hi_v


def int_range(cfg: Mapping[str, Any], key: str, prefix: str = "source") -> tuple[int, int] | None:
    """``[min, max]`` of non-negative integers (a single integer means exactly that), or ``None``."""
    return _range(cfg, key, int, prefix)


def float_range(cfg: Mapping[str, Any], key: str, prefix: str = "source") -> tuple[float, float] | None:
    """``[min, max]`` of non-negative numbers, or ``None``."""
    return _range(cfg, key, float, prefix)
