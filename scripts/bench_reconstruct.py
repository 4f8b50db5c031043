"""Reconstruction throughput (patterns/s) and peak memory of every method on a synthetic 4D-STEM scan.

``python scripts/bench_reconstruct.py [--methods airpi ptychonn chang epie ssb icom ricom] [--scan 128 128]
[--detector 64 64] [--device cpu|cuda] [--threads N] [--epie-iterations 2] [--batch 256] [--scale-check]
[--tmpdir DIR]``

The scan: ``--scan`` probe positions at 0.3 A steps over a weak phase object (Gaussian "atoms" up to 0.5
rad), 300 keV, 20 mrad semi-angle, ``--detector`` pixels covering +-40 mrad (``k_pixel = 2 * 40 mrad /
lambda / K``, zero frequency at pixel ``K // 2``, the ``datagen.scan4d`` convention). CBEDs are
``|FFT(P(r - r_p) T(r))|^2`` with the probe of :func:`physics.probe` Fourier-shifted to each (sub-pixel)
position. The scan is generated row by row and written with :func:`evaluation.io.save_4dstem` to a
temporary ``deepstem.4dstem/1`` file (not timed); every method then runs in a fresh Python process that
opens it lazily with :func:`evaluation.io.load_4dstem`, as ``python reconstruct.py`` does, so the pattern
data themselves are not resident memory of the method unless the method reads them in.

Methods run through :func:`evaluation.cli.run_method` with the shipped defaults of ``conf/reconstruct.yaml``
(ePIE ``iterations`` from ``--epie-iterations``, network ``batch_size`` from ``--batch``). Networks
(``airpi``, ``ptychonn``, ``chang`` = ``chang_unet``) are built from ``conf/model/*.yaml`` with untrained
weights (speed does not depend on them) and stitched by :mod:`evaluation.stitching`, each finding the
detector centre from the mean CBED as by default.

Timed (``seconds``, ``patterns_per_s = positions / seconds``): the whole ``run_method`` call: reading the
file (page cache warm: it was just written), the mean-CBED pass, resampling, inference and stitching or the
reference algorithm. Not timed: process start, imports (the lazily imported SciPy / training modules are
imported first), building the network and one warm-up forward pass on a zero batch. ePIE: a first call with
0 iterations times the pattern preparation (``preparation_s``); ``seconds`` is the call with
``--epie-iterations`` and ``patterns_per_s`` is per iteration: ``positions / ((seconds - preparation_s) /
iterations)``.

Memory, per method in its own process:

* ``peak_memory_MB``: the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` just
  before the call) minus the resident size just before it: what the method itself needs on the host
  (arrays it allocates, blocks read from the file, torch activations). Interpreter, imports, the network
  weights and the open file are the baseline (``baseline_rss_MB``); ``peak_rss_MB`` is the absolute peak.
  Without ``/proc`` (not Linux) the process's ``ru_maxrss`` is used and the baseline is not subtracted.
* ``tracemalloc_peak_MB`` (NumPy methods: ePIE, SSB, iCOM, riCOM): the peak of :mod:`tracemalloc`, which
  sees NumPy and h5py buffers but not torch's CPU allocator, in a second, untimed call (ePIE with one
  iteration: the iterations allocate nothing that grows).
* ``cuda_peak_MB`` (``--device cuda``, networks): ``torch.cuda.max_memory_allocated`` during the call
  minus the memory allocated before it.

``--scale-check`` also runs AIRPI on a scan with twice the positions per side (4x the data) and reports
both peaks: the scan is streamed in blocks of rows (about 128 MB of 3x3 kernels on the 64 px network grid
per block), so the host peak stays about the same while the data grow 4x (only the object accumulator
grows with the field): measured on 2 cores, 16 px detector, batch 64: 32x32 -> 64x64 positions, 396 ->
407 MB. A scan that fits into one
block (fewer than ~900 / Ry rows, e.g. the 6x6 of the tests) is read whole, so there the peak does grow.

Prints one JSON line: ``{"benchmark": "reconstruct", "device", "machine", "torch", "threads", "scan",
"detector", "results": {method: {"patterns_per_s", "peak_memory_MB", "seconds", ...}},
"airpi_scale_check": {...}}``; a method that fails gets ``{"error": ...}`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENERGY_EV = 300e3
SEMIANGLE_MRAD = 20.0
STEP_A = 0.3
DETECTOR_MRAD = 40.0  # detector half-width
NETWORKS = {"airpi": "airpi", "ptychonn": "ptychonn", "chang": "chang_unet"}  # name -> method / config
CONVENTIONAL = ("epie", "ssb", "icom", "ricom")
METHODS = (*NETWORKS, *CONVENTIONAL)
#: network input (channels, pixels) for the warm-up pass: the defaults of conf/reconstruct.yaml
NETWORK_INPUT = {"airpi": (11, 64), "ptychonn": (1, 64), "chang": (1, 32)}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# ------------------------------------------------------------------------------------------------------
# The synthetic scan


class SyntheticScan:
    """Lazily computed CBEDs of a weak phase object: an array-like ``(Rx, Ry, Kx, Ky)`` float32 whose rows
    are simulated when sliced, so writing a large scan never holds it in memory."""

    def __init__(self, scan: tuple[int, int], detector: tuple[int, int], seed: int = 0) -> None:
        import numpy as np
        from scipy import ndimage

        from physics import wavelength

        self.shape = (int(scan[0]), int(scan[1]), int(detector[0]), int(detector[1]))
        self.dtype = np.dtype(np.float32)
        self.gmax_invA = DETECTOR_MRAD * 1e-3 / wavelength(ENERGY_EV)
        self.pixel_A = 1.0 / (2.0 * self.gmax_invA)  # real-space pixel of the detector grid
        self.k_pixel_invA = (2.0 * self.gmax_invA / self.shape[2], 2.0 * self.gmax_invA / self.shape[3])
        # object pixels reached by the last probe window (plus one for the sub-pixel remainder)
        size = [
            math.ceil((n - 1) * STEP_A / self.pixel_A) + k + 2 for n, k in zip(scan, detector, strict=True)
        ]
        rng = np.random.default_rng(seed)
        atoms = (rng.random(size) < self.pixel_A**2 / 3.0) * rng.uniform(0.5, 1.0, size)  # ~1 atom / 3 A^2
        phase = ndimage.gaussian_filter(atoms, 0.4 / self.pixel_A, mode="wrap")
        self.transmission = np.exp(1j * 0.5 * phase / phase.max())

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> Any:
        import numpy as np

        from physics import probe

        _, ry, kx, ky = self.shape
        indices = range(*rows.indices(self.shape[0]))
        out = np.empty((len(indices), ry, kx, ky), dtype=np.float32)
        for n, i in enumerate(indices):
            position = np.stack([np.full(ry, i * STEP_A), np.arange(ry) * STEP_A], -1) / self.pixel_A
            corner = np.floor(position).astype(int)
            fraction = position - corner
            # probe centred at window pixel K // 2 + fraction: the exact sub-pixel position
            probes = probe(
                ENERGY_EV, SEMIANGLE_MRAD, (kx, ky), gmax_invA=self.gmax_invA,
                position_A=(np.array([kx // 2, ky // 2]) + fraction) * self.pixel_A,
            )  # fmt: skip
            windows = np.stack([self.transmission[x : x + kx, y : y + ky] for x, y in corner])
            spectrum = np.fft.fftshift(np.fft.fft2(probes * windows, norm="ortho"), axes=(-2, -1))
            out[n] = np.abs(spectrum) ** 2
        return out

    def write(self, path: Path) -> Path:
        from evaluation.io import save_4dstem

        return save_4dstem(
            path, self, energy_eV=ENERGY_EV, semiangle_mrad=SEMIANGLE_MRAD, scan_step_A=STEP_A,
            k_pixel_invA=self.k_pixel_invA, Cs_A=0.0, defocus_A=0.0,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# Child process: one method


def _status_MB() -> dict[str, float] | None:
    """Current and peak resident set size (MB) from /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            values = {k: float(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in handle)
                      if k in ("VmRSS", "VmHWM")}  # fmt: skip
        return values if len(values) == 2 else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the method's own."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _method_params(method: str, batch: int, epie_iterations: int) -> dict[str, Any]:
    """The method's section of conf/reconstruct.yaml (the CLI's defaults) with the benchmark's overrides."""
    from omegaconf import OmegaConf

    section = OmegaConf.load(ROOT / "conf" / "reconstruct.yaml")[NETWORKS.get(method, method)]
    params = dict(OmegaConf.to_container(section, resolve=True))
    if method in NETWORKS:
        params["batch_size"] = batch
    if method == "epie":
        params["iterations"] = epie_iterations
    return params


def _network(method: str, device: str, batch: int) -> Any:
    """Untrained LightningModule from conf/model/*.yaml, in eval mode, warmed up with one forward pass."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = instantiate(OmegaConf.load(ROOT / "conf" / "model" / f"{NETWORKS[method]}.yaml"))
    model = model.to(device).eval()
    channels, pixels = NETWORK_INPUT[method]
    with torch.inference_mode():
        model(torch.zeros(batch, channels, pixels, pixels, device=device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model


def child(method: str, scan_path: Path, device: str, batch: int, epie_iterations: int) -> dict[str, Any]:
    import importlib
    import tracemalloc

    import numpy as np
    import torch

    from evaluation.cli import run_method
    from evaluation.io import load_4dstem

    # the methods import these on first use: import them now so that the imports are not timed
    for name in ("scipy.signal", "scipy.sparse.linalg", "datagen.stock_images", "training.augment"):
        importlib.import_module(name)

    scan = load_4dstem(scan_path, validate=False)
    positions = scan.num_positions
    network = method in NETWORKS
    model = _network(method, device, batch) if network else None
    run_device = device if network else "cpu"  # the references are NumPy code on the host

    def call(overrides: dict[str, Any] | None = None) -> Any:
        params = {**_method_params(method, batch, epie_iterations), **(overrides or {})}
        return run_method(
            scan, NETWORKS.get(method, method), params, progress=False, model=model, device=run_device
        )

    result: dict[str, Any] = {"device": run_device}
    preparation = 0.0
    if method == "epie":
        start = time.perf_counter()
        call({"iterations": 0})
        preparation = time.perf_counter() - start
    before = _status_MB()
    exact = before is not None and _reset_peak_rss()
    if run_device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    recon = call()
    if run_device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = _status_MB()
    if exact and after is not None:
        result["peak_rss_MB"] = round(after["VmHWM"], 1)
        result["baseline_rss_MB"] = round(before["VmRSS"], 1)
        result["peak_memory_MB"] = round(max(0.0, after["VmHWM"] - before["VmRSS"]), 1)
    else:  # ru_maxrss: KiB on Linux, bytes on macOS; no reset possible, so no baseline is subtracted
        scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
        result["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)
        result["peak_memory_MB"] = result["peak_rss_MB"]
        result["peak_memory_note"] = "ru_maxrss of the whole process (no VmHWM reset available)"
    if run_device.startswith("cuda"):
        result["cuda_peak_MB"] = round((torch.cuda.max_memory_allocated() - cuda_before) / 2**20, 1)
    result["seconds"] = round(seconds, 4)
    if method == "epie":
        iteration_s = (seconds - preparation) / epie_iterations
        if not iteration_s > 0:  # noise at tiny sizes: fall back to the whole call
            iteration_s = seconds / epie_iterations
        result.update(
            patterns_per_s=round(positions / iteration_s, 2),
            preparation_s=round(preparation, 4),
            seconds_per_iteration=round(iteration_s, 4),
            iterations=epie_iterations,
        )
    else:
        result["patterns_per_s"] = round(positions / seconds, 2)
    if "patterns_per_s" in recon.info:  # the stitching's own count (from after the geometry set-up)
        result["patterns_per_s_reported"] = round(float(recon.info["patterns_per_s"]), 2)
    result["finite_output"] = bool(np.all(np.isfinite(recon.phase)))
    del recon  # not part of the tracemalloc pass below
    if not network:
        tracemalloc.start()
        call({"iterations": 1} if method == "epie" else None)
        result["tracemalloc_peak_MB"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    result["positions"] = positions
    scan.close()
    return result


# ------------------------------------------------------------------------------------------------------
# Parent process


def run_child(method: str, scan_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child", method, "--scan-path", str(scan_path), "--device", args.device,
        "--batch", str(args.batch), "--epie-iterations", str(args.epie_iterations),
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"bench_reconstruct: {method} {scan_path.name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def _methods(values: list[str]) -> list[str]:
    names = []
    for value in values:
        value = "chang" if value == "chang_unet" else value
        if value not in METHODS:
            raise SystemExit(f"bench_reconstruct: unknown method {value!r}; choose from {', '.join(METHODS)}")
        names.append(value)
    return names


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _write_scan(folder: Path, scan: tuple[int, int], detector: tuple[int, int]) -> tuple[Path, float, float]:
    """Write the synthetic scan; returns its path, the write time (s) and the data size (MB)."""
    start = time.perf_counter()
    synthetic = SyntheticScan(scan, detector)
    path = synthetic.write(folder / f"scan_{scan[0]}x{scan[1]}_{detector[0]}x{detector[1]}.h5")
    size_MB = math.prod(synthetic.shape) * 4 / 2**20
    return path, time.perf_counter() - start, size_MB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=" ".join(METHODS))
    parser.add_argument("--scan", type=int, nargs=2, default=[128, 128], help="probe positions Rx Ry")
    parser.add_argument("--detector", type=int, nargs=2, default=[64, 64], help="detector pixels Kx Ky")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="for the networks")
    parser.add_argument("--threads", type=int, default=None, help="torch / BLAS threads per method")
    parser.add_argument("--epie-iterations", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="network batch (conf/reconstruct.yaml: 256)")
    parser.add_argument("--scale-check", action="store_true", help="AIRPI also on 2x the positions per side")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the scan files go (default: TMPDIR)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--scan-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        # before NumPy / torch are imported (here and, through the environment, in every child)
        for name in THREAD_VARIABLES:
            os.environ[name] = str(args.threads)
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = child(args.child, args.scan_path, args.device, args.batch, args.epie_iterations)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.epie_iterations < 1 or args.batch < 1 or min(args.scan) < 3 or min(args.detector) < 8:
        raise SystemExit(
            "bench_reconstruct: need --epie-iterations >= 1, --batch >= 1, --scan >= 3, --detector >= 8"
        )
    methods = _methods(args.methods)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_reconstruct: --device cuda was requested but CUDA is not available")
    scan, detector = tuple(args.scan), tuple(args.detector)
    report: dict[str, Any] = {
        "benchmark": "reconstruct",
        "device": args.device,
        "machine": machine_info(args.device),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "scan": list(scan),
        "detector": list(detector),
        "calibration": {
            "energy_eV": ENERGY_EV,
            "semiangle_mrad": SEMIANGLE_MRAD,
            "scan_step_A": STEP_A,
            "detector_half_width_mrad": DETECTOR_MRAD,
        },
        "batch": args.batch,
        "epie_iterations": args.epie_iterations,
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
        path, write_s, data_MB = _write_scan(Path(folder), scan, detector)
        report["scan_data_MB"] = round(data_MB, 3)
        report["scan_write_s"] = round(write_s, 2)
        for method in methods:
            results[method] = run_child(method, path, args)
        report["results"] = results
        if args.scale_check:
            small = results.get("airpi") or run_child("airpi", path, args)
            path.unlink()  # only one scan file on disk at a time
            large_scan = (2 * scan[0], 2 * scan[1])
            large_path, _, large_MB = _write_scan(Path(folder), large_scan, detector)
            large = run_child("airpi", large_path, args)
            runs = (small, large)
            check: dict[str, Any] = {
                "scans": [list(scan), list(large_scan)],
                "data_MB": [round(data_MB, 3), round(large_MB, 3)],
                "peak_memory_MB": [r.get("peak_memory_MB") for r in runs],
                "peak_rss_MB": [r.get("peak_rss_MB") for r in runs],
                "patterns_per_s": [r.get("patterns_per_s") for r in runs],
            }
            if all("peak_memory_MB" in r for r in runs) and small["peak_memory_MB"] > 0:
                check["peak_memory_ratio"] = round(large["peak_memory_MB"] / small["peak_memory_MB"], 3)
            if args.device == "cuda":
                check["cuda_peak_MB"] = [r.get("cuda_peak_MB") for r in runs]
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                check["error"] = "; ".join(errors)
            report["airpi_scale_check"] = check
    print(json.dumps(report))
    failed = [m for m, r in results.items() if "error" in r] + (
        ["airpi_scale_check"] if "error" in report.get("airpi_scale_check", {}) else []
    )
    if failed:
        print(f"bench_reconstruct: failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
