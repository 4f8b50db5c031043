"""Clean HAADF images (datagen/haadf/): incoherent-model physics, abTEM agreement, specimens, shards."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import ase
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from datagen import store
from datagen.haadf import (
    AbtemSettings,
    HaadfOptics,
    HaadfSampleMaker,
    amorphous_slab,
    cross_sections_A2,
    kinematic_cross_section_A2,
    plan_geometry,
    render_incoherent,
    simulate_abtem,
)
from datagen.parameters import ConfigError
from datagen.scan4d import with_point_defect

ROOT = Path(__file__).resolve().parents[1]
ABERRATION_FREE = HaadfOptics(energy_eV=300e3, semiangle_mrad=21.0, detector_inner_mrad=60.0,
                              detector_outer_mrad=190.0)  # fmt: skip
THESIS = HaadfOptics(300e3, 21.0, defocus_A=88.74, Cs_A=4e5, C5_A=1e8, detector_inner_mrad=60.0,
                     detector_outer_mrad=190.0, source_fwhm_A=0.7)  # fmt: skip


def composed(overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="datagen", overrides=["simulation=haadf", *overrides])


def small_simulation(**changes) -> dict:
    cfg = OmegaConf.to_container(composed().simulation, resolve=True)
    cfg.update({"pixels": 64, "num_samples": 6})
    cfg.update(changes)
    return cfg


def centroid_px(image: np.ndarray, half: int = 4) -> np.ndarray:
    """Centre (pixels) of the peak at the maximum: Gaussian-weighted centroid iterated to its fixed point.

    For a peak symmetric about its centre, a weight symmetric about the estimate is unbiased at the
    true centre, which is the fixed point.
    """
    i, j = np.unravel_index(int(np.argmax(image)), image.shape)
    x, y = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
    centre = np.array([i, j], dtype=float)
    for _ in range(50):
        weight = image * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2.0 * (half / 2.0) ** 2))
        centre = np.array([(weight * x).sum(), (weight * y).sum()]) / weight.sum()
    return centre


def fwhm_A(profile: np.ndarray, pixel_A: float) -> float:
    """Full width at half maximum of a single peak, by linear interpolation of the half-maximum crossings."""
    peak = int(np.argmax(profile))
    half = profile[peak] / 2.0
    left = peak
    while profile[left] > half:
        left -= 1
    right = peak
    while profile[right] > half:
        right += 1
    x_left = left + (half - profile[left]) / (profile[left + 1] - profile[left])
    x_right = right - 1 + (profile[right - 1] - half) / (profile[right - 1] - profile[right])
    return (x_right - x_left) * pixel_A


# --------------------------------------------------------------------------------------------------
# incoherent model


@pytest.mark.parametrize("optics", [ABERRATION_FREE, THESIS], ids=["aberration-free", "thesis-table-2.1"])
def test_single_atom_peaks_at_its_position(optics):
    geometry = plan_geometry(64, 0.15, 4.0)
    position = np.array([3.37, 5.81])  # A from the field origin: pixels (22.47, 38.73)
    image = render_incoherent([geometry.origin_A + position], [79], optics, geometry, 1.8, 0.08)
    assert np.allclose(centroid_px(image), position / 0.15, atol=0.03)
    assert np.unravel_index(int(np.argmax(image)), image.shape) == (22, 39)


def test_probe_integrated_intensity_is_the_cross_section():
    geometry = plan_geometry(128, 0.15, 4.0)
    xy = geometry.origin_A + np.array([[9.6, 9.6]])
    for Z, n in ((79, 1.8), (14, 1.6)):
        image = render_incoherent(xy, [Z], ABERRATION_FREE, geometry, n, 0.08)
        expected = cross_sections_A2(np.array([Z]), ABERRATION_FREE, n)[0]
        assert image.sum() * 0.15**2 == pytest.approx(expected, rel=0.01)
    # the power law's prefactor follows the kinematic cross-sections it was fitted to
    kinematic = [kinematic_cross_section_A2(Z, 300e3, 60.0, 190.0) for Z in (14, 29, 79)]
    fitted = cross_sections_A2(np.array([14, 29, 79]), ABERRATION_FREE, 1.9)
    assert np.allclose(fitted, kinematic, rtol=0.3)
    assert 0.005 < kinematic[2] < 0.02  # Au, 300 kV, 60-190 mrad: ~0.012 A^2
    exponent = np.polyfit(np.log([14, 29, 79]), np.log(kinematic), 1)[0]
    assert 1.6 < exponent < 2.1


@pytest.mark.parametrize("n", [1.6, 2.0])
def test_peak_ratio_of_two_atoms_follows_z_power(n):
    geometry = plan_geometry(128, 0.15, 4.0)
    xy = geometry.origin_A + np.array([[4.8, 4.8], [14.4, 14.4]])
    image = render_incoherent(xy, [29, 79], THESIS, geometry, n, 0.08)
    ratio = image[96, 96] / image[32, 32]
    assert ratio == pytest.approx((79 / 29) ** n, rel=0.01)


def test_source_size_widens_the_column_in_quadrature():
    geometry = plan_geometry(96, 0.04, 3.0)
    xy = geometry.origin_A + np.array([[1.92, 1.92]])
    widths = []
    for source in (0.0, 0.6, 1.2):
        optics = HaadfOptics(300e3, 21.0, detector_inner_mrad=60.0, detector_outer_mrad=190.0,
                             source_fwhm_A=source)  # fmt: skip
        image = render_incoherent(xy, [79], optics, geometry, 1.8, 0.02)
        widths.append(fwhm_A(image[:, 48], 0.04))
    sharp = widths[0]
    assert 0.3 < sharp < 0.8  # ~0.5 lambda / alpha for a 21 mrad aberration-free probe
    for source, width in zip((0.6, 1.2), widths[1:], strict=True):
        assert width == pytest.approx(math.hypot(sharp, source), rel=0.08)


def test_vacancy_removes_the_column_intensity():
    from ase.build import bulk

    geometry = plan_geometry(64, 0.15, 4.0)
    crystal = bulk("Au", "fcc", a=4.08, cubic=True).repeat((9, 9, 5))  # [001] columns every a / 2
    crystal.positions[:, :2] += 1.02
    centre = np.array([geometry.origin_A + 4.8, geometry.origin_A + 4.8])
    distances = np.linalg.norm(crystal.positions[:, :2] - centre, axis=1)
    column_xy = crystal.positions[np.argmin(distances), :2]
    perfect = render_incoherent(crystal.positions[:, :2], crystal.numbers, THESIS, geometry, 1.8, 0.08)
    vacant = with_point_defect(crystal, column_xy, kind="vacancy")
    assert len(crystal) - len(vacant) == 5  # the whole column (one atom per a along z)
    defect = render_incoherent(vacant.positions[:, :2], vacant.numbers, THESIS, geometry, 1.8, 0.08)
    px = np.rint((column_xy - geometry.origin_A) / 0.15).astype(int)
    assert np.all(perfect >= 0) and np.all(defect >= 0)
    assert defect[px[0], px[1]] < 0.15 * perfect[px[0], px[1]]
    # far from the vacancy nothing changes (beyond the probe's tails)
    far = np.hypot(*np.meshgrid(np.arange(64) - px[0], np.arange(64) - px[1], indexing="ij")) > 40
    assert np.allclose(defect[far], perfect[far], rtol=2e-2)


# --------------------------------------------------------------------------------------------------
# abTEM


def test_abtem_and_incoherent_model_agree_on_isolated_atoms():
    """PRISM frozen-phonon-free image of Si and Au: same positions, Z exponent and scale as the model."""
    optics = HaadfOptics(300e3, 21.0, detector_inner_mrad=60.0, detector_outer_mrad=150.0)
    geometry = plan_geometry(32, 0.2, 2.5)
    positions = geometry.origin_A + np.array([[1.6, 1.6], [4.8, 4.8]])
    atoms = ase.Atoms(numbers=[14, 79], positions=np.column_stack([positions, [2.0, 2.0]]),
                      cell=[geometry.box_A, geometry.box_A, 4.0], pbc=True)  # fmt: skip
    settings = AbtemSettings(method="prism", num_phonons=0, slice_thickness_A=2.0, prism_window_A=5.0)
    abtem_image = simulate_abtem(atoms, optics, geometry, settings, seed=1)
    model = render_incoherent(positions, [14, 79], optics, geometry, 1.8, 0.06)
    assert abtem_image.shape == (32, 32) and np.all(abtem_image >= 0)
    for image in (abtem_image, model):
        assert np.allclose(centroid_px(image[16:, 16:], 3) + 16, [24, 24], atol=0.1)
        assert np.allclose(centroid_px(image[:16, :16], 3), [8, 8], atol=0.1)
    n_fit = math.log(abtem_image[24, 24] / abtem_image[8, 8]) / math.log(79 / 14)
    assert 1.5 < n_fit < 2.1
    assert abtem_image[24, 24] == pytest.approx(model[24, 24], rel=0.3)  # same absolute scale


@pytest.mark.slow
def test_abtem_multislice_and_prism_agree():
    optics = HaadfOptics(200e3, 25.0, detector_inner_mrad=50.0, detector_outer_mrad=150.0, source_fwhm_A=0.5)
    geometry = plan_geometry(32, 0.2, 2.5)
    positions = geometry.origin_A + np.array([[3.2, 3.2]])
    atoms = ase.Atoms(numbers=[78], positions=np.column_stack([positions, [2.0]]),
                      cell=[geometry.box_A, geometry.box_A, 4.0], pbc=True)  # fmt: skip
    images = [
        simulate_abtem(
            atoms, optics, geometry, AbtemSettings(method=m, num_phonons=2, prism_window_A=99.0), 3
        )
        for m in ("prism", "multislice")
    ]
    assert np.allclose(images[0], images[1], rtol=1e-3, atol=1e-3 * images[1].max())


# --------------------------------------------------------------------------------------------------
# specimens and samples


def test_amorphous_slab_density_and_minimum_distance():
    from scipy.spatial import cKDTree

    slab = amorphous_slab(np.random.default_rng(0), (20.0, 20.0), 10.0, "silica")
    counts = Counter(slab.get_chemical_symbols())
    assert counts["O"] == pytest.approx(2 * counts["Si"], rel=0.15)
    mass_g = (counts["Si"] * 28.085 + counts["O"] * 15.999) / 6.02214076e23
    assert mass_g / (20 * 20 * 10 * 1e-24) == pytest.approx(2.2, rel=0.02)
    pairs = cKDTree(slab.positions).query_pairs(1.5)
    assert not pairs
    z = slab.positions[:, 2]
    assert z.min() >= 0 and z.max() < 10.0


@pytest.fixture(scope="module")
def structures():
    from datagen.sources import load_structures

    return load_structures({"name": "bundled", "ids": ["Au", "Si", "SrTiO3", "GaAs"]})


@pytest.mark.parametrize("kind", ["crystal", "grain_boundary", "nanoparticle"])
def test_every_specimen_kind_gives_a_clean_reproducible_image(kind, structures):
    kinds = {k: float(k == kind) for k in ("crystal", "grain_boundary", "nanoparticle")}
    simulation = small_simulation()
    simulation["specimen"]["kinds"] = kinds
    maker = HaadfSampleMaker(simulation, structures, seed=7)
    record = maker(3)
    assert record["specimen_kind"] == kind and record["model"] == "incoherent"
    image = record["image"]
    assert image.shape == (64, 64) and image.dtype == np.float32
    assert np.all(np.isfinite(image)) and image.min() >= 0 and image.max() > 1e-3
    assert image.max() < 1.0  # a fraction of the incident electrons
    assert np.array_equal(maker(3)["image"], image)  # a pure function of (seed, index)
    assert not np.array_equal(maker(4)["image"], image)


def test_config_errors_name_the_parameter(structures):
    from datagen.haadf import HaadfSpace

    bad = small_simulation()
    bad["optics"]["detector_outer_mrad"] = {"low": 30.0, "high": 150.0}
    with pytest.raises(ConfigError, match=r"^simulation\.optics\.detector_outer_mrad: "):
        HaadfSpace(bad)
    bad = small_simulation(pixels=63)
    with pytest.raises(ConfigError, match=r"^simulation\.pixels: "):
        HaadfSpace(bad)
    bad = small_simulation()
    bad["specimen"]["nanoparticle"]["elements"] = ["Fe"]
    with pytest.raises(ConfigError, match=r"^simulation\.specimen\.nanoparticle\.elements: .*fcc"):
        HaadfSpace(bad)


# --------------------------------------------------------------------------------------------------
# shards


def test_shards_round_trip_through_the_image_dataset(tmp_path):
    from datagen.cli import run
    from training.datasets import ImageDataset, ShardIndex

    overrides = [f"out_dir={tmp_path}", "num_shards=2", "simulation.pixels=64", "simulation.num_samples=5",
                 "source.ids=[Au,Si,SrTiO3,GaAs]", "progress=false", "checkpoint_every=2"]  # fmt: skip
    summaries = [run(composed([*overrides, f"shard_index={i}"])) for i in (0, 1)]
    assert [s.written for s in summaries] == [2, 3] and not any(s.failed for s in summaries)
    index = ShardIndex.open(tmp_path, store.IMAGE)
    assert len(index) == 5 and index.sample_shape == (64, 64) and index.schema == store.IMAGE
    dataset = ImageDataset(index)
    batch = dataset.__getitems__([0, 4])
    assert batch["image"].shape == (2, 64, 64) and batch["pixel_size_A"].shape == (2,)
    with store.open_checked(tmp_path / "shard-00001-of-00002.h5", store.IMAGE) as handle:
        assert list(handle["sample_index"][()]) == [2, 3, 4]
        assert set(handle["model"].asstr()[()]) == {"incoherent"}
        for name in ("energy_eV", "semiangle_mrad", "detector_inner_mrad", "detector_outer_mrad",
                     "source_size_A", "seed", "source_id", "formula", "specimen_kind"):  # fmt: skip
            assert handle[name].shape[0] == 3
        cfg = OmegaConf.to_container(composed(overrides).simulation, resolve=True)
        structures = _structures_of(overrides)
        expected = HaadfSampleMaker(cfg, structures, seed=0)(4)["image"]
        assert np.array_equal(handle["image"][2], expected)  # independent of the sharding
    again = run(composed([*overrides, "shard_index=0"]))
    assert again.skipped_existing
    assert (tmp_path / "index.json").is_file()


def _structures_of(overrides):
    from datagen.sources import load_structures

    return load_structures(composed(overrides).source)


def test_a_failing_image_is_reported_and_the_shard_resumes(tmp_path):
    overrides = [f"out_dir={tmp_path}", "simulation.pixels=32", "simulation.num_samples=4",
                 "source.ids=[Au,Si,SrTiO3]", "progress=false", "checkpoint_every=1"]  # fmt: skip
    cfg = composed(overrides)
    simulation = OmegaConf.to_container(cfg.simulation, resolve=True)
    maker = HaadfSampleMaker(simulation, _structures_of(overrides), seed=0)
    calls: list[int] = []

    class Crashing:
        space = maker.space

        def __call__(self, index, rejected=None):
            calls.append(index)
            if index == 2:
                raise KeyboardInterrupt  # a killed job: the checkpoints of 0 and 1 remain
            return maker(index, rejected)

    from datagen.haadf import run as run_haadf

    with pytest.raises(KeyboardInterrupt):
        run_haadf(cfg, maker=Crashing())
    assert not (tmp_path / "shard-00000-of-00001.h5").exists()
    calls.clear()
    summary = run_haadf(cfg, maker=_Counting(maker, calls))
    assert summary.resumed == 2 and summary.written == 2 and calls == [2, 3]
    with store.open_checked(tmp_path / "shard-00000-of-00001.h5", store.IMAGE) as handle:
        assert list(handle["sample_index"][()]) == [0, 1, 2, 3]


class _Counting:
    def __init__(self, maker, calls):
        self.maker, self.calls, self.space = maker, calls, maker.space

    def __call__(self, index, rejected=None):
        self.calls.append(index)
        return self.maker(index, rejected)


def test_bad_haadf_config_exits_with_one_line(tmp_path):
    from datagen.cli import run

    with pytest.raises(ConfigError, match=r"^simulation\.incoherent\.z_exponent: "):
        run(composed([f"out_dir={tmp_path}", "simulation.incoherent.z_exponent=7"]))
    assert not any(tmp_path.iterdir())


def _worker_fftw_planning(_: int) -> str:
    """abTEM's FFTW planner effort as a worker process sees it."""
    import abtem

    return str(abtem.config.get("fftw.planning_effort"))


def test_worker_processes_get_the_fftw_planning():
    """The root ``fftw_planning`` reaches the spawned HAADF workers, which inherit none of the parent's
    abTEM configuration (abTEM's own default, FFTW_MEASURE, is not reproducible). FFTW_PATIENT: neither
    abTEM's default nor deepstem's, so only a value passed through can match."""
    import multiprocessing

    from datagen.cli import plain_config
    from datagen.haadf import _init_worker

    planning = "FFTW_PATIENT"
    overrides = ["source.ids=[Au]", "simulation.abtem_fraction=1.0"]
    container = plain_config(composed([*overrides, f"fftw_planning={planning}"]))
    initargs = (container, container["simulation"], 0)
    with multiprocessing.get_context("spawn").Pool(1, initializer=_init_worker, initargs=initargs) as pool:
        assert pool.map(_worker_fftw_planning, [0]) == [planning]


@pytest.mark.slow
def test_worker_processes_write_the_same_shard(tmp_path):
    from datagen.cli import run

    base = ["simulation.pixels=32", "simulation.num_samples=4", "source.ids=[Au,Si,SrTiO3]", "progress=false"]
    run(composed([*base, f"out_dir={tmp_path / 'one'}"]))
    run(composed([*base, f"out_dir={tmp_path / 'two'}", "workers=2"]))
    names = ("image", "sample_index", "seed", "pixel_size_A")
    with store.open_checked(tmp_path / "one" / "shard-00000-of-00001.h5", store.IMAGE) as one:
        with store.open_checked(tmp_path / "two" / "shard-00000-of-00001.h5", store.IMAGE) as two:
            for name in names:
                assert np.array_equal(one[name][()], two[name][()])
