"""Configuration parsing of ``simulation=haadf``: :class:`HaadfSpace` checks the config and draws one
:class:`HaadfDraw` per attempt (:mod:`datagen.haadf`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datagen.haadf.abtem_image import AbtemSettings
from datagen.haadf.optics import HaadfOptics
from datagen.haadf.specimens import AMORPHOUS_MATERIALS, NANOPARTICLE_SHAPES
from datagen.parameters import ConfigError, Uniform
from physics import scherzer_defocus

__all__ = [
    "SPECIMEN_KINDS",
    "HaadfDraw",
    "HaadfSpace",
]


SPECIMEN_KINDS = ("crystal", "grain_boundary", "nanoparticle")


def _uniform(node: Any, path: str, lower: float = -math.inf, upper: float = math.inf) -> Uniform:
    if isinstance(node, bool) or node is None:
        raise ConfigError(path, f"must be a number or {{low: ..., high: ...}}, got {node!r}")
    if isinstance(node, int | float):
        node = {"low": node, "high": node}
    if not isinstance(node, Mapping) or set(node) != {"low", "high"}:
        raise ConfigError(path, f"must be a number or {{low: ..., high: ...}}, got {node!r}")
    try:
        low, high = float(node["low"]), float(node["high"])
    except (TypeError, ValueError):
        raise ConfigError(path, f"low and high must be numbers, got {dict(node)}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(path, f"needs finite low <= high, got [{low}, {high}]")
    if low < lower or high > upper:
        raise ConfigError(path, f"range [{low}, {high}] is outside [{lower}, {upper}]")
    return Uniform(low, high)


def _choices(node: Any, path: str, allowed: Sequence[str] | None = None) -> tuple:
    if isinstance(node, str | int | float):
        node = [node]
    if not isinstance(node, Sequence) or isinstance(node, str) or not node:
        raise ConfigError(path, f"must be a non-empty list, got {node!r}")
    values = tuple(node)
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConfigError(path, f"unknown value(s) {bad}; known: {', '.join(map(str, allowed))}")
    return values


def _weights(node: Any, path: str, names: Sequence[str]) -> np.ndarray:
    if not isinstance(node, Mapping):
        raise ConfigError(path, f"must map {', '.join(names)} to non-negative weights, got {node!r}")
    unknown = sorted(set(node) - set(names))
    if unknown:
        raise ConfigError(path, f"unknown key(s) {unknown}; known: {', '.join(names)}")
    try:
        weights = np.array([float(node.get(name, 0.0)) for name in names])
    except (TypeError, ValueError):
        raise ConfigError(path, f"weights must be numbers, got {dict(node)}") from None
    if np.any(weights < 0) or not weights.sum() > 0:
        raise ConfigError(path, f"weights must be >= 0 and not all zero, got {dict(node)}")
    return weights / weights.sum()


def _zone_axes(node: Any, path: str) -> tuple[tuple[int, int, int], ...]:
    from datagen.specimen import parse_zone_axis

    axes = []
    for axis in _choices(node, path):
        try:
            axes.append(parse_zone_axis(list(axis) if not isinstance(axis, str) else axis))
        except (TypeError, ValueError):
            raise ConfigError(
                path, f"zone axis {axis!r} is not three integers [u, v, w], not all 0"
            ) from None
    return tuple(axes)


def _node(cfg: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    node = cfg.get(name) or {}
    return node if isinstance(node, Mapping) else {}


@dataclass(frozen=True)
class HaadfDraw:
    """Everything random about one image (the specimen's own randomness comes from ``seed``)."""

    model: str
    seed: int
    optics: HaadfOptics
    pixel_size_A: float
    z_exponent: float
    atom_sigma_A: float
    kind: str
    structure_index: int
    zone_axis: tuple[int, int, int]
    rotation_deg: float
    thickness_A: float
    extra: dict = field(default_factory=dict)


class HaadfSpace:
    """The checked distributions of a ``simulation`` node of conf/simulation/haadf.yaml."""

    def __init__(self, cfg: Mapping[str, Any], path: str = "simulation") -> None:
        self.path = path
        p = path
        try:
            self.pixels = int(cfg.get("pixels", 256))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{p}.pixels", f"must be an even integer >= 8, got {cfg.get('pixels')!r}"
            ) from None
        if self.pixels < 8 or self.pixels % 2:
            raise ConfigError(f"{p}.pixels", f"must be an even integer >= 8, got {self.pixels}")
        self.pixel_size = _uniform(cfg.get("pixel_size_A"), f"{p}.pixel_size_A", 1e-3, 10.0)
        if self.pixel_size.low <= 0:
            raise ConfigError(f"{p}.pixel_size_A", f"must be positive, got {self.pixel_size}")
        try:
            self.abtem_fraction = float(cfg.get("abtem_fraction", 0.0))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{p}.abtem_fraction", f"must be a number, got {cfg.get('abtem_fraction')!r}"
            ) from None
        if not 0.0 <= self.abtem_fraction <= 1.0:
            raise ConfigError(f"{p}.abtem_fraction", f"must be in [0, 1], got {self.abtem_fraction}")

        o, op = _node(cfg, "optics"), f"{p}.optics"
        try:
            self.energies_eV = tuple(float(e) for e in _choices(o.get("energy_eV"), f"{op}.energy_eV"))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{op}.energy_eV", f"must be energies in eV, got {o.get('energy_eV')!r}"
            ) from None
        if any(not 1e3 <= e <= 5e6 for e in self.energies_eV):
            raise ConfigError(
                f"{op}.energy_eV", f"energies must lie in 1 keV .. 5 MeV, got {self.energies_eV}"
            )
        self.semiangle = _uniform(o.get("semiangle_mrad"), f"{op}.semiangle_mrad", 1.0, 100.0)
        self.Cs = _uniform(o.get("Cs_A", 0.0), f"{op}.Cs_A")
        self.C5 = _uniform(o.get("C5_A", 0.0), f"{op}.C5_A")
        defocus = o.get("defocus_A", "scherzer")
        self.defocus = "scherzer" if defocus == "scherzer" else _uniform(defocus, f"{op}.defocus_A")
        self.defocus_offset = _uniform(o.get("defocus_offset_A", 0.0), f"{op}.defocus_offset_A")
        self.inner = _uniform(o.get("detector_inner_mrad"), f"{op}.detector_inner_mrad", 0.0, 1000.0)
        self.outer = _uniform(o.get("detector_outer_mrad"), f"{op}.detector_outer_mrad", 0.0, 1000.0)
        if self.outer.low <= self.inner.high:
            raise ConfigError(
                f"{op}.detector_outer_mrad",
                f"must lie above detector_inner_mrad ({self.outer.low} <= {self.inner.high})",
            )
        self.source = _uniform(o.get("source_fwhm_A", 0.0), f"{op}.source_fwhm_A", 0.0, 10.0)

        i, ip = _node(cfg, "incoherent"), f"{p}.incoherent"
        self.z_exponent = _uniform(i.get("z_exponent", 1.7), f"{ip}.z_exponent", 0.5, 3.0)
        self.atom_sigma = _uniform(i.get("atom_sigma_A", 0.08), f"{ip}.atom_sigma_A", 0.01, 2.0)
        self.margin_A = float(i.get("margin_A", 4.0))
        if not self.margin_A > 0:
            raise ConfigError(f"{ip}.margin_A", f"must be positive, got {self.margin_A}")
        a = dict(_node(cfg, "abtem"))
        try:
            self.abtem = AbtemSettings.from_mapping(a)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{p}.abtem", str(err)) from None
        unknown = sorted(set(a) - set(AbtemSettings.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{p}.abtem", f"unknown key(s) {unknown}")

        s, sp = _node(cfg, "specimen"), f"{p}.specimen"
        self.kind_weights = _weights(s.get("kinds"), f"{sp}.kinds", SPECIMEN_KINDS)
        c, cp = _node(s, "crystal"), f"{sp}.crystal"
        self.zone_axes = _zone_axes(c.get("zone_axes"), f"{cp}.zone_axes")
        self.thickness = _uniform(c.get("thickness_A"), f"{cp}.thickness_A", 0.5, 1e4)
        self.rotation = _uniform(c.get("rotation_deg", {"low": 0.0, "high": 360.0}), f"{cp}.rotation_deg")
        self.max_strain = float(c.get("max_strain", 0.02))
        d, dp = _node(s, "defects"), f"{sp}.defects"
        self.vacancy_density = _uniform(
            d.get("column_vacancies_per_nm2", 0.0), f"{dp}.column_vacancies_per_nm2", 0
        )
        self.substitution_density = _uniform(
            d.get("column_substitutions_per_nm2", 0.0), f"{dp}.column_substitutions_per_nm2", 0
        )
        self.atom_vacancy = _uniform(d.get("atom_vacancy_fraction", 0.0), f"{dp}.atom_vacancy_fraction", 0, 1)
        self.dopants = _uniform(d.get("dopant_fraction", 0.0), f"{dp}.dopant_fraction", 0, 1)
        from ase.data import atomic_numbers

        self.substitution_elements = _choices(
            d.get("substitution_elements", ["Pt"]), f"{dp}.substitution_elements", list(atomic_numbers)[1:]
        )
        g, gp = _node(s, "grain_boundary"), f"{sp}.grain_boundary"
        self.misorientation = _uniform(
            g.get("misorientation_deg", {"low": 5.0, "high": 45.0}), f"{gp}.misorientation_deg"
        )
        self.other_zone_probability = _uniform(
            g.get("other_zone_axis_probability", 0.0), f"{gp}.other_zone_axis_probability", 0, 1
        ).high
        self.gb_min_distance = float(g.get("min_distance_A", 1.0))
        n, np_ = _node(s, "nanoparticle"), f"{sp}.nanoparticle"
        self.np_elements = _choices(n.get("elements", ["Au"]), f"{np_}.elements", list(atomic_numbers)[1:])
        from ase.data import reference_states

        not_fcc = [
            e
            for e in self.np_elements
            if (reference_states[atomic_numbers[e]] or {}).get("symmetry") != "fcc"
        ]
        if not_fcc:
            raise ConfigError(f"{np_}.elements", f"need fcc metals (ASE reference states), not {not_fcc}")
        self.np_shapes = _choices(
            n.get("shapes", list(NANOPARTICLE_SHAPES)), f"{np_}.shapes", NANOPARTICLE_SHAPES
        )
        self.np_diameter = _uniform(n.get("diameter_A"), f"{np_}.diameter_A", 3.0, 1e3)
        self.np_zone_axes = _zone_axes(
            n.get("zone_axes", [[0, 0, 1], [0, 1, 1], [1, 1, 1]]), f"{np_}.zone_axes"
        )
        self.np_tilt = _uniform(n.get("tilt_deg", 0.0), f"{np_}.tilt_deg", 0.0, 90.0)
        self.np_centre = _uniform(
            n.get("centre_fraction", {"low": 0.3, "high": 0.7}), f"{np_}.centre_fraction", 0, 1
        )
        sup, supp = _node(n, "support"), f"{np_}.support"
        self.support_probability = _uniform(sup.get("probability", 1.0), f"{supp}.probability", 0, 1).high
        self.support_materials = _choices(
            sup.get("materials", ["carbon"]), f"{supp}.materials", sorted(AMORPHOUS_MATERIALS)
        )
        self.support_thickness = _uniform(sup.get("thickness_A", 30.0), f"{supp}.thickness_A", 1.0, 1e3)

    def draw(self, rng: np.random.Generator, num_structures: int) -> HaadfDraw:
        """One image's parameters (the order of draws is part of the reproducibility contract)."""
        seed = int(rng.integers(2**31 - 1))
        model = "abtem" if rng.uniform() < self.abtem_fraction else "incoherent"
        energy = float(self.energies_eV[int(rng.integers(len(self.energies_eV)))])
        Cs, C5 = self.Cs.draw(rng), self.C5.draw(rng)
        base = scherzer_defocus(Cs, energy) if self.defocus == "scherzer" else self.defocus.draw(rng)
        inner = self.inner.draw(rng)
        optics = HaadfOptics(
            energy_eV=energy,
            semiangle_mrad=self.semiangle.draw(rng),
            defocus_A=base + self.defocus_offset.draw(rng),
            Cs_A=Cs,
            C5_A=C5,
            detector_inner_mrad=inner,
            detector_outer_mrad=max(self.outer.draw(rng), inner + 1.0),
            source_fwhm_A=self.source.draw(rng),
        )
        pixel = self.pixel_size.draw(rng)
        z_exponent, atom_sigma = self.z_exponent.draw(rng), self.atom_sigma.draw(rng)
        kind = SPECIMEN_KINDS[int(rng.choice(len(SPECIMEN_KINDS), p=self.kind_weights))]
        structure = int(rng.integers(num_structures))
        zone_axis = self.zone_axes[int(rng.integers(len(self.zone_axes)))]
        rotation = self.rotation.draw(rng)
        thickness = self.thickness.draw(rng)
        extra: dict[str, Any] = {}
        if kind == "grain_boundary":
            other = self.zone_axes[int(rng.integers(len(self.zone_axes)))]
            extra = {
                "zone_axis_2": other if rng.uniform() < self.other_zone_probability else zone_axis,
                "misorientation_deg": float(self.misorientation.draw(rng) * rng.choice([-1.0, 1.0])),
                "point_fraction": (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))),
                "normal_deg": float(rng.uniform(0.0, 360.0)),
            }
        elif kind == "nanoparticle":
            extra = {
                "element": str(self.np_elements[int(rng.integers(len(self.np_elements)))]),
                "shape": str(self.np_shapes[int(rng.integers(len(self.np_shapes)))]),
                "diameter_A": self.np_diameter.draw(rng),
                "np_zone_axis": self.np_zone_axes[int(rng.integers(len(self.np_zone_axes)))],
                "tilt_deg": self.np_tilt.draw(rng),
                "centre_fraction": (self.np_centre.draw(rng), self.np_centre.draw(rng)),
                "support": (
                    str(self.support_materials[int(rng.integers(len(self.support_materials)))])
                    if rng.uniform() < self.support_probability
                    else None
                ),
                "support_thickness_A": self.support_thickness.draw(rng),
            }
        if kind != "nanoparticle":
            extra.update(
                {
                    "vacancies_per_nm2": self.vacancy_density.draw(rng),
                    "substitutions_per_nm2": self.substitution_density.draw(rng),
                    "atom_vacancy_fraction": self.atom_vacancy.draw(rng),
                    "dopant_fraction": self.dopants.draw(rng),
                }
            )
        return HaadfDraw(
            model,
            seed,
            optics,
            pixel,
            z_exponent,
            atom_sigma,
            kind,
            structure,
            zone_axis,
            rotation,
            thickness,
            extra,
        )
