"""Training precision (issue 13, section 3): ``trainer.precision=auto`` resolves to Lightning's ``bf16-mixed``
where the accelerator has bf16 units and to ``32-true`` elsewhere; explicit values pass through; bf16-mixed
training steps stay close to fp32 ones from the same weights and batch.

bf16 autocast runs on any x86 CPU (emulated, slowly, without AVX512-BF16 / AMX), so the accuracy check
runs everywhere; whether auto picks bf16 is tested by monkeypatching :func:`physics.runtime.bf16_supported`.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf
from test_lit_modules import airpi_samples, small

from physics import runtime
from physics.runtime import accelerator_device_type, resolve_training_precision
from training.cli import ConfigError, resolve_trainer_precision

# Relative difference allowed between a bf16-mixed and an fp32 training loss (same weights, batch and
# dropout masks, same step). bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2 % per operation);
# over 5 Adam steps of the small AIRPI below the measured difference was 0.015-0.27 % per step (this CPU,
# emulated bf16, both layouts). 2 % fails a run whose autocast breaks the loss while leaving room for the
# rounding of other bf16 kernels (native AVX512-BF16 / AMX).
LOSS_RTOL = 0.02
STEPS = 5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(precision, accelerator="cpu", channels_last=False):
    return OmegaConf.create(
        {
            "trainer": {"accelerator": accelerator, "precision": precision},
            "model": {"_target_": "models.lightning.AIRPILightning", "channels_last": channels_last},
        }
    )


@pytest.mark.parametrize("supported, expected", [(False, "32-true"), (True, "bf16-mixed")])
def test_auto_resolves_to_bf16_mixed_only_where_bf16_is_native(monkeypatch, supported, expected):
    seen = []
    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: seen.append(device_type) or supported)
    assert resolve_training_precision("auto", "cpu") == expected
    assert resolve_training_precision(None, "cpu") == expected
    cfg = _config("auto")
    assert resolve_trainer_precision(cfg) == expected
    assert cfg.trainer.precision == expected  # in place: config.yaml then records it
    assert cfg.model.channels_last is supported  # NHWC with bf16 only
    assert set(seen) == {"cpu"}


def test_accelerator_names_map_to_torch_device_types(monkeypatch):
    assert [accelerator_device_type(a) for a in ("cpu", "CPU", "gpu", "cuda", "mps")] == [
        "cpu", "cpu", "cuda", "cuda", "mps",
    ]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator_device_type("auto") == "cpu" and accelerator_device_type(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert accelerator_device_type("auto") == "cuda"


def test_gpu_accelerator_asks_about_cuda(monkeypatch):
    seen = []
    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: seen.append(device_type) or True)
    assert resolve_trainer_precision(_config("auto", accelerator="gpu")) == "bf16-mixed"
    assert seen == ["cuda"]


@pytest.mark.parametrize("value", ["32-true", "16-mixed", "64-true", 32, "32"])
def test_explicit_non_bf16_precisions_pass_through_unchanged(monkeypatch, value):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: True)
    cfg = _config(value)
    assert resolve_trainer_precision(cfg) == value
    assert cfg.trainer.precision == value and cfg.model.channels_last is False


def test_explicit_bf16_without_units_warns_and_is_honoured(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: False)
    cfg = _config("bf16-mixed")
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert resolve_trainer_precision(cfg) == "bf16-mixed"
    assert cfg.model.channels_last is True
    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: True)
    with warnings_as_errors():
        assert resolve_trainer_precision(_config("bf16-mixed")) == "bf16-mixed"  # native: no warning


def test_explicit_channels_last_is_kept_in_fp32(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device_type: False)
    cfg = _config("auto", channels_last=True)
    assert resolve_trainer_precision(cfg) == "32-true" and cfg.model.channels_last is True


def test_unknown_precision_is_one_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"^trainer.precision=fp8: must be auto or one of .*bf16-mixed"):
        resolve_trainer_precision(_config("fp8"))


def test_config_without_precision_is_left_to_lightning():
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu"}})
    assert resolve_trainer_precision(cfg) is None and "precision" not in cfg.trainer


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _train_losses(module: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str) -> list[float]:
    """Losses of ``STEPS`` Adam steps on ``batch``, the training step inside Lightning's own precision
    context (``MixedPrecision.forward_context``: CPU bf16 autocast), the backward outside it, as the
    Trainer runs them. The RNG is seeded first, so that every precision draws the same dropout masks."""
    torch.manual_seed(1)
    context = MixedPrecision(precision, "cpu").forward_context if precision == "bf16-mixed" else None
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for i in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with context() if context else contextlib.nullcontext():
            loss = module.training_step(batch, i)
        assert loss.dtype == torch.float32  # the loss itself is fp32 (autocast casts outputs of matmuls)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.filterwarnings("ignore:.*self.log.*")
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_mixed_airpi_steps_match_fp32_from_the_same_weights(channels_last):
    torch.manual_seed(0)
    fp32 = small("airpi", channels_last=channels_last).train()
    bf16 = copy.deepcopy(fp32)
    batch = airpi_samples(n=4, size=32)
    reference = _train_losses(fp32, batch, "32-true")
    mixed = _train_losses(bf16, batch, "bf16-mixed")
    assert len(set(reference)) == STEPS  # the weights move: later steps compare trained weights too
    for step, (a, b) in enumerate(zip(reference, mixed, strict=True)):
        assert abs(b - a) <= LOSS_RTOL * abs(a), (step, reference, mixed)
    assert mixed != reference  # autocast did run in bf16 (identical losses would mean fp32 twice)
    for name, weight in bf16.net.state_dict().items():
        assert weight.dtype == fp32.net.state_dict()[name].dtype  # mixed: the master weights stay fp32
