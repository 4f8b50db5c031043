"""``python evaluate.py``: a benchmark of scans x doses x methods (x checkpoints) scored against the truth.

The suite (``conf/suite/*.yaml``, see ``conf/suite/default.yaml`` for every key) lists

* ``scans``: name -> ``{path, generate}``: a ``deepstem.4dstem/1`` file with a ``truth`` group; when the file
  is absent and ``generate`` is given (and ``generate_missing`` is true) it is simulated with
  :mod:`datagen.scan4d` and written there, so later runs reuse it. ``generate`` is a scan section of
  ``conf/simulation/scan4d.yaml`` (``specimen``, ``settings``, ``edge_margin_A``; twisted bilayers and
  crystals with point defects), or for a twisted bilayer the short form with the keys of
  :func:`datagen.scan4d.twisted_bilayer` next to ``settings`` and ``edge_margin_A``. ``scan_stride: n``
  scores every ``n``-th position along x and y (:func:`evaluation.io.sparser_scan`: the step x ``n``; two
  entries may share one file at different strides, paper 001's sparse-scan study);
* ``doses_e_per_A2``: electron doses per area ``d``; each CBED gets ``D = d * step_x * step_y`` electrons,
  Poisson noise drawn from a seed fixed by ``(seed, scan, dose, scan row)``, so every method sees the same
  noisy data and a rerun gives the same numbers; ``.inf`` is the noise-free scan;
* ``methods``: label -> ``{method, ckpt, params}``: any method of ``reconstruct.py`` (conventional, or a
  network with its checkpoint), ``params`` its keyword arguments (the keys of that method's section in
  ``conf/reconstruct.yaml``).

Metrics per (scan, dose, method), all on one scoring grid per scan (``score_pixel_A``, default
:func:`default_score_pixel_A`: ``min(lambda / (6 alpha), 1 / detector extent)``, 0.164 A at 300 kV and
20 mrad): the truth phase is sampled on it once, band-limited to its Nyquist, and every reconstruction
is put on it by Fourier interpolation (:func:`evaluation.metrics.fourier_resample`; AIRPI is placed on it
directly); the reconstruction is registered onto the truth with a shift bounded by ``max_shift_A``
(reported as ``shift_A``, ``shift_at_bound`` when it hit the bound) and both are cropped to the common
field (:mod:`evaluation.align`); then ``xc`` (Pearson, paper 002 eq. 14) and the FRC resolutions
(Angstrom) at 0.5, the criterion against a truth and the headline, and at the half-data criteria 0.143
and half-bit (for comparison; :data:`FRC_CRITERIA`); ``patterns_per_s`` is the method's throughput (scan
positions per second of its run).

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

from evaluation.frc import (
    HALF_MAP_THRESHOLD,
    TRUTH_THRESHOLD,
    fourier_ring_correlation,
    half_bit_threshold,
    resolution,
)
from evaluation.io import Scan4D, ScanError, load_4dstem, sparser_scan
from evaluation.metrics import fourier_resample, xc
from evaluation.networks.geometry import DetectorReachError
from evaluation.references._common import InsufficientMemoryError
from physics import wavelength
from physics.dose import expected_counts
from physics.runtime import check_precision

__all__ = [
    "FRC_CRITERIA",
    "PoissonScan",
    "ScoringGrid",
    "default_score_pixel_A",
    "evaluate_main",
    "run_suite",
    "score",
    "scoring_grid",
]

THRESHOLDS = (
    ("frc_0.5_A", TRUTH_THRESHOLD),
    ("frc_0.143_A", HALF_MAP_THRESHOLD),
    ("frc_half_bit_A", "half-bit"),
)
#: which criterion each FRC key uses (written to metrics.json; the tables name it in their headers)
FRC_CRITERIA = {
    "frc_0.5_A": "FRC 0.5 against the truth: the truth equivalent of 0.143 (Rosenthal & Henderson 2003, "
    "C_ref = sqrt(2 * 0.143 / 1.143)); the headline resolution",
    "frc_0.143_A": "FRC 0.143: a criterion for two independent half-data reconstructions, too lenient "
    "against a noise-free truth (comparison only)",
    "frc_half_bit_A": "FRC half-bit (van Heel & Schatz 2005): a criterion for two independent half-data "
    "reconstructions (comparison only)",
}
HEADLINE_RESOLUTION = "frc_0.5_A"


#: errors by which a method says it cannot take a scan at all (its detector does not reach a network's grid;
#: the scan would not fit in memory): that (scan, method) cell is left out, not the whole suite
NOT_APPLICABLE = (DetectorReachError, InsufficientMemoryError)


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


def default_score_pixel_A(scan: Scan4D) -> float:
    """The pixel of the common scoring grid: ``min(lambda / (6 alpha), 1 / detector extent)`` (Angstrom).

    Its Nyquist frequency ``1 / (2 pixel)`` is at least ``3 alpha / lambda`` (1.5 x the ``2 alpha`` limit of
    SSB/iCOM's bright-field information, so super-resolution shows) and at least the detector's edge, the
    finest frequency any method (ePIE's object grid, AIRPI's patches, pixel ``1 / (2 gmax)``) can carry.
    300 kV, 20 mrad, detector to 2 alpha: 0.164 A.
    """
    alpha_invA = float(scan.semiangle_mrad) * 1e-3 / wavelength(scan.energy_eV)
    k_pixel = np.broadcast_to(np.asarray(scan.k_pixel_invA, dtype=np.float64), (2,))
    extent_invA = float(min(scan.shape[2] * k_pixel[0], scan.shape[3] * k_pixel[1]))
    return float(min(1.0 / (6.0 * alpha_invA), 1.0 / extent_invA))


@dataclasses.dataclass
class ScoringGrid:
    """The one grid every method of a scan is scored on, with the truth sampled on it once.

    Pixel ``(m, n)`` is centred at ``(m, n) * pixel_A`` in scan coordinates (the first probe position is
    the origin); the grid spans the probe positions. ``truth`` is the true phase band-limited to the
    grid's Nyquist (:func:`evaluation.metrics.fourier_resample`), NaN where the truth does not reach.
    """

    pixel_A: float
    shape: tuple[int, int]
    truth: np.ndarray

    @property
    def origin_A(self) -> tuple[float, float]:
        return (0.0, 0.0)


def scoring_grid(scan: Scan4D, pixel_size_A: float | None = None) -> ScoringGrid:
    """The common scoring grid of ``scan`` (pixel ``pixel_size_A``, default :func:`default_score_pixel_A`)."""
    if scan.truth_phase is None:
        raise SuiteError("the scan has no truth group; scoring needs simulated scans (scan4d)")
    pixel = float(pixel_size_A) if pixel_size_A is not None else default_score_pixel_A(scan)
    if not pixel > 0:
        raise SuiteError(f"suite.score_pixel_A must be positive, got {pixel_size_A}")
    step = np.broadcast_to(np.asarray(scan.scan_step_A, dtype=np.float64), (2,))
    shape = tuple(
        math.floor((n - 1) * s / pixel + 1e-6) + 1 for n, s in zip(scan.shape[:2], step, strict=True)
    )
    truth = fourier_resample(
        scan.truth_phase, scan.truth_pixel_size_A, scan.truth_origin_A, shape, pixel, (0.0, 0.0)
    )
    return ScoringGrid(pixel_A=pixel, shape=shape, truth=truth)  # type: ignore[arg-type]


def _on_grid(grid: ScoringGrid, result: Any) -> tuple[np.ndarray, np.ndarray]:
    """(truth, reconstruction) on the scoring grid, cropped to the rows/columns where both are defined.

    The reconstruction is put on the grid by Fourier interpolation
    (:func:`evaluation.metrics.fourier_resample`: SSB/iCOM on the scan grid carry nothing beyond the scan
    Nyquist, and the FRC shows it).
    """
    phase = np.asarray(result.phase, dtype=np.float64)
    if not np.all(np.isfinite(phase)):
        raise SuiteError(f"{result.method}: the reconstruction contains NaN or inf")
    recon = fourier_resample(phase, result.pixel_size_A, result.origin_A, grid.shape, grid.pixel_A)
    finite = np.isfinite(grid.truth) & np.isfinite(recon)
    # both fields are axis-aligned rectangles, so their overlap is the span of rows/columns with any
    # common pixel (``all`` would drop every row as soon as one column lies outside the reconstruction)
    rows, cols = np.flatnonzero(finite.any(axis=1)), np.flatnonzero(finite.any(axis=0))
    if rows.size < 8 or cols.size < 8:
        raise SuiteError(f"{result.method}: truth and reconstruction share fewer than 8 x 8 scoring pixels")
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    truth, recon = grid.truth[window], recon[window]
    if not (np.all(np.isfinite(truth)) and np.all(np.isfinite(recon))):
        raise SuiteError(f"{result.method}: truth and reconstruction do not overlap on a rectangle")
    return truth, recon


def score(
    scan: Scan4D,
    result: Any,
    max_shift_A: float = 0.5,
    frc_min_ring: int = 2,
    pixel_size_A: float | None = None,
    grid: ScoringGrid | None = None,
) -> dict[str, Any]:
    """xc and FRC resolutions of ``result`` against the scan's truth on the common scoring grid.

    Truth and reconstruction are put on one grid (:func:`scoring_grid`, pixel ``pixel_size_A`` or
    :func:`default_score_pixel_A`; pass ``grid`` to reuse one), the reconstruction is registered onto the
    truth with a shift of at most ``max_shift_A`` per axis (sub-pixel, :func:`evaluation.align.align`; a
    fraction of the smallest lattice spacing, so no method is moved onto the next column) and both are
    cropped to the common field. ``shift_A`` is the shift found, ``shift_at_bound`` flags one that hit the
    bound (the best match may lie further out: the row's numbers are then suspect). The threshold crossings
    are searched from ring ``frc_min_ring`` on: ring 1 holds ~6 Fourier pixels and carries only the
    slowest background (iCOM's lost gradient offset, ePIE's phase ramp). The stored curve keeps every ring.
    ``frc_0.5_A`` is the resolution against the truth (the truth equivalent of 0.143, see
    :mod:`evaluation.frc`); ``frc_0.143_A`` and ``frc_half_bit_A`` use the half-data criteria (too lenient
    against a noise-free truth; kept for comparison).
    """
    from evaluation.align import align

    grid = grid if grid is not None else scoring_grid(scan, pixel_size_A)
    truth, recon = _on_grid(grid, result)
    pixel = grid.pixel_A
    bound_px = max(float(max_shift_A), 0.0) / pixel
    usable = recon.std() > 0
    shift = np.zeros(2)
    if usable and bound_px > 0:
        truth, recon, shift = align(truth, recon, max_shift_px=bound_px)
    at_bound = bool(bound_px > 0 and np.max(np.abs(shift)) >= bound_px - 1e-6)
    value = xc(truth, recon) if usable else float("nan")
    freq, frc, rings = fourier_ring_correlation(truth, recon, pixel, register=False)
    metrics: dict[str, Any] = {
        "xc": float(value),
        "registered": bool(usable and bound_px > 0),
        "shift_A": (shift * pixel).tolist(),
        "shift_norm_A": float(np.hypot(*shift) * pixel),
        "shift_at_bound": at_bound,
        "score_pixel_A": pixel,
    }
    start = max(0, int(frc_min_ring) - 1)
    for key, threshold in THRESHOLDS:
        metrics[key] = resolution(freq[start:], frc[start:], threshold, ring_pixels=rings[start:])
    metrics["frc_curve"] = {"freq_invA": freq.tolist(), "frc": frc.tolist(), "ring_pixels": rings.tolist()}
    return metrics


def score_against(
    grid: ScoringGrid,
    result: Any,
    reference: Any,
    max_shift_A: float = 0.5,
    frc_min_ring: int = 2,
) -> dict[str, float]:
    """FRC resolutions (A) of ``result`` against another method's reconstruction ``reference`` of the same
    data (paper 001 scores its CNN against ePIE so), on the scoring grid: both Fourier-resampled onto it,
    cropped to their common field, ``result`` registered onto ``reference`` (at most ``max_shift_A`` per
    axis). Keys ``frc_0.5_A`` and ``frc_0.143_A`` (for two reconstructions of one data set, 0.143 is the
    half-map criterion and 0.5 the stricter one, as the paper quotes both), searched from ring
    ``frc_min_ring``. Both fields must be finite on a common rectangle of at least 8 x 8 pixels."""
    from evaluation.align import align

    fields = []
    for item in (reference, result):
        phase = np.asarray(item.phase, dtype=np.float64)
        if not np.all(np.isfinite(phase)):
            raise SuiteError(f"{item.method}: the reconstruction contains NaN or inf")
        fields.append(fourier_resample(phase, item.pixel_size_A, item.origin_A, grid.shape, grid.pixel_A))
    finite = np.isfinite(fields[0]) & np.isfinite(fields[1])
    rows, cols = np.flatnonzero(finite.any(axis=1)), np.flatnonzero(finite.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)) if rows.size and cols.size else None
    if window is None or min(rows.size, cols.size) < 8 or not np.all(finite[window]):
        raise SuiteError(
            f"{result.method} and {reference.method} share no 8 x 8 rectangle on the scoring grid"
        )
    ref, recon = fields[0][window], fields[1][window]
    bound_px = max(float(max_shift_A), 0.0) / grid.pixel_A
    if recon.std() > 0 and ref.std() > 0 and bound_px > 0:
        ref, recon, _ = align(ref, recon, max_shift_px=bound_px)
    freq, frc, rings = fourier_ring_correlation(ref, recon, grid.pixel_A, register=False)
    start = max(0, int(frc_min_ring) - 1)
    return {
        key: resolution(freq[start:], frc[start:], threshold, ring_pixels=rings[start:])
        for key, threshold in THRESHOLDS[:2]
    }


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
    """The methods to run. A network entry with ``ckpt: null`` gets the shipped model of its method
    (:func:`evaluation.cli.default_checkpoint`) or, when none ships, is skipped with one line on stderr
    naming the entry and ``suite.methods.<label>.ckpt=PATH`` (the rest of the suite still runs)."""
    from evaluation.cli import CONVENTIONAL_METHODS, NETWORK_METHODS, default_checkpoint, pretrained_dir

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
            shipped = default_checkpoint(method)
            if shipped is None:
                print(f"evaluate: skipping suite.methods.{label} ({method}): no ckpt given and no shipped "
                      f"{method} model in {pretrained_dir()}; give suite.methods.{label}.ckpt=PATH",
                      file=sys.stderr)  # fmt: skip
                continue
            print(f"evaluate: suite.methods.{label}: ckpt not given; using the shipped model {shipped}",
                  file=sys.stderr)  # fmt: skip
            entry["ckpt"] = str(shipped)
        entries.append(
            {
                "label": str(label),
                "method": method,
                "ckpt": str(_resolve(str(entry["ckpt"]))) if entry.get("ckpt") else None,
                "params": dict(entry.get("params") or {}),
            }
        )
    if not entries:
        skipped = " (every network entry was skipped: no checkpoint)" if suite.get("methods") else ""
        raise SuiteError(f"suite.methods is empty{skipped}: list at least one method")
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


def _method_params(entry: Mapping[str, Any], grid: ScoringGrid) -> dict[str, Any]:
    """The method's keyword arguments; AIRPI without an object pixel of its own (``oversampling`` or
    ``pixel_size_A``) is placed directly on the scoring grid (``pixel_size_A``: its Fourier placement is
    then the band-limited interpolation of its native patches, pixel ``1 / (2 gmax)``, instead of the
    scan step of ``oversampling: 1``)."""
    params = dict(entry["params"])
    if entry["method"] == "airpi" and params.get("pixel_size_A") is None and "oversampling" not in params:
        params["pixel_size_A"] = grid.pixel_A
    return params


def _score_against_reference(
    rows: list[dict[str, Any]],
    images: dict,
    scan: str,
    dose: float,
    reference: str,
    grid: ScoringGrid,
    max_shift_A: float,
    frc_min_ring: int,
) -> None:
    """Add ``frc_vs_<reference>_0.5_A`` / ``_0.143_A`` to the rows of (scan, dose) other than the reference
    (``suite.frc_against``: a method label of the suite, e.g. ``epie``)."""
    ref = images.get((scan, dose, reference))
    if ref is None:
        raise SuiteError(f"suite.frc_against={reference!r} is not a method of this suite")
    for row in rows:
        if row["scan"] != scan or row["dose_e_per_A2"] != dose or row["method"] == reference:
            continue
        metrics = score_against(grid, images[(scan, dose, row["method"])], ref, max_shift_A, frc_min_ring)
        for key, value in metrics.items():
            row[f"frc_vs_{reference}_{key.removeprefix('frc_')}"] = value


def run_suite(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the suite of ``cfg.suite`` and write its outputs into ``run_dir``; returns the JSON content."""
    from evaluation.cli import run_method
    from evaluation.networks import CheckpointError, load_network

    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    assert isinstance(suite, dict)
    progress = bool(cfg.get("progress", True))
    device = str(cfg.get("device", "auto"))
    precision = check_precision(cfg.get("precision", "auto"))  # checked before any scan is read
    seed = int(cfg.get("seed", 0))
    doses = _doses(suite)
    entries = _method_entries(suite)
    against = suite.get("frc_against")
    if against and str(against) not in {entry["label"] for entry in entries}:
        raise SuiteError(
            f"suite.frc_against={against!r} is not one of the suite's methods "
            f"({', '.join(entry['label'] for entry in entries)})"
        )
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
    skipped: list[dict[str, str]] = []  # (scan, method) pairs a method cannot take, with the reason
    images: dict[tuple[str, float, str], Any] = {}
    truths: dict[str, Any] = {}
    grids: dict[str, ScoringGrid] = {}
    for scan_index, (name, path) in enumerate(scans.items()):
        source = scan = load_4dstem(path, progress=progress)
        stride = (suite["scans"][name] or {}).get("scan_stride", 1)
        try:
            # every stride-th position (paper 001's sparse scans); doses stay per area of the sparser scan
            scan = sparser_scan(source, stride)
            if scan.truth_phase is None:
                raise SuiteError(f"{path}: no truth group; the suite needs simulated scans (scan4d)")
            truths[name] = scan
            pixel = suite.get("score_pixel_A")
            grid = scoring_grid(scan, None if pixel in (None, "auto") else float(pixel))
            grids[name] = grid
            for dose_index, dose in enumerate(doses):
                per_cbed = dose * scan.scan_step_A[0] * scan.scan_step_A[1]
                data = (
                    scan.data
                    if math.isinf(dose)
                    else PoissonScan(scan.data, per_cbed, (seed, scan_index, dose_index))
                )
                noisy = dataclasses.replace(scan, data=data, _handle=None)
                for entry in entries:
                    if any(s["scan"] == name and s["method"] == entry["label"] for s in skipped):
                        continue
                    start = time.perf_counter()
                    try:
                        result = run_method(
                            noisy, entry["method"], _method_params(entry, grid), progress=progress,
                            model=models.get(entry["label"]), device=device, precision=precision,
                        )  # fmt: skip
                    except NOT_APPLICABLE as err:
                        # a property of the scan (its detector, its size), so it holds at every dose: the
                        # method is left out of this scan with one line, the rest of the suite goes on
                        skipped.append({"scan": name, "method": entry["label"], "reason": str(err)})
                        print(f"evaluate: {name}: skipping {entry['label']} ({entry['method']}): {err}",
                              file=sys.stderr)  # fmt: skip
                        continue
                    elapsed = time.perf_counter() - start
                    metrics = score(
                        scan, result, float(suite.get("max_shift_A", 0.5)), int(suite.get("frc_min_ring", 2)),
                        grid=grid,
                    )  # fmt: skip
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
                            "precision": result.info.get("precision"),
                            **metrics,
                        }
                    )
                    images[(name, dose, entry["label"])] = result
                    if progress:
                        print(
                            f"evaluate: {name} dose={dose:g} {entry['label']}: xc={metrics['xc']:.4f} "
                            f"FRC(0.5 vs truth)={metrics['frc_0.5_A']:.3f} A "
                            f"shift={metrics['shift_norm_A']:.2f} A"
                            + (" (at the bound)" if metrics["shift_at_bound"] else ""),
                            file=sys.stderr,
                        )
                reference_label = suite.get("frc_against")
                if reference_label and (name, dose, str(reference_label)) in images:
                    _score_against_reference(
                        rows, images, name, dose, str(reference_label), grid,
                        float(suite.get("max_shift_A", 0.5)), int(suite.get("frc_min_ring", 2)),
                    )  # fmt: skip
            # the truth and images are kept for the figures; the scan file is closed after them
            ran = [e for e in entries if any(r["scan"] == name and r["method"] == e["label"] for r in rows)]
            _figures(run_dir, name, grid, doses, ran, images, rows)
        finally:
            scan.close()
            source.close()
    content = {
        "suite": suite,
        "seed": seed,
        "device": device,
        "precision": precision,
        "frc_criteria": FRC_CRITERIA,
        "headline_resolution": HEADLINE_RESOLUTION,
        "score_pixel_A": {name: grid.pixel_A for name, grid in grids.items()},
        "max_shift_A": float(suite.get("max_shift_A", 0.5)),
        "rows": rows,
        "not_applicable": skipped,
    }
    _write_text(run_dir / "metrics.json", json.dumps(_jsonable(content), indent=1))
    _write_text(run_dir / "results.md", markdown_table(rows, skipped))
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


def _shift_cell(row: Mapping[str, Any]) -> str:
    value = row.get("shift_norm_A")
    if value is None:
        return "-"
    return f"{float(value):.2f}" + (" (bound)" if row.get("shift_at_bound") else "")


def markdown_table(rows: list[dict[str, Any]], skipped: list[dict[str, str]] | None = None) -> str:
    """One Markdown table: scan, dose, method, xc, FRC resolutions (A; the header names each criterion),
    registration shift (A; "(bound)" when it hit ``max_shift_A``), patterns/s; then one line per
    (scan, method) left out because the method cannot take that scan (``skipped``: scan, method, reason)."""
    lines = [
        "| scan | dose (e/Å²) | method | xc | FRC 0.5 vs truth (Å) | FRC 0.143, half-map criterion (Å) | "
        "FRC half-bit, half-map criterion (Å) | shift (Å) | patterns/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    against = sorted({k[len("frc_vs_") : -len("_0.5_A")] for r in rows for k in r if k.startswith("frc_vs_")
                      and k.endswith("_0.5_A")})  # fmt: skip
    for ref in against:
        lines[0] += f" FRC vs {ref} 0.5 / 0.143 (Å) |"
        lines[1] += "---|"
    for r in rows:
        line = (
            f"| {r['scan']} | {_dose_label(r['dose_e_per_A2'])} | {r['method']} | {r['xc']:.4f} | "
            f"{r['frc_0.5_A']:.3f} | {r['frc_0.143_A']:.3f} | {r['frc_half_bit_A']:.3f} | {_shift_cell(r)} | "
            f"{r['patterns_per_s']:.0f} |"
        )
        for ref in against:
            a, b = r.get(f"frc_vs_{ref}_0.5_A"), r.get(f"frc_vs_{ref}_0.143_A")
            line += " (reference) |" if a is None else f" {a:.3f} / {b:.3f} |"
        lines.append(line)
    notes = (
        "\nFRC against the true phase on one grid for every method (pixel "
        + ", ".join(sorted({f"{r['score_pixel_A']:.3f} Å" for r in rows if "score_pixel_A" in r}))
        + "). 0.5 is the truth equivalent of the half-map 0.143 criterion (Rosenthal & Henderson 2003): "
        "the headline resolution; 0.143 and half-bit are criteria for two independent half-data "
        "reconstructions, shown for comparison. shift: the registration onto the truth, bounded by "
        'max_shift_A; "(bound)" marks a method that hit the bound.\n'
    )
    left_out = "".join(
        f"\nNot applicable: {entry['method']} on {entry['scan']}: {entry['reason']}\n"
        for entry in skipped or []
    )
    return "\n".join(lines) + "\n" + (notes if rows else "") + left_out


def _figures(
    run_dir: Path,
    name: str,
    grid: ScoringGrid,
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
        axes[i, 0].imshow(grid.truth.T, origin="lower", cmap="gray")
        axes[i, 0].set_title(f"truth ({grid.pixel_A:.3f} Å grid)" if i == 0 else "", fontsize=8)
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
        ax.axhline(0.5, color="k", ls="--", lw=0.7, label="0.5 (vs truth)")
        ax.axhline(0.143, color="k", ls=":", lw=0.7, label="0.143 (half-map)")
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
                   "shift_norm_A", "shift_at_bound", "patterns_per_s"]  # fmt: skip
        table = wandb.Table(columns=columns)
        for row in content["rows"]:
            table.add_data(*[_jsonable(row[c]) if c == "dose_e_per_A2" else row[c] for c in columns])
        run.log({"evaluate/results": table})
        for image in sorted((run_dir / "figures").glob("*.png")):
            run.log({f"evaluate/{image.stem}": wandb.Image(str(image))})
        for row in content["rows"]:
            key = f"{row['scan']}/{_dose_label(row['dose_e_per_A2'])}/{row['method']}"
            run.summary[f"xc/{key}"] = row["xc"]
            run.summary[f"frc_0.5_A/{key}"] = row["frc_0.5_A"]
            run.summary[f"frc_0.143_A/{key}"] = row["frc_0.143_A"]
            run.summary[f"shift_A/{key}"] = row["shift_norm_A"]
    finally:
        run.finish()


def evaluate_main(cfg: DictConfig, run_dir: str | Path | None = None) -> int:
    """The body of ``evaluate.py``; returns the exit code (2 with one line on stderr on bad input)."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    logger = cfg.get("logger")
    if logger is not None and (not isinstance(logger, Mapping) or list(logger) != ["wandb"]):
        chosen = list(logger) if isinstance(logger, Mapping) else logger
        message = f"evaluate logs to W&B (logger=wandb) or not at all (logger=null), got {chosen}"
        from physics.runtime import report_error

        return report_error(message)  # deepstem: error: <message>, exit status 2
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        content = run_suite(cfg, run_dir)
    except (SuiteError, ScanError, ValueError, OSError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        from physics.runtime import report_error

        return report_error(message)  # deepstem: error: <message>, exit status 2
    if logger is not None:
        _log_wandb(cfg, run_dir, content)
    print(markdown_table(content["rows"]), end="")
    print(f"evaluate: wrote {run_dir / 'metrics.json'}, {run_dir / 'results.md'} and {run_dir / 'figures'}")
    return 0
