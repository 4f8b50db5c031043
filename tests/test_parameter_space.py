"""Scan step in Angstrom or Rayleigh radii, Cs lists, and the configs that use them (issue #13).

No simulation runs here: only :class:`datagen.parameters.ParameterSpace` and config composition.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from datagen.cli import config_fingerprint
from datagen.kernel import KernelParameters
from datagen.parameters import ConfigError, DrawnSample, ParameterSpace, sample_rng
from datagen.sources import load_structures
from physics import rayleigh_radius_A, scherzer_defocus, wavelength
from training import pipeline

ROOT = Path(__file__).resolve().parents[1]
RAYLEIGH = {"step_A": None, "step_rayleigh": {"low": 0.1, "high": 0.9}}
"""kernel_paper's step rule before issue #13 (0.1 - 0.9 Rayleigh radii)."""


def datagen_cfg(overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="datagen", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def simulation(name: str = "kernel_paper", **changes: Any) -> dict[str, Any]:
    node = datagen_cfg([f"simulation={name}"])["simulation"]
    node.update(changes)
    return node


def old_draw(space: ParameterSpace, rng: np.random.Generator, num_structures: int) -> DrawnSample:
    """ParameterSpace.draw before step_A and Cs lists (commit 9439b2b): step in Rayleigh radii, one Cs."""
    assert space.step_unit == "rayleigh" and len(space.Cs_values_A) == 1
    Cs_A = space.Cs_values_A[0]
    structure = int(rng.integers(num_structures))
    zone_axis = space.zone_axes[int(rng.integers(len(space.zone_axes)))]
    rotation = space.rotation.draw(rng)
    thickness = space.thickness.draw(rng)
    energy = float(space.energies_eV[int(rng.integers(len(space.energies_eV)))])
    semiangle = space.semiangle.draw(rng)
    ratio = space.ratio.draw(rng)
    step_fraction = space.step.draw(rng)
    position = (float(rng.uniform()), float(rng.uniform()))
    phonon_seed = int(rng.integers(2**31 - 1))
    aperture_invA = semiangle * 1e-3 / wavelength(energy)
    defocus = scherzer_defocus(Cs_A, energy) if space.defocus == "scherzer" else float(space.defocus)
    kernel = KernelParameters(
        energy_eV=energy,
        semiangle_mrad=semiangle,
        gmax_invA=aperture_invA / ratio,
        step_A=step_fraction * rayleigh_radius_A(semiangle, energy),
        Cs_A=Cs_A,
        defocus_A=defocus,
        num_phonons=space.num_phonons,
        rms_displacement_A=space.rms_A,
        phonon_seed=phonon_seed,
    )
    return DrawnSample(structure, zone_axis, rotation, thickness, position, kernel)


def assert_draws_as_before(space: ParameterSpace, seed: int = 3, count: int = 50) -> None:
    for index in range(count):
        rng, reference = sample_rng(seed, index), sample_rng(seed, index)
        for _ in range(2):  # a rejected specimen redraws from the same stream
            assert space.draw(rng, 17) == old_draw(space, reference, 17)


# ---------------------------------------------------------------- step_A / step_rayleigh


@pytest.mark.parametrize(
    "change, state",
    [
        ({"step_A": {"low": 0.1, "high": 0.3}, "step_rayleigh": {"low": 0.1, "high": 0.9}}, "both are set"),
        ({"step_A": None, "step_rayleigh": None}, "neither is set"),
    ],
)
def test_exactly_one_of_step_A_and_step_rayleigh(change, state):
    with pytest.raises(ConfigError) as info:
        ParameterSpace(simulation(**change))
    message = str(info.value)
    assert info.value.parameter == "simulation.step_A" and "\n" not in message
    assert "simulation.step_A" in message and "simulation.step_rayleigh" in message and state in message
    node = simulation()
    del node["step_A"], node["step_rayleigh"]  # absent counts as null
    with pytest.raises(ConfigError, match="neither is set"):
        ParameterSpace(node)


@pytest.mark.parametrize(
    "step, match",
    [({"low": 0.3, "high": 0.1}, "above high"), ({"low": 0.0, "high": 0.3}, "outside"), ("x", "must be")],
)
def test_bad_step_A_names_it(step, match):
    with pytest.raises(ConfigError, match=match) as info:
        ParameterSpace(simulation(step_A=step))
    assert info.value.parameter == "simulation.step_A"


def test_step_A_is_the_same_single_draw_in_angstrom():
    """kernel_paper draws Table 1's steps; every other parameter is that of the Rayleigh rule's sample."""
    in_A = ParameterSpace(simulation())
    in_rayleigh = ParameterSpace(simulation(**RAYLEIGH))
    assert (in_A.step_unit, in_A.step.low, in_A.step.high) == ("A", 0.0167, 0.33)
    assert in_rayleigh.step_unit == "rayleigh"
    steps = []
    for index in range(200):
        a, b = in_A.draw(sample_rng(5, index), 100), in_rayleigh.draw(sample_rng(5, index), 100)
        assert 0.0167 <= a.kernel.step_A <= 0.33
        same = [dataclasses.replace(d, kernel=dataclasses.replace(d.kernel, step_A=0.0)) for d in (a, b)]
        assert same[0] == same[1]  # everything but the step
        fraction = b.kernel.step_A / rayleigh_radius_A(b.kernel.semiangle_mrad, b.kernel.energy_eV)
        # the same uniform variate, mapped onto each range
        uniform = (a.kernel.step_A - 0.0167) / (0.33 - 0.0167)
        assert uniform == pytest.approx((fraction - 0.1) / 0.8, abs=1e-12)
        steps.append(a.kernel.step_A)
    assert min(steps) < 0.04 and max(steps) > 0.31


def test_step_rayleigh_and_a_single_Cs_draw_bit_for_bit_as_before():
    assert_draws_as_before(ParameterSpace(simulation(**RAYLEIGH)))
    assert_draws_as_before(ParameterSpace(simulation("kernel", **RAYLEIGH, Cs_A=0.0, defocus_A=0.0)))
    # a one-value list is its number (no extra draw)
    one = ParameterSpace(simulation(**RAYLEIGH, Cs_A=[1.0e4]))
    assert one.Cs_values_A == (1.0e4,)
    assert_draws_as_before(one)


def test_a_Cs_list_is_drawn_last_with_each_sample_at_its_own_scherzer_defocus():
    listed = ParameterSpace(simulation(Cs_A=[0.0, 1.0e4]))
    single = ParameterSpace(simulation())
    assert listed.Cs_values_A == (0.0, 1.0e4) and single.Cs_values_A == (1.0e4,)
    seen = set()
    for index in range(100):
        a, b = listed.draw(sample_rng(1, index), 50), single.draw(sample_rng(1, index), 50)
        k = a.kernel
        seen.add(k.Cs_A)
        assert k.defocus_A == scherzer_defocus(k.Cs_A, k.energy_eV)
        if k.Cs_A == 0.0:
            assert k.defocus_A == 0.0
        # the Cs integer comes after every other draw: the rest of the sample is unchanged
        assert dataclasses.replace(k, Cs_A=b.kernel.Cs_A, defocus_A=b.kernel.defocus_A) == b.kernel
        assert (a.structure_index, a.zone_axis, a.position_fraction) == (
            b.structure_index,
            b.zone_axis,
            b.position_fraction,
        )
    assert seen == {0.0, 1.0e4}
    fixed = ParameterSpace(simulation(Cs_A=[0.0, 1.0e4], defocus_A=12.5))
    assert {fixed.draw(sample_rng(1, i), 50).kernel.defocus_A for i in range(20)} == {12.5}


@pytest.mark.parametrize("value", [[], ["a"], [0.0, None], None])
def test_bad_Cs_names_it(value):
    with pytest.raises(ConfigError) as info:
        ParameterSpace(simulation(Cs_A=value))
    assert info.value.parameter == "simulation.Cs_A" and "\n" not in str(info.value)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("experiment", ["quickstart", "cpu_reference"])
def test_experiments_draw_the_datasets_they_drew_before(experiment):
    """Their overrides give the step in Rayleigh radii (and null kernel_paper's step_A): same samples,
    and the same fingerprint as a config without step_A, so their datasets stay reusable."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train = compose(config_name="train", overrides=[f"experiment={experiment}"])
    cfg = OmegaConf.to_container(pipeline.compose_datagen(list(train.datagen.overrides)), resolve=True)
    space = ParameterSpace(cfg["simulation"])
    assert space.step_unit == "rayleigh" and (space.step.low, space.step.high) == (0.4, 0.6)
    assert space.Cs_values_A == (0.0,) and space.defocus == 0.0 and space.energies_eV == (300e3,)
    assert_draws_as_before(space)
    before = {**cfg, "simulation": {k: v for k, v in cfg["simulation"].items() if k != "step_A"}}
    assert config_fingerprint(cfg) == config_fingerprint(before)


def test_generalist_config_covers_issue_13_and_excludes_the_test_structures():
    text = (ROOT / "conf" / "simulation" / "kernel_generalist.yaml").read_text()
    # the command in the header comment composes and excludes every test structure
    comment = re.sub(r"\\\n#\s*", " ", "\n".join(line for line in text.splitlines() if line.startswith("#")))
    command = re.search(r"^#\s+(python datagen\.py simulation=kernel_generalist .*)$", comment, re.M)
    assert command is not None
    overrides = shlex.split(command.group(1))[2:]
    assert any(arg.startswith("source.exclude_ids=") for arg in overrides)
    cfg = datagen_cfg(overrides)
    assert not cfg["out_dir"].startswith(("data/", str(ROOT)))  # outside the work tree
    kept = {record.source_id for record in load_structures(cfg["source"])}
    every = {record.source_id for record in load_structures({"name": "bundled"})}
    assert every - kept == {"mp-2815", "mp-5229", "mp-48", "bundled:BN-hexagonal"}  # MoS2 SrTiO3 graphite hBN

    node = cfg["simulation"]
    assert node["num_samples"] == 20000 and node["runner"] == "kernel"
    assert node["phonons"]["num_configs"] == 4 and node["numerics"]["max_gpts"] == 256  # kernel.yaml's
    space = ParameterSpace(node)
    assert space.energies_eV == (200e3, 300e3)
    assert (space.semiangle.low, space.semiangle.high) == (15.0, 30.0)
    assert (space.ratio.low, space.ratio.high) == (0.3, 0.59)
    assert (space.step_unit, space.step.low, space.step.high) == ("A", 0.1, 0.35)
    assert (space.thickness.low, space.thickness.high) == (3.0, 30.0)
    assert space.Cs_values_A == (0.0, 1.0e4) and space.defocus == "scherzer"
    draws = [space.draw(sample_rng(0, i), len(kept)).kernel for i in range(400)]
    semiangles = np.array([k.semiangle_mrad for k in draws])
    assert semiangles.min() >= 15 and semiangles.max() <= 30 and 20 < np.median(semiangles) < 25
    reach = np.array([k.gmax_invA / k.aperture_invA for k in draws])  # CBED edge in units of alpha
    assert reach.min() >= 1 / 0.59 - 1e-9 and reach.max() <= 1 / 0.3 + 1e-9
    assert all(0.1 <= k.step_A <= 0.35 for k in draws)
    assert {k.energy_eV for k in draws} == {200e3, 300e3} and {k.Cs_A for k in draws} == {0.0, 1.0e4}
    assert all(k.defocus_A == scherzer_defocus(k.Cs_A, k.energy_eV) for k in draws)
