"""``python evaluate.py``: a benchmark of scans x doses x methods (x checkpoints) scored against the truth.

The suite (``conf/suite/*.yaml``, see ``conf/suite/default.yaml`` for every key) lists

* ``scans``: name -> ``{path, generate}``: a ``deepstem.4dstem/1`` file with a ``truth`` group; when the file
  is absent and ``generate`` is given (and ``generate_missing`` is true) it is simulated with
  :mod:`datagen.scan4d` and written there, so later runs reuse it. ``generate`` is a scan section of
  ``conf/simulation/scan4d.yaml`` (``specimen``, ``settings``, ``edge_margin_A``; twisted bilayers and
  crystals with point defects), or for a twisted bilayer the short form with the keys of
  :func:`datagen.scan4d.twisted_bilayer` next to ``settings`` and ``edge_margin_A``;
* ``doses_e_per_A2``: electron doses per area ``d``; each CBED gets ``D = d * step_x * step_y`` electrons,
  Poisson noise drawn from a seed fixed by ``(seed, scan, dose, scan row)``, so every method sees the same
  noisy data and a rerun gives the same numbers; ``.inf`` is the noise-free scan;
* ``methods``: label -> ``{method, ckpt, params}``: any method of ``reconstruct.py`` (conventional, or a
  network with its checkpoint), ``params`` its keyword arguments (the keys of that method's section in
  ``conf/reconstruct.yaml``).

Metrics per (scan, dose, method): the truth phase is put on the reconstruction's grid
(:func:`evaluation.metrics.resample_to_grid`) and cropped to where it is defined; then the reconstruction
is registered onto it (sub-pixel) and both are cropped to the common field (:mod:`evaluation.align`), and
``xc`` (Pearson, paper 002 eq. 14) and the FRC resolutions at 0.5, 0.143 and half-bit (Angstrom) are
computed; ``patterns_per_s`` is the method's throughput (scan positions per second of its run).

Outputs in the run directory: ``metrics.json`` (config, rows, curves), ``results.md`` (one table),
``figures/recon_<scan>.png`` (truth and every method side by side, one row per dose),
``figures/frc_<scan>.png`` (FRC curves with the 0.5/0.143/half-bit thresholds, one panel per dose) and
``figures/xc_vs_dose_<scan>.png``. With ``logger=wandb`` (the shared ``conf/logger/wandb.yaml``: project,
name, group, tags, offline) the table, the figures and the summary go to Weights & Biases with ``wandb``
itself (offline when ``WANDB_API_KEY`` is not set; no secret is logged).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from evaluation.frc import fourier_ring_correlation, half_bit_threshold, resolution
from evaluation.io import Scan4D, ScanError, load_4dstem
from evaluation.metrics import resample_to_grid, xc
from physics.dose import expected_counts

__all__ = ["PoissonScan", "evaluate_main", "run_suite", "score"]

THRESHOLDS = (("frc_0.5_A", 0.5), ("frc_0.143_A", 0.143), ("frc_half_bit_A", "half-bit"))


class SuiteError(ValueError):
    """A suite cannot run (one-line message)."""


class PoissonScan:
    """A lazily read noisy copy of a scan: rows are drawn on demand as ``Poisson(D * I)``.

    ``data`` (Rx, Ry, Kx, Ky) noise-free intensities as fractions of the incident electrons per pixel;
    ``dose_per_cbed`` ``D`` incident electrons per position (a pattern's mean total is ``D * sum(I)``).
    Row ``r`` always gets the same noise: its generator is seeded by ``(*seed, r)``. Indexing follows
    NumPy with the first index a row slice or integer (the way every reader here streams scans).
    """

    def __init__(self, data: Any, dose_per_cbed: float, seed: tuple[int, ...]) -> None:
        if not dose_per_cbed > 0:
            raise SuiteError(f"doses must be positive, got {dose_per_cbed} electrons per CBED")
        self.data = data
        self.dose = float(dose_per_cbed)
        self.seed = tuple(int(s) for s in seed)
        self.shape = tuple(int(n) for n in data.shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = 4

    def _row(self, r: int) -> np.ndarray:
        clean = np.asarray(self.data[r : r + 1], dtype=np.float64)[0]
        rate = expected_counts(clean, self.dose)  # Poisson(D * I), physics.dose
        rng = np.random.default_rng(np.random.SeedSequence([*self.seed, r]))
        return rng.poisson(rate).astype(np.float32)

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], tuple(key[1:])) if isinstance(key, tuple) else (key, ())
        if isinstance(first, (int, np.integer)):
            block = self._row(int(first) % self.shape[0])
            return block[rest] if rest else block
        if not isinstance(first, slice):
            raise TypeError(f"PoissonScan: index rows with an int or a slice, got {type(first).__name__}")
        rows = range(*first.indices(self.shape[0]))
        block = (
            np.stack([self._row(r) for r in rows])
            if len(rows)
            else np.zeros((0, *self.shape[1:]), np.float32)
        )
        return block[(slice(None), *rest)] if rest else block

    def __len__(self) -> int:
        return self.shape[0]


def _truth_on_grid(scan: Scan4D, result: Any) -> tuple[np.ndarray, np.ndarray]:
    """(truth, reconstruction) on the reconstruction's grid, cropped to the rows/columns the truth covers."""
    recon = np.asarray(result.phase, dtype=np.float64)
    truth = resample_to_grid(
        scan.truth_phase,
        scan.truth_pixel_size_A,
        scan.truth_origin_A,
        recon.shape,
        result.pixel_size_A,
        result.origin_A,
    )
    finite = np.isfinite(truth)
    rows, cols = np.flatnonzero(finite.all(axis=1)), np.flatnonzero(finite.all(axis=0))
    if rows.size < 8 or cols.size < 8:
        raise SuiteError("the truth covers fewer than 8 x 8 pixels of the reconstruction")
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return truth[window], recon[window]


def score(scan: Scan4D, result: Any, max_shift_A: float = 2.0, frc_min_ring: int = 2) -> dict[str, Any]:
    """xc and FRC resolutions of ``result`` against the scan's truth on the reconstruction's grid.

    The reconstruction is registered onto the truth (sub-pixel, :func:`evaluation.align.align`) and both are
    cropped to the common field, unless the estimated shift exceeds ``max_shift_A`` (a failed
    reconstruction correlates with nothing; then the images are compared as they are placed, and
    ``registered`` is false). The threshold crossings are searched from ring ``frc_min_ring`` on: ring 1
    holds ~6 Fourier pixels and carries only the slowest background (iCOM's lost gradient offset, ePIE's
    phase ramp), which would otherwise decide the "resolution" of an image with xc 0.99. The stored curve
    keeps every ring.
    """
    from evaluation.align import align, estimate_shift

    truth, recon = _truth_on_grid(scan, result)
    if not np.all(np.isfinite(recon)):
        raise SuiteError(f"{result.method}: the reconstruction contains NaN or inf")
    pixel = float(np.mean(result.pixel_size_A))
    shift = estimate_shift(truth, recon) if recon.std() > 0 else np.zeros(2)
    registered = bool(np.max(np.abs(shift)) * pixel <= max_shift_A and recon.std() > 0)
    if registered:
        truth, recon, shift = align(truth, recon)
    value = xc(truth, recon) if recon.std() > 0 else float("nan")
    freq, frc, rings = fourier_ring_correlation(truth, recon, pixel, register=False)
    metrics: dict[str, Any] = {
        "xc": float(value),
        "registered": registered,
        "shift_A": (shift * pixel).tolist(),
    }
    start = max(0, int(frc_min_ring) - 1)
    for key, threshold in THRESHOLDS:
        metrics[key] = resolution(freq[start:], frc[start:], threshold, ring_pixels=rings[start:])
    metrics["frc_curve"] = {"freq_invA": freq.tolist(), "frc": frc.tolist(), "ring_pixels": rings.tolist()}
    return metrics


# ------------------------------------------------------------------------------------------------------


def _resolve(path: str) -> Path:
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except Exception:  # outside a Hydra run
        return Path(path).resolve()


def _prepare_scan(name: str, entry: Mapping[str, Any], generate_missing: bool, progress: bool) -> Path:
    if not entry.get("path"):
        raise SuiteError(f"suite.scans.{name}: give a path (the file is written there when generated)")
    path = _resolve(str(entry["path"]))
    if path.is_file():
        return path
    generate = entry.get("generate")
    if not generate or not generate_missing:
        raise SuiteError(
            f"suite.scans.{name}: {path} does not exist (and no 'generate' section to simulate it)"
        )
    from datagen.parameters import ConfigError
    from datagen.scan4d import build_scan_specimen, plan_scans, simulate_scan, write_scan

    spec = dict(generate)
    if "specimen" not in spec:  # short form: datagen.scan4d.twisted_bilayer's keys at the top level
        settings = spec.pop("settings", None) or {}
        margin = spec.pop("edge_margin_A", 0.0)
        spec = {
            "specimen": {"kind": "twisted_bilayer", **spec},
            "settings": settings,
            "edge_margin_A": margin,
        }
    if progress:
        print(f"evaluate: simulating scan {name!r} with abTEM -> {path}", file=sys.stderr)
    try:  # the scan section of `python datagen.py simulation=scan4d`: one planner, one specimen builder
        job = plan_scans({"scans": {name: spec}}, seed=0)[0]
        atoms = build_scan_specimen(job)
        result = simulate_scan(atoms, job.settings, edge_margin_A=job.edge_margin_A)
    except ConfigError as err:
        where = str(err).replace(f"simulation.scans.{name}", f"suite.scans.{name}.generate", 1)
        raise SuiteError(where.splitlines()[0]) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_scan(path, result, config={"suite_scan": name, "generate": dict(generate)})
    return path


def _method_entries(suite: Mapping[str, Any]) -> list[dict[str, Any]]:
    from evaluation.cli import CONVENTIONAL_METHODS, NETWORK_METHODS

    entries = []
    for label, entry in (suite.get("methods") or {}).items():
        entry = dict(entry or {})
        method = str(entry.get("method", label))
        if method not in CONVENTIONAL_METHODS + NETWORK_METHODS:
            raise SuiteError(
                f"suite.methods.{label}: unknown method {method!r}; choose one of "
                f"{', '.join(CONVENTIONAL_METHODS + NETWORK_METHODS)}"
            )
        if method in NETWORK_METHODS and not entry.get("ckpt"):
            raise SuiteError(f"suite.methods.{label}: network method {method!r} needs ckpt: PATH")
        entries.append(
            {
                "label": str(label),
                "method": method,
                "ckpt": str(_resolve(str(entry["ckpt"]))) if entry.get("ckpt") else None,
                "params": dict(entry.get("params") or {}),
            }
        )
    if not entries:
        raise SuiteError("suite.methods is empty: list at least one method")
    return entries


def _dose(value: Any) -> float:
    text = str(value).strip().lower()
    if text in (".inf", "+.inf", "inf", "+inf", "infinity"):
        return math.inf
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SuiteError(f"suite.doses_e_per_A2: {value!r} is not a dose (e/A^2, or .inf)") from None


def _doses(suite: Mapping[str, Any]) -> list[float]:
    doses = [_dose(d) for d in (suite.get("doses_e_per_A2") or [math.inf])]
    if any(not d > 0 for d in doses):
        raise SuiteError(f"suite.doses_e_per_A2 must be positive (or .inf), got {doses}")
    return doses


def run_suite(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the suite of ``cfg.suite`` and write its outputs into ``run_dir``; returns the JSON content."""
    from evaluation.cli import run_method
    from evaluation.stitching import CheckpointError, load_network

    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    assert isinstance(suite, dict)
    progress = bool(cfg.get("progress", True))
    device = str(cfg.get("device", "auto"))
    seed = int(cfg.get("seed", 0))
    doses = _doses(suite)
    entries = _method_entries(suite)
    scans = {
        name: _prepare_scan(name, entry or {}, bool(suite.get("generate_missing", True)), progress)
        for name, entry in (suite.get("scans") or {}).items()
    }
    if not scans:
        raise SuiteError("suite.scans is empty: list at least one scan4d file")
    models = {}
    for entry in entries:
        if entry["ckpt"]:
            try:
                models[entry["label"]] = load_network(entry["ckpt"], entry["method"], device)
            except CheckpointError as err:
                raise SuiteError(f"suite.methods.{entry['label']}: {err}") from None
    rows: list[dict[str, Any]] = []
    images: dict[tuple[str, float, str], Any] = {}
    truths: dict[str, Any] = {}
    for scan_index, (name, path) in enumerate(scans.items()):
        scan = load_4dstem(path, progress=progress)
        try:
            if scan.truth_phase is None:
                raise SuiteError(f"{path}: no truth group; the suite needs simulated scans (scan4d)")
            truths[name] = scan
            for dose_index, dose in enumerate(doses):
                per_cbed = dose * scan.scan_step_A[0] * scan.scan_step_A[1]
                data = (
                    scan.data
                    if math.isinf(dose)
                    else PoissonScan(scan.data, per_cbed, (seed, scan_index, dose_index))
                )
                noisy = dataclasses.replace(scan, data=data, _handle=None)
                for entry in entries:
                    start = time.perf_counter()
                    result = run_method(
                        noisy, entry["method"], dict(entry["params"]), progress=progress,
                        model=models.get(entry["label"]), device=device,
                    )  # fmt: skip
                    elapsed = time.perf_counter() - start
                    metrics = score(
                        scan, result, float(suite.get("max_shift_A", 2.0)), int(suite.get("frc_min_ring", 2))
                    )
                    rows.append(
                        {
                            "scan": name,
                            "dose_e_per_A2": dose,
                            "dose_e_per_cbed": per_cbed,
                            "method": entry["label"],
                            "kind": entry["method"],
                            "ckpt": entry["ckpt"],
                            "seconds": elapsed,
                            "patterns_per_s": scan.num_positions / max(elapsed, 1e-9),
                            "pixel_size_A": list(result.pixel_size_A),
                            **metrics,
                        }
                    )
                    images[(name, dose, entry["label"])] = result
                    if progress:
                        print(
                            f"evaluate: {name} dose={dose:g} {entry['label']}: xc={metrics['xc']:.4f} "
                            f"FRC(0.143)={metrics['frc_0.143_A']:.3f} A",
                            file=sys.stderr,
                        )
            # the truth and images are kept for the figures; the scan file is closed after them
            _figures(run_dir, name, scan, doses, entries, images, rows)
        finally:
            scan.close()
    content = {
        "suite": suite,
        "seed": seed,
        "device": device,
        "rows": rows,
    }
    _write_text(run_dir / "metrics.json", json.dumps(_jsonable(content), indent=1))
    _write_text(run_dir / "results.md", markdown_table(rows))
    return content


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _dose_label(dose: float) -> str:
    return "inf" if math.isinf(dose) else f"{dose:g}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown table: scan, dose, method, xc, FRC resolutions (A), patterns/s."""
    lines = [
        "| scan | dose (e/Å²) | method | xc | FRC 0.5 (Å) | FRC 0.143 (Å) | FRC half-bit (Å) | patterns/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scan']} | {_dose_label(r['dose_e_per_A2'])} | {r['method']} | {r['xc']:.4f} | "
            f"{r['frc_0.5_A']:.3f} | {r['frc_0.143_A']:.3f} | {r['frc_half_bit_A']:.3f} | "
            f"{r['patterns_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _figures(
    run_dir: Path,
    name: str,
    scan: Scan4D,
    doses: list[float],
    entries: list[dict[str, Any]],
    images: dict,
    rows: list[dict[str, Any]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = run_dir / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    labels = [e["label"] for e in entries]
    # reconstructions side by side (truth on the first method's grid in the first column)
    figure, axes = plt.subplots(
        len(doses), len(labels) + 1, figsize=(2.2 * (len(labels) + 1), 2.3 * len(doses)), squeeze=False
    )
    for i, dose in enumerate(doses):
        first = images[(name, dose, labels[0])]
        truth, _ = _truth_on_grid(scan, first)
        axes[i, 0].imshow(truth.T, origin="lower", cmap="gray")
        axes[i, 0].set_title("truth" if i == 0 else "", fontsize=8)
        axes[i, 0].set_ylabel(f"{_dose_label(dose)} e/Å²", fontsize=8)
        for j, label in enumerate(labels, start=1):
            result = images[(name, dose, label)]
            axes[i, j].imshow(np.asarray(result.phase).T, origin="lower", cmap="gray")
            row = next(
                r for r in rows if r["scan"] == name and r["dose_e_per_A2"] == dose and r["method"] == label
            )
            axes[i, j].set_title(f"{label}\nxc {row['xc']:.3f}", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(folder / f"recon_{name}.png", dpi=110)
    plt.close(figure)
    # FRC curves with thresholds
    figure, axes = plt.subplots(1, len(doses), figsize=(3.6 * len(doses), 3.2), squeeze=False)
    for i, dose in enumerate(doses):
        ax = axes[0, i]
        for n, label in enumerate(labels):
            row = next(
                r for r in rows if r["scan"] == name and r["dose_e_per_A2"] == dose and r["method"] == label
            )
            curve = row["frc_curve"]
            colour = f"C{n % 10}"
            ax.plot(curve["freq_invA"], curve["frc"], color=colour, label=label, lw=1)
            # the half-bit curve depends on the ring sizes, i.e. on each reconstruction's grid
            ax.plot(curve["freq_invA"], half_bit_threshold(np.asarray(curve["ring_pixels"])), color=colour,
                    ls="-.", lw=0.6, label="half-bit" if n == len(labels) - 1 else None)  # fmt: skip
        ax.axhline(0.5, color="k", ls="--", lw=0.7, label="0.5")
        ax.axhline(0.143, color="k", ls=":", lw=0.7, label="0.143")
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("FRC against truth")
        ax.set_title(f"{name}, {_dose_label(dose)} e/Å²", fontsize=9)
        ax.set_ylim(-0.2, 1.05)
    axes[0, -1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / f"frc_{name}.png", dpi=110)
    plt.close(figure)
    # xc against dose (noise-free plotted at the right, beyond the largest finite dose)
    finite = [d for d in doses if math.isfinite(d)]
    top = max(finite) * 10 if finite else 1.0
    figure, ax = plt.subplots(figsize=(4.5, 3.4))
    for label in labels:
        points = sorted(
            (r["dose_e_per_A2"] if math.isfinite(r["dose_e_per_A2"]) else top, r["xc"])
            for r in rows
            if r["scan"] == name and r["method"] == label
        )
        ax.plot(*zip(*points, strict=True), "o-", label=label, ms=3)
    ax.set_xscale("log")
    ticks = sorted(set(finite))
    names = [f"{t:g}" for t in ticks]
    if any(math.isinf(d) for d in doses):
        ticks, names = [*ticks, top], [*names, "∞"]
    ax.set_xticks(ticks, names)
    ax.minorticks_off()
    ax.set_xlabel("dose (e/Å²)")
    ax.set_ylabel("xc against truth")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / f"xc_vs_dose_{name}.png", dpi=110)
    plt.close(figure)


def _wandb_options(cfg: DictConfig) -> dict[str, Any]:
    """The settings of the shared ``conf/logger/wandb.yaml`` that apply here (interpolations not resolved)."""
    section = cfg.logger.wandb
    options = {key: section.get(key) for key in ("project", "name", "group") if section.get(key) is not None}
    tags = section.get("tags")
    options["tags"] = [*list(tags or []), "evaluate"]
    offline = str(section.get("offline", "auto")).lower()
    if offline == "auto":
        options["mode"] = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    else:
        options["mode"] = "offline" if offline in ("true", "1", "yes") else "online"
    return options


def _log_wandb(cfg: DictConfig, run_dir: Path, content: dict[str, Any]) -> None:
    import wandb

    run = wandb.init(
        dir=str(run_dir),
        config=_jsonable({"suite": content["suite"], "seed": content["seed"], "device": content["device"]}),
        job_type="evaluate",
        **_wandb_options(cfg),
    )
    try:
        columns = ["scan", "dose_e_per_A2", "method", "xc", "frc_0.5_A", "frc_0.143_A", "frc_half_bit_A",
                   "patterns_per_s"]  # fmt: skip
        table = wandb.Table(columns=columns)
        for row in content["rows"]:
            table.add_data(*[_jsonable(row[c]) if c == "dose_e_per_A2" else row[c] for c in columns])
        run.log({"evaluate/results": table})
        for image in sorted((run_dir / "figures").glob("*.png")):
            run.log({f"evaluate/{image.stem}": wandb.Image(str(image))})
        for row in content["rows"]:
            key = f"{row['scan']}/{_dose_label(row['dose_e_per_A2'])}/{row['method']}"
            run.summary[f"xc/{key}"] = row["xc"]
            run.summary[f"frc_0.143_A/{key}"] = row["frc_0.143_A"]
    finally:
        run.finish()


def evaluate_main(cfg: DictConfig, run_dir: str | Path | None = None) -> int:
    """The body of ``evaluate.py``; returns the exit code (1 with one line on stderr on bad input)."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    logger = cfg.get("logger")
    if logger is not None and (not isinstance(logger, Mapping) or list(logger) != ["wandb"]):
        chosen = list(logger) if isinstance(logger, Mapping) else logger
        message = f"evaluate logs to W&B (logger=wandb) or not at all (logger=null), got {chosen}"
        print(f"deepstem: error: {message}", file=sys.stderr)
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        content = run_suite(cfg, run_dir)
    except (SuiteError, ScanError, ValueError, OSError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"deepstem: error: {message}", file=sys.stderr)
        return 1
    if logger is not None:
        _log_wandb(cfg, run_dir, content)
    print(markdown_table(content["rows"]), end="")
    print(f"evaluate: wrote {run_dir / 'metrics.json'}, {run_dir / 'results.md'} and {run_dir / 'figures'}")
    return 0
