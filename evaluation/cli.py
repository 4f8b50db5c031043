"""``python reconstruct.py input=SCAN method=...``: one scan in, one ``deepstem.recon/1`` file + PNG out.

Conventional methods (``epie``, ``ssb``, ``icom``, ``ricom``, ``vadf``) run from :mod:`evaluation.references`;
network methods (``airpi``, ``chang_unet``, ``ptychonn``) load ``ckpt=PATH`` and stitch with
:mod:`evaluation.networks`; without ``ckpt``, ``airpi`` uses the shipped model in ``pretrained/`` whose
recorded training ranges cover the scan (:func:`choose_checkpoint`; the default, and the one taken on a tie,
is ``pretrained/airpi_reference.ckpt``, model card ``pretrained/README.md``). A scan outside the model's
training ranges (:func:`evaluation.networks.optics_mismatch`) gets one ``reconstruct: warning: ...`` line
per quantity, or, with ``strict_optics=true``, is refused. ``method=cgrdn`` restores a 2D image instead
(``input=IMAGE``: :mod:`evaluation.restore`, writing ``deepstem.restored/1`` + PNG).

Exit codes: 0 done; 2 (:data:`physics.runtime.EXIT_ERROR`) bad config or input (scan, calibration,
checkpoint of another model, optics outside the model's ranges under ``strict_optics``, ...) or a failed
reconstruction: one line ``deepstem: error: ...`` on stderr, nothing written under the output names.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from datagen import store
from evaluation.engines import ENGINES
from evaluation.io import Scan4D, ScanError, load_4dstem
from evaluation.references import (
    Reconstruction,
    epie,
    icom,
    ricom,
    scan_detector_angles_mrad,
    ssb,
    virtual_detector,
)
from physics.runtime import check_compile, check_precision, configure_threads, report_error

__all__ = [
    "CONVENTIONAL_METHODS",
    "IMAGE_METHODS",
    "NETWORK_METHODS",
    "choose_checkpoint",
    "default_checkpoint",
    "missing_key_message",
    "pretrained_dir",
    "reconstruct_main",
    "run_method",
    "setup_threads",
    "shipped_checkpoints",
    "write_reconstruction",
]

CONVENTIONAL_METHODS = ("epie", "ssb", "icom", "ricom", "vadf")
NETWORK_METHODS = ("airpi", "chang_unet", "ptychonn")
#: methods that restore a 2D image instead of reconstructing a 4D scan (evaluation.restore)
IMAGE_METHODS = ("cgrdn",)
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
#: environment variable naming another folder of shipped models (tests; a site's own model collection)
PRETRAINED_DIR_ENV = "DEEPSTEM_PRETRAINED_DIR"
#: network method -> file name of its default shipped model (model card: pretrained/README.md), the one
#: chosen when several cover a scan equally well
PRETRAINED = {
    "airpi": "airpi_reference.ckpt",
    "cgrdn": "cgrdn_cpu.ckpt",
    "chang_unet": "chang_hbn.ckpt",
    "ptychonn": "ptychonn_cpu.ckpt",
}
#: engines of reconstruct.py: evaluation.engines' ENGINES (a saved scan) and engine=libertem_live (frames
#: streamed from a detector while it scans: evaluation.engines.live, the live extra)
LIVE_ENGINE = "libertem_live"
CLI_ENGINES = tuple(dict.fromkeys((*ENGINES, LIVE_ENGINE)))


def pretrained_dir() -> Path:
    """The folder of shipped models: ``$DEEPSTEM_PRETRAINED_DIR`` when set, else the repository's
    ``pretrained/``."""
    return Path(os.environ.get(PRETRAINED_DIR_ENV) or PRETRAINED_DIR)


def shipped_checkpoints(method: str) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, checkpoint)`` of every ``*.ckpt`` in :func:`pretrained_dir` that holds a ``method`` network
    (:func:`evaluation.networks.identify_checkpoint`), sorted by name; files that do not load
    weights-only are skipped."""
    from evaluation.networks import CheckpointError, identify_checkpoint
    from models.checkpoints import load_checkpoint

    found = []
    for path in sorted(pretrained_dir().glob("*.ckpt")):
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError:
            continue
        if identify_checkpoint(checkpoint) == method:
            found.append((path, checkpoint))
    return found


def choose_checkpoint(
    method: str, scan: Any = None, pixels: int = 64, step_factor: float = 1.0
) -> tuple[Path, str] | None:
    """``(path, reason)`` of the shipped ``method`` model whose recorded training ranges cover ``scan``
    best, or None when none is shipped.

    Score: the quantities of the scan outside the model's ranges
    (:func:`evaluation.networks.optics_mismatch`, ``step_factor`` as there) plus one when the detector
    does not reach the model's ``alpha / gmax`` on a ``pixels`` grid
    (:func:`evaluation.networks.detector_mismatch`); the lowest wins, ties go to the default of
    :data:`PRETRAINED`, then to the first by name. Without ``scan``: the default (or the first).
    ``reason`` says why, in words, for the log.
    """
    from evaluation.networks import detector_mismatch, optics_mismatch

    candidates = shipped_checkpoints(method)
    if not candidates:
        return None
    default = PRETRAINED.get(method)
    scores = []
    for path, checkpoint in candidates:
        misses = [] if scan is None else optics_mismatch(checkpoint, scan, step_factor=step_factor)
        misses += [] if scan is None else detector_mismatch(checkpoint, scan, pixels)
        scores.append((len(misses), path.name != default, path.name, path))
    scores.sort()
    best, _, name, path = scores[0]
    if scan is None:
        reason = "the default" if name == default else f"the first of {len(scores)} shipped {method} models"
        return path, reason
    covers = (
        "its training ranges cover the scan"
        if best == 0
        else f"{best} quantit{'y' if best == 1 else 'ies'} of the scan outside its training ranges"
    )
    if len(scores) == 1:
        return path, f"the only shipped {method} model; {covers}"
    tied = sum(1 for score in scores if score[0] == best) > 1
    tie = ("; a tie, the default wins" if name == default else "; a tie, first by name") if tied else ""
    others = ", ".join(f"{s[2]} {s[0]} outside" for s in scores[1:])
    return path, f"{covers}; fewest of {len(scores)} shipped {method} models{tie} (others: {others})"


def default_checkpoint(method: str, scan: Any = None) -> Path | None:
    """The shipped checkpoint of ``method`` for ``scan`` (:func:`choose_checkpoint`; without ``scan``
    the default ``pretrained/airpi_reference.ckpt``), or None when there is none."""
    choice = choose_checkpoint(method, scan)
    return None if choice is None else choice[0]


def _params(cfg: DictConfig, method: str) -> dict[str, Any]:
    section = cfg.get(method)
    return dict(OmegaConf.to_container(section, resolve=True)) if section is not None else {}


def run_method(
    scan: Scan4D,
    method: str,
    params: dict[str, Any],
    progress: bool = True,
    model: Any = None,
    device: str = "auto",
    precision: str = "auto",
    channels_last: bool = True,
    engine: str = "local",
    engine_workers: Any = None,
    engine_scheduler: Any = None,
    compile: bool | str = "auto",
) -> Reconstruction:
    """Run one method on ``scan`` with the parameters of its config section.

    Network methods need ``model``: a loaded LightningModule or a checkpoint path; they run at
    ``precision`` (auto | bf16 | 32: auto = bf16 where the device has bf16 units, fp32 otherwise), with
    weights and inputs in NHWC memory order where ``channels_last`` (NCHW otherwise), compiled with
    :func:`torch.compile` per ``compile`` (auto | true | false, :func:`evaluation.networks.resolve_compile`;
    the local engine only). All three are ignored by the conventional methods.

    ``engine="libertem"`` runs the per-pattern part as LiberTEM UDFs (:mod:`evaluation.engines.libertem`:
    icom, ricom, vadf, ssb, ptychonn, airpi, chang_unet; inline with ``engine_workers`` None, else a local
    Dask cluster of that many workers, or the Dask scheduler at ``engine_scheduler``); epie raises
    ValueError. The live engine (``engine=libertem_live``, :mod:`evaluation.engines.live`) has no scan file
    and is dispatched by :func:`main`.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "libertem":
        from evaluation.engines.libertem import run_libertem

        if method in NETWORK_METHODS and isinstance(model, (str, Path)):
            from evaluation.networks import load_network

            model = load_network(model, method, "cpu")
        elif method in NETWORK_METHODS and model is not None:
            model = model.to("cpu")  # the UDF runs the network on the workers' CPUs
        return run_libertem(
            scan, method, params, workers=engine_workers, scheduler=engine_scheduler, model=model,
            precision=precision, channels_last=channels_last, progress=progress,
        )  # fmt: skip
    if method in NETWORK_METHODS:
        from evaluation.networks import reconstruct_with_network

        if model is None:
            raise ValueError(f"method {method!r} needs a network checkpoint: give ckpt=PATH")
        return reconstruct_with_network(
            scan, method, model, params, device=device, progress=progress, precision=precision,
            channels_last=channels_last, compile=compile,
        )  # fmt: skip
    common = {
        "scan_step_A": scan.scan_step_A,
        "k_pixel_invA": scan.k_pixel_invA,
        "scan_rotation_deg": scan.scan_rotation_deg,
        "transpose": scan.scan_transpose,
        "progress": progress,
    }
    optics = {"energy_eV": scan.energy_eV, "semiangle_mrad": scan.semiangle_mrad}
    aberrations = {"defocus_A": scan.defocus_A, "Cs_A": scan.Cs_A}
    if method == "ssb":
        return ssb(scan.data, **optics, **common, **aberrations, **params)
    if method == "epie":
        return epie(scan.data, **optics, **common, **aberrations, **params)
    if method == "icom":
        return icom(scan.data, **common, **params)
    if method == "ricom":
        band = params.pop("band_pass_invA", None)
        return ricom(scan.data, **common, band_pass_invA=tuple(band) if band else None, **params)
    if method == "vadf":
        inner, outer = scan_detector_angles_mrad(
            scan.shape[2:], scan.k_pixel_invA, scan.energy_eV, scan.semiangle_mrad,
            params.get("detector", "adf"), params.get("inner_mrad"), params.get("outer_mrad"),
        )  # fmt: skip
        result = virtual_detector(
            scan.data,
            scan.k_pixel_invA,
            scan.energy_eV,
            inner,
            outer,
            scan_step_A=scan.scan_step_A,
            progress=progress,
        )
        result.info["detector"] = params.get("detector", "adf")
        return result
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(CONVENTIONAL_METHODS)}")


def _save_png(path: Path, result: Reconstruction, title: str) -> None:
    """The phase (or image) in scan coordinates; beside it, where the result has one, the trust map
    ``result.consistency`` over the scan positions (:mod:`evaluation.networks.consistency`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(result.phase)
    # pixel (i, j) is centred on origin + (i, j) * pixel
    x0 = result.origin_A[0] - 0.5 * result.pixel_size_A[0]
    y0 = result.origin_A[1] - 0.5 * result.pixel_size_A[1]
    extent = (
        x0,
        x0 + image.shape[0] * result.pixel_size_A[0],
        y0,
        y0 + image.shape[1] * result.pixel_size_A[1],
    )
    trust = None if result.consistency is None else np.asarray(result.consistency, dtype=np.float64)
    if trust is None:
        figure, axes = plt.subplots(figsize=(5, 4.3), dpi=120)
    else:
        figure, (axes, trust_axes) = plt.subplots(1, 2, figsize=(9.6, 4.3), dpi=120)
    shown = axes.imshow(image.T, origin="lower", extent=extent, cmap="gray")
    axes.set_xlabel("x (Å)")
    axes.set_ylabel("y (Å)")
    axes.set_title(title, fontsize=9)
    figure.colorbar(shown, ax=axes, label="counts" if result.method == "vadf" else "phase (rad)")
    if trust is not None:
        finite = trust[np.isfinite(trust)]
        # linear, 0 .. the 99th percentile but at least 2, so that a map at the shot-noise level 1 shows
        # mid-scale and outliers saturate
        top = max(2.0, float(np.percentile(finite, 99))) if finite.size else 2.0
        rx, ry = trust.shape
        drawn = trust_axes.imshow(
            trust.T, origin="lower", extent=(-0.5, rx - 0.5, -0.5, ry - 0.5), cmap="magma", vmin=0.0, vmax=top
        )
        trust_axes.set_xlabel("scan position x")
        trust_axes.set_ylabel("scan position y")
        median = float(np.median(finite)) if finite.size else float("nan")
        trust_axes.set_title(f"forward-model consistency (median {median:.3g})", fontsize=9)
        figure.colorbar(drawn, ax=trust_axes, label="Poisson deviance / expected (1 = shot noise)")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def write_reconstruction(
    output: Path,
    result: Reconstruction,
    patterns_per_s: float,
    input_path: Path | None = None,
    config: Any = None,
    overwrite: bool = True,
) -> tuple[Path, Path]:
    """Write ``deepstem.recon/1`` to ``output`` and a PNG beside it, both atomically (all or nothing).

    Datasets: ``phase`` float32 (H, W); optional ``amplitude`` float32 (H, W), ``fourier_error`` (ePIE,
    per iteration), ``probe``, and ``consistency`` float32 (Rx, Ry) for network methods: the trust map, one
    normalised Poisson deviance per (effective) scan position, ~1 where the prediction explains the
    electron counts to within shot noise (:mod:`evaluation.networks.consistency`), drawn beside the phase
    in the PNG. Attributes: ``pixel_size_A``, ``origin_A``, ``method``, ``patterns_per_s``, ``input`` and
    the scalar ``info_*`` entries of ``result.info`` (e.g. ``info_consistency_median``).
    """
    png = output.with_suffix(".png")
    if not overwrite:
        for existing in (output, png):
            if existing.exists():
                raise FileExistsError(f"{existing}: exists (set overwrite=true to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary_png = png.with_name(f".{png.name}.tmp-{os.getpid()}")
    datasets: dict[str, Any] = {"phase": np.asarray(result.phase, dtype=np.float32)}
    if result.amplitude is not None:
        datasets["amplitude"] = np.asarray(result.amplitude, dtype=np.float32)
    if "fourier_error" in result.info:
        datasets["fourier_error"] = np.asarray(result.info["fourier_error"], dtype=np.float64)
    if "probe" in result.info:
        datasets["probe"] = np.asarray(result.info["probe"])
    if result.consistency is not None:
        datasets["consistency"] = np.asarray(result.consistency, dtype=np.float32)
    attrs: dict[str, Any] = {
        "pixel_size_A": np.asarray(result.pixel_size_A, dtype=np.float64),
        "origin_A": np.asarray(result.origin_A, dtype=np.float64),
        "method": result.method,
        "patterns_per_s": float(patterns_per_s),
    }
    if input_path is not None:
        attrs["input"] = str(input_path)
    for key, value in result.info.items():
        if isinstance(value, (int, float, str, bool)):
            attrs[f"info_{key}"] = value
    try:
        _save_png(temporary_png, result, f"{result.method}: {input_path.name if input_path else ''}")
        store.write(output, store.RECON, datasets, attrs=attrs, config=config, overwrite=True)
        os.replace(temporary_png, png)
    finally:
        if temporary_png.exists():
            temporary_png.unlink()
    return output, png


def _error(message: str) -> int:
    first_line = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    return report_error(first_line)


def missing_key_message(cfg: DictConfig, skip: tuple[str, ...] = ()) -> str | None:
    """``suite.scans.tiny.path is not set: give suite.scans.tiny.path=...`` for the first mandatory value
    (``???``) left unset, other than the keys in ``skip``; None when all are set."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if key not in skip)
    if not missing:
        return None
    return f"{missing[0]} is not set: give {missing[0]}=..."


def setup_threads(cfg: DictConfig) -> int:
    """Set torch's intra-op threads from ``cfg.threads`` (auto: every core; no worker processes here).

    Raises ValueError with a one-line message naming ``threads``.
    """
    return configure_threads(cfg.get("threads", "auto"), 0)


def reconstruct_main(cfg: DictConfig) -> int:
    """The body of ``reconstruct.py``; returns the exit code."""
    method = str(cfg.method)
    methods = CONVENTIONAL_METHODS + NETWORK_METHODS + IMAGE_METHODS
    if method not in methods:
        return _error(f"unknown method {method!r}; choose one of {', '.join(methods)}")
    engine = str(cfg.get("engine", "local"))
    if engine not in CLI_ENGINES:
        return _error(f"unknown engine {engine!r}; choose one of {', '.join(CLI_ENGINES)}")
    if engine == LIVE_ENGINE:
        return live_main(cfg, method)
    if OmegaConf.is_missing(cfg, "input") or not cfg.input:
        return _error(
            "no input: give input=SCAN (deepstem .h5, EMD 1.0, .mib, Velox .emd, .npy + YAML, or through "
            "LiberTEM's readers .raw + YAML, EMPAD .xml, ...)"
        )
    message = missing_key_message(cfg)
    if message is not None:
        return _error(message)
    try:
        threads = setup_threads(cfg)
        check_precision(cfg.get("precision", "auto"))
        check_compile(cfg.get("compile", "auto"))
    except ValueError as err:
        return _error(str(err))
    if engine == "libertem":
        from evaluation.engines.libertem import unsupported_message

        if (message := unsupported_message(method)) is not None:
            return _error(message)
    from hydra.utils import to_absolute_path

    input_path = Path(to_absolute_path(str(cfg.input)))
    output = (
        Path(to_absolute_path(str(cfg.output)))
        if cfg.get("output")
        else input_path.with_name(f"{input_path.stem}_{method}.h5")
    )
    if method in IMAGE_METHODS:
        from evaluation.restore import restore_command

        return restore_command(cfg, input_path, output, threads)
    overrides = {k: v for k, v in dict(cfg.get("calibration_override") or {}).items() if v is not None}
    calibration = to_absolute_path(str(cfg.calibration)) if cfg.get("calibration") else None
    progress = bool(cfg.get("progress", True))
    device = str(cfg.get("device", "auto"))
    model = None
    scan = None
    try:
        params = _params(cfg, method)
        ckpt = None
        if method in NETWORK_METHODS and cfg.get("ckpt"):  # a given checkpoint is checked before the input
            from evaluation.networks import load_network

            ckpt = Path(to_absolute_path(str(cfg.ckpt)))
            model = load_network(ckpt, method, device)
        from evaluation.image_io import image_input_message

        if (message := image_input_message(input_path, method)) is not None:
            return _error(message)
        # the calibration (the data are read lazily) before a shipped model is chosen: the choice needs it
        scan = load_4dstem(input_path, calibration, progress=progress, **overrides)
        if method in NETWORK_METHODS:
            from evaluation.networks import load_network, optics_mismatch

            # data repetition feeds the network CBED sums at repetition_stride x the scan step
            step_factor = float(params.get("repetition_stride", 2)) if params.get("data_repetition") else 1.0
            if model is None:
                choice = choose_checkpoint(method, scan, int(params.get("pixels") or 64), step_factor)
                if choice is None:
                    return _error(f"method {method!r} needs a network checkpoint: give ckpt=PATH")
                ckpt, reason = choice
                print(
                    f"reconstruct: ckpt not given; using the shipped model {ckpt} ({reason})", file=sys.stderr
                )
                model = load_network(ckpt, method, device)
            mismatches = optics_mismatch(model, scan, step_factor=step_factor)
            if mismatches and bool(cfg.get("strict_optics", False)):
                return _error(
                    f"{input_path.name}: outside the training ranges of {ckpt.name}: {'; '.join(mismatches)} "
                    "(strict_optics=true; strict_optics=false reconstructs with a warning)"
                )
            for mismatch in mismatches:
                print(f"reconstruct: warning: {input_path.name}: {mismatch}", file=sys.stderr)
        start = time.perf_counter()
        result = run_method(
            scan, method, params, progress=progress, model=model, device=device,
            precision=str(cfg.get("precision", "auto")), engine=engine,
            engine_workers=cfg.get("engine_workers"), engine_scheduler=cfg.get("engine_scheduler"),
            compile=cfg.get("compile", "auto"),
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        num_patterns = scan.num_positions
        patterns_per_s = num_patterns / max(elapsed, 1e-9)
        if not np.all(np.isfinite(result.phase)):
            return _error(f"{method} produced NaN or inf; nothing written")
        h5, png = write_reconstruction(
            output,
            result,
            patterns_per_s,
            input_path=input_path,
            config=cfg,
            overwrite=bool(cfg.get("overwrite", True)),
        )
    except (ScanError, store.StoreError, ValueError, OSError, RuntimeError) as err:
        return _error(str(err))
    finally:
        if scan is not None:
            scan.close()
    precision_note = f", precision {result.info['precision']}" if "precision" in result.info else ""
    if result.info.get("compiled"):
        precision_note += ", compiled"
    print(
        f"{method}: {num_patterns} patterns in {elapsed:.3f} s = {patterns_per_s:.0f} patterns/s "
        f"({threads} thread{'s' if threads != 1 else ''}{precision_note}); wrote {h5} and {png}"
    )
    return 0


def live_main(cfg: DictConfig, method: str) -> int:
    """``reconstruct.py engine=libertem_live``: one acquisition streamed from a Merlin detector
    (:mod:`evaluation.engines.live`; settings in ``live:``, the calibration from ``calibration=`` and
    ``calibration_override``, no ``input``). Writes ``output`` + PNG as ``engine=local`` does, and while the
    frames arrive ``<output stem>_partial.h5`` + ``.png`` every ``live.preview_every_rows`` scan rows.
    Returns the exit code (2 with one error line for a bad setting or an unreachable detector)."""
    from hydra.utils import to_absolute_path

    from evaluation.engines.live import LiveSettings, run_live, unsupported_message

    if (message := unsupported_message(method)) is not None:
        return _error(message)
    message = missing_key_message(cfg, skip=("input",))
    if message is not None:
        return _error(message)
    if not cfg.get("output"):
        return _error("engine=libertem_live writes no file beside an input: give output=PATH.h5")
    output = Path(to_absolute_path(str(cfg.output)))
    if output.suffix != ".h5":
        return _error(f"output must end in .h5, got {output.name}")
    try:
        threads = setup_threads(cfg)
        live_section = cfg.get("live")
        settings = LiveSettings.from_config(
            OmegaConf.to_container(live_section, resolve=True) if live_section is not None else None
        )
        scan = live_calibration(cfg, settings)
        if not bool(cfg.get("overwrite", True)) and output.exists():
            raise FileExistsError(f"{output}: exists (set overwrite=true to replace it)")
        model = None
        if method in NETWORK_METHODS:
            from evaluation.networks import load_network

            check_precision(cfg.get("precision", "auto"))
            if cfg.get("ckpt"):
                ckpt = Path(to_absolute_path(str(cfg.ckpt)))
            else:
                choice = choose_checkpoint(method)
                if choice is None:
                    return _error(f"method {method!r} needs a network checkpoint: give ckpt=PATH")
                ckpt = choice[0]
                print(
                    f"reconstruct: ckpt not given; using the shipped model {ckpt} ({choice[1]})",
                    file=sys.stderr,
                )
            model = load_network(ckpt, method, "cpu")
        result, summary = run_live(
            scan, method, _params(cfg, method), settings, output, config=cfg,
            progress=bool(cfg.get("progress", True)), model=model,
            precision=str(cfg.get("precision", "auto")),
        )  # fmt: skip
        patterns_per_s = summary["frames"] / max(summary["seconds"], 1e-9)
        if not np.all(np.isfinite(result.phase)):
            return _error(f"{method} produced NaN or inf; nothing written")
        h5, png = write_reconstruction(
            output, result, patterns_per_s, config=cfg, overwrite=bool(cfg.get("overwrite", True))
        )
    except (ScanError, store.StoreError, ValueError, OSError, RuntimeError) as err:
        return _error(str(err))
    print(
        f"{method}: {summary['frames']} frames live in {summary['seconds']:.3f} s = {patterns_per_s:.0f} "
        f"patterns/s ({threads} thread{'s' if threads != 1 else ''}, {summary['partial_writes']} partial "
        f"writes); wrote {h5} and {png}"
    )
    return 0


def live_calibration(cfg: DictConfig, settings: Any) -> Scan4D:
    """The calibration of a live scan from ``calibration=FILE.yaml`` and ``calibration_override``, as a
    :class:`evaluation.io.Scan4D` whose ``data`` only has the scan's shape (the frames stream)."""
    from hydra.utils import to_absolute_path

    from evaluation.io import _calibrated_scan, _read_yaml_calibration

    values: dict[str, Any] = {}
    if cfg.get("calibration"):
        values.update(_read_yaml_calibration(Path(to_absolute_path(str(cfg.calibration)))))
    values.update({k: v for k, v in dict(cfg.get("calibration_override") or {}).items() if v is not None})
    return _calibrated_scan(_Shape((*settings.scan_shape, 0, 0)), values, "live scan", "Merlin live")


class _Shape:
    """Stands in for the data of a live scan: its shape only."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(n) for n in shape)
