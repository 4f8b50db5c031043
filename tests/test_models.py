"""Networks (models/airpi.py, chang_unet.py, ptychonn.py, cgrdn.py): sizes, shapes, residuals, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.airpi import AIRPINet, output_to_wave
from models.cgrdn import CGRDN, PatchDiscriminator
from models.chang_unet import ChangUNet
from models.ptychonn import PtychoNN


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# exact counts of the default configurations, and the published approximate figures
@pytest.mark.parametrize(
    ("factory", "exact", "published", "rel_tol"),
    [
        (AIRPINet, 2_129_028, 2.14e6, 0.01),
        (ChangUNet, 9_437_891, 9.4e6, 0.01),
        (PtychoNN, 1_154_210, 1.15e6, 0.01),
        (CGRDN, 7_035_521, 7.04e6, 0.001),
    ],
)
def test_parameter_counts(factory, exact: int, published: float, rel_tol: float) -> None:
    count = n_params(factory())
    assert count == exact
    assert abs(count - published) / published < rel_tol


def test_discriminator_parameter_count_and_patch_size() -> None:
    d = PatchDiscriminator()
    # 2->64, 64->128, 128->256 (4x4 s2), 256->512 (4x4 s1), 512->1, conv biases + instance-norm affine
    convs = (2 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512 * 1) * 16 + (64 + 128 + 256 + 512 + 1)
    norms = 2 * (128 + 256 + 512)
    assert n_params(d) == convs + norms == 2_765_505
    with torch.no_grad():
        assert d(torch.randn(1, 1, 256, 256), torch.randn(1, 1, 256, 256)).shape == (1, 1, 32, 32)
        assert d(torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64)).shape == (2, 1, 8, 8)


def _airpi_inputs(batch: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 11, size, size, generator=g)
    amp = torch.rand(batch, size, size, generator=g)
    phase = (torch.rand(batch, size, size, generator=g) - 0.5) * 4
    x[:, 9], x[:, 10] = amp, phase
    return x, amp, phase


def test_airpi_shapes_and_filters() -> None:
    net = AIRPINet().eval()
    x, _, _ = _airpi_inputs()
    with torch.no_grad():
        assert net(x).shape == (2, 2, 64, 64)
    widths = [block[0][0].out_channels for block in net.encoder] + [net.down[-1][0].out_channels]
    assert widths == [32, 64, 128, 256]
    # bottleneck is 8 x 8 px for a 64 x 64 input
    h = x
    for block, down in zip(net.encoder, net.down, strict=True):
        h = down(block(h))
    assert h.shape[-2:] == (8, 8)
    assert isinstance(net.encoder[0][0][2], nn.SiLU)
    assert net.encoder[0][0][3].p == pytest.approx(0.05)
    assert net.amplitude_head.scale.item() == pytest.approx(1e-4)
    assert net.phase_head.scale.item() == pytest.approx(1e-4)


def test_airpi_residual_equals_probe_with_zero_scales() -> None:
    net = AIRPINet(filters=8, depth=2).eval()
    with torch.no_grad():
        net.amplitude_head.scale.zero_()
        net.phase_head.scale.zero_()
    x, amp, phase = _airpi_inputs(size=32)
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out[:, 0], amp**0.2)
    torch.testing.assert_close(out[:, 1], phase)
    wave = output_to_wave(out)
    torch.testing.assert_close(wave, torch.polar(amp, phase), atol=1e-5, rtol=1e-4)
    # a non-zero scale changes the output: the residual is not all there is
    with torch.no_grad():
        net.phase_head.scale.fill_(1.0)
        assert not torch.allclose(net(x)[:, 1], phase)


def test_airpi_probe_standardisation_is_inside_the_net() -> None:
    """Scaling the raw probe amplitude does not change what the U-Net sees (only the residual)."""
    net = AIRPINet(filters=8, depth=2).eval()
    x, amp, _ = _airpi_inputs(size=32)
    x2 = x.clone()
    x2[:, 9] = 4 * amp
    with torch.no_grad():
        d1 = net(x)[:, 0] - amp**0.2
        d2 = net(x2)[:, 0] - (4 * amp) ** 0.2
    torch.testing.assert_close(d1, d2, atol=1e-6, rtol=1e-5)


def test_chang_shapes_and_blocks() -> None:
    net = ChangUNet().eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    # lowest resolution 2 x 2 with 256 channels
    h = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        for stage in net.encoder:
            h = stage(h)
    assert h.shape == (1, 256, 2, 2)
    block = net.encoder[1][0]
    assert isinstance(block.branch[0], nn.BatchNorm2d) and isinstance(block.branch[1], nn.ReLU)
    assert block.shortcut.kernel_size == (3, 3) and block.shortcut.stride == (2, 2)
    assert block.dropout.p == pytest.approx(0.2)


def test_ptychonn_shapes_and_ranges() -> None:
    net = PtychoNN().eval()
    with torch.no_grad():
        amp, phase = net(10 * torch.randn(3, 1, 64, 64))
    assert amp.shape == phase.shape == (3, 1, 64, 64)
    assert amp.min() >= 0 and amp.max() <= 1
    assert phase.abs().max() <= math.pi


def test_cgrdn_shape_and_standardisation_invariance() -> None:
    torch.manual_seed(0)
    net = CGRDN(features=16, growth=8, rdb_layers=2, rdbs_per_grdb=2, grdbs=2).eval()
    x = 1.0 + torch.rand(2, 1, 64, 64)  # std ~0.29 > 0.1 mean|x|: the floor is inactive
    with torch.no_grad():
        y = net(x)
        assert y.shape == x.shape
        torch.testing.assert_close(net(3.0 * x), 3.0 * y, rtol=1e-4, atol=1e-5)
        # translation: while std >= 0.1 mean|x| for x and x + b (here mean|x + 0.5| ~2, std ~0.29)
        torch.testing.assert_close(net(x + 0.5), y + 0.5, rtol=1e-4, atol=1e-4)


def _tiny_cgrdn(**kwargs: float | None) -> CGRDN:
    torch.manual_seed(0)
    return CGRDN(features=4, growth=2, rdb_layers=1, rdbs_per_grdb=1, grdbs=1, **kwargs).eval()


@pytest.mark.parametrize("c", [1e-3, 1.0, 1e3])
def test_cgrdn_scale_equivariant_at_any_intensity_unit(c: float) -> None:
    """G(c x) = c G(x) for HAADF-like intensities (fractions of the beam: std ~0.004, below the old
    absolute floor 0.1) and a flat image (floor active), at any c > 0 (issue #16)."""
    net = _tiny_cgrdn()
    torch.manual_seed(1)
    haadf = 0.01 + 0.004 * torch.rand(1, 1, 32, 32)
    flat = 0.5 + 1e-4 * torch.rand(1, 1, 32, 32)  # std << 0.1 mean: standardised by 0.1 mean
    x = torch.cat([haadf, flat])
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(net(c * x) / c, y, rtol=1e-5, atol=1e-7)
        assert net(torch.zeros(1, 1, 8, 8)).abs().max() < 1e-30  # an empty image stays empty


def test_cgrdn_legacy_absolute_floor() -> None:
    """std_min set (hyper-parameters of checkpoints made before issue #16): the old rule max(std, std_min)."""
    net = _tiny_cgrdn(std_min=0.1)
    x = 0.004 + 0.01 * torch.rand(1, 1, 32, 32)  # std ~0.003 > 0.1 mean|x| ~0.0009
    _, scale = net.standardisation(x)
    assert scale.item() == pytest.approx(0.1)
    _, new_scale = _tiny_cgrdn().standardisation(x)
    assert new_scale.item() == pytest.approx(x.std(unbiased=False).item(), rel=1e-5)
    with torch.no_grad():  # below std_min the scale is clamped: not equivariant
        assert not torch.allclose(net(0.1 * x), 0.1 * net(x), rtol=1e-3, atol=1e-7)


def test_cgrdn_default_forward_64px() -> None:
    net = CGRDN().eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def _all_parameters_get_gradients(net: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", ["airpi", "chang", "ptychonn", "cgrdn", "discriminator"])
def test_gradients_reach_all_parameters(name: str) -> None:
    torch.manual_seed(0)
    if name == "airpi":
        net = AIRPINet(filters=8, depth=2).train()
        x, _, _ = _airpi_inputs(size=32)
        out = net(x)
        loss = (out**2).mean()
    elif name == "chang":
        net = ChangUNet(channels=(4, 8, 16), dropout=0.0).train()
        loss = (net(torch.randn(2, 1, 16, 16)) ** 2).mean()
    elif name == "ptychonn":
        net = PtychoNN(channels=(8, 16, 32)).train()
        amp, phase = net(torch.rand(2, 1, 32, 32))
        loss = ((amp - 0.3) ** 2).mean() + (phase**2).mean()
    elif name == "cgrdn":
        net = CGRDN(features=8, growth=4, rdb_layers=2, rdbs_per_grdb=2, grdbs=2).train()
        x = torch.rand(2, 1, 32, 32)
        loss = ((net(x) - torch.rand(2, 1, 32, 32)) ** 2).mean()
    else:
        net = PatchDiscriminator(channels=(8, 16, 32, 64)).train()
        loss = (net(torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64)) ** 2).mean()
    _all_parameters_get_gradients(net, loss)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="divisible"):
        AIRPINet(depth=3)(torch.randn(1, 11, 36, 36))
    with pytest.raises(ValueError, match="11"):
        AIRPINet(in_channels=9)
    with pytest.raises(ValueError, match="even"):
        CGRDN(features=8, growth=4, rdb_layers=1, rdbs_per_grdb=1, grdbs=1)(torch.rand(1, 1, 33, 32))
