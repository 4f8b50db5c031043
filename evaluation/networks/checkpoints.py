"""Network checkpoints: loading, identification, the ranges a model was trained for, and the predictor.

* :func:`load_network` loads a Lightning checkpoint of a method in :data:`NETWORK_CLASSES` (weights only,
  :func:`models.checkpoints.load_checkpoint`); :func:`identify_checkpoint` names the model a checkpoint
  holds from its state-dict keys.
* :func:`training_ranges`, :func:`optics_mismatch`, :func:`detector_mismatch`, :func:`model_ratio_alpha_gmax`:
  the optics a model was trained for (``deepstem.trained_for``, written by ``scripts/export_checkpoint.py``)
  held against a scan's calibration (units in :data:`TRAINED_FOR_UNITS`).
* :func:`model_predictor`: the ``predictor(inputs, positions_A)`` the reconstructions call, in fp32 or bf16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.networks.geometry import Predictor, _detector_reach_invA, resolve_device
from evaluation.references._common import pair
from models.checkpoints import CheckpointError, load_checkpoint  # the one class for a refused checkpoint
from physics import wavelength
from physics.runtime import check_compile

__all__ = [
    "ABSOLUTE_TOLERANCE",
    "AUTO_BATCH_SIZE",
    "COMPILE_AUTO_DEVICES",
    "NETWORK_CLASSES",
    "TRAINED_FOR_UNITS",
    "CheckpointError",
    "detector_mismatch",
    "identify_checkpoint",
    "load_network",
    "model_predictor",
    "model_ratio_alpha_gmax",
    "optics_mismatch",
    "ptychonn_geometry_params",
    "resolve_batch_size",
    "resolve_compile",
    "training_ranges",
]

#: method name -> LightningModule class path (module, class)
NETWORK_CLASSES = {
    "airpi": ("models.lightning", "AIRPILightning"),
    "chang_unet": ("models.lightning", "ChangLightning"),
    "ptychonn": ("models.lightning", "PtychoNNLightning"),
}


def identify_checkpoint(checkpoint: Mapping[str, Any]) -> str:
    """Which network a Lightning checkpoint holds, from its state-dict keys.

    Returns ``"airpi"``, ``"chang_unet"``, ``"ptychonn"``, ``"cgrdn"`` or ``"unknown"``.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return "unknown"
    keys = list(state)
    if any(k.startswith("discriminator.") for k in keys):
        return "cgrdn"
    if any(k.startswith("net.amplitude_head.") for k in keys):
        return "airpi"
    if any(k.startswith("net.amplitude_decoder.") for k in keys):
        return "ptychonn"
    if any(k.startswith("net.bridge") for k in keys) or (
        any(k.startswith("net.head.") for k in keys) and any(k.startswith("net.encoder.") for k in keys)
    ):
        return "chang_unet"
    return "unknown"


def load_network(path: str | Path, method: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load the LightningModule of ``method`` from a Lightning checkpoint, in eval mode on ``device``.

    The checkpoint must be a dict with ``state_dict`` and ``hyper_parameters`` (what ``Trainer`` and
    ``load_from_checkpoint`` use). A checkpoint of another model raises :class:`CheckpointError` naming
    the model it holds.
    """
    import importlib

    path = Path(path)
    if method not in NETWORK_CLASSES:
        raise CheckpointError(
            f"unknown network method {method!r}; choose one of {', '.join(NETWORK_CLASSES)}"
        )
    checkpoint = load_checkpoint(path)  # weights only: a file that could run code is refused, never retried
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    held = identify_checkpoint(checkpoint)
    if held != method:
        hint = f"; use method={held}" if held in NETWORK_CLASSES else ""
        raise CheckpointError(f"{path}: the checkpoint holds model '{held}', not '{method}'{hint}")
    module_name, class_name = NETWORK_CLASSES[method]
    cls = getattr(importlib.import_module(module_name), class_name)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams["compile"] = False
    try:
        model = cls(**hparams)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (TypeError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: the {method} checkpoint does not load: {first}") from None
    # what the exporter recorded (scripts/export_checkpoint.py: provenance, the optics it was trained for)
    model.deepstem_info = dict(checkpoint.get("deepstem") or {})
    return model.to(resolve_device(device)).eval()


#: quantities a checkpoint's ``deepstem.trained_for`` may record (scripts/export_checkpoint.py) -> unit
TRAINED_FOR_UNITS = {
    "energy_eV": "eV",
    "semiangle_mrad": "mrad",
    "alpha_over_gmax": "",
    "scan_step_A": "A",
    "Cs_A": "A",
    "defocus_A": "A",
    "dose_e_per_cbed": "electrons per CBED",
}
#: absolute tolerance (in the quantity's unit) added to the relative one, for ranges that may be [0, 0];
#: the reasons are in :func:`optics_mismatch`
ABSOLUTE_TOLERANCE = {"defocus_A": 2.0, "Cs_A": 1000.0}


def training_ranges(model: Any) -> dict[str, tuple[float, float]]:
    """The ranges a model was trained for: ``{quantity: (low, high)}`` in the units of
    :data:`TRAINED_FOR_UNITS` (e.g. ``{"energy_eV": (300000.0, 300000.0), "scan_step_A": (0.24, 0.36)}``).

    ``model`` is a network from :func:`load_network` (its ``deepstem_info``) or a checkpoint dict (its
    ``deepstem`` section). The exporter stores ``[low, high]`` lists; a scalar (checkpoints exported before
    ranges) is the range ``[v, v]``. Empty when nothing was recorded. A malformed entry raises
    :class:`CheckpointError` naming it.
    """
    info = getattr(model, "deepstem_info", None)
    if info is None and isinstance(model, Mapping):
        info = model.get("deepstem")
    trained = (info or {}).get("trained_for") if isinstance(info, Mapping) else None
    ranges: dict[str, tuple[float, float]] = {}
    for key, value in (trained or {}).items():
        bounds = list(value) if isinstance(value, list | tuple) else [value]
        try:
            low, high = (float(bounds[0]), float(bounds[-1])) if len(bounds) in (1, 2) else (math.nan, 0.0)
        except (TypeError, ValueError):
            low, high = math.nan, 0.0
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise CheckpointError(
                f"the model's trained_for[{key!r}] = {value!r} is not a number or [low, high]"
            )
        ranges[str(key)] = (low, high)
    return ranges


#: the Chang U-Net input geometry a checkpoint may record (``deepstem.geometry``, written by
#: scripts/export_checkpoint.py from the training run's ``data.forward_model``) -> chang_reconstruct keyword
CHANG_GEOMETRY = {
    "diffraction_px": "pixels",
    "bin_factor": "bin_factor",
    "collection_ratio": "collection_ratio",
    "illuminated_fraction": "illuminated_fraction",
}


def recorded_geometry(model: Any) -> dict[str, float]:
    """The input geometry a model records (``deepstem.geometry``: ``{"diffraction_px": 32, "bin_factor": 2,
    "collection_ratio": 2.0, "illuminated_fraction": 0.9}`` for a Chang U-Net), empty when none. ``model``
    as for :func:`training_ranges`. A value that is not a positive number raises :class:`CheckpointError`."""
    info = getattr(model, "deepstem_info", None)
    if info is None and isinstance(model, Mapping):
        info = model.get("deepstem")
    geometry = (info or {}).get("geometry") if isinstance(info, Mapping) else None
    found: dict[str, float] = {}
    for key, value in (geometry or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise CheckpointError(f"the model's geometry[{key!r}] = {value!r} is not a positive number")
        found[str(key)] = number
    return found


def chang_geometry_params(model: Any, params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``params`` with the Chang geometry keywords the caller left unset (None or absent) taken from the
    model's :func:`recorded_geometry`, and one message per keyword the caller set to a value other than the
    recorded one (the network then sees patterns of another geometry than it was trained on)."""
    out = dict(params)
    conflicts: list[str] = []
    recorded = recorded_geometry(model)
    for key, keyword in CHANG_GEOMETRY.items():
        if key not in recorded:
            continue
        value = recorded[key]
        typed: Any = round(value) if keyword in ("pixels", "bin_factor") else value
        if out.get(keyword) is None:
            out[keyword] = typed
        elif not math.isclose(float(out[keyword]), value, rel_tol=1e-6):
            conflicts.append(
                f"chang_unet.{keyword}={out[keyword]} differs from the model's training geometry "
                f"({key}={typed})"
            )
    return out, conflicts


def ptychonn_geometry_params(
    model: Any, params: Mapping[str, Any], detector_shape: tuple[int, int], k_pixel_invA: tuple[float, float]
) -> tuple[dict[str, Any], list[str]]:
    """``params`` with PtychoNN's ``pixels``, ``gmax_invA`` and ``detector_centre_px`` left unset (None or
    absent) derived from the model's :func:`recorded_geometry`, and one message per value set otherwise.

    A PtychoNN trained on a scan's own ePIE reconstruction
    (:class:`training.datamodules.EpieLabelsDataModule`) records
    ``{"network_px": K, "detector_px": N, "whole_detector": 1}`` (and ``weight_threshold``, the probe
    fraction its loss footprint ended at, which becomes the stitching's): it saw each whole ``N x N`` detector
    resized to ``K x K`` (area average), so network pixel ``K // 2`` sits at detector coordinate
    ``(K // 2 + 1/2) N / K - 1/2`` (0-based pixel centres; 32.5 for 64 -> 32) and the network grid spans the
    whole detector, ``gmax = N k_pixel / 2``: the resampling of :mod:`evaluation.networks` then reproduces
    the training inputs. A scan whose detector is not ``N`` pixels square gets the same rule on its own
    detector and a message (the patterns are binned otherwise than in training). A model without the record
    returns ``params`` unchanged.
    """
    out = dict(params)
    recorded = recorded_geometry(model)
    if "network_px" not in recorded or not recorded.get("whole_detector"):
        return out, []
    messages: list[str] = []
    k_net = round(recorded["network_px"])
    ny, nx = (int(n) for n in detector_shape)
    trained_n = round(recorded.get("detector_px", nx))
    if ny != nx or nx != trained_n:
        messages.append(
            f"the detector ({ny} x {nx} px) differs from the model's training detector ({trained_n} x "
            f"{trained_n} px, resized to {k_net} px): the patterns are binned otherwise than in training"
        )
    k_pixel = float(min(k_pixel_invA))
    derived: dict[str, Any] = {
        "pixels": k_net,
        "gmax_invA": min(ny, nx) * k_pixel / 2.0,
        "detector_centre_px": tuple((k_net // 2 + 0.5) * n / k_net - 0.5 for n in (ny, nx)),
    }
    if "weight_threshold" in recorded:  # the loss footprint it was trained on is the one to stitch
        derived["weight_threshold"] = float(recorded["weight_threshold"])
    for keyword, value in derived.items():
        given = out.get(keyword)
        if given is None:
            out[keyword] = value
        elif not np.allclose(np.asarray(given, float), np.asarray(value, float), rtol=1e-6, atol=1e-9):
            why = (
                "its loss footprint"
                if keyword == "weight_threshold"
                else f"the whole {trained_n} px detector resized to {k_net} px"
            )
            messages.append(
                f"ptychonn.{keyword}={given} differs from the model's training geometry ({keyword}={value}: "
                f"{why})"
            )
    return out, messages


def _format_range(key: str, low: float, high: float) -> str:
    unit = TRAINED_FOR_UNITS.get(key, "")
    return f"[{low:g}, {high:g}]" + (f" {unit}" if unit else "")


def _outside(key: str, value: float, low: float, high: float, tolerance: float) -> bool:
    extra = ABSOLUTE_TOLERANCE.get(key, 0.0)
    return not low - tolerance * abs(low) - extra <= value <= high + tolerance * abs(high) + extra


def optics_mismatch(model: Any, scan: Any, tolerance: float = 0.02, step_factor: float = 1.0) -> list[str]:
    """The calibration values of ``scan`` outside the ranges the model was trained for, one message each,
    e.g. ``defocus_A=-52.1 outside the model's training range [0, 0] A``; empty when all are inside or
    nothing is recorded (:func:`training_ranges`).

    Checked: ``energy_eV``, ``semiangle_mrad``, ``scan_step_A`` (each axis; one message when both are the
    same), ``Cs_A``, ``defocus_A``. Not here: ``alpha_over_gmax`` (the network grid is resampled to it,
    :func:`evaluation.networks.reconstruct_with_network`) and ``dose_e_per_cbed`` (a scan does not tell its
    dose).
    ``step_factor`` multiplies the scan step (data repetition reconstructs at ``repetition_stride`` x the
    step, and that is the step the network sees).

    A value is inside when it lies in ``[low, high]`` widened by ``tolerance`` (relative, of each bound's
    magnitude) plus, for ranges that may be ``[0, 0]``, an absolute tolerance (:data:`ABSOLUTE_TOLERANCE`):
    ``defocus_A`` 2 A, an aberration phase ``pi df alpha^2 / lambda`` at the aperture edge of 0.13 rad at
    300 kV / 20 mrad (0.29 rad at 30 mrad), and ``Cs_A`` 1000 A = 0.1 um, ``pi/2 Cs alpha^4 / lambda`` =
    0.013 rad there (0.065 rad at 30 mrad): both far inside the quarter-wave (pi/2) limit, i.e. optics the
    network cannot tell from an aberration-free probe, while paper 002's Table 1 setting, Cs = 0.001 mm
    (10,000 A) at its Scherzer defocus (17 A at 300 kV), lies outside both.
    """
    ranges = training_ranges(model)
    found: list[str] = []

    def check(key: str, label: str, value: float, note: str = "") -> None:
        low, high = ranges[key]
        if _outside(key, value, low, high, tolerance):
            found.append(
                f"{label}={value:g}{note} outside the model's training range {_format_range(key, low, high)}"
            )

    for key in ("energy_eV", "semiangle_mrad"):
        if key in ranges and getattr(scan, key, None) is not None:
            check(key, key, float(getattr(scan, key)))
    if "scan_step_A" in ranges and getattr(scan, "scan_step_A", None) is not None:
        steps = [float(s) for s in np.atleast_1d(np.asarray(scan.scan_step_A, dtype=np.float64))][:2]
        note = f" (data repetition: {step_factor:g} x the scan step)" if step_factor != 1 else ""
        if len(set(steps)) == 1:
            check("scan_step_A", "scan_step_A", steps[0] * step_factor, note)
        else:
            for axis, step in zip("xy", steps, strict=False):
                check("scan_step_A", f"scan_step_A[{axis}]", step * step_factor, note)
    for key in ("Cs_A", "defocus_A"):
        if key in ranges and getattr(scan, key, None) is not None:
            check(key, key, float(getattr(scan, key)))
    return found


def model_ratio_alpha_gmax(model: Any, tolerance: float = 0.02) -> tuple[float, float] | None:
    """The ``alpha / gmax`` range to resample a scan to for ``model``: its recorded ``alpha_over_gmax``
    with the upper bound widened by ``tolerance`` (relative, as in :func:`optics_mismatch`; a model trained
    at exactly 0.5 then accepts a detector that ends a rounding error short of 2 alpha); the lower bound,
    which sets ``gmax = alpha / low`` on a large detector, is kept. None when not recorded."""
    recorded = training_ranges(model).get("alpha_over_gmax")
    if recorded is None:
        return None
    low, high = recorded
    return low, max(high, min(high * (1 + tolerance), 0.99))


def detector_mismatch(model: Any, scan: Any, pixels: int = 64, tolerance: float = 0.02) -> list[str]:
    """One message when the detector of ``scan`` (about its middle pixel) does not reach ``alpha / high``
    of the model's recorded ``alpha_over_gmax`` range on a ``pixels`` grid, so that the model's grid would
    not fit; empty otherwise or when not recorded. Used to choose among shipped models before the scan's
    data are read (the reconstruction itself measures the detector centre and refuses such a scan)."""
    ratio = model_ratio_alpha_gmax(model, tolerance)
    needed = ("energy_eV", "semiangle_mrad", "k_pixel_invA", "data")
    if ratio is None or any(getattr(scan, k, None) is None for k in needed):
        return []
    shape = tuple(int(n) for n in scan.data.shape[2:])
    k_pixel = pair(scan.k_pixel_invA, "k_pixel_invA")
    reach = _detector_reach_invA(shape, k_pixel, np.array([n // 2 for n in shape], dtype=np.float64), pixels)
    alpha = float(scan.semiangle_mrad) * 1e-3 / wavelength(float(scan.energy_eV))
    if reach >= alpha / ratio[1]:
        return []
    low, high = training_ranges(model)["alpha_over_gmax"]
    return [
        f"the detector reaches {reach / alpha:.3g} alpha, short of the alpha / {high:g} = {1 / high:.3g} "
        f"alpha of the model's alpha_over_gmax training range {_format_range('alpha_over_gmax', low, high)}"
    ]


#: Inference batch per device type when ``batch_size`` is ``auto`` (or None), for a 64 x 64 network input
#: (:func:`resolve_batch_size` scales it by the input's pixel count). On the CPU small batches keep a layer's
#: activations in cache: AIRPI's network at bf16 ran 282 / 278 / 246 / 169 / 134 patterns/s at batch
#: 16 / 32 / 64 / 128 / 256 on 2 AVX512-BF16 cores (and Chang's 32 x 32 U-Net peaked at 128:
#: docs/benchmarks.md); a GPU needs large batches to fill.
AUTO_BATCH_SIZE = {"cpu": 32, "cuda": 1024}
AUTO_BATCH_PIXELS = 64

#: Device types where ``compile=auto`` compiles the network (:func:`torch.compile`, inductor), for scans of
#: at least :data:`COMPILE_AUTO_MIN_POSITIONS`. Not the CPU: on 2 AVX512-BF16 cores the compiled AIRPI network
#: ran 1.1-1.4x faster alone (bf16, batch 32), but a whole 128 x 128 scan end to end took 64.7 s compiled
#: (4-6 s of it compiling) against 61.7 s eager (docs/benchmarks.md); ``compile=true`` there is for long
#: scans.
COMPILE_AUTO_DEVICES = ("cuda",)

#: The fewest scan positions for which ``compile=auto`` compiles on :data:`COMPILE_AUTO_DEVICES`. Measured on
#: one H200 (docs/benchmarks.md "GPU", AIRPI bf16, 256 x 256 scan): compiled, a warm call saves 9.9 us per
#: pattern (1.86 s against 2.52 s for 65,536), and compiling costs 4.4-7.1 s once per process (6.2 s inside
#: the first end-to-end call): break-even at 440,000-710,000 patterns. So a single 256 x 256 scan runs
#: eager (25,360 patterns/s, against 8,101 compiled, compilation included) and one of ~840 x 840 or more
#: compiled; ``compile=true`` compiles whatever the size (a session of many scans, a live detector).
COMPILE_AUTO_MIN_POSITIONS = 700_000


def resolve_batch_size(batch_size: int | str | None, device_type: str, pixels: int | None = None) -> int:
    """The inference batch: ``batch_size``, or for ``auto`` / None the device's :data:`AUTO_BATCH_SIZE`, on
    the CPU scaled to the same activation size for a ``pixels`` x ``pixels`` input (32 px: 4x the batch)."""
    if batch_size is None or (isinstance(batch_size, str) and batch_size.strip().lower() == "auto"):
        batch = AUTO_BATCH_SIZE.get(device_type, AUTO_BATCH_SIZE["cuda"])
        if device_type == "cpu" and pixels:
            batch = max(1, round(batch * (AUTO_BATCH_PIXELS / int(pixels)) ** 2))
        return batch
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or str(batch_size).strip() not in (str(value), f"{value}.0"):
        raise ValueError(f"batch_size must be a positive integer or auto, got {batch_size!r}")
    return value


def resolve_compile(compile: bool | str | None, device_type: str, positions: int | None = None) -> bool:
    """Whether to compile the network: ``true`` / ``false`` as given; ``auto`` (or None) on the device types
    of :data:`COMPILE_AUTO_DEVICES` for scans of at least :data:`COMPILE_AUTO_MIN_POSITIONS` ``positions``
    (None: size unknown, compiled there). Raises ValueError naming ``compile`` for anything else
    (:func:`physics.runtime.check_compile`)."""
    value = check_compile(compile)
    if value == "auto":
        large = positions is None or positions >= COMPILE_AUTO_MIN_POSITIONS
        return device_type in COMPILE_AUTO_DEVICES and large
    return value == "true"


def _run_frozen(forward: Any, inputs: torch.Tensor) -> Any:
    """``forward(inputs)`` of a :func:`torch.compile`-d network with inductor's weight freezing on (a module
    level function: a predictor closure that names inductor's config module cannot be pickled to Dask)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        return forward(inputs)


def model_predictor(
    model: torch.nn.Module,
    method: str,
    precision: str = "32",
    channels_last: bool = True,
    compile: bool = False,
) -> Predictor:
    """A ``predictor(inputs, positions_A)`` around a loaded LightningModule (positions are ignored).

    AIRPI returns the complex exit wave (B, K, K); Chang the phase (B, K, K); PtychoNN (amplitude, phase).
    ``precision`` ``"bf16"`` runs the network under bf16 autocast (outputs back in fp32 before the complex
    wave is formed), ``"32"`` in fp32 (resolve ``auto`` first: :func:`physics.runtime.resolve_precision`).
    ``channels_last`` puts the weights and inputs in NHWC memory order (oneDNN's and cuDNN's fast
    convolution layout). The model's weights are converted in place.

    ``compile`` wraps the network in :func:`torch.compile` (inductor, static shapes, weights frozen as
    constants: batch-norm folded into the convolutions, weights pre-packed for oneDNN). It compiles on the
    first call; a smaller batch after it (the last of a scan) is padded to the first batch's size with
    copies of its last input, so that nothing recompiles. Where compilation fails (no C++ compiler, an
    unsupported backend) a RuntimeWarning names the reason and the network runs eagerly.
    """
    from models.airpi import output_to_wave

    if precision not in ("32", "bf16"):
        raise ValueError(f"model_predictor: precision must be '32' or 'bf16', got {precision!r}")
    device_type = next(model.parameters()).device.type
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    use_bf16 = precision == "bf16"
    state: dict[str, Any] = {"forward": torch.compile(model, dynamic=False) if compile else model, "batch": 0}

    def run(inputs: torch.Tensor) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
            if state["forward"] is model:
                return model(inputs)
            return _run_frozen(state["forward"], inputs)

    def compiled(inputs: torch.Tensor) -> Any:
        count = inputs.shape[0]
        state["batch"] = size = max(state["batch"], count)
        if count < size:  # a static-shape graph: pad rather than compile a second one
            filler = inputs[-1:].expand(size - count, *inputs.shape[1:])
            inputs = torch.cat([inputs, filler])
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
        try:
            out = run(inputs)
        except Exception as err:  # any compiler failure: warn once, run eagerly (errors of the network
            # itself raise again there)
            import warnings

            reason = (str(err).splitlines() or [""])[0][:200]
            warnings.warn(
                f"compile: torch.compile failed ({type(err).__name__}: {reason}); running the network "
                "uncompiled",
                RuntimeWarning,
                stacklevel=2,
            )
            state["forward"] = model
            out = run(inputs)
        if count < size:
            out = tuple(o[:count] for o in out) if isinstance(out, tuple) else out[:count]
        return out

    def network(inputs: torch.Tensor) -> Any:
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        out = compiled(inputs) if state["forward"] is not model else run(inputs)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    @torch.inference_mode()
    def predict(inputs: torch.Tensor, positions_A: torch.Tensor | None = None) -> Any:
        if method == "airpi":
            return output_to_wave(network(inputs), model.net.amplitude_exponent)
        if method == "chang_unet":
            return network(inputs)[:, 0]
        amplitude, phase = network(inputs)
        return amplitude[:, 0], phase[:, 0]

    predict.compiled = lambda: state["forward"] is not model  # type: ignore[attr-defined]
    return predict
