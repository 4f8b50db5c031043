"""Loader throughput next to the AIRPI training step's consumption: would the accelerator starve?

``python scripts/bench_loader.py [--data DIR] [--samples 2048] [--batch 64] [--workers 0 1 2] [--device cpu]``

Without ``--data`` it writes schema-complete kernel shards of the default size (9 x 64 x 64 CBEDs, complex
64 x 64 wave and probe) to a temporary folder; loader speed does not depend on the values. Prints one JSON
line: samples/s of the raw loader (reading only) for each worker count, of loading plus the on-device AIRPI
augmentation, and of the AIRPI training step (forward + backward + Adam) on ``--device``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from datagen import store
from models.lightning import AIRPILightning
from training.augment import AirpiAugmentation
from training.datasets import ChunkBatchSampler, KernelDataset, ShardIndex, collate_batched


def write_synthetic_shards(folder: Path, samples: int, shards: int = 4, k: int = 64) -> None:
    rng = np.random.default_rng(0)
    per_shard = samples // shards
    for s in range(shards):
        n = per_shard
        data = {
            "cbed": rng.random((n, 9, k, k), dtype=np.float32) / (k * k),
            "wave": (rng.normal(size=(n, k, k)) + 1j * rng.normal(size=(n, k, k))).astype(np.complex64) / k,
            "probe": np.full((n, k, k), 1 / k, np.complex64),
            "energy_eV": np.full(n, 200e3),
            "semiangle_mrad": np.full(n, 20.0),
            "gmax_invA": np.full(n, 2.0),
            "step_A": rng.uniform(0.05, 0.3, n),
            "Cs_A": np.full(n, 1e4),
            "defocus_A": np.full(n, 19.4),
            "thickness_A": np.full(n, 10.0),
            "rotation_deg": np.zeros(n),
            "zone_axis": np.tile([0, 0, 1], (n, 1)),
            "num_phonons": np.full(n, 30),
            "seed": np.arange(n) + s * n,
            "source_id": np.array([f"mp-{(s * n + i) // 8}" for i in range(n)]),
            "formula": np.array(["X"] * n),
        }
        store.write(folder / f"shard-{s:05d}-of-{shards:05d}.h5", store.KERNEL, data)


def loader_rate(dataset: KernelDataset, batch: int, workers: int, augment: AirpiAugmentation | None) -> float:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ChunkBatchSampler(dataset, batch, seed=0),
        num_workers=workers,
        collate_fn=collate_batched,
        multiprocessing_context="fork" if workers else None,
    )
    seen, start = 0, None
    for i, item in enumerate(loader):
        if i == 1:  # exclude worker start-up
            start, seen = time.perf_counter(), 0
        if augment is not None:
            augment(item, deterministic=False)
        seen += item["cbed"].shape[0]
    return seen / (time.perf_counter() - start)


def training_rate(batch: int, device: str, steps: int = 5) -> float:
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is a no-op
    module = AIRPILightning().to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=5e-4)
    inputs = torch.randn(batch, 11, 64, 64, device=device)
    inputs[:, 9] = 1 / 64
    inputs[:, 10] = 0
    wave = torch.randn(batch, 64, 64, dtype=torch.complex64, device=device) / 64
    samples = {"inputs": inputs, "wave": wave}
    for i in range(steps + 1):
        if i == 1:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
        optimizer.zero_grad()
        loss = (
            module._step(samples, "train") if hasattr(module, "_step") else module.training_step(samples, 0)
        )
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="folder of kernel shards (default: synthetic)"
    )
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data
        if folder is None:
            folder = Path(tmp)
            write_synthetic_shards(folder, args.samples)
        dataset = KernelDataset(ShardIndex.open(folder))
        result = {
            "benchmark": "loader",
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {args.device}",
            "samples": len(dataset),
            "batch": args.batch,
            "read_samples_per_s": {
                str(w): round(loader_rate(dataset, args.batch, w, None), 1) for w in args.workers
            },
            "read_and_augment_samples_per_s": {
                str(w): round(loader_rate(dataset, args.batch, w, AirpiAugmentation()), 1)
                for w in args.workers
            },
            "airpi_training_step_samples_per_s": round(training_rate(args.batch, args.device), 1),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
