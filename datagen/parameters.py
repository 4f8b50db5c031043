"""Sample-parameter distributions of the kernel dataset (REFERENCE.md section 2), checked and drawn.

Every sample is a pure function of ``(global seed, sample index)``: its random stream is
``numpy.random.default_rng([seed, index])``, so a sample is the same whatever shard computes it.
Configuration mistakes raise :class:`ConfigError`, whose message is one line naming the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from datagen.kernel import KernelParameters, SimulationSettings
from physics import rayleigh_radius_A, scherzer_defocus, wavelength

__all__ = ["ConfigError", "DrawnSample", "ParameterSpace", "sample_rng"]


class ConfigError(ValueError):
    """A configuration value is invalid; ``parameter`` is its dotted name."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` of the dataset with global ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def draw(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class TruncatedNormal:
    mean: float
    std: float
    low: float
    high: float

    def draw(self, rng: np.random.Generator) -> float:
        if self.std == 0:
            return float(min(max(self.mean, self.low), self.high))
        for _ in range(10_000):  # rejection sampling: exact truncation
            value = float(rng.normal(self.mean, self.std))
            if self.low <= value <= self.high:
                return value
        return float(rng.uniform(self.low, self.high))  # pragma: no cover - absurd truncation


@dataclass(frozen=True)
class DrawnSample:
    """Everything random about one sample except the structure's atoms."""

    structure_index: int
    zone_axis: tuple[int, int, int]
    rotation_deg: float
    thickness_A: float
    position_fraction: tuple[float, float]
    """Centre probe position as a fraction of the specimen's lateral cell."""
    kernel: KernelParameters


def _number(cfg: Mapping[str, Any], name: str, path: str) -> float:
    value = cfg.get(name) if isinstance(cfg, Mapping) else None
    if value is None:
        raise ConfigError(f"{path}.{name}", "missing")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}.{name}", f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{path}.{name}", f"must be finite, got {value!r}")
    return number


def _range(
    cfg: Mapping[str, Any], name: str, lower: float, upper: float, path: str, strict_low: bool
) -> Uniform:
    node = cfg.get(name)
    full = f"{path}.{name}"
    if isinstance(node, int | float):
        node = {"low": node, "high": node}
    if not isinstance(node, Mapping):
        raise ConfigError(full, f"must be a number or {{low: ..., high: ...}}, got {node!r}")
    low, high = _number(node, "low", full), _number(node, "high", full)
    if low > high:
        raise ConfigError(full, f"low ({low}) is above high ({high})")
    if (low <= lower if strict_low else low < lower) or high > upper:
        bound = f"({lower}, {upper}]" if strict_low else f"[{lower}, {upper}]"
        raise ConfigError(full, f"range [{low}, {high}] is outside {bound}")
    return Uniform(low, high)


def _zone_axes(value: Any, path: str) -> tuple[tuple[int, int, int], ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
        raise ConfigError(path, f"must be a non-empty list of [u, v, w], got {value!r}")
    axes = []
    for axis in value:
        if isinstance(axis, str) or not isinstance(axis, Sequence) or len(axis) != 3:
            raise ConfigError(path, f"zone axis {axis!r} is not three integers [u, v, w]")
        try:
            ints = tuple(int(c) for c in axis)
        except (TypeError, ValueError):
            raise ConfigError(path, f"zone axis {list(axis)!r} is not three integers [u, v, w]") from None
        if any(float(c) != i for c, i in zip(axis, ints, strict=True)):
            raise ConfigError(path, f"zone axis {list(axis)!r} is not three integers [u, v, w]")
        if ints == (0, 0, 0):
            raise ConfigError(path, "zone axis [0, 0, 0] has no direction")
        axes.append(ints)
    return tuple(axes)


STEP_KEYS = ("step_A", "step_rayleigh")
"""The two ways to give the scan step: uniform in Angstrom, or uniform in Rayleigh radii
``0.61 lambda / sin(alpha)`` of each sample's optics. Exactly one is set, the other absent or null."""


def _step(cfg: Mapping[str, Any], path: str) -> tuple[Uniform, str]:
    """The scan-step distribution and its unit: ``"A"`` (``step_A``) or ``"rayleigh"`` (``step_rayleigh``)."""
    given = [key for key in STEP_KEYS if cfg.get(key) is not None]
    if len(given) != 1:
        state = "both are set" if given else "neither is set"
        raise ConfigError(
            f"{path}.step_A",
            f"set exactly one of {path}.step_A (Angstrom) and {path}.step_rayleigh (Rayleigh radii), "
            f"the other null; {state}",
        )
    if given[0] == "step_A":
        return _range(cfg, "step_A", 0.0, 10.0, path, strict_low=True), "A"
    return _range(cfg, "step_rayleigh", 0.0, 10.0, path, strict_low=True), "rayleigh"


def _spherical_aberrations(cfg: Mapping[str, Any], path: str) -> tuple[float, ...]:
    """``Cs_A`` (C30 in Angstrom): a number, or a non-empty list of values drawn uniformly per sample."""
    value = cfg.get("Cs_A")
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise ConfigError(f"{path}.Cs_A", "must be a number or a non-empty list of numbers in Angstrom")
        return tuple(_number({"Cs_A": item}, "Cs_A", path) for item in value)
    return (_number(cfg, "Cs_A", path),)


class ParameterSpace:
    """The checked distributions of a ``simulation`` config node (conf/simulation/kernel*.yaml).

    The scan step is ``step_A`` (uniform, Angstrom) or ``step_rayleigh`` (uniform, in Rayleigh radii
    ``0.61 lambda / sin(alpha)`` of the sample's energy and semi-angle): exactly one of the two, the other
    absent or null. ``Cs_A`` (C30, Angstrom) is a number or a list drawn uniformly per sample;
    ``defocus_A: scherzer`` gives each sample the Scherzer defocus of its own Cs (0 for Cs = 0; abTEM sign,
    ``C10 = -defocus``). ``step``, ``step_unit`` (``"A"`` or ``"rayleigh"``) and ``Cs_values_A`` hold them.
    """

    def __init__(self, cfg: Mapping[str, Any], path: str = "simulation") -> None:
        self.path = path
        energies = cfg.get("energy_eV")
        if isinstance(energies, int | float):
            energies = [energies]
        if not isinstance(energies, Sequence) or isinstance(energies, str) or not energies:
            raise ConfigError(
                f"{path}.energy_eV", f"must be a non-empty list of energies in eV, got {energies!r}"
            )
        try:
            self.energies_eV = tuple(float(e) for e in energies)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}.energy_eV", f"must be numbers in eV, got {list(energies)!r}") from None
        if any(not (1e3 <= e <= 5e6) for e in self.energies_eV):
            raise ConfigError(
                f"{path}.energy_eV", f"energies must lie in 1 keV .. 5 MeV, got {self.energies_eV}"
            )

        node = cfg.get("semiangle_mrad")
        full = f"{path}.semiangle_mrad"
        if isinstance(node, int | float):
            node = {"mean": node, "std": 0.0, "low": node, "high": node}
        if not isinstance(node, Mapping):
            raise ConfigError(full, f"must be a number or {{mean, std, low, high}}, got {node!r}")
        aperture = TruncatedNormal(*(_number(node, k, full) for k in ("mean", "std", "low", "high")))
        if aperture.low <= 0 or aperture.low > aperture.high or aperture.std < 0:
            raise ConfigError(full, f"needs 0 < low <= high and std >= 0, got {dict(node)}")
        if aperture.high > 200:
            raise ConfigError(full, f"high = {aperture.high} mrad is not a convergence semi-angle")
        self.semiangle = aperture

        ratio_path = f"{path}.ratio_alpha_gmax"
        self.ratio = _range(cfg, "ratio_alpha_gmax", 0.0, 1.0, path, strict_low=True)
        if self.ratio.high >= 1.0:
            raise ConfigError(
                ratio_path, f"high = {self.ratio.high}: the aperture must lie inside gmax (alpha / gmax < 1)"
            )
        self.step, self.step_unit = _step(cfg, path)
        self.thickness = _range(cfg, "thickness_A", 0.0, 1e4, path, strict_low=True)
        self.rotation = _range(cfg, "rotation_deg", -1e4, 1e4, path, strict_low=False)
        self.zone_axes = _zone_axes(cfg.get("zone_axes"), f"{path}.zone_axes")
        self.Cs_values_A = _spherical_aberrations(cfg, path)
        defocus = cfg.get("defocus_A", "scherzer")
        if defocus != "scherzer":
            try:
                defocus = float(defocus)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{path}.defocus_A", f"must be 'scherzer' or a number, got {defocus!r}"
                ) from None
        self.defocus = defocus
        phonons = cfg.get("phonons") or {}
        self.num_phonons = int(_number(phonons, "num_configs", f"{path}.phonons"))
        if self.num_phonons < 0:
            raise ConfigError(f"{path}.phonons.num_configs", f"must be >= 0, got {self.num_phonons}")
        self.rms_A = _number(phonons, "rms_displacement_A", f"{path}.phonons")
        if self.rms_A < 0:
            raise ConfigError(f"{path}.phonons.rms_displacement_A", f"must be >= 0, got {self.rms_A}")
        pixels = int(_number(cfg, "pixels", path))
        if pixels < 8 or pixels % 2:
            raise ConfigError(f"{path}.pixels", f"must be an even number >= 8, got {pixels}")
        numerics = dict(cfg.get("numerics") or {})
        self.settings = SimulationSettings.from_mapping({**numerics, "pixels": pixels})
        for name in ("slice_thickness_A", "max_sampling_A", "antialias_margin", "probe_window_diameters"):
            if not float(getattr(self.settings, name)) > 0:
                raise ConfigError(
                    f"{path}.numerics.{name}", f"must be positive, got {getattr(self.settings, name)}"
                )
        if self.settings.wave_plane not in ("entrance", "exit"):
            raise ConfigError(
                f"{path}.numerics.wave_plane",
                f"must be 'entrance' or 'exit', got {self.settings.wave_plane!r}",
            )
        if int(self.settings.min_period_factor) < 1:
            raise ConfigError(
                f"{path}.numerics.min_period_factor", f"must be >= 1, got {self.settings.min_period_factor}"
            )
        if self.settings.max_gpts < 2 * pixels:
            raise ConfigError(f"{path}.numerics.max_gpts", f"must be at least 2 * pixels = {2 * pixels}")

    def draw(self, rng: np.random.Generator, num_structures: int) -> DrawnSample:
        """Draw one sample's parameters (the order of draws is part of the reproducibility contract).

        Order: structure, zone axis, rotation, thickness, energy, semi-angle, alpha / gmax, step (one uniform
        draw in either unit), position (2), phonon seed, then Cs only when ``Cs_A`` lists several values, so
        that a config with a single Cs draws the same samples as before Cs lists existed.
        """
        structure = int(rng.integers(num_structures))
        zone_axis = self.zone_axes[int(rng.integers(len(self.zone_axes)))]
        rotation = self.rotation.draw(rng)
        thickness = self.thickness.draw(rng)
        energy = float(self.energies_eV[int(rng.integers(len(self.energies_eV)))])
        semiangle = self.semiangle.draw(rng)
        ratio = self.ratio.draw(rng)
        step = self.step.draw(rng)  # in Rayleigh radii or in Angstrom (step_unit): the same single draw
        position = (float(rng.uniform()), float(rng.uniform()))
        phonon_seed = int(rng.integers(2**31 - 1))
        # drawn last, and only when there is a choice: a single Cs keeps the draw sequence of before
        Cs_A = self.Cs_values_A[0]
        if len(self.Cs_values_A) > 1:
            Cs_A = self.Cs_values_A[int(rng.integers(len(self.Cs_values_A)))]
        aperture_invA = semiangle * 1e-3 / wavelength(energy)
        defocus = scherzer_defocus(Cs_A, energy) if self.defocus == "scherzer" else float(self.defocus)
        step_A = step if self.step_unit == "A" else step * rayleigh_radius_A(semiangle, energy)
        kernel = KernelParameters(
            energy_eV=energy,
            semiangle_mrad=semiangle,
            gmax_invA=aperture_invA / ratio,
            step_A=step_A,
            Cs_A=Cs_A,
            defocus_A=defocus,
            num_phonons=self.num_phonons,
            rms_displacement_A=self.rms_A,
            phonon_seed=phonon_seed,
        )
        return DrawnSample(structure, zone_axis, rotation, thickness, position, kernel)
