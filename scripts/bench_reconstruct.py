"""Reconstruction throughput (patterns/s) and peak memory of every method on a synthetic 4D-STEM scan.

``python scripts/bench_reconstruct.py [--methods airpi ptychonn chang epie ssb icom ricom] [--scan 128 128]
[--detector 64 64] [--device cpu|cuda] [--threads N] [--epie-iterations 2] [--batch N]
[--precisions 32 bf16] [--channels-last on|off|both] [--network-min-s 1.0] [--airpi-ckpt PATH]
[--scale-check] [--read-ahead-check] [--compile off|both] [--batch-sweep 16 32 64] [--warm-repeat]
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
weights (speed does not depend on them; ``--airpi-ckpt`` loads AIRPI's from a checkpoint instead, e.g.
``pretrained/airpi_reference.ckpt``, trained for this geometry, so that the bf16 agreement below is that of
a working network) and stitched by :mod:`evaluation.networks`, each finding the detector centre from the
mean CBED as by default.

Threads (``--threads``, default every core this process may use, :func:`physics.runtime.resolve_threads`):
set deliberately in every process, torch's intra-op pool through :func:`physics.runtime.configure_threads`
and the BLAS / OpenMP pools through ``OMP_NUM_THREADS`` and friends (overriding the caller's).

Precision and layout (networks, issue #17): each network is measured, in its one process and on the same
scan, once per configuration: every ``--precisions`` entry (``32`` = fp32, ``bf16`` = bf16 autocast with
fp32 outputs, :func:`evaluation.networks.model_predictor`) in the primary layout (``--channels-last on`` or
``both``: NHWC weights and inputs; ``off``: NCHW), and with ``both`` fp32 also in NCHW; the fp32 run in the
primary layout comes first and is the reference. bf16 is requested explicitly, so it runs even where the
hardware has no bf16 units (emulated, slower; ``precision=auto`` would use fp32 there): the report's
``bf16`` says whether it is ``native`` (:func:`physics.runtime.bf16_supported`), which of the CPU's
``cpu_flags`` allow it (avx512_bf16, amx_bf16) and what ``auto_precision`` resolves to. Per configuration:

* ``patterns_per_s`` end to end (the ``run_method`` call, below) and the precision the stitching used;
* ``network_patterns_per_s``: the network alone, the predictor of ``model_predictor`` (forward pass under
  ``inference_mode`` and the output conversion, e.g. AIRPI's complex wave) on a uniform random batch of
  ``--batch`` inputs of the method's shape (``NETWORK_INPUT``), one untimed warm-up pass and then passes
  until ``--network-min-s`` seconds have passed (at least one): ``batch * passes / seconds``;
* for every run but the reference: ``xc_vs_fp32`` (:func:`evaluation.metrics.xc` of its phase image
  against the reference's, no registration), ``max_abs_phase_diff_rad`` and ``reference_phase_std_rad``
  (untrained networks give nearly flat phases, where rounding alone moves xc far from 1: read xc there
  against the spread).

With both AIRPI and SSB in the run, ``airpi_vs_ssb`` gives AIRPI's end-to-end patterns/s over SSB's per
precision and whether it meets issue #17's goal (>= 5 %, ``AIRPI_SSB_GOAL``).

Timed (``seconds``, ``patterns_per_s = positions / seconds``): the whole ``run_method`` call: reading the
file (page cache warm: it was just written), the mean-CBED pass, resampling, inference and stitching or the
reference algorithm. Not timed: process start, imports (the lazily imported SciPy / training modules are
imported first), building the network, one warm-up forward pass on a zero batch and, per configuration,
the network-alone passes just before the call (so its kernels are warm). ePIE: a first call with
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

``--scale-check`` runs AIRPI at its reference configuration only.

``--warm-repeat`` (networks): every configuration's end-to-end call once more right after the timed one,
in the same process: ``"warm": {"patterns_per_s", "seconds", "recompiled"}``, what a second scan (or a live
detector's next scan) gets once the network is compiled and the kernels are warm (a compiled
configuration's timed call includes its compilation; ``recompiled`` says whether the repeat compiled again,
from torch's dynamo counters); and, where the method finds the detector centre from the mean CBED
(``detector_centre_px`` in its info), a third call with that centre given (``detector_centre_px=[x, y]``,
as with a calibrated detector): ``"warm_centre_given": {"patterns_per_s", "seconds"}``, the pipeline without
its first read of the whole scan, and its ``max_abs_phase_diff_rad`` from the timed call (0 for eager fp32:
the centre found, given back).

``--read-ahead-check`` (networks): after the configurations, the first one end to end again with the
pattern read-ahead off (``_PatternStream.read_ahead = False``: each block of raw rows read in place) and
then on (the default: the next block is read by a reader thread during inference), in the same process:
``"read_ahead": {"off_patterns_per_s", "on_patterns_per_s", "on_over_off", "max_abs_phase_diff_rad"}``.

Prints one JSON line: ``{"benchmark": "reconstruct", "device", "machine" (with "cpu_model",
"cpu_simd_flags"), "torch", "threads", "scan", "detector", "precisions", "channels_last", "bf16":
{"native", "cpu_flags", "auto_precision"}, "results": {method: {"patterns_per_s", "peak_memory_MB",
"seconds", ...}}, "airpi_vs_ssb": {...}, "airpi_scale_check": {...}}``. A network's top-level fields are
those of its reference run (the format before precisions), plus ``"weights"``, ``"precisions": {"32":
run, "bf16": run}`` (primary layout), with ``--channels-last both`` ``"layouts": {"nhwc": run, "nchw":
run}`` (fp32), and with ``--compile both`` ``"compiled": {"32": run, "bf16": run}`` (primary layout,
``torch.compile``: its ``network_warmup_s`` is the compilation, its end-to-end ``seconds`` include one; in
``airpi_vs_ssb`` as ``"32/compiled"``, ``"bf16/compiled"``), and with ``--batch-sweep B ...``
``"batch_sweep": {precision: {B: network patterns/s}}``. A method that fails gets ``{"error": ...}``
and the exit status is 1.
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
from collections.abc import Sequence
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
#: --channels-last: on = NHWC, off = NCHW, both = fp32 in both (bf16 in NHWC)
LAYOUT_MODES = ("on", "off", "both")
#: /proc/cpuinfo flags recorded in ``machine.cpu_simd_flags`` (those that decide fp32 / bf16 speed)
SIMD_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip
#: issue #17: AIRPI end-to-end at >= 5 % of SSB's patterns/s
AIRPI_SSB_GOAL = 0.05


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


def _network(method: str, device: str, batch: int, ckpt: Path | None = None) -> Any:
    """The LightningModule of ``method`` in eval mode on ``device``, warmed up with one forward pass.

    Untrained weights from ``conf/model/*.yaml`` (seed 0), or those of the checkpoint ``ckpt``.
    """
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if ckpt is not None:
        from evaluation.networks import load_network

        model = load_network(ckpt, NETWORKS[method], device)
    else:
        torch.manual_seed(0)
        model = instantiate(OmegaConf.load(ROOT / "conf" / "model" / f"{NETWORKS[method]}.yaml"))
        model = model.to(device).eval()
    channels, pixels = NETWORK_INPUT[method]
    with torch.inference_mode():
        model(torch.zeros(batch, channels, pixels, pixels, device=device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model


def configurations(precisions: Sequence[str], channels_last: str) -> list[tuple[str, bool]]:
    """The ``(precision, channels_last)`` pairs a network is measured at, the reference first.

    Every precision in ``precisions`` (``"32"``, ``"bf16"``) at the primary layout (NHWC for
    ``channels_last`` ``on`` and ``both``, NCHW for ``off``); with ``both`` fp32 also in NCHW, right after
    fp32 NHWC.
    """
    if channels_last not in LAYOUT_MODES:
        raise ValueError(f"channels_last must be one of {', '.join(LAYOUT_MODES)}, got {channels_last!r}")
    primary = channels_last != "off"
    pairs = [(precision, primary) for precision in precisions]
    if channels_last == "both" and "32" in precisions:
        pairs.insert(pairs.index(("32", True)) + 1, ("32", False))
    return pairs


def _label(precision: str, channels_last: bool) -> str:
    return f"{precision}/{'nhwc' if channels_last else 'nchw'}"


def network_rate(
    model: Any,
    method: str,
    precision: str,
    channels_last: bool,
    batch: int,
    device: str,
    min_s: float,
    compile: bool = False,
) -> dict[str, Any]:
    """Network-alone patterns/s: the predictor of :func:`evaluation.networks.model_predictor` (forward
    pass under ``inference_mode``, bf16 autocast for ``precision="bf16"``, NHWC where ``channels_last``, and
    the output conversion: AIRPI's complex wave) on a uniform random batch of ``batch`` inputs of the
    method's shape (:data:`NETWORK_INPUT`) on ``device``. One untimed warm-up pass, then passes until at
    least ``min_s`` seconds have passed (at least one); ``network_patterns_per_s = batch * passes / s``.
    With ``compile`` the predictor is :func:`torch.compile`-d; its warm-up pass (the compilation) is
    reported as ``network_warmup_s``.
    """
    import torch

    from evaluation.networks import model_predictor

    channels, pixels = NETWORK_INPUT[method]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(batch, channels, pixels, pixels, generator=generator).to(device)
    predict = model_predictor(model, NETWORKS[method], precision, channels_last, compile=compile)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    warmup_start = time.perf_counter()
    predict(inputs)
    sync()
    warmup_s = time.perf_counter() - warmup_start
    passes = 0
    start = time.perf_counter()
    while True:
        predict(inputs)
        sync()
        passes += 1
        elapsed_s = time.perf_counter() - start
        if elapsed_s >= min_s:
            break
    return {
        "network_patterns_per_s": round(batch * passes / elapsed_s, 2),
        "network_batch": batch,
        "network_passes": passes,
        "network_seconds": round(elapsed_s, 4),
        "network_warmup_s": round(warmup_s, 3),
    }


def _measure(call: Any, run_device: str) -> tuple[Any, dict[str, Any]]:
    """Run ``call()`` once; returns its result and ``seconds`` plus the memory fields of the module doc."""
    import torch

    result: dict[str, Any] = {}
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
    return recon, result


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _agreement(reference_rad: Any, test_rad: Any) -> dict[str, Any]:
    """How far the phase image ``test_rad`` (rad) is from ``reference_rad`` of the same scan.

    ``xc_vs_fp32``: :func:`evaluation.metrics.xc` (no registration; None, with ``xc_error``, where
    undefined); ``max_abs_phase_diff_rad``; ``reference_phase_std_rad``: the spread of the reference, the
    scale the difference is to be read against (untrained networks give nearly flat phases, where rounding
    alone moves xc far from 1).
    """
    import numpy as np

    from evaluation.metrics import xc

    if reference_rad.shape != test_rad.shape:
        return {"xc_vs_fp32": None, "xc_error": f"shapes {reference_rad.shape} != {test_rad.shape}"}
    out: dict[str, Any] = {}
    try:
        out["xc_vs_fp32"] = round(xc(reference_rad, test_rad), 6)
    except ValueError as err:  # a constant image
        out.update(xc_vs_fp32=None, xc_error=str(err))
    out["max_abs_phase_diff_rad"] = _significant(float(np.max(np.abs(test_rad - reference_rad))))
    out["reference_phase_std_rad"] = _significant(float(np.std(reference_rad)))
    return out


#: the fields of a network's reference run repeated at the method's top level (the format before bf16)
TOP_LEVEL_FIELDS = (
    "peak_rss_MB", "baseline_rss_MB", "peak_memory_MB", "peak_memory_note", "cuda_peak_MB", "seconds",
    "patterns_per_s", "patterns_per_s_reported", "precision", "channels_last",
)  # fmt: skip


def child(
    method: str,
    scan_path: Path,
    device: str,
    batch: int,
    epie_iterations: int,
    precisions: Sequence[str] = ("32", "bf16"),
    channels_last: str = "on",
    network_min_s: float = 1.0,
    ckpt: Path | None = None,
    read_ahead_check: bool = False,
    compile: str = "off",
    batch_sweep: Sequence[int] = (),
    warm_repeat: bool = False,
) -> dict[str, Any]:
    """Measure ``method`` on the scan file ``scan_path`` in this process; returns its result dict.

    Networks run once per :func:`configurations` pair of ``precisions`` x ``channels_last`` (on | off |
    both), each with its :func:`network_rate` and a timed ``run_method`` call, uncompiled; with ``compile``
    ``both`` every precision runs again compiled (``torch.compile``) in the primary layout, its end-to-end
    time including the compilation (``compiled``); ``batch_sweep``: the network alone at each of these
    batches and every precision, primary layout (``batch_sweep``: {precision: {batch: patterns/s}});
    conventional methods once.
    """
    import importlib
    import tracemalloc

    import numpy as np
    import torch

    from evaluation.cli import run_method
    from evaluation.io import load_4dstem

    # the methods import these on first use: import them now so that the imports are not timed
    for name in ("scipy.signal", "scipy.sparse.linalg", "datagen.stock_images", "models.inputs"):
        importlib.import_module(name)

    scan = load_4dstem(scan_path, validate=False)
    positions = scan.num_positions
    network = method in NETWORKS
    model = _network(method, device, batch, ckpt) if network else None
    run_device = device if network else "cpu"  # the references are NumPy code on the host

    def call(
        overrides: dict[str, Any] | None = None,
        precision: str = "32",
        layout: bool = True,
        compiled: bool = False,
    ) -> Any:
        params = {**_method_params(method, batch, epie_iterations), **(overrides or {})}
        return run_method(
            scan, NETWORKS.get(method, method), params, progress=False, model=model, device=run_device,
            precision=precision, channels_last=layout, compile=compiled,
        )  # fmt: skip

    result: dict[str, Any] = {"device": run_device}
    if network:
        runs: dict[str, dict[str, Any]] = {}
        phases: dict[str, Any] = {}
        pairs = configurations(precisions, channels_last)
        runs_to_make = [(precision, layout, False) for precision, layout in pairs]
        if compile == "both":
            runs_to_make += [(precision, channels_last != "off", True) for precision in precisions]
        for precision, layout, compiled in runs_to_make:
            # model_predictor converts the weights to NHWC but never back: set the layout of this run
            model.to(memory_format=torch.channels_last if layout else torch.contiguous_format)
            entry: dict[str, Any] = {"precision_requested": precision, "channels_last": layout}
            entry.update(
                network_rate(model, method, precision, layout, batch, run_device, network_min_s, compiled)
            )
            recon, measured = _measure(
                lambda p=precision, c=layout, k=compiled: call(precision=p, layout=c, compiled=k), run_device
            )
            entry.update(measured)
            entry["patterns_per_s"] = round(positions / measured["seconds"], 2)
            entry["precision"] = recon.info.get("precision", precision)
            entry["compiled"] = bool(recon.info.get("compiled", False))
            if "patterns_per_s" in recon.info:
                entry["patterns_per_s_reported"] = round(float(recon.info["patterns_per_s"]), 2)
            entry["finite_output"] = bool(np.all(np.isfinite(recon.phase)))
            if warm_repeat:
                entry.update(_warm_repeat(call, recon, precision, layout, compiled, positions, run_device))
            label = _label(precision, layout) + ("/compiled" if compiled else "")
            phases[label] = np.asarray(recon.phase, dtype=np.float64)
            runs[label] = entry
            del recon
        primary = channels_last != "off"
        reference = _label("32", primary)
        for label, entry in runs.items():
            if label != reference and reference in phases:
                entry.update(_agreement(phases[reference], phases[label]))
        first = runs[_label(*pairs[0])]
        result.update({key: first[key] for key in TOP_LEVEL_FIELDS if key in first})
        result["finite_output"] = all(entry["finite_output"] for entry in runs.values())
        result["weights"] = str(ckpt) if ckpt is not None else "untrained"
        result["precisions"] = {precision: runs[_label(precision, primary)] for precision in precisions}
        if channels_last == "both" and "32" in precisions:
            result["layouts"] = {"nhwc": runs["32/nhwc"], "nchw": runs["32/nchw"]}
        if compile == "both":
            result["compiled"] = {p: runs[_label(p, primary) + "/compiled"] for p in precisions}
        if batch_sweep:
            model.to(memory_format=torch.channels_last if primary else torch.contiguous_format)
            result["batch_sweep"] = {
                p: {
                    str(b): network_rate(model, method, p, primary, b, run_device, network_min_s)[
                        "network_patterns_per_s"
                    ]
                    for b in batch_sweep
                }
                for p in precisions
            }
        if read_ahead_check:
            result["read_ahead"] = _read_ahead_check(call, pairs[0], positions, run_device)
        result["positions"] = positions
        scan.close()
        return result

    preparation = 0.0
    if method == "epie":
        start = time.perf_counter()
        call({"iterations": 0})
        preparation = time.perf_counter() - start
    recon, measured = _measure(call, run_device)
    result.update(measured)
    seconds = measured["seconds"]
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
    tracemalloc.start()
    call({"iterations": 1} if method == "epie" else None)
    result["tracemalloc_peak_MB"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    result["positions"] = positions
    scan.close()
    return result


# ------------------------------------------------------------------------------------------------------
# Parent process


def _dynamo_compilations() -> int:
    """Frames torch.compile has compiled so far in this process (0 where the counter is unavailable)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(sum(counters["stats"].get(key, 0) for key in ("unique_graphs",)))


def _warm_repeat(
    call: Any, recon: Any, precision: str, layout: bool, compiled: bool, positions: int, device: str
) -> dict[str, Any]:
    """The end-to-end call again (``warm``) and, where the centre was found from the data, with it given."""
    before = _dynamo_compilations()
    _, again = _measure(lambda: call(precision=precision, layout=layout, compiled=compiled), device)
    out: dict[str, Any] = {
        "warm": {
            "patterns_per_s": round(positions / again["seconds"], 2),
            "seconds": again["seconds"],
            "recompiled": _dynamo_compilations() > before,
        }
    }
    centre = recon.info.get("detector_centre_px")
    if centre is not None:
        overrides = {"detector_centre_px": [float(v) for v in centre]}
        same, given = _measure(
            lambda: call(overrides, precision=precision, layout=layout, compiled=compiled), device
        )
        out["warm_centre_given"] = {
            "patterns_per_s": round(positions / given["seconds"], 2),
            "seconds": given["seconds"],
            # the centre it found, given back: the same reconstruction (only the mean-CBED pass is skipped)
            "max_abs_phase_diff_rad": _agreement(recon.phase, same.phase).get("max_abs_phase_diff_rad"),
        }
    return out


def _read_ahead_check(call: Any, pair: tuple[str, bool], positions: int, device: str) -> dict[str, Any]:
    """The first configuration end to end with the pattern read-ahead off, then on (one after the other,
    same process): patterns/s of each, their ratio, and the largest phase difference (0: same numbers)."""
    import numpy as np

    from evaluation.networks.geometry import _PatternStream

    rates, phases = {}, {}
    try:
        for mode in ("off", "on"):
            _PatternStream.read_ahead = mode == "on"
            recon, measured = _measure(lambda: call(precision=pair[0], layout=pair[1]), device)
            rates[mode] = round(positions / measured["seconds"], 2)
            phases[mode] = np.asarray(recon.phase, dtype=np.float64)
    finally:
        _PatternStream.read_ahead = True
    return {
        "off_patterns_per_s": rates["off"],
        "on_patterns_per_s": rates["on"],
        "on_over_off": round(rates["on"] / rates["off"], 3),
        "max_abs_phase_diff_rad": float(np.max(np.abs(phases["on"] - phases["off"]))),
    }


def run_child(
    method: str, scan_path: Path, args: argparse.Namespace, reference_only: bool = False
) -> dict[str, Any]:
    """``method`` in a fresh process; ``reference_only``: a network at its first configuration only."""
    precisions = args.precisions[:1] if reference_only else args.precisions
    layout = ("on" if args.channels_last == "both" else args.channels_last) if reference_only else None
    command = [
        sys.executable, __file__, "--child", method, "--scan-path", str(scan_path), "--device", args.device,
        "--batch", str(args.batch), "--epie-iterations", str(args.epie_iterations),
        "--threads", str(args.threads), "--precisions", *precisions,
        "--channels-last", layout or args.channels_last, "--network-min-s", str(args.network_min_s),
    ]  # fmt: skip
    if method == "airpi" and args.airpi_ckpt is not None:
        command += ["--airpi-ckpt", str(args.airpi_ckpt)]
    if args.read_ahead_check and not reference_only:
        command += ["--read-ahead-check"]
    if args.warm_repeat and not reference_only:
        command += ["--warm-repeat"]
    if not reference_only:
        command += ["--compile", args.compile]
        if args.batch_sweep:
            command += ["--batch-sweep", *map(str, args.batch_sweep)]
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


def _precisions(values: list[str]) -> list[str]:
    """``--precisions`` normalised (``fp32`` -> ``32``, ``bfloat16`` -> ``bf16``), duplicates dropped."""
    from physics.runtime import check_precision

    names: list[str] = []
    for value in values:
        try:
            name = check_precision(value)
        except ValueError as err:
            raise SystemExit(f"bench_reconstruct: --precisions: {err}") from None
        if name == "auto":
            raise SystemExit("bench_reconstruct: --precisions takes 32 and/or bf16 (auto is one of them)")
        if name not in names:
            names.append(name)
    return names


def _cpu_info(cpuinfo: str = "/proc/cpuinfo") -> tuple[str | None, list[str]]:
    """The CPU's model name and which of :data:`SIMD_FLAGS` it reports (Linux; ``None, []`` elsewhere)."""
    model, flags = None, []
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    present = set(value.split())
                    flags = [flag for flag in SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return model, flags


def machine_info(device: str) -> dict[str, Any]:
    model, flags = _cpu_info()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": model,
        "cpu_simd_flags": flags,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def airpi_vs_ssb(results: dict[str, Any]) -> dict[str, Any] | None:
    """AIRPI end-to-end patterns/s over SSB's, per precision, against issue #17's goal (>= 5 %)."""
    airpi, ssb = results.get("airpi"), results.get("ssb")
    if not airpi or not ssb or "error" in airpi or "error" in ssb:
        return None
    ssb_rate = ssb["patterns_per_s"]
    runs = dict(airpi.get("precisions", {}))
    runs.update({f"{p}/compiled": run for p, run in airpi.get("compiled", {}).items()})
    ratio = {p: round(run["patterns_per_s"] / ssb_rate, 5) for p, run in runs.items()}
    return {
        "ssb_patterns_per_s": ssb_rate,
        "airpi_patterns_per_s": {p: run["patterns_per_s"] for p, run in runs.items()},
        "ratio": ratio,
        "goal_ratio": AIRPI_SSB_GOAL,
        "meets_goal": {p: value >= AIRPI_SSB_GOAL for p, value in ratio.items()},
    }


def _write_scan(folder: Path, scan: tuple[int, int], detector: tuple[int, int]) -> tuple[Path, float, float]:
    """Write the synthetic scan; returns its path, the write time (s) and the data size (MB)."""
    start = time.perf_counter()
    synthetic = SyntheticScan(scan, detector)
    path = synthetic.write(folder / f"scan_{scan[0]}x{scan[1]}_{detector[0]}x{detector[1]}.h5")
    size_MB = math.prod(synthetic.shape) * 4 / 2**20
    return path, time.perf_counter() - start, size_MB


def main() -> None:
    from physics.runtime import THREAD_VARIABLES, configure_threads, resolve_threads

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=" ".join(METHODS))
    parser.add_argument("--scan", type=int, nargs=2, default=[128, 128], help="probe positions Rx Ry")
    parser.add_argument("--detector", type=int, nargs=2, default=[64, 64], help="detector pixels Kx Ky")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="for the networks")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch / BLAS threads per method (default: every core)"
    )
    parser.add_argument("--epie-iterations", type=int, default=2)
    parser.add_argument(
        "--batch", type=int, default=None,
        help="network batch (default: reconstruct.py's batch_size=auto for --device: 32 CPU, 1024 CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--precisions", nargs="+", default=["32", "bf16"], help="network inference precisions: 32 bf16"
    )
    parser.add_argument(
        "--channels-last", default="on", choices=LAYOUT_MODES,
        help="network memory layout: on = NHWC, off = NCHW, both = fp32 in both",
    )  # fmt: skip
    parser.add_argument(
        "--network-min-s", type=float, default=1.0, help="least seconds of network-alone passes per run"
    )
    parser.add_argument(
        "--airpi-ckpt", type=Path, default=None, help="AIRPI checkpoint (default: untrained weights)"
    )
    parser.add_argument("--scale-check", action="store_true", help="AIRPI also on 2x the positions per side")
    parser.add_argument(
        "--warm-repeat", action="store_true",
        help="networks: every configuration end to end again (warm, compiled once) and with the centre given",
    )  # fmt: skip
    parser.add_argument(
        "--read-ahead-check", action="store_true",
        help="networks: also the first configuration with the pattern read-ahead off, then on",
    )  # fmt: skip
    parser.add_argument(
        "--compile", default="off", choices=["off", "both"],
        help="networks: both = every precision also torch.compile-d (end to end including the compilation)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-sweep", type=int, nargs="+", default=[],
        help="networks: also the network alone at each of these batches (e.g. 16 32 64 128 256)",
    )  # fmt: skip
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the scan files go (default: TMPDIR)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--scan-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        args.threads = resolve_threads(args.threads)  # None: every core this process may use
    except ValueError as err:
        raise SystemExit(f"bench_reconstruct: --threads: {err}") from None
    # before NumPy / torch are imported (here and, through the environment, in every child)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(args.threads)
    args.precisions = _precisions(args.precisions)
    # this imports torch: after the thread variables are set
    from evaluation.networks.checkpoints import resolve_batch_size

    try:
        args.batch = resolve_batch_size(args.batch, args.device)
    except ValueError as err:
        raise SystemExit(f"bench_reconstruct: --batch: {err}") from None
    if any(b < 1 for b in args.batch_sweep):
        raise SystemExit("bench_reconstruct: need --batch-sweep entries >= 1")
    if args.child:
        configure_threads(args.threads)
        result = child(
            args.child, args.scan_path, args.device, args.batch, args.epie_iterations,
            precisions=args.precisions, channels_last=args.channels_last, network_min_s=args.network_min_s,
            ckpt=args.airpi_ckpt if args.child == "airpi" else None,
            read_ahead_check=args.read_ahead_check, compile=args.compile, batch_sweep=args.batch_sweep,
            warm_repeat=args.warm_repeat,
        )  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.epie_iterations < 1 or args.batch < 1 or min(args.scan) < 3 or min(args.detector) < 8:
        raise SystemExit(
            "bench_reconstruct: need --epie-iterations >= 1, --batch >= 1, --scan >= 3, --detector >= 8"
        )
    if not args.network_min_s >= 0:
        raise SystemExit("bench_reconstruct: need --network-min-s >= 0")
    methods = _methods(args.methods)
    import torch

    from physics.runtime import bf16_supported, cpu_bf16_flags, resolve_precision

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_reconstruct: --device cuda was requested but CUDA is not available")
    configure_threads(args.threads)
    scan, detector = tuple(args.scan), tuple(args.detector)
    report: dict[str, Any] = {
        "benchmark": "reconstruct",
        "device": args.device,
        "machine": machine_info(args.device),
        "torch": torch.__version__,
        "threads": args.threads,
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
        "precisions": args.precisions,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "network_min_s": args.network_min_s,
        "bf16": {
            "native": bf16_supported(args.device),
            "cpu_flags": cpu_bf16_flags(),
            "auto_precision": resolve_precision("auto", args.device),
        },
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
        path, write_s, data_MB = _write_scan(Path(folder), scan, detector)
        report["scan_data_MB"] = round(data_MB, 3)
        report["scan_write_s"] = round(write_s, 2)
        for method in methods:
            results[method] = run_child(method, path, args)
        report["results"] = results
        ratio = airpi_vs_ssb(results)
        if ratio is not None:
            report["airpi_vs_ssb"] = ratio
        if args.scale_check:
            small = results.get("airpi") or run_child("airpi", path, args, reference_only=True)
            path.unlink()  # only one scan file on disk at a time
            large_scan = (2 * scan[0], 2 * scan[1])
            large_path, _, large_MB = _write_scan(Path(folder), large_scan, detector)
            large = run_child("airpi", large_path, args, reference_only=True)
            runs = (small, large)
            check: dict[str, Any] = {
                "scans": [list(scan), list(large_scan)],
                "data_MB": [round(data_MB, 3), round(large_MB, 3)],
                "peak_memory_MB": [r.get("peak_memory_MB") for r in runs],
                "peak_rss_MB": [r.get("peak_rss_MB") for r in runs],
                "patterns_per_s": [r.get("patterns_per_s") for r in runs],
                "precision": large.get("precision"),
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
