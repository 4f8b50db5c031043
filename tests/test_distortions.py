"""Statistical tests of the STEM distortion models (training.distortions, thesis ch.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import find_peaks

from training.distortions import (
    PMTParameters,
    StemDistortion,
    ar1_series,
    dead_pixels,
    detector_noise,
    fast_scan_blur,
    fast_scan_kernel,
    make_generator,
    per_sample_generators,
    pmt_noise,
    poisson,
    sample_seed,
    saturate,
    scan_jitter,
    shot_noise,
)


def _lag1(series: torch.Tensor) -> float:
    """Pooled lag-1 autocorrelation of (B, N) series (zero-mean processes)."""
    s = series.double()
    return float((s[:, 1:] * s[:, :-1]).sum() / (s[:, :-1] ** 2).sum())


# ------------------------------------------------------------------------------------------------ shot noise


@pytest.mark.parametrize("dose_e_per_A2", [5e2, 1e5, 1e9])
def test_shot_noise_mean_and_variance_match_dose(dose_e_per_A2: float) -> None:
    gen = make_generator(11)
    pixel_A = 0.15
    intensity = 0.2 + 0.6 * torch.rand(8, 64, 64, generator=make_generator(1))  # non-flat clean image
    alpha = dose_e_per_A2 * pixel_A**2  # electrons per unit intensity, lambda = I d dx dy
    counts = shot_noise(intensity, dose_e_per_A2, pixel_A, gen, rescale=False).double()
    lam = intensity.double() * alpha
    z = (counts - lam) / lam.sqrt()  # standardised residuals: mean 0, variance 1 for Poisson
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2.0 / n)
    # rescaled output: mean I, variance I / alpha
    out = shot_noise(intensity, dose_e_per_A2, (pixel_A, pixel_A), gen).double()
    z2 = (out - intensity.double()) / (intensity.double() / alpha).sqrt()
    assert abs(float(z2.mean())) < 5 / math.sqrt(n)
    assert abs(float(z2.var()) - 1.0) < 5 * math.sqrt(2.0 / n)


def test_shot_noise_uses_per_sample_dose_and_pixel_area() -> None:
    image = torch.full((2, 128, 128), 1.0)
    counts = shot_noise(
        image,
        torch.tensor([100.0, 1e4]),
        torch.tensor([[0.1, 0.2], [0.2, 0.2]]),
        make_generator(2),
        rescale=False,
    )
    expected = torch.tensor([100.0 * 0.02, 1e4 * 0.04])
    assert torch.allclose(counts.mean(dim=(1, 2)), expected, rtol=0.05)


# ------------------------------------------------------------------------------------------------ PMT model


def test_pmt_parameters_follow_eq_2_5_to_2_11() -> None:
    p = PMTParameters()  # 300 kV, 1 photon/kV, eta 0.25, delta 4, 10 dynodes
    assert p.collected_photons == pytest.approx(300.0)
    assert p.photoelectrons == pytest.approx(75.0)  # eq. 2.5
    assert p.multiplier_gain == pytest.approx(4.0**10)  # eq. 2.8
    assert p.anode_electrons_per_electron == pytest.approx(75.0 * 4.0**10)  # eq. 2.9
    # eq. 2.11 divided by m_c eta G, sigma_c^2 = m_c (Poisson photons)
    expected = math.sqrt((1 - 0.25 + 1 / 3) / 75 + 300 / 300**2)
    assert p.single_electron_std == pytest.approx(expected)
    assert p.single_electron_std == pytest.approx(0.13333, abs=1e-4)
    k = torch.tensor([0.0, 1.0, 4.0])
    assert torch.allclose(p.response_std(k), expected * k.sqrt())
    dark = PMTParameters(dark_noise_e=0.1, photon_count_std=0.0)
    assert float(dark.response_std(torch.tensor([0.0]))) == pytest.approx(0.1)


def test_detector_noise_histogram_has_one_peak_per_electron() -> None:
    """Low-dose background (thesis fig. 2.3): peaks at 0, 1, 2, 3 electrons, spread sigma_1 sqrt(k)."""
    params = PMTParameters()
    dose, pixel = 32.0, 0.25  # alpha = d dx dy = 2 electrons per unit intensity
    image = torch.full((8, 128, 128), 1.0)
    out = detector_noise(image, dose, pixel, params, make_generator(3))
    electrons = (out.double() * dose * pixel**2).flatten().numpy()
    hist, edges = np.histogram(electrons, bins=np.arange(-0.5, 5.5, 0.02))
    centres = 0.5 * (edges[1:] + edges[:-1])
    hist = np.convolve(hist, np.ones(5) / 5, mode="same")  # light smoothing against counting noise
    # the zero-electron peak is a spike (no dark noise): judge prominence against the one-electron peak
    peaks, _ = find_peaks(hist, prominence=0.1 * hist[centres > 0.5].max(), distance=20)
    found = centres[peaks]
    assert len(found) >= 4
    assert np.allclose(found[:4], [0, 1, 2, 3], atol=0.08), found
    # distinct peaks: the valley between k and k + 1 electrons is far below both neighbouring peaks
    heights = hist[peaks]
    for k, valley in enumerate((0.5, 1.5, 2.5)):
        assert hist[np.argmin(abs(centres - valley))] < 0.3 * min(heights[k], heights[k + 1])
    # width of the one-electron peak is the single-electron response of eq. 2.11
    one = electrons[(electrons > 0.5) & (electrons < 1.5)]
    assert np.std(one) == pytest.approx(params.single_electron_std, rel=0.05)


def test_detector_noise_mean_and_variance() -> None:
    """E[x] = I and Var[alpha x] = lambda (1 + sigma_1^2) (Poisson counts + Gaussian response)."""
    params = PMTParameters(energy_kV=80.0)
    lam = 20.0
    image = torch.full((8, 64, 64), 2.0)
    alpha = lam / 2.0
    out = detector_noise(image, alpha, 1.0, params, make_generator(4)).double()
    n = out.numel()
    assert abs(float(out.mean()) - 2.0) < 5 * math.sqrt(lam * 1.1) / alpha / math.sqrt(n)
    expected_var = lam * (1 + params.single_electron_std**2)
    assert float((out * alpha).var()) == pytest.approx(expected_var, rel=5 * math.sqrt(2 / n))


def test_pmt_noise_keeps_zero_counts_without_dark_noise() -> None:
    counts = poisson(torch.full((2, 32, 32), 0.5), make_generator(5))
    noisy = pmt_noise(counts, PMTParameters(), make_generator(6))
    assert torch.equal(noisy[counts == 0], counts[counts == 0])
    assert not torch.equal(noisy[counts > 0], counts[counts > 0])


# ------------------------------------------------------------------------------------------------ jitter


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_ar1_lag1_autocorrelation_equals_phi(phi: float) -> None:
    sigma = 0.5
    series = ar1_series(1024, phi, sigma, make_generator(7), batch=200, stationary_start=True)
    n = series.numel()
    assert _lag1(series) == pytest.approx(phi, abs=5 * math.sqrt((1 - phi**2) / n) + 1e-3)
    # stationary variance sigma^2 / (1 - phi^2)
    expected = sigma**2 / (1 - phi**2)
    assert float(series.double().var()) == pytest.approx(expected, rel=0.03 + 0.1 * phi**4)
    # innovations a_j = Delta_j - phi Delta_{j-1} are white with standard deviation sigma (exact recursion)
    innov = series[:, 1:].double() - phi * series[:, :-1].double()
    assert float(innov.std()) == pytest.approx(sigma, rel=0.01)
    assert abs(_lag1(innov)) < 5 / math.sqrt(innov.numel())


def test_ar1_start_values_follow_eq_2_14_and_2_15() -> None:
    phi, sigma = 0.5, 0.5
    x = ar1_series(3, phi, sigma, make_generator(8), batch=40000, stationary_start=False)
    y = ar1_series(3, phi, sigma, make_generator(9), batch=40000, stationary_start=True)
    assert float(x[:, 0].var()) == pytest.approx(sigma**2, rel=0.04)  # Delta_1 = a_1
    assert float(x[:, 1].var()) == pytest.approx(sigma**2 * (1 + phi**2), rel=0.04)
    assert float(y[:, 0].var()) == pytest.approx(sigma**2 / (1 - phi**2), rel=0.04)  # stationary
    assert float(y[:, 2].var()) == pytest.approx(sigma**2 / (1 - phi**2), rel=0.04)


def test_scan_jitter_moves_lines_as_specified() -> None:
    b, h, w = 2, 16, 40
    cols = torch.arange(w, dtype=torch.float32).expand(b, h, w).clone()
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(b, h, w).clone()
    gen = make_generator(10)
    dx = 0.7 * torch.randn(b, h, generator=gen)
    dy = 0.3 * torch.randn(b, h, generator=gen)
    # x-jitter shifts whole lines along the scan direction: I = x gives x + dx_j away from the edges
    out = scan_jitter(cols, dx, torch.zeros_like(dy))
    assert torch.allclose(out[:, :, 5:-5], cols[:, :, 5:-5] + dx[:, :, None], atol=1e-4)
    # y-jitter moves the line positions: I = y gives j + dy_j
    out = scan_jitter(rows, torch.zeros_like(dx), dy)
    inner = slice(2, -2)
    assert torch.allclose(out[:, inner], rows[:, inner] + dy[:, inner, None], atol=1e-4)
    # zero shifts are the identity
    assert torch.allclose(scan_jitter(cols, torch.zeros_like(dx), torch.zeros_like(dy)), cols, atol=1e-5)


def test_stem_distortion_jitter_has_table_2_2_statistics() -> None:
    """End to end: the line shifts recovered from a jittered ramp image have lag-1 correlation phi_x."""
    module = StemDistortion(dose_e_per_A2_range=None, detector=None, fast_scan_prob=0.0, seed=3)
    b, h, w = 8, 512, 48
    ramp = torch.arange(w, dtype=torch.float32).expand(b, h, w).contiguous()
    out, params = module(ramp, 0.15, return_parameters=True)
    recovered = (out[:, :, 8:-8] - ramp[:, :, 8:-8]).mean(dim=2)  # x-shift of every line
    assert torch.allclose(recovered, params["shift_x_px"], atol=1e-3)
    assert _lag1(recovered) == pytest.approx(0.5, abs=0.07)
    assert float(recovered.std()) == pytest.approx(0.5 / math.sqrt(1 - 0.25), rel=0.1)
    assert _lag1(params["shift_y_px"]) == pytest.approx(0.5, abs=0.07)
    assert float(params["shift_y_px"].std()) == pytest.approx(0.25 / math.sqrt(1 - 0.25), rel=0.1)


# ------------------------------------------------------------------------------------------------ fast scan


@pytest.mark.parametrize("model", ["exponential", "lorentzian"])
def test_fast_scan_psf_damps_only_scan_direction(model: str) -> None:
    b, h, w = 12, 96, 96
    noise = torch.randn(b, h, w, generator=make_generator(12), dtype=torch.float64)
    kernel = fast_scan_kernel(w, 1.0, model)
    out = fast_scan_blur(noise, kernel)
    p_in = (torch.fft.fft2(noise).abs() ** 2).mean(dim=0)
    p_out = (torch.fft.fft2(out).abs() ** 2).mean(dim=0)
    # profile along the slow-scan axis (ky, averaged over kx): flat
    along_y = p_out.mean(dim=1) / p_in.mean(dim=1)
    assert float(along_y.std() / along_y.mean()) < 0.06
    # profile along the scan axis (kx, averaged over ky): the transfer function |H(kx)|^2, low-pass
    along_x = p_out.mean(dim=0) / p_in.mean(dim=0)
    transfer = torch.fft.fft(kernel[0], w).abs() ** 2
    assert torch.allclose(along_x, transfer, rtol=0.1, atol=0.01)
    assert float(along_x[0]) == pytest.approx(1.0, rel=0.05)
    assert float(along_x[w // 2]) < 0.4 * float(along_x[0])
    # the damping is only along x: the slow-axis profile stays far above the Nyquist value along x
    assert float(along_y.min()) > 2 * float(along_x[w // 2])


def test_fast_scan_kernel_is_causal_normalised_and_has_requested_hwhm() -> None:
    for model in ("exponential", "lorentzian"):
        g = fast_scan_kernel(64, torch.tensor([2.0, 0.0]), model, batch=2)
        assert torch.allclose(g.sum(dim=1), torch.ones(2, dtype=torch.float64))
        assert float(g[0, 2] / g[0, 0]) == pytest.approx(0.5, rel=1e-6)  # half maximum at t = hwhm
        assert torch.equal(g[1], torch.nn.functional.one_hot(torch.tensor(0), 64).double())
    image = torch.zeros(1, 1, 32)
    image[0, 0, 10] = 1.0
    out = fast_scan_blur(image, fast_scan_kernel(32, 1.5, "lorentzian"))
    assert torch.all(out[0, 0, :10].abs() < 1e-6)  # nothing before the feature (causal)
    assert torch.all(torch.diff(out[0, 0, 10:]) < 0)  # monotonic tail in the scan direction
    flat = torch.full((1, 4, 32), 3.0)
    assert torch.allclose(fast_scan_blur(flat, fast_scan_kernel(32, 1.0, "exponential")), flat)


# ------------------------------------------------------------------------------------------------ defects


def test_dead_pixels_are_zero_and_saturation_clips() -> None:
    image = 1.0 + torch.rand(4, 128, 128, generator=make_generator(13))
    out = dead_pixels(image, torch.tensor([0.0, 0.01, 0.05, 0.2]), make_generator(14))
    n = 128 * 128
    for i, frac in enumerate([0.0, 0.01, 0.05, 0.2]):
        zero = out[i] == 0
        assert abs(float(zero.float().mean()) - frac) < 5 * math.sqrt(frac * (1 - frac) / n) + 1e-9
        assert torch.equal(out[i][~zero], image[i][~zero])
    clipped = saturate(image, torch.tensor([1.5, 1.8, math.inf, 1.2]))
    for i, level in enumerate([1.5, 1.8, math.inf, 1.2]):
        level32 = torch.tensor(level, dtype=torch.float32)
        assert clipped[i].max() <= level32
        below = image[i] <= level32
        assert torch.equal(clipped[i][below], image[i][below])
        assert torch.all(clipped[i][~below] == level32)


# ------------------------------------------------------------------------------------------------ pipeline


def test_stem_distortion_reproducible_and_batch_independent() -> None:
    image = 0.5 + 0.5 * torch.rand(3, 48, 48, generator=make_generator(15))
    module = StemDistortion(dead_pixel_prob=0.5, saturation_prob=0.5, seed=1)
    a = module(image, 0.2, generator=make_generator(21))
    b = module(image, 0.2, generator=make_generator(21))
    c = module(image, 0.2, generator=make_generator(22))
    assert a.shape == image.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # per-index noise: sample 7 gets the same distortion in any batch, at any position
    first = module(image[[0, 1]], 0.2, indices=[7, 8])
    second = module(image[[2, 0]], 0.2, indices=[3, 7])
    assert torch.equal(first[0], second[1])
    assert not torch.allclose(first[1], module(image[[1]], 0.2, indices=[9])[0])
    # the module mean follows the clean image (noise is unbiased, shifts are small)
    assert float((a.mean() - image.mean()).abs()) < 0.05


def test_per_sample_seeds_are_distinct_and_stable() -> None:
    seeds = {sample_seed(0, i) for i in range(10000)}
    assert len(seeds) == 10000
    assert sample_seed(5, 123) == sample_seed(5, 123) != sample_seed(6, 123)
    g1, g2 = per_sample_generators(torch.tensor([4, 4]), base_seed=2)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
