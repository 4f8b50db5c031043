"""`scripts/bench_int8.py`: the int8 AIRPI it times is a quantized copy computing the same map."""

from __future__ import annotations

import torch

from models.airpi import AIRPINet
from tests.script_modules import load_script


def test_quantized_blocks_are_int8_and_close_to_fp32():
    script = load_script("bench_int8")
    torch.manual_seed(0)
    net = AIRPINet(filters=4, depth=2, block_convs=1, dropout=0.0, phase_scale_init=1.0).eval()
    x = torch.rand(8, 11, 16, 16)
    qnet = script.quantize_blocks(net, x, "x86")
    assert any("quantized" in type(m).__module__ for m in qnet.encoder[0].modules())  # int8 convolutions
    assert not any("quantized" in type(m).__module__ for m in net.modules())  # the original is kept
    with torch.inference_mode():
        ref, out = net(x), qnet(x)
    assert out.shape == ref.shape
    head = (ref[:, 1] - x[:, 10]).abs().max()  # what the phase head adds to the probe phase
    assert head > 0 and (out[:, 1] - ref[:, 1]).abs().max() < 0.2 * head  # 8-bit error, not another map
