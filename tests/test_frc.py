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


# ------------------------------------------------------------------------------------------------------
# leakage of the edge treatment (issue 12): hard band limits and a Gaussian blur with an analytic FRC


def _hard_band(n: int, pixel_A: float, cutoff_invA: float, seed: int) -> np.ndarray:
    """White noise with every frequency |k| >= cutoff removed (periodic on the n x n grid)."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n, pixel_A)
    k = np.hypot(f[:, None], f[None, :])
    return np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, n))) * (k < cutoff_invA)).real


def _noisy_pair(image: np.ndarray, relative_noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd = relative_noise * image.std()
    return image + rng.normal(size=image.shape) * sd, image + rng.normal(size=image.shape) * sd


def test_hard_band_limit_crosses_half_at_the_cut():
    """0.1 A pixels, cut at 1.5 1/A, noise 1e-3 of the signal: FRC = 1 below the cut, ~0 above, so it
    crosses 0.5 at 1 / 1.5 = 0.667 A. A Tukey window smeared the cut out to 0.49 A (Hann: 0.61 A)."""
    a, b = _noisy_pair(_hard_band(256, 0.1, 1.5, seed=1), 1e-3, seed=2)
    freq, frc, counts = fourier_ring_correlation(a, b, 0.1, register=False)
    assert resolution(freq, frc, 0.5) == pytest.approx(1 / 1.5, rel=0.02)
    assert resolution(freq, frc, 0.143) == pytest.approx(1 / 1.5, rel=0.03)
    beyond = freq > 1.1 * 1.5  # only noise there: |FRC| within the scatter of rings of `counts` pixels
    assert np.all(np.abs(frc[beyond]) < 4 / np.sqrt(counts[beyond]))


def test_hard_band_limit_of_a_cropped_field_leaks_less_than_the_thresholds():
    """A crop of a band-limited field is not periodic (its edges jump): the FRC tapers it (Hann, sidelobes
    falling as 1/k^3). With the error of a good reconstruction (10 % of the signal) the 0.5 crossing stays
    within two rings of the cut and beyond 1.2 x the cut the FRC is noise (below the half-bit curve)."""
    field = _hard_band(512, 0.1, 1.5, seed=3)[100:356, 50:306]
    a, b = _noisy_pair(field, 0.1, seed=4)
    freq, frc, counts = fourier_ring_correlation(a, b, 0.1, register=False)
    assert resolution(freq, frc, 0.5) == pytest.approx(1 / 1.5, rel=0.07)
    beyond = freq > 1.2 * 1.5
    assert np.abs(frc[beyond]).mean() < 0.05 and np.all(frc[beyond] < half_bit_threshold(counts[beyond]))
    # without any treatment the jumps at the edges correlate out to Nyquist
    _, raw, _ = fourier_ring_correlation(a, b, 0.1, register=False, window=None)
    assert raw[beyond].mean() > 0.3


@pytest.mark.parametrize("periodic", [True, False])
def test_gaussian_blur_follows_the_analytic_frc(periodic):
    """a = o + n1, b = G * o + n2 with o white (variance 1), G a Gaussian of sigma s (transfer
    H(k) = exp(-2 pi^2 s^2 k^2)) and white noise of variances v1, v2: per Fourier pixel
    FRC(k) = H / sqrt((1 + v1) (H^2 + v2))."""
    n, pixel, sigma_A, v1, v2 = 256, 0.1, 0.25, 1e-2, 1e-5
    size = n if periodic else 2 * n
    rng = np.random.default_rng(5)
    f = np.fft.fftfreq(size, pixel)
    transfer = np.exp(-2 * np.pi**2 * sigma_A**2 * (f[:, None] ** 2 + f[None, :] ** 2))
    obj = rng.normal(size=(size, size))
    blurred = np.fft.ifft2(np.fft.fft2(obj) * transfer).real
    window = slice(0, n) if periodic else slice(n // 3, n // 3 + n)
    a = obj[window, window] + rng.normal(size=(n, n)) * np.sqrt(v1)
    b = blurred[window, window] + rng.normal(size=(n, n)) * np.sqrt(v2)
    freq, frc, counts = fourier_ring_correlation(a, b, pixel, register=False)
    h = np.exp(-2 * np.pi**2 * sigma_A**2 * freq**2)
    expected = h / np.sqrt((1 + v1) * (h**2 + v2))
    scatter = 3 / np.sqrt(counts)  # each ring averages ~2 pi r independent Fourier pixels
    inside = freq > 4 / (n * pixel)
    assert np.all(np.abs(frc - expected)[inside] < scatter[inside] + (0.0 if periodic else 0.03))
    assert resolution(freq, frc, 0.5) == pytest.approx(resolution(freq, expected, 0.5), rel=0.02)


def test_registration_shift_is_bounded():
    """A copy shifted by 6 pixels: unbounded the shift is found; with a 2-pixel bound the search stays
    inside it and the result sits on the bound (the caller flags it), whatever lies further out."""
    rng = np.random.default_rng(6)
    big = gaussian_filter(rng.normal(size=(120, 120)), 2.0)
    a = big[10:106, 10:106]
    b = fourier_shift(big, (6.0, -1.3))[10:106, 10:106]
    assert estimate_shift(a, b) == pytest.approx([6.0, -1.3], abs=0.06)
    bounded = estimate_shift(a, b, max_shift_px=2.0)
    assert np.all(np.abs(bounded) <= 2.0) and bounded[0] == pytest.approx(2.0)
    _, _, shift = align(a, b, max_shift_px=2.0)
    assert np.max(np.abs(shift)) <= 2.0
