"""Chang U-Net forward model: geometry, analytic diffraction of a phase grating, labels, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import j0, j1

from datagen.stock_images import ChangForwardModel, StockImageBank, procedural_textures
from physics import wavelength


@pytest.fixture(scope="module")
def small_bank():
    return StockImageBank.build(photographs=("camera", "coins"), faces=3, textures=3, size_px=64)


def test_bank_holds_photographs_faces_and_textures(small_bank):
    assert len(small_bank) == 8
    assert small_bank.images.shape == (8, 1, 64, 64)
    assert float(small_bank.images.min()) >= 0 and float(small_bank.images.max()) <= 1
    assert small_bank.names[:2] == ["camera", "coins"]
    textures = procedural_textures(6, 32, seed=1)
    np.testing.assert_array_equal(textures, procedural_textures(6, 32, seed=1))
    assert textures.std(axis=(1, 2)).min() > 0.05


def test_photographs_null_means_all_bundled_photographs():
    from datagen.stock_images import SKIMAGE_PHOTOGRAPHS

    bank = StockImageBank.build(photographs=None, faces=0, textures=0, size_px=16)  # `photographs: null`
    assert bank.names == list(SKIMAGE_PHOTOGRAPHS)
    assert len(StockImageBank.build(photographs=[], faces=0, textures=1, size_px=16)) == 1


def test_indexed_samples_equal_single_draws_of_their_seeds(small_bank):
    model = ChangForwardModel(bank=small_bank)
    batch = model.indexed([11, 12, 13])
    for row, seed in enumerate((11, 12, 13)):
        single = model(1, torch.Generator().manual_seed(seed))
        for key in ("diffraction", "phase", "mask", "aberrations"):
            torch.testing.assert_close(batch[key][row], single[key][0], rtol=1e-5, atol=1e-7)
    assert not torch.equal(batch["phase"][0], batch["phase"][1])


def test_vacuum_gives_the_aperture_disc_whatever_the_aberrations(small_bank):
    model = ChangForwardModel(phase_max_rad=(0.0, 0.0), collection_ratio=2.0, bank=small_bank)
    out = model(4, torch.Generator().manual_seed(0))
    d = out["diffraction"].numpy()
    assert d.shape == (4, 32, 32)
    np.testing.assert_allclose(d.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # disc radius: alpha / lambda over a detector pixel of 2 k_det / 32, i.e. 32 / (2 * 2) = 8 px
    assert model.k_detector_invA == pytest.approx(2 * 17.1e-3 / wavelength(300e3))
    r = np.hypot(*np.meshgrid(np.arange(32) - 16, np.arange(32) - 16, indexing="ij"))
    assert d[:, r > 9].max() < 1e-10
    inside = d[:, r < 7]
    np.testing.assert_allclose(inside, inside.mean(), rtol=1e-3)  # uniform disc: aberrations only alter phase
    assert out["aberrations"][:, 0].abs().max() > 1  # and they were drawn


def test_phase_grating_diffracts_into_bessel_orders(small_bank):
    """exp(i a cos(2 pi g x)) = sum_n i^n J_n(a) exp(i n 2 pi g x): disc n carries J_n(a)^2."""
    model = ChangForwardModel(collection_ratio=4.0, bank=small_bank)
    a, g_px = 0.3, 20  # grating amplitude (rad) and period: 20 reciprocal sim pixels
    x = np.arange(model.sim_px)
    phase = torch.from_numpy(
        np.tile(a * np.cos(2 * np.pi * g_px * x / model.sim_px)[:, None], (1, model.sim_px))
    )
    no_aberrations = {k: np.zeros(1) for k in ("C10", "C12", "C21", "C23")}
    probes = model.probes(no_aberrations)
    d = model.diffraction(probes, phase[None].float())[0].numpy()
    centre, shift, radius = 16, g_px // 2, 4.5  # binned pixels: disc radius 8 sim px -> 4 binned px
    r0 = np.hypot(*np.meshgrid(np.arange(32) - centre, np.arange(32) - centre, indexing="ij"))
    r_plus = np.hypot(*np.meshgrid(np.arange(32) - centre - shift, np.arange(32) - centre, indexing="ij"))
    r_minus = np.hypot(*np.meshgrid(np.arange(32) - centre + shift, np.arange(32) - centre, indexing="ij"))
    assert d[r0 < radius].sum() == pytest.approx(j0(a) ** 2, rel=2e-3)
    assert d[r_plus < radius].sum() == pytest.approx(j1(a) ** 2, rel=2e-2)
    assert d[r_minus < radius].sum() == pytest.approx(j1(a) ** 2, rel=2e-2)


def test_labels_are_zero_mean_phase_inside_the_illuminated_area(small_bank):
    model = ChangForwardModel(bank=small_bank, illuminated_fraction=0.9)
    out = model(6, torch.Generator().manual_seed(3))
    phase, mask = out["phase"], out["mask"]
    assert phase.shape == mask.shape == (6, 32, 32) and mask.dtype == torch.bool
    assert torch.all(phase[~mask] == 0)
    means = (phase * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))
    assert means.abs().max() < 1e-5
    assert mask[:, 16, 16].all() and not mask[:, 0, 0].any()  # a filled disc centred on the probe
    probes = model.probes(model.draw_aberrations(6, torch.Generator().manual_seed(3)))
    window = model.label_window(probes.abs() ** 2)
    inside = (window * model.illuminated_mask(probes)).sum(dim=(1, 2)) / window.sum(dim=(1, 2))
    assert inside.min() >= 0.9 and inside.max() < 0.97
    spans = torch.stack([phase[i][mask[i]].max() - phase[i][mask[i]].min() for i in range(6)])
    assert spans.min() > 0 and spans.max() <= np.pi + 1e-5


def test_same_seed_same_batch_other_seed_other_batch(small_bank):
    model = ChangForwardModel(bank=small_bank)
    first = model(3, torch.Generator().manual_seed(7))
    again = model(3, torch.Generator().manual_seed(7))
    other = model(3, torch.Generator().manual_seed(8))
    for key in ("diffraction", "phase", "aberrations"):
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])
    assert first["diffraction"].sum(dim=(1, 2)).max() <= 1 + 1e-5


def test_bad_geometry_is_rejected_with_the_parameter_named(small_bank):
    with pytest.raises(ValueError, match="collection_ratio"):
        ChangForwardModel(collection_ratio=0.8, bank=small_bank)
    with pytest.raises(ValueError, match="C12_A"):
        ChangForwardModel(C12_A=(5.0, 1.0), bank=small_bank)
    with pytest.raises(ValueError, match="crop_fraction"):
        ChangForwardModel(crop_fraction=(0.0, 0.5), bank=small_bank)


def test_aperture_edge_range_softens_the_disc_rim_and_keeps_the_hard_stream(small_bank):
    """``aperture_edge_mrad``: drawn per sample within the range, the vacuum disc gets intensity just outside
    alpha (a hard edge has none), and the default (0, 0) draws exactly the samples it drew before."""
    hard = ChangForwardModel(phase_max_rad=(0.0, 0.0), bank=small_bank)
    soft = ChangForwardModel(phase_max_rad=(0.0, 0.0), aperture_edge_mrad=(2.0, 3.0), bank=small_bank)
    a = hard(3, torch.Generator().manual_seed(5))
    b = soft(3, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a["aberrations"], b["aberrations"])  # the edge is drawn after them
    edges = soft.draw_aberrations(64, torch.Generator().manual_seed(1))["aperture_edge_mrad"]
    assert edges.min() >= 2.0 and edges.max() <= 3.0 and edges.std() > 0.1
    r = np.hypot(*np.meshgrid(np.arange(32) - 16, np.arange(32) - 16, indexing="ij"))
    inner = a["diffraction"].numpy()[:, r < 6].mean(axis=1)[:, None, None]

    def rim_pixels(d: np.ndarray) -> np.ndarray:  # pixels between 5 % and 95 % of the disc's intensity
        return ((d > 0.05 * inner) & (d < 0.95 * inner)).sum(axis=(1, 2))

    # a hard edge is graded only by the binning (one ring of ~33 pixels); a 2-3 mrad ramp (0.9-1.4 pixels of
    # the simulation grid) about doubles it
    assert rim_pixels(a["diffraction"].numpy()).max() < 40
    assert rim_pixels(b["diffraction"].numpy()).min() > 50
    np.testing.assert_allclose(b["diffraction"].sum(dim=(1, 2)).numpy(), 1.0, rtol=1e-5)
    batch = soft.indexed([7, 8])  # the indexed path keeps each seed's own edge
    torch.testing.assert_close(
        batch["diffraction"][1], soft(1, torch.Generator().manual_seed(8))["diffraction"][0]
    )
    with pytest.raises(ValueError, match="aperture_edge_mrad"):
        ChangForwardModel(aperture_edge_mrad=(3.0, 1.0), bank=small_bank)


def _radial_peak_invA(objects: np.ndarray, pixel_A: float) -> float:
    """|k| (1/A) of the strongest ring of the mean power spectrum, zero frequency excluded."""
    n = objects.shape[-1]
    power = np.abs(np.fft.fft2(objects - objects.mean(axis=(-2, -1), keepdims=True))) ** 2
    k = np.fft.fftfreq(n, pixel_A)
    radius = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    edges = np.arange(1, n // 2) / (n * pixel_A)
    ring = np.digitize(radius, edges)
    profile = [power.mean(axis=0)[ring == i].mean() for i in range(1, len(edges))]
    return float(edges[int(np.argmax(profile))])


def test_atom_lattices_put_their_power_at_the_lattice_spacing(small_bank):
    # a lattice of spacing a (second vector b = 1-1.5 a, at 60-120 deg) has its first reflections at
    # |g| = 1 / (a sin(opening)) and 1 / (b sin(opening)): between 1 / (1.5 a) and 2 / (sqrt(3) a)
    peaks = []
    for spacing_A in (1.5, 3.0):
        spacing, width = (spacing_A, spacing_A), (0.25, 0.25)
        model = ChangForwardModel(
            atom_fraction=1.0, atom_spacing_A=spacing, atom_sigma_A=width, bank=small_bank
        )
        objects = model.atom_lattices(24, torch.Generator().manual_seed(3), "cpu").numpy()
        assert objects.shape == (24, 64, 64)
        assert objects.min() == pytest.approx(0.0, abs=1e-6) and objects.max() == pytest.approx(1.0, abs=1e-6)
        ring_width = 1 / (64 * model.pixel_size_A)
        peak = _radial_peak_invA(objects, model.pixel_size_A)
        assert 1 / (1.5 * spacing_A) - 2 * ring_width <= peak <= 2 / (np.sqrt(3) * spacing_A) + 2 * ring_width
        peaks.append(peak)
    assert 1.6 <= peaks[0] / peaks[1] <= 2.5  # half the spacing, twice the frequency
    # a stock crop of the same window has its power at the lowest frequencies
    crops = ChangForwardModel(bank=small_bank).phase_objects(24, torch.Generator().manual_seed(3), "cpu")
    assert _radial_peak_invA(crops.numpy(), model.pixel_size_A) < 0.3


def test_atom_fraction_mixes_lattices_into_the_stock_stream(small_bank):
    stock = ChangForwardModel(bank=small_bank)(32, torch.Generator().manual_seed(8))
    mixed = ChangForwardModel(atom_fraction=0.5, bank=small_bank)(32, torch.Generator().manual_seed(8))
    same = [torch.equal(stock["phase"][i], mixed["phase"][i]) for i in range(32)]
    assert 6 <= sum(same) <= 26  # stock samples keep their crops, the others became lattices
    torch.testing.assert_close(stock["aberrations"], mixed["aberrations"])  # probes drawn as before
    again = ChangForwardModel(atom_fraction=0.5, bank=small_bank)(32, torch.Generator().manual_seed(8))
    assert torch.equal(again["phase"], mixed["phase"])
    with pytest.raises(ValueError, match="atom_fraction"):
        ChangForwardModel(atom_fraction=1.5, bank=small_bank)
    with pytest.raises(ValueError, match="atom_spacing_A"):
        ChangForwardModel(atom_spacing_A=(0.0, 2.0), bank=small_bank)
