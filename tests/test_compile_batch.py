"""Inference batch and ``torch.compile`` (issue #17): ``batch_size=auto`` is sized for the device,
``compile=auto|true|false`` compiles the network only where it pays, a compiled network gives the eager
numbers (also for a short last batch, which must not recompile), and a compiler failure falls back with one
warning instead of failing the reconstruction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_precision import _module, _one_thread  # noqa: F401  (the autouse one-thread fixture)
from test_reconstruct_networks import _config, folder  # noqa: F401  (fixture)

from evaluation.cli import reconstruct_main
from evaluation.networks import (
    AUTO_BATCH_SIZE,
    COMPILE_AUTO_MIN_POSITIONS,
    model_predictor,
    resolve_batch_size,
    resolve_compile,
)
from physics.runtime import check_compile


def test_auto_batch_is_per_device_and_bad_batches_are_named():
    assert resolve_batch_size("auto", "cpu") == resolve_batch_size(None, "cpu") == AUTO_BATCH_SIZE["cpu"]
    assert AUTO_BATCH_SIZE["cpu"] == 32
    # the same activation size for other inputs on the CPU: Chang's 32 px takes 4x, a 128 px grid 1/4
    assert resolve_batch_size("auto", "cpu", 32) == 128 and resolve_batch_size("auto", "cpu", 128) == 8
    assert resolve_batch_size("auto", "cuda", 32) == 1024 and resolve_batch_size(5, "cpu", 32) == 5
    assert resolve_batch_size("AUTO", "cuda") == AUTO_BATCH_SIZE["cuda"] == 1024
    assert resolve_batch_size(7, "cpu") == 7 and resolve_batch_size("64", "cuda") == 64
    for bad in (0, -3, "many", 2.5):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer or auto, got {bad!r}"):
            resolve_batch_size(bad, "cpu")


def test_compile_auto_only_on_cuda_and_bad_values_named():
    assert [check_compile(v) for v in (None, "auto", True, False, "on", "OFF", "true", "0")] == [
        "auto", "auto", "true", "false", "true", "false", "true", "false",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="compile must be one of auto, true, false, got 'max'"):
        check_compile("max")
    assert resolve_compile("auto", "cuda") and not resolve_compile("auto", "cpu")
    # auto compiles on CUDA only where the scan is large enough to win back the compilation (measured
    # break-even on an H200: 440,000-710,000 patterns); true / false whatever the size
    assert not resolve_compile("auto", "cuda", 256 * 256)
    assert resolve_compile("auto", "cuda", COMPILE_AUTO_MIN_POSITIONS)
    assert not resolve_compile("auto", "cpu", 10 * COMPILE_AUTO_MIN_POSITIONS)
    assert resolve_compile("true", "cuda", 9) and not resolve_compile("false", "cuda", 10**7)
    assert resolve_compile("true", "cpu") and not resolve_compile(False, "cuda")


def test_compiled_network_matches_eager_and_pads_the_last_batch():
    torch.manual_seed(1)
    inputs = torch.randn(6, 11, 32, 32)
    eager = model_predictor(_module("airpi"), "airpi", "32", channels_last=True)
    compiled = model_predictor(_module("airpi"), "airpi", "32", channels_last=True, compile=True)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    full = compiled(inputs[:4])
    short = compiled(inputs[4:])  # the last, smaller batch of a scan
    assert compiled.compiled(), "torch.compile fell back to eager on this machine"
    assert short.shape == (2, 32, 32) and full.shape == (4, 32, 32)
    # one graph for both calls: the short batch was padded, not recompiled
    assert counters["stats"]["unique_graphs"] == 1
    want = eager(inputs)
    got = torch.cat([full, short])
    np.testing.assert_allclose(np.angle(got.numpy()), np.angle(want.numpy()), atol=2e-4)
    np.testing.assert_allclose(np.abs(got.numpy()), np.abs(want.numpy()), rtol=2e-4, atol=2e-5)


def test_a_compiler_failure_warns_once_and_runs_eagerly(monkeypatch):
    def broken_compile(model, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("InductorError: no working C++ compiler\nsecond line")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    inputs = torch.randn(3, 1, 32, 32)
    want = model_predictor(_module("chang_unet"), "chang_unet", "32")(inputs)
    predict = model_predictor(_module("chang_unet"), "chang_unet", "32", compile=True)
    message = r"torch.compile failed \(RuntimeError: InductorError: no working"
    with pytest.warns(RuntimeWarning, match=message):
        got = predict(inputs)
    assert not predict.compiled()
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second batch: no second warning
        predict(inputs)


def test_reconstruct_uses_the_auto_batch_and_rejects_a_bad_compile(folder, tmp_path, capsys):  # noqa: F811
    import h5py

    out = tmp_path / "airpi.h5"
    code = reconstruct_main(
        _config(folder, "method=airpi", f"ckpt={folder}/airpi.ckpt", f"output={out}", "airpi.pixels=32")
    )
    assert code == 0
    assert ", compiled" not in capsys.readouterr().out  # the CPU: auto does not compile
    with h5py.File(out) as f:
        assert int(f.attrs["info_batch_size"]) == 128  # auto on the CPU for this 32 px network grid
        assert not bool(f.attrs["info_compiled"])
    code = reconstruct_main(
        _config(folder, "method=airpi", f"ckpt={folder}/airpi.ckpt", f"output={tmp_path}/x.h5", "compile=max")
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["deepstem: error: compile must be one of auto, true, false, got 'max'"]
    assert not (tmp_path / "x.h5").exists()


def test_auto_precision_keeps_ptychonn_in_fp32_on_an_engine(monkeypatch):
    """A PtychoNN's phase may vary below bf16's resolution at its offset: on an engine's reconstructor (no
    local first-batch check) ``precision=auto`` keeps it in fp32 even where bf16 is native
    (``precision=bf16`` still forces bf16); AIRPI takes bf16 there."""
    from evaluation.networks import FP32_AUTO_METHODS, reconstruct_with_network
    from evaluation.references import Reconstruction
    from physics import runtime

    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: True)

    def capture(scan, predictor, *, device, progress, **params):
        return Reconstruction(np.zeros((2, 2)), (1.0, 1.0), (0.0, 0.0), "x")

    class Scan:
        data = np.zeros((2, 2, 32, 32), np.float32)
        k_pixel_invA = 0.05

    assert "ptychonn" in FP32_AUTO_METHODS and "airpi" not in FP32_AUTO_METHODS
    used = {}
    for method, precision in (("ptychonn", "auto"), ("ptychonn", "bf16"), ("airpi", "auto")):
        result = reconstruct_with_network(
            Scan(), method, _module(method), {"gmax_invA": 1.0}, device="cpu", precision=precision,
            reconstructor=capture,
        )  # fmt: skip
        used[(method, precision)] = result.info["precision"]
    assert used == {("ptychonn", "auto"): "32", ("ptychonn", "bf16"): "bf16", ("airpi", "auto"): "bf16"}


class _ToyPtychoNN(torch.nn.Module):
    """PtychoNN's interface (amplitude, phase), with phase = offset + scale * conv(inputs)."""

    def __init__(self, offset: float, scale: float) -> None:
        super().__init__()
        self.calls = []  # (batch size, under bf16 autocast) of each forward call
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        self.offset, self.scale = offset, scale

    def forward(self, inputs):
        self.calls.append((len(inputs), torch.is_autocast_enabled("cpu")))
        out = self.conv(inputs)
        return torch.ones_like(out), self.offset + self.scale * out


def test_auto_precision_checks_bf16_against_fp32_on_the_first_batch():
    """bf16 is kept where its phase agrees with fp32 over the first batch, and refused where the phase
    varies below bf16's resolution at its offset (a weak phase object on a 0.23 rad offset)."""
    from evaluation.networks import BF16_CHECK_TOLERANCE, precision_checked_predictor

    inputs = torch.rand(48, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    decisions, calls = {}, {}
    for name, offset, scale in (("strong", 0.0, 1.0), ("weak", 0.23, 1e-3)):
        model = _ToyPtychoNN(offset, scale).eval()
        predict = precision_checked_predictor(model, "ptychonn", check_patterns=16)
        assert predict.chosen() is None
        first = predict(inputs)
        calls[name] = list(model.calls)
        exact = model(inputs)[1][:, 0].detach()
        decisions[name] = (predict.chosen(), predict.check())
        if predict.chosen() == "32":  # the batch that decided is returned in the precision chosen
            torch.testing.assert_close(first[1], exact)
        else:
            assert not torch.equal(first[1], exact) and float((first[1] - exact).abs().max()) < 0.05
        second = predict(inputs)
        torch.testing.assert_close(second[1], first[1])
    assert decisions["strong"][0] == "bf16" and decisions["strong"][1] < BF16_CHECK_TOLERANCE / 5
    assert decisions["weak"][0] == "32" and decisions["weak"][1] > 2 * BF16_CHECK_TOLERANCE
    # fp32 ran on the check's 16 patterns only, and on the whole batch again where it was chosen
    assert calls["strong"] == [(48, True), (16, False)]
    assert calls["weak"] == [(48, True), (16, False), (48, False)]
    # a first batch smaller than the check: its fp32 pass is the answer when bf16 is rejected
    model = _ToyPtychoNN(0.23, 1e-3).eval()
    predict = precision_checked_predictor(model, "ptychonn", check_patterns=16)
    first = predict(inputs[:8])
    assert predict.chosen() == "32" and model.calls == [(8, True), (8, False)]
    torch.testing.assert_close(first[1], model(inputs[:8])[1][:, 0].detach())
