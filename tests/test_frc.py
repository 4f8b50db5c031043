"""FRC and resolution on analytic cases: known SNR, band limit, identical images, shifted copies."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from evaluation.align import align, estimate_shift
from evaluation.frc import fourier_ring_correlation, half_bit_threshold, resolution
from physics import fourier_shift

PIXEL_A = 0.5


def _band_limited(n: int, cutoff_invA: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n, PIXEL_A)
    k = np.hypot(f[:, None], f[None, :])
    return np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, n))) * (k < cutoff_invA)).real


def test_identical_images_give_frc_one():
    image = gaussian_filter(np.random.default_rng(0).normal(size=(128, 128)), 1.0)
    freq, frc, counts = fourier_ring_correlation(image, image, PIXEL_A)
    assert np.allclose(frc, 1.0, atol=1e-6)
    assert freq[0] == pytest.approx(1 / (128 * PIXEL_A))
    assert freq[-1] == pytest.approx(1 / (2 * PIXEL_A))
    assert counts[0] > 0 and counts.sum() < 128 * 128
    # never crosses: the resolution is the Nyquist limit
    assert resolution(freq, frc, 0.143) == pytest.approx(2 * PIXEL_A)


@pytest.mark.parametrize("snr", [0.25, 1.0, 4.0])
def test_independent_noise_of_known_snr(snr):
    """A white object seen twice with independent white noise: FRC = SNR / (1 + SNR) in every ring."""
    rng = np.random.default_rng(1)
    n = 256
    obj = rng.normal(size=(n, n))
    noise_sd = 1 / np.sqrt(snr)
    a = obj + rng.normal(size=(n, n)) * noise_sd
    b = obj + rng.normal(size=(n, n)) * noise_sd
    _, frc, _ = fourier_ring_correlation(a, b, PIXEL_A)
    expected = snr / (1 + snr)
    assert np.mean(frc[4:]) == pytest.approx(expected, abs=0.03)
    # per-ring scatter as expected for rings of ~2 pi r pixels
    assert np.std(frc[20:]) < 0.1


@pytest.mark.parametrize("threshold", [0.5, 0.143, "half-bit"])
def test_band_limited_resolution_at_cutoff(threshold):
    cutoff_invA = 0.4
    n = 256
    obj = _band_limited(n, cutoff_invA, seed=2)
    rng = np.random.default_rng(3)
    a = obj + rng.normal(size=(n, n)) * obj.std() * 0.05
    b = obj + rng.normal(size=(n, n)) * obj.std() * 0.05
    freq, frc, counts = fourier_ring_correlation(a, b, PIXEL_A)
    res = resolution(freq, frc, threshold, counts)
    # apodisation smears the sharp edge of the band over a few rings (one ring = 0.0078 1/A here)
    assert res == pytest.approx(1 / cutoff_invA, rel=0.08)
    assert frc[freq < 0.8 * cutoff_invA].min() > 0.95
    assert np.abs(frc[freq > 1.3 * cutoff_invA]).max() < 0.3


def test_half_bit_threshold_formula():
    assert half_bit_threshold(np.array([1.0]))[0] == pytest.approx(1.0, abs=1e-3)
    assert half_bit_threshold(np.array([1e12]))[0] == pytest.approx(0.2071 / 1.2071, abs=1e-5)
    n = 100.0
    expected = (0.2071 + 1.9102 / 10) / (1.2071 + 0.9102 / 10)
    assert half_bit_threshold(np.array([n]))[0] == pytest.approx(expected)


def test_resolution_interpolates_the_first_crossing():
    freq = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    frc = np.array([0.9, 0.7, 0.3, 0.6, 0.1])  # first crossing of 0.5 between 0.2 and 0.3
    assert resolution(freq, frc, 0.5) == pytest.approx(1 / 0.25)
    with pytest.raises(ValueError):
        resolution(freq, frc, "quarter-bit")


def test_shifted_copy_registers():
    rng = np.random.default_rng(4)
    big = gaussian_filter(rng.normal(size=(160, 160)), 2.0)
    shift = np.array([3.4, -2.25])
    a = big[16:144, 16:144]
    b = fourier_shift(big, shift)[16:144, 16:144]  # not periodic: edges differ
    assert estimate_shift(a, b) == pytest.approx(shift, abs=0.06)
    a_c, b_c, found = align(a, b)
    assert found == pytest.approx(shift, abs=0.06)
    assert a_c.shape == (124, 125)
    assert np.corrcoef(a_c[2:-2, 2:-2].ravel(), b_c[2:-2, 2:-2].ravel())[0, 1] > 0.995
    _, registered, _ = fourier_ring_correlation(a, b, PIXEL_A)
    _, unregistered, _ = fourier_ring_correlation(a, b, PIXEL_A, register=False)
    mid = slice(5, 30)
    assert registered[mid].min() > 0.97
    assert unregistered[mid].mean() < 0.5
