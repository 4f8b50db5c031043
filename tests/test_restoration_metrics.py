"""Restoration scores and baselines (evaluation/restoration_metrics.py, evaluation/denoise_baselines.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.denoise_baselines import (
    anscombe,
    blurred_noise_std,
    bm3d_anscombe,
    inverse_anscombe,
    oracle_gaussian,
    pmt_gain,
)
from evaluation.restoration_metrics import (
    column_position_error,
    find_columns,
    fit_column,
    psnr_db,
    ssim_index,
)

PIXEL_A = 0.15


def lattice(shape=(64, 64), spacing_px=12.0, offset_px=(6.3, 6.7), shift_px=(0.0, 0.0), sigma_px=2.0,
            amplitude=1.0, background=0.05):  # fmt: skip
    """Gaussian columns on a square lattice (row, column) plus a constant; returns the image and centres."""
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(float)
    image = np.full(shape, background)
    centres = []
    for r0 in np.arange(offset_px[0], shape[0], spacing_px):
        for c0 in np.arange(offset_px[1], shape[1], spacing_px):
            r, c = r0 + shift_px[0], c0 + shift_px[1]
            image += amplitude * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma_px**2))
            centres.append((r, c))
    return image, np.array(centres)


# --- PSNR / SSIM ---------------------------------------------------------------------------------


def test_psnr_of_a_known_error_is_exact():
    clean, _ = lattice()
    value_range = float(clean.max() - clean.min())
    error_std = 0.01
    signs = np.where(np.indices(clean.shape).sum(axis=0) % 2 == 0, 1.0, -1.0)  # MSE exactly error_std^2
    noisy = clean + error_std * signs
    assert psnr_db(clean, noisy) == pytest.approx(20 * math.log10(value_range / error_std), abs=1e-9)
    assert psnr_db(clean, clean) == math.inf
    # the data range is the clean image's: scaling both scales nothing
    assert psnr_db(3.0 * clean, 3.0 * noisy) == pytest.approx(psnr_db(clean, noisy), abs=1e-9)


def test_psnr_of_white_noise_matches_its_snr():
    rng = np.random.default_rng(0)
    clean, _ = lattice((128, 128))
    value_range = float(np.ptp(clean))
    noisy = clean + 0.02 * rng.standard_normal(clean.shape)
    assert psnr_db(clean, noisy) == pytest.approx(20 * math.log10(value_range / 0.02), abs=0.1)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    rng = np.random.default_rng(1)
    clean, _ = lattice()
    assert ssim_index(clean, clean) == pytest.approx(1.0, abs=1e-12)
    low = ssim_index(clean, clean + 0.05 * rng.standard_normal(clean.shape))
    high = ssim_index(clean, clean + 0.2 * rng.standard_normal(clean.shape))
    assert 1.0 > low > high > 0.0
    assert ssim_index(clean, clean.max() - clean) < 0.0  # inverted contrast


def test_scores_refuse_constant_or_mismatched_images():
    with pytest.raises(ValueError, match="constant"):
        psnr_db(np.ones((16, 16)), np.zeros((16, 16)))
    with pytest.raises(ValueError, match="one shape"):
        ssim_index(np.ones((16, 16)), np.ones((16, 8)))


# --- column positions ----------------------------------------------------------------------------


def test_fit_column_recovers_a_sub_pixel_centre():
    image, centres = lattice((24, 24), spacing_px=100.0, offset_px=(11.37, 12.81), sigma_px=1.7)
    params = fit_column(image, (11, 13), radius_px=5)
    assert params is not None
    assert params[2:4] == pytest.approx(centres[0], abs=1e-6)
    assert params[4:6] == pytest.approx([1.7, 1.7], abs=1e-5)
    assert params[1] == pytest.approx(1.0, abs=1e-5)


def test_find_columns_finds_every_inner_column():
    image, centres = lattice()
    found = find_columns(image, PIXEL_A, min_distance_A=1.0, window_radius_A=0.6)
    border = math.ceil(0.6 / PIXEL_A) + 1
    inner = [c for c in centres if border <= c[0] < 64 - border and border <= c[1] < 64 - border]
    assert len(found) == len(inner) > 0
    for peak in found:
        assert np.min(np.hypot(*(np.array(inner) - peak).T)) < 0.75


@pytest.mark.parametrize("shift_px", [(0.3, -0.2), (-0.45, 0.1)])
def test_column_error_of_a_shifted_image_is_the_shift(shift_px):
    clean, _ = lattice()
    shifted, _ = lattice(shift_px=shift_px)
    result = column_position_error(clean, shifted, PIXEL_A)
    expected_A = math.hypot(*shift_px) * PIXEL_A
    assert result.fitted >= 9 and result.failed == 0
    assert result.mean_A == pytest.approx(expected_A, abs=1e-5)
    assert result.rms_A == pytest.approx(expected_A, abs=1e-5)
    assert column_position_error(clean, clean, PIXEL_A).rms_A == pytest.approx(0.0, abs=1e-7)


def test_column_error_counts_columns_that_vanished():
    clean, _ = lattice()
    empty = np.full_like(clean, 0.05) + 1e-3 * np.random.default_rng(2).standard_normal(clean.shape)
    result = column_position_error(clean, empty, PIXEL_A)
    assert result.failed > 0
    assert result.failed + result.fitted == len(find_columns(clean, PIXEL_A))


# --- Anscombe ------------------------------------------------------------------------------------


def test_algebraic_inverse_undoes_the_transform():
    y = np.array([0.0, 0.2, 1.0, 7.5, 1e3, 1e6])
    for sigma in (0.0, 1.5):
        assert inverse_anscombe(anscombe(y, sigma), sigma, method="algebraic") == pytest.approx(y, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_exact_unbiased_inverse_recovers_the_poisson_mean(sigma):
    rng = np.random.default_rng(3)
    n = 2_000_000
    for lam in (0.1, 1.0, 5.0, 50.0, 2e4):
        y = rng.poisson(lam, n) + sigma * rng.standard_normal(n)
        D = anscombe(y, sigma)
        mean_D = np.array([D.mean()])
        step = 1e-3
        slope = (inverse_anscombe(mean_D + step, sigma) - inverse_anscombe(mean_D - step, sigma))[0] / (
            2 * step
        )
        tolerance = 4.0 * D.std() / math.sqrt(n) * slope + 1e-4 * lam  # 4 standard errors of the mean
        assert inverse_anscombe(mean_D, sigma)[0] == pytest.approx(lam, abs=tolerance)
        if lam < 5:  # the algebraic inverse is biased at low counts; the exact one is not
            assert abs(inverse_anscombe(mean_D, sigma, "algebraic")[0] - lam) > 5 * tolerance


def test_closed_form_inverse_is_close_to_the_exact_one():
    D = np.linspace(1.5, 60.0, 200)
    exact = inverse_anscombe(D)
    closed = inverse_anscombe(D, method="closed_form")
    assert np.max(np.abs(closed - exact) / np.maximum(exact, 1.0)) < 0.02


def test_pmt_gain_is_the_variance_per_mean_of_the_detector_model():
    from training.distortions import PMTParameters, detector_noise

    params = PMTParameters()
    alpha = 40.0  # dose 1e3 e/A^2 on 0.2 A pixels
    clean = torch.full((1, 256, 256), 0.5, dtype=torch.float64)
    noisy = detector_noise(clean, 1e3, 0.2, params, torch.Generator().manual_seed(0))
    electrons = noisy.numpy() * alpha
    gain = pmt_gain(params.single_electron_std)
    assert electrons.var() / electrons.mean() == pytest.approx(gain, abs=0.02)
    assert gain == pytest.approx(1.0 + 0.133**2, abs=1e-3)


def test_blurred_noise_std_matches_filtered_white_noise():
    rng = np.random.default_rng(4)
    kernel = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    noise = rng.standard_normal((400, 400))
    filtered = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), 1, noise)
    assert filtered[:, 4:-4].std() == pytest.approx(blurred_noise_std(kernel), rel=0.01)


# --- baselines -----------------------------------------------------------------------------------


def noisy_lattice(alpha: float, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    clean, _ = lattice((64, 64), amplitude=0.04, background=0.002)
    rng = np.random.default_rng(seed)
    return clean, rng.poisson(clean * alpha) / alpha


def test_bm3d_beats_the_noisy_input_and_the_oracle_gaussian_is_no_worse_than_it():
    pytest.importorskip("bm3d")
    clean, noisy = noisy_lattice(alpha=400.0)  # ~16 electrons at a column, 0.8 in the background
    restored = bm3d_anscombe(noisy, electrons_per_unit=400.0)
    assert restored.shape == clean.shape
    assert psnr_db(clean, restored) > psnr_db(clean, noisy) + 6.0
    assert ssim_index(clean, restored) > ssim_index(clean, noisy)
    oracle = oracle_gaussian(noisy, clean)
    assert oracle.sigma_px > 0
    assert oracle.psnr_db == pytest.approx(psnr_db(clean, oracle.image))
    assert oracle.psnr_db > psnr_db(clean, noisy)
    # a clean input is (nearly) left alone by the oracle
    assert oracle_gaussian(clean, clean).sigma_px == 0.0
