"""Inference precision: ``precision=auto|bf16|32`` detects bf16 units, falls back to fp32, and bf16 agrees.

bf16 autocast pays only on hardware with bf16 arithmetic (AVX512-BF16 / AMX on x86, compute capability
>= 8 on CUDA); elsewhere auto must mean fp32. The numbers must not depend on the memory layout, and a bf16
forward pass must stay close to fp32 (the issue asks xc within 0.01 on whole scans).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_reconstruct_networks import TINY, _config, folder  # noqa: F401  (fixture)

from evaluation.cli import reconstruct_main
from evaluation.metrics import xc
from evaluation.networks import model_predictor
from physics import runtime
from physics.runtime import check_precision, cpu_bf16_flags, resolve_precision


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_precision_names_are_normalised_and_bad_ones_named():
    assert [check_precision(v) for v in ("auto", None, "BF16", "bfloat16", "32", 32, "fp32")] == [
        "auto", "auto", "bf16", "bf16", "32", "32", "32",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, 32, got 'fp16'"):
        check_precision("fp16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f amx_tile amx_bf16 avx512_bf16\n")
    assert cpu_bf16_flags(str(info)) == ["avx512_bf16", "amx_bf16"]
    info.write_text("processor : 0\nflags : fpu sse2 avx2 fma\n")
    assert cpu_bf16_flags(str(info)) == []
    assert cpu_bf16_flags(str(tmp_path / "absent")) == []


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "32")])
def test_auto_uses_bf16_only_where_supported(monkeypatch, supported, expected):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: supported)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("32", "cpu") == "32"


def test_explicit_bf16_without_units_warns_and_is_honoured(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: False)
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert resolve_precision("bf16", "cpu") == "bf16"


def _module(method: str):
    cls, kwargs = TINY[method]
    torch.manual_seed(0)
    return cls(**kwargs).eval()


def _conv_output_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    return seen


@pytest.mark.parametrize("method, channels", [("airpi", 11), ("chang_unet", 1), ("ptychonn", 1)])
def test_layout_does_not_change_the_answer_and_bf16_stays_close(method, channels):
    torch.manual_seed(1)
    inputs = torch.randn(4, channels, 32, 32)
    reference = model_predictor(_module(method), method, "32", channels_last=False)(inputs)
    nhwc = model_predictor(_module(method), method, "32", channels_last=True)(inputs)
    bf16_module = _module(method)
    dtypes = _conv_output_dtypes(bf16_module)
    bf16 = model_predictor(bf16_module, method, "bf16", channels_last=True)(inputs)
    assert dtypes == {torch.bfloat16}  # every convolution ran in bf16
    pick = (lambda out: out[1]) if method == "ptychonn" else (lambda out: out)  # PtychoNN: the phase
    assert pick(bf16).dtype in (torch.float32, torch.complex64)  # back in fp32 for the stitching
    as_image = (lambda t: np.angle(t.numpy())) if method == "airpi" else (lambda t: t.numpy())
    want, got_nhwc, got_bf16 = (as_image(pick(out)) for out in (reference, nhwc, bf16))
    np.testing.assert_allclose(got_nhwc, want, atol=1e-5)
    assert xc(want, got_bf16) > 0.99


def test_reconstruct_reports_the_precision_and_rejects_a_bad_one(folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "airpi.h5"
    code = reconstruct_main(
        _config(
            folder,
            "method=airpi",
            f"ckpt={folder}/airpi.ckpt",
            f"output={out}",
            "airpi.pixels=32",
            "precision=32",
        )
    )
    assert code == 0
    assert "precision 32" in capsys.readouterr().out
    code = reconstruct_main(
        _config(
            folder, "method=airpi", f"ckpt={folder}/airpi.ckpt", f"output={tmp_path}/x.h5", "precision=fp16"
        )
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["deepstem: error: precision must be one of auto, bf16, 32, got 'fp16'"]
    assert not (tmp_path / "x.h5").exists()
