"""The mean-CBED pass (the detector centre every network and reference method finds first) with and without
the read-ahead of :func:`evaluation.references._common.iter_scan_rows`.

``python scripts/bench_mean_cbed.py [--scan 256 256] [--detector 64 64] [--repeats 5] [--threads N]
[--tmpdir DIR]``

Writes the synthetic scan of ``scripts/bench_reconstruct.py`` (``deepstem.4dstem/1``, one HDF5 chunk per
pattern; not timed), opens it as ``reconstruct.py`` does, then times :func:`mean_pattern` serially
(each block read, then summed) and with the next block read by a reader thread during the sum, alternating,
``--repeats`` times each (page cache warm after the first read). Why it matters: on one H200 this pass was
0.66 s of the 1.86 s a warm, compiled AIRPI reconstruction of a 256 x 256 scan took (docs/benchmarks.md
"GPU"). Prints one JSON line: the median seconds of each, ``read_ahead_speedup`` (serial / read-ahead, one
run) and ``identical`` (the two means agree bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, nargs=2, default=[256, 256], help="probe positions Rx Ry")
    parser.add_argument("--detector", type=int, nargs=2, default=[64, 64], help="detector pixels Kx Ky")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    from physics.runtime import configure_threads, resolve_threads

    args.threads = resolve_threads(args.threads)
    configure_threads(args.threads)
    if args.repeats < 1:
        raise SystemExit("bench_mean_cbed: need --repeats >= 1")

    import numpy as np
    from bench_reconstruct import _write_scan

    from evaluation.io import load_4dstem
    from evaluation.references._common import mean_pattern

    with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
        path, write_s, size_MB = _write_scan(Path(folder), tuple(args.scan), tuple(args.detector))
        scan = load_4dstem(path)
        seconds: dict[str, list[float]] = {"serial": [], "read_ahead": []}
        results = {}
        mean_pattern(scan.data, False, read_ahead=False)  # page cache and allocator warm for both
        for _ in range(args.repeats):
            for name in seconds:
                start = time.perf_counter()
                results[name] = mean_pattern(scan.data, False, read_ahead=name == "read_ahead")
                seconds[name].append(time.perf_counter() - start)
        scan.close()
    # Nanosecond rounding, and the ratio of the printed figures, so that the printed ratio is the ratio of
    # the printed seconds even for a tiny scan whose reads take microseconds.
    medians = {name: round(statistics.median(values), 9) for name, values in seconds.items()}
    print(
        json.dumps(
            {
                "benchmark": "mean_cbed",
                "cpus": os.cpu_count(),
                "threads": args.threads,
                "scan": args.scan,
                "detector": args.detector,
                "scan_data_MB": round(size_MB, 1),
                "scan_write_s": round(write_s, 2),
                "repeats": args.repeats,
                "serial_s": medians["serial"],
                "read_ahead_s": medians["read_ahead"],
                "read_ahead_speedup": round(medians["serial"] / medians["read_ahead"], 3),
                "identical": bool(np.array_equal(results["serial"], results["read_ahead"])),
            }
        )
    )


if __name__ == "__main__":
    main()
