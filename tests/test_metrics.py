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


def test_fourier_resample_is_exact_for_band_limited_content_and_cuts_the_rest():
    """A non-periodic field of two plane waves, one below and one above the target grid's Nyquist: on a
    grid whose Nyquist holds both they are kept (no Gaussian damping, no edge ringing), with a band
    limit between them the fast one is removed."""
    from evaluation.metrics import fourier_resample

    pixel, n = 0.06, 150  # 9 A field, not a whole number of periods of either wave
    x = -1.0 + np.arange(n) * pixel
    slow = np.cos(2 * np.pi * 0.8 * x[:, None] + 0.3) * np.cos(2 * np.pi * 0.55 * x[None, :])
    fast = 0.5 * np.sin(2 * np.pi * 2.6 * x[:, None] + 2 * np.pi * 1.9 * x[None, :])
    target, origin, shape = 0.164, (0.3, -0.2), (40, 45)  # Nyquist 3.05 1/A: 2.6 and 1.9 1/A inside
    xt = origin[0] + np.arange(shape[0]) * target
    yt = origin[1] + np.arange(shape[1]) * target
    slow_t = np.cos(2 * np.pi * 0.8 * xt[:, None] + 0.3) * np.cos(2 * np.pi * 0.55 * yt[None, :])
    fast_t = 0.5 * np.sin(2 * np.pi * 2.6 * xt[:, None] + 2 * np.pi * 1.9 * yt[None, :])
    both = fourier_resample(slow + fast, pixel, (-1.0, -1.0), shape, target, origin)
    np.testing.assert_allclose(both, slow_t + fast_t, atol=0.05)  # the leakage of a finite field
    cut = fourier_resample(slow + fast, pixel, (-1.0, -1.0), shape, target, origin, band_limit_invA=1.5)
    np.testing.assert_allclose(cut, slow_t, atol=0.03)
    # the linear interpolation with Gaussian anti-aliasing (the old way onto a coarser grid) damps both
    old = resample_to_grid(slow + fast, pixel, (-1.0, -1.0), shape, target, origin)
    assert np.nanmax(np.abs(old - (slow_t + fast_t))) > 0.3
    # outside the source field: NaN
    outside = fourier_resample(slow, pixel, (-1.0, -1.0), (3, 3), target, (7.8, 0.0))
    assert np.all(np.isnan(outside[1:])) and np.all(np.isfinite(outside[0]))


def test_fourier_resample_upsamples_a_scan_grid_image_by_sinc_interpolation():
    """An image on a coarse periodic grid (as SSB's on the scan grid) upsampled 3x: the samples are kept
    and the values between them are the trigonometric interpolant (no content beyond the coarse Nyquist)."""
    from evaluation.metrics import fourier_resample

    rng = np.random.default_rng(7)
    coarse = rng.normal(size=(16, 16))
    fine = fourier_resample(coarse, 0.3, (0.0, 0.0), (46, 46), 0.1, (0.0, 0.0))
    np.testing.assert_allclose(fine[::3, ::3], coarse, atol=1e-9)
    # the trigonometric interpolant (scipy's FFT resampling splits the Nyquist bin the same way)
    from scipy.signal import resample

    expected = resample(resample(coarse, 48, axis=0), 48, axis=1)
    np.testing.assert_allclose(fine, expected[:46, :46], atol=1e-9)
