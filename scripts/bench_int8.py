"""Is int8 (VNNI) AIRPI inference faster than bf16 on this CPU? (issue #17, section 1)

    python scripts/bench_int8.py --ckpt pretrained/airpi_generalist.ckpt --threads 1

The network alone, one run: fp32, bf16 autocast + channels_last (what ``reconstruct.py precision=auto``
does) and post-training static int8 quantization (PyTorch FX, ``--engine`` x86 / onednn) of every
convolution block of the U-Net (encoder, down-sampling and decoder blocks: conv + BN + SiLU; the transposed
convolutions and output heads stay in fp32), calibrated on ``--calibration`` random batches. Prints
patterns/s of each and the largest phase difference of int8 against fp32 on the timed batch. A network
whose SiLU layers fall back to fp32 between int8 convolutions pays a quantize / dequantize round trip per
layer; this script measures whether the int8 convolutions win that back.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation.networks.checkpoints import load_network  # noqa: E402
from models.airpi import AIRPINet  # noqa: E402

#: the convolution blocks of :class:`models.airpi.AIRPINet` that are quantized
BLOCK_GROUPS = ("encoder", "down", "decoder")


def patterns_per_s(run: Callable[[], object], batch: int, repeats: int) -> float:
    """Patterns per second of ``run`` (one batch of ``batch``), after one warm-up call."""
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return repeats * batch / (time.perf_counter() - start)


def quantize_blocks(net: AIRPINet, calibration: torch.Tensor, engine: str) -> AIRPINet:
    """A copy of ``net`` whose convolution blocks are int8 (FX static quantization for ``engine``),
    calibrated by running ``calibration`` through the network."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    qnet = copy.deepcopy(net).eval()
    keys = [(group, i) for group in BLOCK_GROUPS for i in range(len(getattr(qnet, group)))]
    examples: dict[tuple[str, int], torch.Tensor] = {}
    hooks = [
        getattr(qnet, group)[i].register_forward_pre_hook(
            lambda module, args, key=(group, i): examples.setdefault(key, args[0])
        )
        for group, i in keys
    ]
    with torch.no_grad():
        qnet(calibration[:1])
    for hook in hooks:
        hook.remove()
    mapping = get_default_qconfig_mapping(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantization is deprecated in favour of torchao
        for group, i in keys:
            getattr(qnet, group)[i] = prepare_fx(getattr(qnet, group)[i], mapping, (examples[(group, i)],))
        with torch.no_grad():
            qnet(calibration)
        for group, i in keys:
            getattr(qnet, group)[i] = convert_fx(getattr(qnet, group)[i])
    return qnet


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    net = load_network(args.ckpt, "airpi").net.eval().float()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, net.encoder[0][0][0].in_channels, 64, 64, generator=generator)
    calibration = torch.randn(args.calibration * args.batch, *x.shape[1:], generator=generator)
    last = net.to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)

    def bf16() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return last(x_last)

    with torch.inference_mode():
        figures = {"fp32": patterns_per_s(lambda: net(x), args.batch, args.repeats)}
        if torch.backends.mkldnn.is_available():
            figures["bf16"] = patterns_per_s(bf16, args.batch, args.repeats)
    qnet = quantize_blocks(net.to(memory_format=torch.contiguous_format), calibration, args.engine)
    with torch.inference_mode():
        figures["int8"] = patterns_per_s(lambda: qnet(x), args.batch, args.repeats)
        difference = float((qnet(x)[:, 1] - net(x)[:, 1]).abs().max())
    cells = ", ".join(f"{name} {value:.1f}" for name, value in figures.items())
    print(f"{args.threads} thread(s), batch {args.batch}, engine {args.engine}: {cells} patterns/s; "
          f"int8 / bf16 x{figures['int8'] / figures.get('bf16', figures['fp32']):.2f}; "
          f"int8 vs fp32 max |d phase| {difference:.3g} rad")  # fmt: skip
    return {**figures, "max_phase_difference_rad": difference}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="AIRPI checkpoint (Lightning or exported)")
    parser.add_argument("--engine", default="x86", choices=("x86", "onednn", "fbgemm"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=1, help="calibration batches")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
