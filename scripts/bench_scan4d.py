"""Benchmark of the scan4d and stock_images writers (`python datagen.py simulation=scan4d|stock_images`).

Each section runs the real runner (:func:`datagen.cli.run` on the composed Hydra config, progress bar off)
into a fresh temporary folder and times it end to end: building the specimen / image bank, simulating,
and writing the HDF5 files. Printed: one JSON line per section with

* ``scan4d``: scans/s and probe positions/s (and seconds per scan) for the shipped default scans
  (a twisted MoS2 bilayer and an SrTiO3 [001] slab with a vacancy, 24 x 24 positions each);
* ``stock_images``: samples/s written for the shipped default set (1024 samples, 32 x 32 patterns).

Usage::

    python scripts/bench_scan4d.py                          # both sections, shipped defaults
    python scripts/bench_scan4d.py --sections stock_images --stock-samples 4096
    python scripts/bench_scan4d.py --scan-gpts 16 --device gpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="datagen", overrides=overrides)


def bench_scan4d(scan_gpts: int | None, device: str) -> dict:
    import numpy as np
    from omegaconf import OmegaConf

    from datagen.cli import run

    with tempfile.TemporaryDirectory() as folder:
        overrides = ["simulation=scan4d", f"out_dir={folder}", "progress=false", f"device={device}"]
        if scan_gpts:
            overrides.append(f"simulation.settings.scan_gpts=[{scan_gpts},{scan_gpts}]")
        cfg = _compose(overrides)
        container = OmegaConf.to_container(cfg, resolve=True)
        gpts = container["simulation"]["settings"]["scan_gpts"]
        start = time.perf_counter()
        summary = run(cfg)
        seconds = time.perf_counter() - start
        if summary.failed:
            raise RuntimeError(f"scan4d benchmark: failed scans {summary.failed}")
        positions = summary.written * int(np.prod(gpts))
        return {
            "section": "scan4d",
            "scans": summary.written,
            "scan_gpts": gpts,
            "detector_px": container["simulation"]["settings"]["detector_px"],
            "num_phonons": container["simulation"]["settings"]["num_phonons"],
            "seconds": round(seconds, 2),
            "scans_per_s": round(summary.written / seconds, 4),
            "positions_per_s": round(positions / seconds, 2),
            "seconds_per_scan": round(seconds / summary.written, 2),
        }


def bench_stock(num_samples: int | None, device: str) -> dict:
    from omegaconf import OmegaConf

    from datagen.cli import run

    with tempfile.TemporaryDirectory() as folder:
        overrides = ["simulation=stock_images", f"out_dir={folder}", "progress=false", f"device={device}"]
        if num_samples:
            overrides.append(f"simulation.num_samples={num_samples}")
        cfg = _compose(overrides)
        container = OmegaConf.to_container(cfg, resolve=True)
        start = time.perf_counter()
        summary = run(cfg)
        seconds = time.perf_counter() - start
        size_MB = sum(p.stat().st_size for p in Path(folder).glob("*.h5")) / 1e6
        return {
            "section": "stock_images",
            "samples": summary.written,
            "diffraction_px": container["simulation"]["forward_model"]["diffraction_px"],
            "batch_size": container["simulation"]["batch_size"],
            "seconds_incl_image_bank": round(seconds, 2),
            "samples_per_s": round(summary.written / seconds, 1),
            "samples_per_s_shard_loop": round(summary.written / summary.wall_s, 1),
            "file_MB": round(size_MB, 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections", nargs="+", default=["stock_images", "scan4d"], choices=["stock_images", "scan4d"]
    )
    parser.add_argument(
        "--scan-gpts", type=int, default=None, help="positions per side (default: the config's)"
    )
    parser.add_argument("--stock-samples", type=int, default=None, help="samples (default: the config's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    for section in args.sections:
        if section == "scan4d":
            result = bench_scan4d(args.scan_gpts, args.device)
        else:
            result = bench_stock(args.stock_samples, args.device)
        print(json.dumps({**result, "device": args.device, **machine}), flush=True)


if __name__ == "__main__":
    main()
