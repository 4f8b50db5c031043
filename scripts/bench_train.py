"""Training throughput (samples/s) of the four LightningModules on synthetic batches.

``python scripts/bench_train.py [--models airpi chang ptychonn cgrdn] [--batch N] [--steps 10] [--warmup 2]
[--device cpu|cuda] [--precision both|32|bf16] [--channels-last auto|on|off] [--compile] [--threads N]
[--cgrdn-tile 256]``

Each model is instantiated from its shipped Hydra config (``conf/model/<name>.yaml`` through
``hydra.utils.instantiate``; ``--compile`` sets the config's own ``compile`` switch, so the network is
wrapped in ``torch.compile`` exactly as in training) and trained on one synthetic batch that satisfies its
batch contract (``BATCH_KEYS`` / ``check_batch``; shapes of ``models/lightning.py`` and the configs: AIRPI
11 x 64 x 64 CBED kernel + probe channels with a complex 64 x 64 exit wave, Chang 1 x 32 x 32, PtychoNN
1 x 64 x 64, CGRDN 1 x 256 x 256 tiles). The batch is built once and already on ``--device``.

What is timed, per step: the module's real ``training_step`` (forward, loss, and for the logging calls
the no-op path of a module without a Trainer), ``backward`` and the optimiser step(s) from the module's
``configure_optimizers`` (plus a per-step LR scheduler where the module asks for one, as the Trainer
would). For the CGRDN GAN (manual optimisation) ``training_step`` itself runs the discriminator update
then the generator update; the two Trainer hooks it calls (``optimizers()`` and ``manual_backward``) are
bound to the module's own two Adam optimisers and ``loss.backward()``. Not timed: data loading and
augmentation (see ``scripts/bench_loader.py``), the ``--warmup`` steps (which include ``torch.compile``'s
compilation; reported as ``warmup_s``), model construction. On CUDA the clock is read after
``torch.cuda.synchronize()``.

Precision (``--precision``, default ``both``): ``32`` is fp32 (Lightning's ``32-true``); ``bf16`` runs the
training step under ``torch.autocast(device, torch.bfloat16)`` (the backward of the automatic-optimisation
modules outside it, as Lightning's ``bf16-mixed`` does); ``both`` measures each model in fp32 and then in
bf16, each from the same initial weights (seed 0) and the same batch. bf16 is measured even where the
hardware has no bf16 units (then torch emulates it, slower than fp32, and ``trainer.precision=auto`` trains
in fp32): the report's ``bf16`` says whether it is ``native`` (:func:`physics.runtime.bf16_supported`),
``"mode": "native" | "emulated"``, which bf16 ``cpu_flags`` the CPU has and what ``trainer.precision=auto``
resolves to here. ``--channels-last auto`` (default) puts the network in NHWC memory order for bf16 only,
as ``train.py`` does with a bf16 precision (``on`` / ``off``: for every precision).

Prints one JSON line: ``{"benchmark": "train", "device", "machine", "torch", "threads", "precision",
"precisions", "bf16": {"native", "mode", "cpu_flags", "auto_precision"}, "channels_last", "compile",
"results": {model: {"samples_per_s", "batch", "input_shape", "params", ... (of the first precision),
"precisions": {"32": {...}, "bf16": {...}}, "bf16_speedup", "bf16_first_loss_rel_diff"}}}``; the last two
(bf16 samples/s over fp32's, and the relative difference of the first step's loss, same weights and batch)
only with both precisions. Per precision: ``samples_per_s``, ``seconds``, ``seconds_per_step``,
``warmup_s``, ``first_loss``, ``last_loss``, ``channels_last``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: benchmark name -> shipped model config (conf/model/<file>.yaml)
CONFIGS = {"airpi": "airpi", "chang": "chang_unet", "ptychonn": "ptychonn", "cgrdn": "cgrdn"}
#: per-model default batch on a CPU: the data configs' batch for Chang (16); AIRPI and PtychoNN train with
#: 64 there, 16 keeps a CPU step short; the CGRDN's 256 x 256 tiles are ~30x the pixels of a 64 x 64 input
DEFAULT_BATCH = {"airpi": 16, "chang": 16, "ptychonn": 16, "cgrdn": 2}
ENERGY_EV, SEMIANGLE_MRAD = 300e3, 20.0


#: --precision choices -> the precisions measured, in order (fp32 first: the reference)
PRECISION_CHOICES = {"both": ("32", "bf16"), "32": ("32",), "bf16": ("bf16",)}


def build_module(name: str, compile_net: bool, channels_last: bool = False) -> torch.nn.Module:
    """The LightningModule of ``name`` from its shipped YAML config (``compile`` and ``channels_last``
    switched as asked)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{CONFIGS[name]}.yaml")
    cfg.compile = bool(compile_net)
    if "channels_last" in cfg:
        cfg.channels_last = bool(channels_last)
    return instantiate(cfg)


def uses_channels_last(precision: str, channels_last: str) -> bool:
    """Whether a ``precision`` run uses NHWC: ``auto`` = for bf16 only (as train.py), ``on`` / ``off``."""
    if channels_last == "auto":
        return precision == "bf16"
    return channels_last == "on"


def _probe_grid(pixels: int) -> torch.Tensor:
    """A real 300 keV, 20 mrad probe on the AIRPI grid (gmax = 2 alpha), complex (K, K)."""
    from physics import probe, wavelength

    gmax = 2 * SEMIANGLE_MRAD * 1e-3 / wavelength(ENERGY_EV)
    return torch.from_numpy(probe(ENERGY_EV, SEMIANGLE_MRAD, pixels, gmax_invA=gmax))


def synthetic_batch(name: str, batch: int, device: torch.device, cgrdn_tile: int) -> dict[str, torch.Tensor]:
    """One batch satisfying the module's contract; values are plausible, speed does not depend on them."""
    g = torch.Generator().manual_seed(0)
    if name == "airpi":
        k = 64
        psi = _probe_grid(k)
        inputs = torch.randn(batch, 11, k, k, generator=g)  # channels 0-8: pre-processed CBEDs (standardised)
        inputs[:, 9] = psi.abs()  # raw probe amplitude and phase, as the data module passes them
        inputs[:, 10] = psi.angle()
        phase = 0.3 * torch.rand(batch, k, k, generator=g)
        out = {"inputs": inputs, "wave": psi * torch.polar(torch.ones_like(phase), phase)}
    elif name == "chang":
        k = 32
        yy, xx = torch.meshgrid(torch.arange(k) - k // 2, torch.arange(k) - k // 2, indexing="ij")
        disc = ((xx**2 + yy**2) <= (k // 4) ** 2).float()[None, None].expand(batch, 1, k, k)
        out = {
            "diffraction": torch.rand(batch, 1, k, k, generator=g).sqrt() / k,
            "phase": math.pi * torch.rand(batch, 1, k, k, generator=g),
            "mask": disc.contiguous(),
        }
    elif name == "ptychonn":
        k = 64
        out = {
            "diffraction": torch.rand(batch, 1, k, k, generator=g),
            "amplitude": 1 + 0.1 * torch.rand(batch, 1, k, k, generator=g),
            "phase": torch.rand(batch, 1, k, k, generator=g),
        }
    elif name == "cgrdn":
        if cgrdn_tile % 2:
            raise ValueError(f"--cgrdn-tile must be even (the CGRDN contract), got {cgrdn_tile}")
        clean = torch.rand(batch, 1, cgrdn_tile, cgrdn_tile, generator=g)
        out = {"distorted": clean + 0.1 * torch.randn(clean.shape, generator=g), "clean": clean}
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(CONFIGS)}")
    return {key: value.to(device) for key, value in out.items()}


def optimizers_of(module: torch.nn.Module) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """Optimisers and the per-step LR schedulers from ``configure_optimizers`` (any return form Lightning
    accepts here: one optimiser, a list, or a dict with ``lr_scheduler``)."""
    config = module.configure_optimizers()
    if isinstance(config, torch.optim.Optimizer):
        return [config], []
    if isinstance(config, dict):
        schedulers = []
        scheduler = config.get("lr_scheduler")
        # epoch-interval schedulers (AIRPI's plateau on val/loss) do not run inside an epoch
        if isinstance(scheduler, dict) and scheduler.get("interval") == "step":
            schedulers.append(scheduler["scheduler"])
        return [config["optimizer"]], schedulers
    return list(config), []


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_function(
    module: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, precision: str
) -> Callable[[int], torch.Tensor]:
    """One training step (forward + loss + backward + optimiser step) of ``module`` on ``batch``."""
    optimizers, schedulers = optimizers_of(module)
    if not module.automatic_optimization:
        # Manual optimisation (the GAN): training_step asks the Trainer for its optimisers and backward.
        # Without a Trainer, bind those two hooks to the module's own optimisers and plain autograd
        # (instance attributes shadow the LightningModule methods for this module only).
        module.optimizers = lambda use_pl_optimizer=True: optimizers  # type: ignore[method-assign]
        module.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)  # type: ignore[method-assign]

        def manual(i: int) -> torch.Tensor:
            with _autocast(device, precision):
                return module.training_step(batch, i)

        return manual

    def automatic(i: int) -> torch.Tensor:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = module.training_step(batch, i)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        return loss.detach()

    return automatic


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    name: str,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    compile_net: bool,
    cgrdn_tile: int,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Time ``steps`` training steps of model ``name`` in ``precision`` (``"32"`` or ``"bf16"``)."""
    torch.manual_seed(0)  # the same initial weights for every precision
    module = build_module(name, compile_net, channels_last).to(device).train()
    data = synthetic_batch(name, batch, device, cgrdn_tile)
    module.check_batch(data)
    step = step_function(module, data, device, precision)
    first: torch.Tensor | None = None  # the first step's loss: from the seed-0 weights, whatever precision
    start = time.perf_counter()
    for i in range(warmup):
        loss = step(i)
        first = loss.detach() if first is None else first
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
        first = loss.detach() if first is None else first  # detach: no copy, no device sync
    _sync(device)
    seconds = time.perf_counter() - start
    first_key = module.BATCH_KEYS[0]
    result: dict[str, Any] = {
        "samples_per_s": round(steps * batch / seconds, 3),
        "batch": batch,
        "input_shape": list(data[first_key].shape[1:]),
        "params": sum(p.numel() for p in module.net.parameters()),
        "steps": steps,
        "seconds": round(seconds, 4),
        "seconds_per_step": round(seconds / steps, 5),
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 3),
        "first_loss": float(first),
        "last_loss": float(loss),
        "precision": precision,
        "channels_last": bool(channels_last),
        "config": f"conf/model/{CONFIGS[name]}.yaml",
    }
    if hasattr(module, "discriminator"):
        result["params_discriminator"] = sum(p.numel() for p in module.discriminator.parameters())
    return result


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bf16_info(device: torch.device) -> dict[str, Any]:
    """Whether bf16 is native on ``device`` (else emulated), the CPU's bf16 flags, and ``trainer.precision``
    ``auto`` here (:func:`physics.runtime.resolve_training_precision`)."""
    from physics.runtime import bf16_supported, cpu_bf16_flags, resolve_training_precision

    native = bf16_supported(device.type)
    return {
        "native": native,
        "mode": "native" if native else "emulated",
        "cpu_flags": cpu_bf16_flags(),
        "auto_precision": resolve_training_precision("auto", device.type),
    }


def compare_precisions(fp32: dict[str, Any], bf16: dict[str, Any]) -> dict[str, float]:
    """bf16 samples/s over fp32's, and the relative difference of their first-step losses (same weights,
    same batch: what bf16 autocast alone changes)."""
    scale = max(abs(fp32["first_loss"]), 1e-30)
    return {
        "bf16_speedup": round(bf16["samples_per_s"] / fp32["samples_per_s"], 4),
        "bf16_first_loss_rel_diff": abs(bf16["first_loss"] - fp32["first_loss"]) / scale,
    }


def _models(values: list[str]) -> Iterator[str]:
    for value in values:
        if value == "chang_unet":  # accept the config/method name too
            value = "chang"
        if value not in CONFIGS:
            raise SystemExit(f"bench_train: unknown model {value!r}; choose from {', '.join(CONFIGS)}")
        yield value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), help="airpi chang ptychonn cgrdn")
    parser.add_argument(
        "--batch", type=int, default=None, help=f"batch for every model (default per model {DEFAULT_BATCH})"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, caches)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision", default="both", choices=list(PRECISION_CHOICES), help="fp32, bf16 autocast, or both"
    )
    parser.add_argument(
        "--channels-last", default="auto", choices=["auto", "on", "off"], help="NHWC: auto = for bf16 only"
    )
    parser.add_argument("--compile", action="store_true", help="the configs' compile switch (torch.compile)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cgrdn-tile", type=int, default=256, help="CGRDN tile side, px (thesis: 256)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("bench_train: --steps must be >= 1 and --warmup >= 0")
    if args.compile and args.warmup < 1:
        raise SystemExit("bench_train: --compile needs --warmup >= 1 (compilation happens in the first step)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train: --device cuda was requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = PRECISION_CHOICES[args.precision]
    # without a Trainer, self.log() warns and does nothing; the benchmark has no Trainer on purpose
    warnings.filterwarnings("ignore", message=".*self.log.*")
    bf16 = bf16_info(device)
    mode = bf16["mode"]
    results = {}
    for name in _models(args.models):
        batch = args.batch or DEFAULT_BATCH[name]
        runs = {}
        for precision in precisions:
            runs[precision] = bench_model(
                name, batch, args.steps, args.warmup, device, precision, args.compile, args.cgrdn_tile,
                channels_last=uses_channels_last(precision, args.channels_last),
            )  # fmt: skip
            print(
                f"bench_train: {name} {precision}: {json.dumps(runs[precision])}", file=sys.stderr, flush=True
            )
        results[name] = {**runs[precisions[0]], "precisions": runs}
        if len(runs) == 2:
            results[name].update(compare_precisions(runs["32"], runs["bf16"]))
            print(
                f"bench_train: {name}: fp32 {runs['32']['samples_per_s']:.4g} samples/s, bf16 ({mode}) "
                f"{runs['bf16']['samples_per_s']:.4g} samples/s ({results[name]['bf16_speedup']:.3g}x)",
                file=sys.stderr,
                flush=True,
            )
    print(
        json.dumps(
            {
                "benchmark": "train",
                "device": str(device),
                "machine": machine_info(device),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "precision": args.precision,
                "precisions": list(precisions),
                "bf16": bf16,
                "channels_last": args.channels_last,
                "compile": bool(args.compile),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
