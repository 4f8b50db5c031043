"""Losses (models/losses.py) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import (
    AIRPILoss,
    CGRDNGeneratorLoss,
    PtychoNNLoss,
    illuminated_mask,
    masked_l1,
    object_phase,
    object_phase_spread,
    pearson_xc,
    psnr,
    relativistic_discriminator_loss,
    relativistic_generator_loss,
    whitening_transform,
)


def _disc_probe(n: int = 32) -> torch.Tensor:
    """A smooth probe-like wave: Gaussian amplitude with a quadratic phase, sum |psi|^2 = 1."""
    x = torch.arange(n, dtype=torch.float32) - n / 2
    r2 = x[:, None] ** 2 + x[None, :] ** 2
    probe = torch.polar(torch.exp(-r2 / (2 * 12.0**2)), 0.01 * r2)
    return (probe / probe.abs().pow(2).sum().sqrt()).unsqueeze(0).repeat(2, 1, 1)


def _exit_wave(probe: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obj_phase = 0.5 * torch.tanh(torch.randn(probe.shape, generator=g))
    return probe * torch.polar(torch.ones_like(obj_phase), obj_phase), obj_phase


def test_pearson_xc_identical_anticorrelated_and_weighted() -> None:
    x = torch.randn(3, 8, 8)
    torch.testing.assert_close(pearson_xc(x, 2 * x + 1), torch.ones(3))
    torch.testing.assert_close(pearson_xc(x, -x), -torch.ones(3))
    mask = torch.zeros(3, 8, 8)
    mask[:, :4] = 1
    y = x.clone()
    y[:, 4:] = torch.randn(3, 4, 8)  # outside the mask: irrelevant
    torch.testing.assert_close(pearson_xc(x, y, mask), torch.ones(3))


def test_object_phase_and_mask() -> None:
    probe = _disc_probe()
    wave, obj = _exit_wave(probe)
    torch.testing.assert_close(object_phase(wave, probe), obj, atol=1e-5, rtol=0)
    mask = illuminated_mask(probe)
    intensity = probe.abs() ** 2
    expected = intensity > 0.1 * intensity.amax(dim=(1, 2), keepdim=True)
    assert torch.equal(mask.bool(), expected)
    assert 0 < mask.mean() < 1


def test_object_phase_spread_is_the_std_over_the_illuminated_disc() -> None:
    probe = _disc_probe()
    wave, obj = _exit_wave(probe)
    mask = illuminated_mask(probe).bool()
    expected = torch.stack([obj[i][mask[i]].double().std(unbiased=False) for i in range(2)]).float()
    torch.testing.assert_close(object_phase_spread(wave, probe), expected, atol=1e-5, rtol=0)
    # a uniform phase plate (and the probe's own phase) is no object: spread 0, and the dark rim,
    # where a strong phase would sit, does not count
    plate = probe * torch.polar(torch.ones_like(probe.real), torch.full_like(probe.real, 0.7))
    plate = torch.where(mask, plate, plate * torch.polar(torch.ones_like(probe.real), 3.0 * obj))
    torch.testing.assert_close(object_phase_spread(plate, probe), torch.zeros(2), atol=1e-6, rtol=0)


def test_airpi_loss_zero_for_identical() -> None:
    probe = _disc_probe()
    wave, _ = _exit_wave(probe)
    wave = wave * math.sqrt(0.8)  # integrated intensity 0.8 < 1: no penalty
    total, terms = AIRPILoss()(wave, wave, probe, wave.angle())
    for name, value in terms.items():
        assert value.item() == pytest.approx(0.0, abs=1e-6), name
    assert total.item() == pytest.approx(0.0, abs=1e-5)


def test_airpi_loss_constant_phase_offset() -> None:
    """psi_pred = psi exp(i d): intensities unchanged; each sin/cos pair gives |e^{id} - 1|^2 = 2 - 2 cos d
    in r and k space; object phase shifted by d everywhere: L2 = d^2, xc = 1."""
    probe = _disc_probe()
    wave, _ = _exit_wave(probe)
    wave = wave * math.sqrt(0.8)
    d = 0.3
    pred = wave * complex(math.cos(d), math.sin(d))
    loss = AIRPILoss()
    total, terms = loss(pred, wave, probe, pred.angle())
    pair = 2 - 2 * math.cos(d)
    assert terms["intensity_r"].item() == pytest.approx(0, abs=1e-8)
    assert terms["intensity_k"].item() == pytest.approx(0, abs=1e-8)
    assert terms["phase_r"].item() == pytest.approx(pair, rel=1e-3)
    assert terms["phase_k"].item() == pytest.approx(pair, rel=1e-3)
    assert terms["object"].item() == pytest.approx(d**2, rel=1e-4)
    assert terms["xc"].item() == pytest.approx(0, abs=1e-5)
    assert total.item() == pytest.approx(3 * pair + pair + d**2, rel=1e-3)
    # fine-tuning stage: the object term weighs 10
    loss.fine_tune = True
    total_ft, _ = loss(pred, wave, probe, pred.angle())
    assert total_ft.item() == pytest.approx(3 * pair + pair + 10 * d**2, rel=1e-3)


def test_airpi_loss_amplitude_scaling_intensity_terms() -> None:
    probe = _disc_probe()
    wave, _ = _exit_wave(probe)
    wave = wave * math.sqrt(0.5)
    a = 1.2
    _, terms = AIRPILoss()(a * wave, wave, probe, wave.angle())
    n = wave.shape[-1] * wave.shape[-2]
    intensity_r = (n * wave.abs() ** 2).pow(2).mean().item()
    wave_k = torch.fft.fft2(wave, norm="ortho")
    intensity_k = (n * wave_k.abs() ** 2).pow(2).mean().item()
    assert terms["intensity_r"].item() == pytest.approx((a**2 - 1) ** 2 * intensity_r, rel=1e-4)
    assert terms["intensity_k"].item() == pytest.approx((a**2 - 1) ** 2 * intensity_k, rel=1e-4)
    assert terms["phase_r"].item() == pytest.approx(0, abs=1e-6)
    assert terms["object"].item() == pytest.approx(0, abs=1e-8)


def test_airpi_loss_anticorrelated_object_and_penalties() -> None:
    probe = _disc_probe()
    _, obj = _exit_wave(probe)
    mask = illuminated_mask(probe)
    # true object phase with zero mean inside the mask, prediction its negative
    obj = obj - (obj * mask).sum((1, 2), keepdim=True) / mask.sum((1, 2), keepdim=True)
    ones = torch.ones_like(obj)
    true = probe * torch.polar(ones, obj)
    pred = probe * torch.polar(ones, -obj) * math.sqrt(1.5)  # integrated intensity 1.5
    # the net's raw (unwrapped) phase output: arg(pred) + 2 pi, i.e. the same wave, but outside +-pi
    phase_out = torch.angle(pred) + 2 * math.pi
    _, terms = AIRPILoss()(pred, true, probe, phase_out)
    assert terms["xc"].item() == pytest.approx(1.0, abs=1e-5)
    expected_obj = ((mask * (2 * obj) ** 2).sum((1, 2)) / mask.sum((1, 2))).mean()
    assert terms["object"].item() == pytest.approx(expected_obj.item(), rel=1e-4)
    assert terms["intensity_penalty"].item() == pytest.approx(0.5, rel=1e-5)
    expected_penalty = torch.relu(phase_out.abs() - math.pi).mean()
    assert expected_penalty > 1.0
    assert terms["phase_penalty"].item() == pytest.approx(expected_penalty.item(), rel=1e-6)
    # the phase terms see the wave's phase, whichever 2 pi branch the output is on
    _, same = AIRPILoss()(pred, true, probe, torch.angle(pred))
    for name in ("phase_r", "object", "xc"):
        assert terms[name].item() == pytest.approx(same[name].item(), rel=1e-5, abs=1e-7)


def test_airpi_loss_gradients_stay_finite_where_the_amplitude_vanishes() -> None:
    """A predicted amplitude clamped to zero inside the probe (a badly initialised net) must not give NaN."""
    probe = _disc_probe()
    true, _ = _exit_wave(probe)
    out = torch.zeros(true.shape[0], 2, *true.shape[-2:], requires_grad=True)
    with torch.no_grad():
        out[:, 0] = -0.5  # clamped: |psi| = 0 everywhere
        out[:, 1] = 0.3
    from models.airpi import output_to_wave

    total, _ = AIRPILoss()(output_to_wave(out), true, probe, out[:, 1])
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(out.grad).all() and out.grad[:, 1].abs().sum() > 0


def test_airpi_loss_weights_are_configurable() -> None:
    probe = _disc_probe()
    wave, _ = _exit_wave(probe)
    d = 0.2
    pred = wave * complex(math.cos(d), math.sin(d))
    only_object = {f"w_{t}": 0.0 for t in AIRPILoss.TERMS}
    only_object["w_object"] = 2.0
    total, _ = AIRPILoss(**only_object)(pred, wave, probe, pred.angle())
    assert total.item() == pytest.approx(2 * d**2, rel=1e-4)


def test_masked_l1() -> None:
    target = torch.randn(2, 1, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    pred = target + 0.5 * mask + 100 * (1 - mask)
    assert masked_l1(pred, target, mask).item() == pytest.approx(0.5)
    assert masked_l1(target, target, mask).item() == 0.0
    assert masked_l1(pred[:, 0], target[:, 0], None).item() == pytest.approx(0.25 * 0.5 + 0.75 * 100)


def test_ptychonn_loss() -> None:
    amp, phase = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    total, terms = PtychoNNLoss()(amp + 0.1, phase - 0.2, amp, phase)
    assert terms["amplitude"].item() == pytest.approx(0.1, rel=1e-5)
    assert terms["phase"].item() == pytest.approx(0.2, rel=1e-5)
    assert total.item() == pytest.approx(0.3, rel=1e-5)
    total, _ = PtychoNNLoss(w_amplitude=2.0, w_phase=1.0)(amp + 0.1, phase - 0.2, amp, phase)
    assert total.item() == pytest.approx(0.4, rel=1e-5)
    assert PtychoNNLoss()(amp, phase, amp, phase)[0].item() == 0.0


ALL_ONE = {"w_l1": 1.0, "w_l2": 1.0, "w_mlwt": 1.0, "w_fs": 1.0, "w_mean": 1.0, "w_std": 1.0}


def test_cgrdn_loss_zero_for_identical() -> None:
    y = torch.rand(2, 1, 32, 32)
    total, terms = CGRDNGeneratorLoss(**ALL_ONE)(y, y)
    assert total.item() == 0.0
    assert set(terms) == {"l1", "l2", "mlwt", "fs", "mean", "std"}


def test_cgrdn_loss_constant_offset() -> None:
    """Legacy absolute floor (sigma_min=0.1, checkpoints before issue #16):
    y_g = y + c: L1 = w c, L2 = w c^2 (w = 1/max(0.1, std y)); whitening removes c (mlwt = 0);
    F(c) has only the DC term c sqrt(N) (orthonormal): fs = (c sqrt N)^gamma / N; mean = c, std = 0.
    (|F|^0.125 is so steep near 0 that float rounding noise would count: the values are exact here.)"""
    y = torch.randint(0, 64, (2, 1, 16, 16)) / 64.0  # dyadic values: y + c - y is exact in float32
    c = 0.25
    _, terms = CGRDNGeneratorLoss(**ALL_ONE, sigma_min=0.1)(y + c, y)
    w = 1 / y.std(dim=(1, 2, 3), unbiased=False).clamp_min(0.1)
    n = 16 * 16
    assert terms["l1"].item() == pytest.approx((w * c).mean().item(), rel=1e-5)
    assert terms["l2"].item() == pytest.approx((w * c**2).mean().item(), rel=1e-5)
    assert terms["mlwt"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["fs"].item() == pytest.approx((c * math.sqrt(n)) ** 0.125 / n, rel=1e-4)
    assert terms["mean"].item() == pytest.approx(c, rel=1e-5)
    assert terms["std"].item() == pytest.approx(0.0, abs=1e-6)


def test_cgrdn_loss_weight_per_example_and_std_term() -> None:
    """Legacy rule: a low-contrast example (std < sigma_min) is weighted by 1/sigma_min, a high-contrast one
    by 1/std; the std term is unweighted."""
    flat = 0.5 + 0.01 * torch.rand(1, 1, 16, 16)
    sharp = torch.rand(1, 1, 16, 16)
    y = torch.cat([flat, sharp])
    loss = CGRDNGeneratorLoss(w_l1=1.0, w_adversarial=0.0, sigma_min=0.1)
    total, _ = loss(y + 0.2, y)
    expected = 0.5 * (0.2 / 0.1 + 0.2 / sharp.std(unbiased=False).item())
    assert total.item() == pytest.approx(expected, rel=1e-5)
    _, terms = CGRDNGeneratorLoss(**ALL_ONE, sigma_min=0.1)(2 * y, y)
    assert terms["std"].item() == pytest.approx(y.std(dim=(1, 2, 3), unbiased=False).mean().item(), rel=1e-5)


def test_cgrdn_loss_weight_relative_to_the_image_level() -> None:
    """Scale-free rule (default): w_y = 1 / max(Std y, 0.1 mean|y|); HAADF-like intensities (fractions of
    the beam, std ~0.004) are weighted by their own std, not by the constant 1/0.1 of the old floor."""
    torch.manual_seed(0)
    flat = 0.5 + 0.01 * torch.rand(1, 1, 16, 16)  # std 0.003 < 0.1 * 0.5: weight 1 / 0.05
    haadf = 0.004 + 0.012 * torch.rand(1, 1, 16, 16)  # std 0.0035 > 0.1 * 0.01
    y = torch.cat([flat, haadf])
    d = 0.001
    _, terms = CGRDNGeneratorLoss(w_l1=1.0, w_adversarial=0.0)(y + d, y)
    level = (y + d).abs().mean(dim=(1, 2, 3))  # the (brighter) prediction's level sets the floor here
    expected = 0.5 * (d / (0.1 * level[0]).item() + d / haadf.std(unbiased=False).item())
    assert terms["l1"].item() == pytest.approx(expected, rel=1e-4)
    # an empty target: the prediction's level bounds the weight (L1 = 1 / 0.1 for any prediction > 0)
    _, terms = CGRDNGeneratorLoss(w_l1=1.0, w_adversarial=0.0)(
        torch.full((1, 1, 8, 8), 3e-4), torch.zeros(1, 1, 8, 8)
    )
    assert terms["l1"].item() == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_cgrdn_loss_invariant_to_the_intensity_unit(c: float) -> None:
    """Rescaling prediction and target together (fractions of the beam -> counts) leaves every term
    unchanged (issue #16)."""
    torch.manual_seed(0)
    y = 0.01 + 0.004 * torch.rand(3, 1, 32, 32)
    y_g = y + 0.002 * torch.randn(3, 1, 32, 32)
    loss = CGRDNGeneratorLoss(**ALL_ONE)
    total, terms = loss(y_g, y)
    total_c, terms_c = loss(c * y_g, c * y)
    assert total_c.item() == pytest.approx(total.item(), rel=1e-4)
    for name in CGRDNGeneratorLoss.TERMS:
        assert terms_c[name].item() == pytest.approx(terms[name].item(), rel=1e-4), name


def test_whitening_transform_checkerboard_and_constant() -> None:
    idx = torch.arange(16)
    board = ((idx[:, None] + idx[None, :]) % 2).float().view(1, 1, 16, 16)
    torch.testing.assert_close(whitening_transform(board, 2, 0.1), 2 * board - 1)
    const = torch.full((1, 1, 16, 16), 3.0)
    torch.testing.assert_close(whitening_transform(const, 8, 0.1), torch.zeros_like(const))
    for s in (2, 4, 8, 16):
        assert whitening_transform(torch.rand(2, 1, 16, 16), s, 0.1).shape == (2, 1, 16, 16)


def test_relativistic_losses() -> None:
    zeros = torch.zeros(2, 1, 4, 4)
    assert relativistic_generator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert relativistic_discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    t = 0.7
    real, fake = torch.full_like(zeros, t), torch.full_like(zeros, -t)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    # D_Rap(y, y_g) = sigmoid(2t), D_Rap(y_g, y) = sigmoid(-2t)
    assert relativistic_discriminator_loss(real, fake).item() == pytest.approx(2 * softplus(-2 * t), rel=1e-6)
    assert relativistic_generator_loss(real, fake).item() == pytest.approx(2 * softplus(2 * t), rel=1e-6)
    # generator term enters L_G with w_adversarial
    y = torch.rand(2, 1, 16, 16)
    total, terms = CGRDNGeneratorLoss(w_l1=0.0, w_adversarial=0.5)(y, y, real, fake)
    assert total.item() == pytest.approx(0.5 * 2 * softplus(2 * t), rel=1e-6)
    assert terms["adversarial"].item() == pytest.approx(2 * softplus(2 * t), rel=1e-6)


def test_fs_loss_has_finite_gradient_at_zero() -> None:
    y = torch.rand(1, 1, 8, 8)
    y_g = y.clone().requires_grad_(True)
    total, _ = CGRDNGeneratorLoss(w_l1=0.0, w_fs=1.0, w_adversarial=0.0)(y_g, y)
    total.backward()
    assert torch.isfinite(y_g.grad).all()


def test_psnr() -> None:
    target = torch.linspace(0, 1, 64).view(1, 1, 8, 8)
    assert psnr(target + 0.1, target).item() == pytest.approx(20.0, rel=1e-5)
    assert psnr(target + 0.1, target, data_range=2.0).item() == pytest.approx(
        20 + 20 * math.log10(2), rel=1e-5
    )


def _weighted_sum(terms: dict[str, torch.Tensor], loss: AIRPILoss) -> float:
    return sum(loss.effective_weights()[name] * terms[name].item() for name in AIRPILoss.TERMS)


def test_balanced_intensity_terms_are_relative_errors() -> None:
    """Zero prediction -> 1, perfect -> 0, psi scaled by a -> (a^2 - 1)^2 (whatever the intensity scale)."""
    probe = _disc_probe()
    wave, _ = _exit_wave(probe)
    wave = wave * math.sqrt(0.5)
    loss = AIRPILoss(normalization="balanced")
    _, zero = loss(torch.zeros_like(wave), wave, probe, torch.zeros(wave.shape))
    assert zero["intensity_r"].item() == pytest.approx(1.0, rel=1e-5)
    assert zero["intensity_k"].item() == pytest.approx(1.0, rel=1e-5)
    a = 1.2
    total, scaled = loss(a * wave, wave, probe, wave.angle())
    assert scaled["intensity_r"].item() == pytest.approx((a**2 - 1) ** 2, rel=1e-4)
    assert scaled["intensity_k"].item() == pytest.approx((a**2 - 1) ** 2, rel=1e-4)
    assert scaled["phase_r"].item() == pytest.approx(0, abs=1e-6)
    assert total.item() == pytest.approx(_weighted_sum(scaled, loss), rel=1e-5)


def test_balanced_phase_terms_ignore_the_phase_where_there_is_no_amplitude() -> None:
    """Random phases in pixels of vanishing true amplitude: chance-level noise for the paper's k-space term,
    nothing for the intensity-weighted one; a random phase everywhere is chance (2) for both."""
    probe = _disc_probe()
    x = torch.arange(probe.shape[-1], dtype=torch.float32)
    smooth = 0.3 * torch.cos(2 * math.pi * x / 16)[:, None] * torch.ones_like(x)[None, :]
    wave = probe * torch.polar(torch.ones_like(smooth), smooth)  # a band-limited exit wave
    wave_k = torch.fft.fft2(wave, norm="ortho")
    dark = wave_k.abs() < 1e-3 * wave_k.abs().amax()
    assert 0.2 < dark.float().mean() < 0.95
    g = torch.Generator().manual_seed(3)
    noise = torch.rand(wave_k.shape, generator=g) * 2 * math.pi
    noisy_k = torch.where(dark, wave_k.abs() * torch.polar(torch.ones_like(noise), noise), wave_k)
    pred = torch.fft.ifft2(noisy_k, norm="ortho")
    _, paper = AIRPILoss()(pred, wave, probe, pred.angle())
    _, balanced = AIRPILoss(normalization="balanced")(pred, wave, probe, pred.angle())
    assert paper["phase_k"].item() > 0.3
    assert balanced["phase_k"].item() < 1e-3
    random_phase = torch.polar(wave.abs(), torch.rand(wave.shape, generator=g) * 2 * math.pi)
    _, chance = AIRPILoss(normalization="balanced")(random_phase, wave, probe, random_phase.angle())
    assert chance["phase_r"].item() == pytest.approx(2.0, abs=0.15)


def test_unknown_normalization_is_named() -> None:
    with pytest.raises(ValueError, match="normalization must be 'paper' or 'balanced', got 'unit'"):
        AIRPILoss(normalization="unit")
