"""Statistical tests of the AIRPI augmentation and pre-processing (training.augment, paper 002)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from models.inputs import (
    compress_intensity,
    preprocess,
    probe_intensity,
    rotate_patterns,
    standardise,
    zeta_weights,
)
from physics import probe as make_probe
from training.augment import (
    AirpiAugmentation,
    PMTParameters,
    apply_dose,
    dead_hot_pixels,
    dihedral_transform,
    draw_no_specimen,
    flip_about_centre,
    gaussian_readout_noise,
    make_generator,
    replace_no_specimen,
    shift_patterns,
)
from training.distortions import uniform_range

K = 64


def _blob(k: int, centre: tuple[float, float], sigma: float = 2.5) -> torch.Tensor:
    x = torch.arange(k, dtype=torch.float64)[:, None]
    y = torch.arange(k, dtype=torch.float64)[None, :]
    return torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2))


def _com(pattern: torch.Tensor) -> torch.Tensor:
    """Centre of mass ``(x, y)`` in pixels over the last two axes."""
    k1, k2 = pattern.shape[-2:]
    x = torch.arange(k1, dtype=torch.float64)[:, None]
    y = torch.arange(k2, dtype=torch.float64)[None, :]
    p = pattern.double()
    total = p.sum(dim=(-2, -1))
    return torch.stack([(p * x).sum(dim=(-2, -1)) / total, (p * y).sum(dim=(-2, -1)) / total], dim=-1)


def _kernel_batch(b: int, k: int = K, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic kernel batch with the shard layout: CBED discs, probe, wave, step, index."""
    gen = make_generator(seed)
    pr = torch.from_numpy(make_probe(200e3, 20.0, k, sampling_A=6.4 / k, Cs_A=1e4, dtype=np.complex64))
    probe_b = pr.expand(b, k, k).clone()
    disc = probe_intensity(probe_b)
    cbed = disc[:, None] * (0.5 + torch.rand(b, 9, 1, 1, generator=gen)) + 1e-4 * torch.rand(
        b, 9, k, k, generator=gen
    )
    cbed = (cbed / cbed.sum(dim=(-2, -1), keepdim=True)).float()
    wave = probe_b * torch.exp(1j * 0.1 * torch.rand(b, k, k, generator=gen))
    return {
        "cbed": cbed,
        "probe": probe_b,
        "wave": wave.to(torch.complex64),
        "step_A": 0.02 + 0.3 * torch.rand(b, generator=gen),
        "index": torch.arange(b) + 100,
    }


# -------------------------------------------------------------------------------- dose


@pytest.mark.parametrize("dose_e", [3.0, 300.0, 3e5, 1e9, 3e9])
def test_poisson_dose_total_counts_mean_and_variance(dose_e: float) -> None:
    """The total count of a CBED is Poisson(D): mean D and variance D, from tiny to huge doses."""
    n, k = 12000, 8
    gen = make_generator(1)
    cbed = torch.rand(n // 9 + 1, 9, k, k, generator=make_generator(2))[: n // 9]
    cbed = cbed / cbed.sum(dim=(-2, -1), keepdim=True)  # the whole beam on the detector: mean D
    counts = apply_dose(cbed, dose_e, gen).double()
    assert torch.all(counts == counts.round()) and torch.all(counts >= 0)
    totals = counts.sum(dim=(-2, -1)).flatten()
    m = totals.numel()
    assert abs(float(totals.mean()) - dose_e) < 5 * math.sqrt(dose_e / m)
    # standard error of the sample variance of Poisson(D): sqrt((mu4 - D^2) / m), mu4 = D (1 + 3 D)
    se_var = math.sqrt((dose_e * (1 + 3 * dose_e) - dose_e**2) / m)
    assert abs(float(totals.var()) - dose_e) < 5 * se_var


@pytest.mark.parametrize("dose_e", [1e4, 1e9])
def test_poisson_dose_per_pixel_follows_intensity(dose_e: float) -> None:
    b, k = 40, 32
    cbed = 0.1 + torch.rand(b, 9, k, k, generator=make_generator(3))
    cbed = 0.7 * cbed / cbed.sum(dim=(-2, -1), keepdim=True)  # fractions of the beam, 30 % lost
    rate = dose_e * cbed.double()
    counts = apply_dose(cbed, torch.full((b,), dose_e), make_generator(4)).double()
    z = (counts - rate) / rate.sqrt()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2.0 / n)


def test_dose_keeps_what_the_detector_misses_and_per_pattern_totals() -> None:
    """Poisson(D * I): a pattern holding 60 % of the beam gets 0.6 D counts on average, not D, and a
    kernel's patterns keep their different totals (REFERENCE.md: D incident electrons per position)."""
    b, k, dose_e = 400, 16, 5e3
    shape = torch.rand(b, 9, k, k, generator=make_generator(12), dtype=torch.float64) + 0.05
    fraction = torch.linspace(0.3, 0.9, 9, dtype=torch.float64)  # in-detector share per pattern
    cbed = (shape / shape.sum(dim=(-2, -1), keepdim=True) * fraction[None, :, None, None]).float()
    totals = apply_dose(cbed, dose_e, make_generator(13)).double().sum(dim=(-2, -1))  # (B, 9)
    expected = dose_e * cbed.double().sum(dim=(-2, -1)).mean(0)
    np.testing.assert_allclose(
        totals.mean(0).numpy(), expected.numpy(), atol=float(5 * math.sqrt(dose_e / b))
    )
    assert float(totals[:, 0].mean()) < 0.35 * dose_e  # not renormalised to D
    # the full augmentation (no other noise) draws the same model
    aug = AirpiAugmentation(dose_e_range=(dose_e, dose_e), no_specimen_prob=0.0)
    batch = _kernel_batch(b, k=k, seed=3)
    batch["cbed"] = cbed
    out = aug.augment(**_args(batch), generator=make_generator(14))
    got = out["cbed"].double().sum(dim=(-2, -1)).mean(0)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=float(5 * math.sqrt(dose_e / b)))


def test_expected_counts_is_one_function_for_numpy_and_torch() -> None:
    from physics.dose import dose_per_position, expected_counts

    intensity = np.array([[0.2, -0.01], [0.3, 0.1]])
    np.testing.assert_allclose(expected_counts(intensity, 100.0), [[20.0, 0.0], [30.0, 10.0]])
    t = expected_counts(torch.from_numpy(intensity), torch.tensor(100.0))
    assert isinstance(t, torch.Tensor) and torch.allclose(
        t, torch.tensor([[20.0, 0.0], [30.0, 10.0]], dtype=t.dtype)
    )
    assert dose_per_position(1e4, (0.3, 0.2)) == pytest.approx(600.0)


def test_dose_is_log_uniform_in_the_configured_range() -> None:
    lo, hi = 3.0, 3e9
    dose = uniform_range(make_generator(5), 20000, lo, hi, log=True, dtype=torch.float64)
    assert float(dose.min()) >= lo and float(dose.max()) <= hi
    u = (torch.log(dose) - math.log(lo)) / (math.log(hi) - math.log(lo))
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    # the module reports the doses it used, inside the range
    aug = AirpiAugmentation(no_specimen_prob=0.0)
    out = aug.augment(**_args(_kernel_batch(16, k=16)), generator=make_generator(6))
    assert torch.all((out["dose_e"] >= lo * 0.999) & (out["dose_e"] <= hi * 1.001))
    totals = out["cbed"].double().sum(dim=(-2, -1))
    assert torch.all(
        (totals - out["dose_e"].double()[:, None]).abs() < 6 * out["dose_e"].double()[:, None].sqrt() + 1
    )


def _args(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in ("cbed", "probe", "wave", "step_A")}


# -------------------------------------------------------------------------------- reproducibility


def test_seeds_reproduce_exactly_and_differ_across_seeds() -> None:
    batch = _kernel_batch(6, k=16)
    aug = AirpiAugmentation(misalignment_prob=0.5, readout_prob=0.5, pmt_prob=0.5, defect_prob=0.5)
    a = aug.augment(**_args(batch), generator=make_generator(7))
    b = aug.augment(**_args(batch), generator=make_generator(7))
    c = aug.augment(**_args(batch), generator=make_generator(8))
    for key in ("inputs", "wave", "cbed", "dose_e", "no_specimen"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.allclose(a["inputs"], c["inputs"])
    # the module's own training generator: same seed, same stream
    x = AirpiAugmentation(seed=3)(batch)
    y = AirpiAugmentation(seed=3)(batch)
    z = AirpiAugmentation(seed=4)(batch)
    assert torch.equal(x["inputs"], y["inputs"]) and not torch.allclose(x["inputs"], z["inputs"])


def test_validation_noise_depends_only_on_sample_index() -> None:
    batch = _kernel_batch(5, k=16)
    aug = AirpiAugmentation(misalignment_prob=0.5, pmt_prob=0.5, defect_prob=0.5).eval()

    def subset(rows: list[int]) -> dict[str, torch.Tensor]:
        return {key: value[rows] for key, value in batch.items()}

    full = aug(batch)  # eval mode: deterministic, seeded by batch["index"]
    again = aug(batch)
    assert torch.equal(full["inputs"], again["inputs"])
    part = aug(subset([3, 0]))  # other batch composition and order
    assert torch.equal(part["inputs"][0], full["inputs"][3])
    assert torch.equal(part["inputs"][1], full["inputs"][0])
    assert torch.equal(part["dose_e"], full["dose_e"][[3, 0]])
    # different indices give different noise for the same pattern
    other = dict(subset([3, 0]), index=torch.tensor([1, 2]))
    assert not torch.allclose(aug(other)["inputs"], part["inputs"])
    # training mode is not index-seeded
    aug.train()
    assert not torch.equal(aug(batch)["inputs"], full["inputs"])


# -------------------------------------------------------------------------------- pre-processing


def test_zeta_weights_match_eq_10() -> None:
    step = torch.tensor([0.02, 0.1, 0.33])
    w = zeta_weights(step)
    assert w.shape == (3, 9)
    for i, ds in enumerate(step.tolist()):
        zeta_xy, zeta_d = 1 / (50 * ds), 1 / (math.sqrt(2 * ds**2) * 50)
        expected = [zeta_d, zeta_xy, zeta_d, zeta_xy, 1.0, zeta_xy, zeta_d, zeta_xy, zeta_d]
        assert torch.allclose(w[i], torch.tensor(expected), rtol=1e-6)
    assert float(zeta_weights(0.1)[0, 1]) == pytest.approx(0.2)
    assert float(zeta_weights(0.1)[0, 0]) == pytest.approx(0.2 / math.sqrt(2))
    with pytest.raises(ValueError):
        zeta_weights(torch.tensor([0.1, 0.0]))


def test_intensity_compression_and_preprocessing_formulas() -> None:
    x = torch.tensor([0.0, 1.0, 1024.0, 1e10, -3.0])
    assert torch.allclose(compress_intensity(x), torch.tensor([0.0, 1.0, 2.0, 10.0, 0.0]))
    batch = _kernel_batch(3, k=16)
    counts = 1000 * batch["cbed"]
    raw = preprocess(counts, batch["step_A"], batch["probe"], standardise_input=False)
    expected = counts**0.1 * zeta_weights(batch["step_A"])[:, :, None, None]
    assert torch.allclose(raw[:, :9], expected, rtol=1e-5)
    std = preprocess(counts, batch["step_A"], batch["probe"])
    manual = (expected - expected.mean(dim=(1, 2, 3), keepdim=True)) / expected.std(
        dim=(1, 2, 3), keepdim=True, correction=0
    )
    assert torch.allclose(std[:, :9], manual, atol=1e-5)
    # per sample over the 9 patterns jointly: mean 0, std 1; the centre pattern keeps the larger weight
    assert torch.allclose(std[:, :9].mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(std[:, :9].std(dim=(1, 2, 3), correction=0), torch.ones(3), atol=1e-5)
    s = standardise(torch.randn(2, 3, 4, 5) * 7 + 2)
    assert torch.allclose(s.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)


def test_shapes_dtypes_and_probe_channels() -> None:
    batch = _kernel_batch(4)
    out = AirpiAugmentation()(batch)
    assert out["inputs"].shape == (4, 11, K, K) and out["inputs"].dtype == torch.float32
    assert out["wave"].shape == (4, K, K) and out["wave"].dtype == torch.complex64
    assert out["cbed"].shape == (4, 9, K, K) and out["dose_e"].shape == (4,)
    assert out["no_specimen"].dtype == torch.bool
    assert torch.isfinite(out["inputs"]).all()
    assert torch.allclose(out["inputs"][:, 9], batch["probe"].abs())
    assert torch.allclose(out["inputs"][:, 10], batch["probe"].angle())
    assert torch.equal(out["index"], batch["index"])  # other keys pass through


def test_noise_free_pipeline_is_pure_preprocessing() -> None:
    batch = _kernel_batch(3, k=16)
    aug = AirpiAugmentation(dose_e_range=None, no_specimen_prob=0.0)
    out = aug.augment(**_args(batch), generator=make_generator(9))
    assert torch.equal(out["cbed"], batch["cbed"])
    assert torch.allclose(out["inputs"], preprocess(batch["cbed"], batch["step_A"], batch["probe"]))
    assert torch.isinf(out["dose_e"]).all()


# -------------------------------------------------------------------------------- no specimen


def test_no_specimen_fraction_is_three_percent() -> None:
    n, p = 200000, 0.03
    mask = draw_no_specimen(make_generator(10), n, p)
    assert abs(float(mask.double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    # through the module, with the replacement itself checked
    b, k = 3000, 8
    batch = _kernel_batch(b, k=k, seed=1)
    aug = AirpiAugmentation(dose_e_range=None)
    out = aug.augment(**_args(batch), generator=make_generator(11))
    empty = out["no_specimen"]
    assert abs(float(empty.double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / b)
    assert torch.equal(out["wave"][empty], batch["probe"][empty].to(torch.complex64))
    assert torch.equal(out["wave"][~empty], batch["wave"][~empty])
    disc = probe_intensity(batch["probe"][empty])
    replaced = out["cbed"][empty]
    for j in range(9):  # every pattern is the probe intensity: vacuum, the whole beam on the detector
        assert torch.allclose(replaced[:, j], disc.to(replaced.dtype), rtol=1e-4, atol=1e-7)
    assert torch.equal(out["cbed"][~empty], batch["cbed"][~empty])


def test_replace_no_specimen_puts_the_whole_beam_on_the_detector() -> None:
    batch = _kernel_batch(2, k=16)
    cbed, wave = replace_no_specimen(
        batch["cbed"], batch["wave"], batch["probe"], torch.tensor([True, False])
    )
    totals = cbed.double().sum(dim=(-2, -1))
    expected = probe_intensity(batch["probe"][0]).double().sum()
    assert torch.allclose(totals[0], expected.expand(9), rtol=1e-5)  # vacuum: 1 for a normalised probe
    assert torch.allclose(cbed[1], batch["cbed"][1])
    assert torch.equal(wave[0], batch["probe"][0]) and torch.equal(wave[1], batch["wave"][1])


# -------------------------------------------------------------------------------- misalignment


def test_centre_shift_moves_centre_of_mass_by_requested_subpixel_amount() -> None:
    blob = _blob(K, (K // 2, K // 2), sigma=3.0).float()
    cbed = blob.expand(3, 9, K, K).clone()
    shift = torch.tensor([[0.3, -0.45], [-1.25, 0.7], [0.0, 0.0]])
    out = shift_patterns(cbed, shift)
    moved = _com(out) - _com(cbed)
    assert torch.allclose(moved, shift[:, None, :].double().expand(3, 9, 2), atol=2e-3)
    assert torch.allclose(out.sum(dim=(-2, -1)), cbed.sum(dim=(-2, -1)), rtol=1e-4)


@pytest.mark.parametrize("angle_deg", [90.0, 30.0, -17.0])
def test_rotation_preserves_intensity_and_rotates_an_asymmetric_pattern(angle_deg: float) -> None:
    c = K // 2
    # asymmetric pattern: a strong blob 12 px along +kx and a weaker one 6 px along +ky
    pattern = _blob(K, (c + 12, c)) + 0.5 * _blob(K, (c, c + 6))
    cbed = pattern.float().expand(2, 9, K, K).clone()
    out = rotate_patterns(cbed, torch.tensor([angle_deg, 0.0]))
    assert torch.allclose(out.sum(dim=(-2, -1)), cbed.sum(dim=(-2, -1)), rtol=1e-5)
    assert torch.allclose(out[1], cbed[1], atol=1e-6)  # zero angle: identity
    t = math.radians(angle_deg)

    def rotated(dx: float, dy: float) -> tuple[float, float]:
        return c + dx * math.cos(t) - dy * math.sin(t), c + dx * math.sin(t) + dy * math.cos(t)

    expected = _blob(K, rotated(12, 0)) + 0.5 * _blob(K, rotated(0, 6))
    expected = expected / expected.sum() * pattern.sum()
    assert torch.allclose(out[0, 4].double(), expected, atol=0.05)  # bilinear interpolation, peak 1
    com = _com(out[0, 4])
    ex = _com(expected)
    assert torch.allclose(com, ex, atol=0.01)


# -------------------------------------------------------------------------------- detector


def test_readout_noise_and_pmt_statistics_in_the_module() -> None:
    counts = torch.full((4, 9, 32, 32), 5.0)
    noisy = gaussian_readout_noise(counts, torch.tensor([0.0, 0.5, 1.0, 2.0]), make_generator(12))
    assert torch.equal(noisy[0], counts[0])
    for i, s in enumerate([0.5, 1.0, 2.0], start=1):
        assert float((noisy[i] - 5.0).std()) == pytest.approx(s, rel=0.05)
    # the PMT model is the one of training.distortions: at a low dose, peaks at integer electron counts
    batch = _kernel_batch(64, k=16)
    aug = AirpiAugmentation(dose_e_range=(300.0, 300.0), no_specimen_prob=0.0, pmt_prob=1.0)
    out = aug.augment(**_args(batch), generator=make_generator(13))["cbed"]
    assert float((out.round() - out).abs().max()) > 0.0  # not integer any more
    assert float(out[out.round() == 1].std()) == pytest.approx(PMTParameters().single_electron_std, rel=0.15)


def test_dead_and_hot_pixels() -> None:
    counts = 10 + torch.rand(3, 9, 64, 64, generator=make_generator(14))
    out = dead_hot_pixels(
        counts,
        torch.tensor([0.0, 0.1, 0.02]),
        torch.tensor([0.0, 0.05, 0.0]),
        torch.tensor([3.0, 3.0, 3.0]),
        make_generator(15),
    )
    assert torch.equal(out[0], counts[0])
    n = 64 * 64
    dead = out[1] == 0
    hot = out[1] == 3.0 * counts[1].amax(dim=(-2, -1), keepdim=True)
    assert torch.equal(dead, dead[:1].expand_as(dead))  # the same defect map for the 9 patterns
    assert abs(float(dead[0].double().mean()) - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)
    assert abs(float(hot[0].double().mean()) - 0.05 * 0.9) < 5 * math.sqrt(0.05 / n)
    assert torch.equal(out[1][~dead & ~hot], counts[1][~dead & ~hot])
    assert abs(float((out[2] == 0).double().mean()) - 0.02) < 5 * math.sqrt(0.02 / (9 * n))


def test_module_misalignment_moves_patterns_within_the_configured_limits() -> None:
    b = 64
    blob = _blob(K, (K // 2 + 5, K // 2 - 3), sigma=3.0).float()
    batch = _kernel_batch(b, k=K)
    batch["cbed"] = blob.expand(b, 9, K, K).clone()
    aug = AirpiAugmentation(
        dose_e_range=None, no_specimen_prob=0.0, misalignment_prob=1.0, max_shift_px=1.0, max_rotation_deg=0.0
    )
    out = aug.augment(**_args(batch), generator=make_generator(16))["cbed"]
    moved = _com(out) - _com(batch["cbed"])  # (B, 9, 2)
    assert torch.allclose(moved, moved[:, :1].expand_as(moved), atol=1e-4)  # one shift per sample
    radius = moved[:, 0].norm(dim=-1)
    assert float(radius.max()) <= 1.0 + 1e-3 and float(radius.min()) >= 0.0
    # uniform in the unit disc: E[r] = 2/3, and every sample moved
    assert float(radius.mean()) == pytest.approx(2 / 3, abs=5 * 0.2357 / math.sqrt(b))
    assert torch.all(radius > 0)
    # rotation only: the centre of mass turns about the centre pixel by at most max_rotation_deg
    aug_rot = AirpiAugmentation(
        dose_e_range=None, no_specimen_prob=0.0, misalignment_prob=1.0, max_shift_px=0.0, max_rotation_deg=5.0
    )
    rot = aug_rot.augment(**_args(batch), generator=make_generator(17))["cbed"]
    c = _com(rot)[:, 4] - K // 2
    c0 = _com(batch["cbed"])[:, 4] - K // 2
    angle = torch.rad2deg(torch.atan2(c[:, 1], c[:, 0]) - torch.atan2(c0[:, 1], c0[:, 0]))
    assert float(angle.abs().max()) <= 5.0 + 0.05 and float(angle.abs().max()) > 2.5
    assert torch.allclose(c.norm(dim=-1), c0.norm(dim=-1), atol=0.02)


# ---------------------------------------------------------------- symmetry operations of the square


def _asymmetric_cell(length_A: float = 10.0):
    from ase import Atoms

    rng = np.random.default_rng(3)
    xyz = np.column_stack(
        [rng.uniform(0, length_A, 7), rng.uniform(0, length_A, 7), rng.uniform(0.5, 3.5, 7)]
    )
    return Atoms(
        ["Au", "O", "Si", "Sr", "N", "Ti", "Mo"], positions=xyz, cell=[length_A, length_A, 4.0], pbc=True
    )


def test_dihedral_transform_equals_the_multislice_of_the_transformed_specimen():
    """Mirror (x -> 2 c - x, y -> 2 c - y) or transpose the atoms about the centre probe position, simulate
    again with abTEM: the result is the dihedral transform of the first sample. Exact for the transpose;
    the mirrors agree to discretisation (~0.5 % of the wave maximum) while a plain flip (centre moved by one
    pixel) or no transform is off by tens of percent."""
    from datagen.kernel import KernelParameters, KernelSimulator, SimulationSettings
    from physics import wavelength

    k, energy, alpha = 32, 200e3, 20.0
    params = KernelParameters(
        energy_eV=energy,
        semiangle_mrad=alpha,
        gmax_invA=2 * alpha * 1e-3 / wavelength(energy),
        step_A=0.4,
        Cs_A=1e4,
        defocus_A=50.0,  # an aberrated probe: it is transformed along with the specimen
        num_phonons=0,
        rms_displacement_A=0.0,
        phonon_seed=0,
    )
    sim = KernelSimulator(
        SimulationSettings(pixels=k, max_sampling_A=0.1, max_gpts=256, probe_window_diameters=5)
    )
    atoms, centre = _asymmetric_cell(), (4.3, 5.7)
    first = sim.simulate(atoms, params, centre)
    tensors = [torch.from_numpy(a)[None] for a in (first.cbed, first.wave, first.probe)]

    def relative(a, b):
        return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())

    def transformed(swap: bool, fx: bool, fy: bool):
        ops = [torch.tensor([v]) for v in (swap, fx, fy)]
        return [t[0].numpy() for t in dihedral_transform(*tensors, *ops)]

    for axis in (0, 1):
        mirrored = atoms.copy()
        mirrored.positions[:, axis] = 2 * centre[axis] - mirrored.positions[:, axis]
        mirrored.wrap()
        truth = sim.simulate(mirrored, params, centre)
        cbed, wave, probe = transformed(False, axis == 0, axis == 1)
        assert relative(cbed, truth.cbed) < 0.01 and relative(wave, truth.wave) < 0.02
        np.testing.assert_allclose(probe, truth.probe, atol=1e-6)
        assert relative(np.flip(first.wave, axis), truth.wave) > 0.2  # off by one pixel
        assert relative(first.cbed, truth.cbed) > 0.2

    swapped = atoms.copy()
    swapped.positions[:, [0, 1]] = swapped.positions[:, [1, 0]]
    swapped.wrap()
    truth = sim.simulate(swapped, params, centre[::-1])
    cbed, wave, _ = transformed(True, False, False)
    assert relative(cbed, truth.cbed) < 1e-4 and relative(wave, truth.wave) < 1e-4


def test_dihedral_operations_are_a_group_action_on_the_kernel_layout():
    rng = torch.Generator().manual_seed(0)
    cbed = torch.rand(8, 9, 16, 16, generator=rng)
    wave = torch.randn(8, 16, 16, dtype=torch.complex64, generator=rng)
    probe = torch.randn(8, 16, 16, dtype=torch.complex64, generator=rng)
    bits = torch.tensor([[(n >> b) & 1 for b in range(3)] for n in range(8)], dtype=torch.bool)
    once = dihedral_transform(cbed, wave, probe, bits[:, 0], bits[:, 1], bits[:, 2])
    # the centre pixel and the centre CBED's position stay put; flips are involutions
    assert torch.equal(once[0][:, 4, 8, 8], cbed[:, 4, 8, 8])
    flips = dihedral_transform(*once, torch.zeros(8, dtype=torch.bool), bits[:, 1], bits[:, 2])
    no_flip = dihedral_transform(cbed, wave, probe, bits[:, 0], bits[:, 0] & False, bits[:, 0] & False)
    for a, b in zip(flips, no_flip, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(flip_about_centre(flip_about_centre(wave, 1), 1), wave)
    # a flip along x moves kernel row i to 2 - i: the neighbour at -x becomes the one at +x
    no, yes = torch.tensor([False]), torch.tensor([True])
    moved = dihedral_transform(cbed[:1], wave[:1], probe[:1], no, yes, no)[0]
    assert torch.equal(moved[0, 1], flip_about_centre(cbed[0, 7], 0))


def test_dihedral_augmentation_only_in_training_and_probe_follows():
    k = 16
    batch = {
        "cbed": torch.rand(32, 9, k, k, generator=torch.Generator().manual_seed(1)),
        "wave": torch.randn(32, k, k, dtype=torch.complex64, generator=torch.Generator().manual_seed(2)),
        "probe": torch.randn(32, k, k, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)),
        "step_A": torch.full((32,), 0.3),
        "index": torch.arange(32),
    }
    aug = AirpiAugmentation(dose_e_range=None, no_specimen_prob=0.0, dihedral=True, seed=5)
    train = aug(batch, deterministic=False)
    changed = (train["probe"] != batch["probe"]).flatten(1).any(1)
    assert 0 < int(changed.sum()) < 32  # the identity is one of the 8 operations
    assert torch.equal(train["inputs"][:, 9], train["probe"].abs())
    evaluation = aug(batch, deterministic=True)
    assert torch.equal(evaluation["probe"], batch["probe"]) and torch.equal(evaluation["wave"], batch["wave"])


def test_probe_phase_channel_has_no_branch_cut_noise() -> None:
    """An aberration-free probe is real: its negative rings must read one phase (+pi), not +-pi at random."""
    from models.inputs import probe_channels
    from physics import probe, wavelength

    gmax = 2 * 20e-3 / wavelength(300e3)
    psi = torch.from_numpy(probe(300e3, 20.0, 64, gmax_invA=gmax))[None]
    raw = psi.angle()
    assert int((raw < -math.pi + 1e-3).sum()) > 500  # what angle() alone gives (round-off signs)
    phase = probe_channels(psi)[0, 1]
    negative = psi[0].real < 0
    assert float((phase[negative] - math.pi).abs().max()) < 1e-5
    assert float(phase[~negative].abs().max()) < 1e-5
    # the encoded probe is the probe
    rebuilt = torch.polar(probe_channels(psi)[:, 0], phase[None])
    torch.testing.assert_close(rebuilt, psi.to(torch.complex64), atol=1e-6, rtol=0)
    # an aberrated probe keeps its phase away from the seam
    defocused = torch.from_numpy(probe(300e3, 20.0, 64, gmax_invA=gmax, defocus_A=50.0))[None]
    kept = probe_channels(defocused)[0, 1]
    wanted = defocused[0].angle()
    away = wanted > -math.pi + 1e-3
    torch.testing.assert_close(kept[away], wanted[away].float())
