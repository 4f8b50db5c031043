"""xc, PSNR and SSIM against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from evaluation.metrics import psnr, resample_to_grid, ssim, xc
from physics import fourier_shift


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return gaussian_filter(np.random.default_rng(0).normal(size=(96, 96)), 2.0)


def test_xc_is_pearson(image):
    assert xc(image, 3.0 * image + 7.0) == pytest.approx(1.0)
    assert xc(image, -image) == pytest.approx(-1.0)
    rng = np.random.default_rng(1)
    noise = rng.normal(size=image.shape) * image.std()
    # equal signal and noise variance: xc = 1 / sqrt(2)
    assert xc(image, image + noise) == pytest.approx(1 / np.sqrt(2), abs=0.03)
    with pytest.raises(ValueError):
        xc(image, np.ones_like(image))


def test_xc_with_registration(image):
    big = gaussian_filter(np.random.default_rng(2).normal(size=(128, 128)), 2.0)
    a = big[10:110, 10:110]
    b = fourier_shift(big, (2.5, 1.25))[10:110, 10:110]
    assert xc(a, b) < 0.9
    assert xc(a, b, register=True) > 0.995


def test_psnr_of_known_error(image):
    data_range = float(np.ptp(image))
    offset = 0.01 * data_range
    assert psnr(image, image + offset) == pytest.approx(10 * np.log10(data_range**2 / offset**2))
    assert psnr(image, image + offset, data_range=1.0) == pytest.approx(10 * np.log10(1 / offset**2))
    assert psnr(image, image) == float("inf")


def test_ssim_properties(image):
    assert ssim(image, image) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    noisy = [image + rng.normal(size=image.shape) * s * image.std() for s in (0.1, 0.3, 1.0)]
    values = [ssim(image, x) for x in noisy]
    assert values[0] > values[1] > values[2] > 0
    assert ssim(image, noisy[1]) == pytest.approx(ssim(noisy[1], image, data_range=np.ptp(image)), abs=1e-9)
    # a brightness offset lowers only the luminance term
    positive = image - image.min() + np.ptp(image)
    assert 0.5 < ssim(positive, positive + 0.3 * np.ptp(image)) < 0.99
    value, full_map = ssim(image, noisy[0], full=True)
    assert full_map.shape == image.shape and value < 1


def test_ssim_of_constant_images_matches_the_formula():
    """Uniform images a and b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (no variance terms)."""
    a = np.full((40, 40), 0.6)
    b = np.full((40, 40), 0.3)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.6 * 0.3 + c1) / (0.6**2 + 0.3**2 + c1)
    assert ssim(a, b, data_range=1.0) == pytest.approx(expected)


def test_ssim_agrees_with_scikit_image(image):
    metrics = pytest.importorskip("skimage.metrics")
    noisy = image + np.random.default_rng(4).normal(size=image.shape) * 0.3 * image.std()
    reference = metrics.structural_similarity(
        image, noisy, data_range=np.ptp(image), gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(image, noisy) == pytest.approx(reference, abs=0.01)


def test_resample_to_grid_follows_origin_and_pixel():
    """A slow plane wave on a fine grid, sampled on a coarser, shifted grid, matches the analytic values."""
    pixel, period = 0.05, 4.0
    x = -1.0 + np.arange(200) * pixel  # fine grid starts at -1 A
    fine = np.sin(2 * np.pi * x / period)[:, None] * np.ones((1, 120))
    coarse = resample_to_grid(fine, pixel, (-1.0, -0.5), (20, 10), 0.3, (0.25, 0.0))
    expected = np.sin(2 * np.pi * (0.25 + np.arange(20) * 0.3) / period)
    # Gaussian anti-aliasing (sigma 0.15 A) damps this frequency by exp(-2 pi^2 sigma^2 / period^2) = 0.97
    damping = np.exp(-2 * np.pi**2 * 0.15**2 / period**2)
    np.testing.assert_allclose(coarse[:, 3], damping * expected, atol=5e-3)
    outside = resample_to_grid(fine, pixel, (-1.0, -0.5), (5, 5), 0.3, (100.0, 0.0))
    assert np.all(np.isnan(outside))
