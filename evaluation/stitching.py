"""Network reconstructions of whole scans: AIRPI, Chang U-Net and PtychoNN patches stitched into one object.

Conventions (those of :mod:`evaluation.references`): scans are indexed ``[Rx, Ry, Kx, Ky]``; probe position
``(i, j)`` sits at ``(i * step_x, j * step_y)`` Angstrom; a detector vector becomes a scan-frame vector by the
optional component swap (``scan_transpose``) and then the rotation ``R(scan_rotation_deg)``. The result is a
:class:`~evaluation.references.Reconstruction` whose pixel ``(m, n)`` is centred at ``origin_A + (m, n) *
pixel_size_A``.

Pipeline, the same for the three networks:

1. The scan is streamed in blocks of scan rows (it is read lazily; only ``block_rows`` rows plus a halo of
   one row per side are in memory at a time).
2. Each CBED is resampled from the detector grid onto the network's ``K x K`` grid covering ``+-gmax``
   (1/Angstrom, zero frequency at pixel ``K // 2``, the kernel-shard convention of ``datagen.kernel``) by
   the exact area overlap of detector and network pixels, which preserves the counts inside ``+-gmax``
   (:func:`overlap_matrix`); the detector centre is the centre of mass of the position-averaged CBED
   (as for SSB and ePIE); scan rotation/transpose are applied on the network grid with
   :func:`models.inputs.rotate_patterns`. Chang U-Net patterns go through the training data's own
   geometry (:class:`datagen.stock_images.ChangForwardModel`): any detector (32, 128 x 128 EMPAD,
   256 x 256 Merlin, an odd crop, unequal pixels along x and y) is resampled onto its simulation grid
   (``pixels * bin_factor`` pixels over ``+-collection_ratio * alpha``, zero frequency at the centre
   pixel), rotated there, and summed in ``bin_factor`` x ``bin_factor`` blocks (:func:`_bin_patterns`), so
   zero frequency lies ``(bin_factor - 1) / (2 bin_factor)`` of a network pixel below ``K // 2``, as in
   the training patterns.
3. Network inputs are built with the training pre-processing: AIRPI with :func:`models.inputs.preprocess`
   (``x^0.1``, ``zeta`` step weights, standardisation, probe channels), PtychoNN as in
   :func:`training.datamodules.ptychonn_view` (centre CBED / its maximum), Chang as in the stock-image data
   module (``sqrt(counts / total)`` on 32 x 32 pixels over ``+-collection_ratio * alpha``).
4. Batched inference (``batch_size``) on the CPU or GPU; any callable ``predictor(inputs, positions_A)`` can
   stand in for the network (the tests use an oracle that returns the true exit wave).
5. Patches are evaluated on the object grid (pixel ``step / oversampling`` per axis, or ``pixel_size_A``
   for AIRPI) and summed into an object-sized accumulator, the only array whose size grows with the field:

   * AIRPI (paper 002 eq. 4-8): the predicted exit wave and the probe are moved to the scan position by a
     Fourier phase ramp (evaluated directly on the object pixels: sub-pixel placement and resampling in one
     matrix product), ``T_n = sgn(psi_out conj(psi_in)) * w_n`` with ``w_n = |psi_in|^2 / sum |psi_in|^2``
     where ``|psi_in|^2 > 0.1 max`` (0 elsewhere), ``T = sum_n T_n``, image ``angle(T)``.
   * Chang U-Net (paper 001 eq. 2): phase patches inside the illuminated disc, each with an unknown constant
     offset ``c_n``; the offsets minimise ``sum over overlapping pairs (mean_ij(P_i) + c_i - mean_ij(P_j) -
     c_j)^2`` (means over the common pixels), a sparse linear least-squares problem solved exactly with
     :func:`scipy.sparse.linalg.lsqr` (``c_0 = 0``); image = mean of ``P_n + c_n`` over the patches covering
     a pixel. Only the per-patch overlap means (``N x pairs``) are kept, not the patches.
   * PtychoNN (paper 004): probe-weighted average ``sum w_n A_n exp(i phi_n) / sum w_n`` with ``w_n`` the
     probe intensity where ``|psi_in|^2 > 0.1 max``; phase = its angle, amplitude = the weighted mean of
     ``A_n``.

Options: ``oversampling`` (object pixel = step / oversampling), ``data_repetition`` (paper 002: each CBED
replaced by the sum of a ``repetition_box`` x ``repetition_box`` box of CBEDs, edge positions reusing the
nearest ones, reconstructed at ``repetition_stride`` times the step), ``crop_to_scan`` (keep the field of
the probe positions; otherwise the whole area the patches cover). Border positions reuse the nearest CBEDs
in the 3x3 kernel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluation.references import Reconstruction
from evaluation.references._common import check_scan_array, iter_scan_rows, pair, pattern_centre
from evaluation.unwrap import unwrap_phase_image
from models.checkpoints import CheckpointError, load_checkpoint  # the one class for a refused checkpoint
from physics import probe, wavelength

__all__ = [
    "ABSOLUTE_TOLERANCE",
    "NETWORK_CLASSES",
    "PAPER_RATIO_ALPHA_GMAX",
    "TRAINED_FOR_UNITS",
    "CheckpointError",
    "DetectorReachError",
    "PtychoNNPlacement",
    "ScanGeometry",
    "airpi_reconstruct",
    "chang_reconstruct",
    "default_gmax_invA",
    "detector_mismatch",
    "identify_checkpoint",
    "load_network",
    "model_predictor",
    "model_ratio_alpha_gmax",
    "optics_mismatch",
    "overlap_matrix",
    "ptychonn_placement",
    "ptychonn_reconstruct",
    "reconstruct_with_network",
    "resolve_device",
    "training_ranges",
]

#: method name -> LightningModule class path (module, class)
NETWORK_CLASSES = {
    "airpi": ("models.lightning", "AIRPILightning"),
    "chang_unet": ("models.lightning", "ChangLightning"),
    "ptychonn": ("models.lightning", "PtychoNNLightning"),
}
Predictor = Callable[..., Any]


# ------------------------------------------------------------------------------------------------------
# Checkpoints


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or ``None``) -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(str(device))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was requested but CUDA is not available; use device=cpu or auto")
    return resolved


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
#: alpha / gmax range of paper 002's training data (U(0.1, 0.95)): the default grid for an unrecorded model
PAPER_RATIO_ALPHA_GMAX = (0.1, 0.95)


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
    :func:`reconstruct_with_network`) and ``dose_e_per_cbed`` (a scan does not tell its dose).
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


def model_predictor(
    model: torch.nn.Module, method: str, precision: str = "32", channels_last: bool = True
) -> Predictor:
    """A ``predictor(inputs, positions_A)`` around a loaded LightningModule (positions are ignored).

    AIRPI returns the complex exit wave (B, K, K); Chang the phase (B, K, K); PtychoNN (amplitude, phase).
    ``precision`` ``"bf16"`` runs the network under bf16 autocast (outputs back in fp32 before the complex
    wave is formed), ``"32"`` in fp32 (resolve ``auto`` first: :func:`physics.runtime.resolve_precision`).
    ``channels_last`` puts the weights and inputs in NHWC memory order (oneDNN's and cuDNN's fast
    convolution layout). The model's weights are converted in place.
    """
    from models.airpi import output_to_wave

    if precision not in ("32", "bf16"):
        raise ValueError(f"model_predictor: precision must be '32' or 'bf16', got {precision!r}")
    device_type = next(model.parameters()).device.type
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    use_bf16 = precision == "bf16"

    def network(inputs: torch.Tensor) -> Any:
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(inputs)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    @torch.inference_mode()
    def predict(inputs: torch.Tensor, positions_A: torch.Tensor | None = None) -> Any:
        if method == "airpi":
            return output_to_wave(network(inputs), model.net.amplitude_exponent)
        if method == "chang_unet":
            return network(inputs)[:, 0]
        amplitude, phase = network(inputs)
        return amplitude[:, 0], phase[:, 0]

    return predict


# ------------------------------------------------------------------------------------------------------
# Geometry


def overlap_matrix(n_in: int, pixel_in: float, centre_in: float, n_out: int, pixel_out: float) -> np.ndarray:
    """Area-overlap matrix ``(n_out, n_in)`` from a 1D grid centred at (sub-pixel) ``centre_in`` onto a grid
    centred at pixel ``n_out // 2``.

    The rule of :func:`datagen.kernel.rebin_matrix` (each input pixel split by the overlapping fraction of
    its width) with an arbitrary input centre, so a detector whose zero frequency is not at a pixel centre
    is resampled exactly; counts inside the output range are preserved.
    """
    centres_in = (np.arange(n_in) - float(centre_in)) * pixel_in
    centres_out = (np.arange(n_out) - n_out // 2) * pixel_out
    lo = np.maximum(centres_in[None, :] - pixel_in / 2, centres_out[:, None] - pixel_out / 2)
    hi = np.minimum(centres_in[None, :] + pixel_in / 2, centres_out[:, None] + pixel_out / 2)
    return np.clip(hi - lo, 0.0, None) / pixel_in


def _detector_reach_invA(
    shape: tuple[int, int],
    k_pixel: tuple[float, float],
    centre: np.ndarray,
    pixels: int,
    slack_px: float = 0.0,
) -> float:
    """Largest ``g`` whose ``pixels`` x ``pixels`` grid over ``+-g`` (zero at pixel ``pixels // 2``) lies on
    the detector, allowing ``slack_px`` detector pixels of overhang at an edge (1/A).

    The grid reaches ``(pixels // 2 + 1/2) 2 g / pixels`` below zero and ``(pixels - pixels // 2 - 1/2) 2 g /
    pixels`` above, the detector ``centre + 1/2`` and ``n - 1/2 - centre`` pixels.
    """
    low_out = (pixels // 2 + 0.5) * 2.0 / pixels
    high_out = (pixels - pixels // 2 - 0.5) * 2.0 / pixels
    reach = []
    for a in range(2):
        low = (centre[a] + 0.5 + slack_px) * k_pixel[a]
        high = (shape[a] - 0.5 - centre[a] + slack_px) * k_pixel[a]
        reach.append(min(low / low_out, high / high_out))
    return float(min(reach))


class DetectorReachError(ValueError):
    """The detector does not reach the ``gmax`` a network's ``alpha / gmax`` range needs."""


def default_gmax_invA(
    semiangle_mrad: float,
    energy_eV: float,
    detector_reach_invA: float,
    ratio_range: tuple[float, float] = PAPER_RATIO_ALPHA_GMAX,
) -> float:
    """``gmax`` for a network trained with ``alpha / gmax`` in ``ratio_range`` (paper 002: U(0.1, 0.95)).

    The largest the detector covers (AIRPI uses the dark field beyond the disc), but no more than
    ``alpha / ratio_range[0]``; :class:`DetectorReachError` when the detector does not even reach
    ``alpha / ratio_range[1]``.
    """
    alpha_invA = float(semiangle_mrad) * 1e-3 / wavelength(energy_eV)
    low, high = float(ratio_range[0]), float(ratio_range[1])
    if not 0 < low <= high < 1:
        raise ValueError(f"ratio_alpha_gmax must satisfy 0 < low <= high < 1, got {list(ratio_range)}")
    if detector_reach_invA < alpha_invA / high:
        raise DetectorReachError(
            f"the detector reaches {detector_reach_invA:.4g} 1/A from its centre, less than alpha / "
            f"{high} = {alpha_invA / high:.4g} 1/A: the network was not trained on such patterns"
        )
    return float(min(detector_reach_invA, alpha_invA / low))


@dataclass
class ScanGeometry:
    """Calibration of a scan plus the effective positions after data repetition.

    ``data`` is the lazily readable ``(Rx, Ry, Kx, Ky)`` array; ``step_A`` the step of the *effective*
    positions (``stride`` x the scan step); effective position ``(e, c)`` is scan position
    ``(stride * e, stride * c)``.
    """

    data: Any
    energy_eV: float
    semiangle_mrad: float
    scan_step_A: tuple[float, float]
    k_pixel_invA: tuple[float, float]
    scan_rotation_deg: float = 0.0
    transpose: bool = False
    defocus_A: float = 0.0
    Cs_A: float = 0.0
    box: int = 1
    stride: int = 1

    @classmethod
    def from_scan(
        cls, scan: Any, data_repetition: bool = False, box: int = 5, stride: int = 2
    ) -> ScanGeometry:
        """From an :class:`evaluation.io.Scan4D` (or anything with the same attributes)."""
        if data_repetition and (box < 1 or box % 2 == 0 or stride < 1):
            raise ValueError(f"repetition_box must be odd and >= 1 and stride >= 1, got {box}, {stride}")
        return cls(
            data=scan.data,
            energy_eV=float(scan.energy_eV),
            semiangle_mrad=float(scan.semiangle_mrad),
            scan_step_A=pair(scan.scan_step_A, "scan_step_A"),
            k_pixel_invA=pair(scan.k_pixel_invA, "k_pixel_invA"),
            scan_rotation_deg=float(getattr(scan, "scan_rotation_deg", 0.0) or 0.0),
            transpose=bool(getattr(scan, "scan_transpose", False)),
            defocus_A=float(getattr(scan, "defocus_A", 0.0) or 0.0),
            Cs_A=float(getattr(scan, "Cs_A", 0.0) or 0.0),
            box=int(box) if data_repetition else 1,
            stride=int(stride) if data_repetition else 1,
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def positions_shape(self) -> tuple[int, int]:
        rx, ry = self.shape[:2]
        return (rx - 1) // self.stride + 1, (ry - 1) // self.stride + 1

    @property
    def step_A(self) -> tuple[float, float]:
        return self.scan_step_A[0] * self.stride, self.scan_step_A[1] * self.stride

    @property
    def alpha_invA(self) -> float:
        return self.semiangle_mrad * 1e-3 / wavelength(self.energy_eV)


class _PatternStream:
    """Reads effective rows of CBEDs resampled to the network grid (see the module docstring, 1-2).

    ``margin_px`` network pixels per side are resampled beyond the grid when the scan is rotated, so the
    rotation draws on what the detector holds there instead of zeros; they are cropped after it.
    """

    def __init__(
        self,
        geometry: ScanGeometry,
        pixels: int,
        g_invA: float,
        centre_px: np.ndarray,
        device: torch.device,
        margin_px: int = 0,
    ) -> None:
        self.geometry = geometry
        self.device = device
        _, _, kx, ky = geometry.shape
        pixel_out = 2.0 * g_invA / pixels
        self.margin = int(margin_px) if geometry.scan_rotation_deg else 0
        size = pixels + 2 * self.margin  # zero frequency at size // 2 = pixels // 2 + margin
        mx = overlap_matrix(kx, geometry.k_pixel_invA[0], centre_px[0], size, pixel_out)
        my = overlap_matrix(ky, geometry.k_pixel_invA[1], centre_px[1], size, pixel_out)
        self.mx = torch.from_numpy(mx.astype(np.float32)).to(device)
        self.my_t = torch.from_numpy(my.T.astype(np.float32)).to(device)
        self.pixels = pixels

    def _resample(self, block: np.ndarray) -> torch.Tensor:
        from models.inputs import rotate_patterns

        x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(self.device)
        out = torch.matmul(torch.matmul(self.mx, x), self.my_t)  # (..., K + 2 margin, K + 2 margin)
        if self.geometry.transpose:
            out = out.transpose(-2, -1)
        if self.geometry.scan_rotation_deg:
            size = out.shape[-1]
            flat = out.reshape(-1, size, size)
            angle = torch.full((flat.shape[0],), self.geometry.scan_rotation_deg, device=self.device)
            out = rotate_patterns(flat, angle).reshape(out.shape)
        if self.margin:
            m = self.margin
            out = out[..., m : m + self.pixels, m : m + self.pixels].contiguous()
        return out

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Effective rows ``start .. stop - 1``: (rows, Ry_eff, K, K) float32 on the device."""
        g = self.geometry
        rx, ry = g.shape[:2]
        h = g.box // 2
        first = max(0, g.stride * start - h)
        last = min(rx - 1, g.stride * (stop - 1) + h)
        raw = self._resample(np.asarray(g.data[first : last + 1], dtype=np.float32))  # (n, Ry, K, K)
        if g.box == 1 and g.stride == 1:
            return raw
        _, ry_eff = g.positions_shape
        centres_x = g.stride * np.arange(start, stop)
        centres_y = g.stride * np.arange(ry_eff)
        out = torch.zeros((stop - start, ry_eff, self.pixels, self.pixels), device=self.device)
        for a in range(-h, h + 1):
            row_index = torch.as_tensor(np.clip(centres_x + a, 0, rx - 1) - first, device=self.device)
            rows = raw[row_index]
            for b in range(-h, h + 1):
                col_index = torch.as_tensor(np.clip(centres_y + b, 0, ry - 1), device=self.device)
                out += rows[:, col_index]
        return out

    def kernels(
        self, block_rows: int, progress: bool, desc: str, neighbours: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        """Yield ``(e, c, counts)``: effective positions of a block and their 3x3 kernels (B, 9, K, K).

        Kernel index ``3 i + j`` holds position ``(e + i - 1, c + j - 1)``, clamped to the scan (edge
        positions reuse the nearest CBEDs). Without ``neighbours`` only the centre CBED (B, 1, K, K).
        """
        rx, ry = self.geometry.positions_shape
        starts = range(0, rx, block_rows)
        for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
            stop = min(rx, start + block_rows)
            if not neighbours:
                ee, cc = np.meshgrid(np.arange(start, stop), np.arange(ry), indexing="ij")
                rows = self.rows(start, stop)
                yield ee.ravel(), cc.ravel(), rows.reshape(-1, 1, self.pixels, self.pixels)
                continue
            lo, hi = max(0, start - 1), min(rx, stop + 1)
            rows = self.rows(lo, hi)
            e = np.arange(start, stop)
            ri = np.clip(e[:, None] + np.arange(-1, 2)[None, :], 0, rx - 1) - lo  # (ne, 3)
            ci = np.clip(np.arange(ry)[:, None] + np.arange(-1, 2)[None, :], 0, ry - 1)  # (ry, 3)
            index_r = torch.as_tensor(ri, device=self.device)[:, None, :, None]
            index_c = torch.as_tensor(ci, device=self.device)[None, :, None, :]
            kernels = rows[index_r, index_c]  # (ne, ry, 3, 3, K, K)
            ee, cc = np.meshgrid(e, np.arange(ry), indexing="ij")
            yield ee.ravel(), cc.ravel(), kernels.reshape(-1, 9, self.pixels, self.pixels)


def _default_block_rows(ry: int, pixels: int, budget_bytes: float = 2**27) -> int:
    return max(1, int(budget_bytes // max(1, ry * 9 * pixels * pixels * 4)))


def _inference_bar(geometry: ScanGeometry, progress: bool, desc: str) -> Any:
    """Patterns/s and ETA of network inference over a scan, on stderr; only on a terminal (tqdm's
    ``disable=None``), so that logs and captured output stay free of bar redraws."""
    rx, ry = geometry.positions_shape
    return tqdm(total=rx * ry, desc=desc, unit="pattern", disable=None if progress else True, leave=False)


# ------------------------------------------------------------------------------------------------------
# Patch -> object grid


def _fourier_evaluation(n: int, coordinates: torch.Tensor) -> torch.Tensor:
    """Matrix ``(..., M, n)`` evaluating the band-limited periodic interpolant of ``n`` samples at fractional
    sample ``coordinates`` (..., M): ``psi(u) = (1/n) sum_k fft(psi)_k exp(2 pi i f_k u)``, i.e. a Fourier
    shift (phase ramp) and resampling in one matrix."""
    f = torch.fft.fftfreq(n, dtype=torch.float64, device=coordinates.device)
    samples = torch.arange(n, dtype=torch.float64, device=coordinates.device)
    synthesis = coordinates.to(torch.float64)[..., :, None] * f  # (..., M, n)
    e = torch.polar(torch.ones_like(synthesis), 2.0 * math.pi * synthesis) / n
    analysis = torch.polar(
        torch.ones(n, n, dtype=torch.float64, device=f.device), -2.0 * math.pi * f[:, None] * samples
    )
    return (e @ analysis).to(torch.complex64)


def _placement_matrices(pixels: int, offsets: torch.Tensor, frac: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, M, K) Fourier evaluation matrices for footprint ``offsets`` (M,) and remainders ``frac`` (B,)."""
    coordinates = pixels // 2 + (offsets[None, :] - frac[:, None]) * scale
    if bool(torch.all(frac == frac[0])):
        return _fourier_evaluation(pixels, coordinates[:1]).expand(frac.shape[0], -1, -1)
    return _fourier_evaluation(pixels, coordinates)


def _linear_evaluation(n: int, coordinates: np.ndarray) -> np.ndarray:
    """Matrix ``(M, n)`` of linear interpolation at fractional sample ``coordinates`` (0 outside)."""
    coordinates = np.asarray(coordinates, dtype=np.float64)
    matrix = np.zeros((coordinates.size, n))
    lower = np.floor(coordinates).astype(int)
    t = coordinates - lower
    for m, (i, w) in enumerate(zip(lower, t, strict=True)):
        if 0 <= i < n:
            matrix[m, i] += 1.0 - w
        if 0 <= i + 1 < n and w > 0:
            matrix[m, i + 1] += w
    return matrix


@dataclass
class _ObjectGrid:
    """Object pixels ``p`` (A), footprint half-widths ``h`` (object pixels) and the accumulator layout.

    Effective position ``(e, c)`` sits at object pixel ``(e, c) * step / p`` (integer when ``p = step /
    oversampling``); accumulator index = object pixel + ``h``.
    """

    pixel_A: tuple[float, float]
    step_A: tuple[float, float]
    half: tuple[int, int]
    positions: tuple[int, int]

    def placement(self, e: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest object pixel (B, 2) int and fractional remainder (B, 2) of each position."""
        exact = np.stack([e * self.step_A[0] / self.pixel_A[0], c * self.step_A[1] / self.pixel_A[1]], -1)
        nearest = np.rint(exact).astype(np.int64)
        return nearest[:, 0], nearest[:, 1], exact - nearest

    @property
    def last_pixel(self) -> tuple[int, int]:
        return tuple(
            round((n - 1) * s / p) for n, s, p in zip(self.positions, self.step_A, self.pixel_A, strict=True)
        )  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int]:
        last = self.last_pixel
        return last[0] + 2 * self.half[0] + 1, last[1] + 2 * self.half[1] + 1

    def flat_indices(self, mx: np.ndarray, my: np.ndarray, device: torch.device) -> torch.Tensor:
        """(B, Ox, Oy) flat accumulator indices of the footprints at object pixels ``(mx, my)``."""
        ox = np.arange(-self.half[0], self.half[0] + 1)
        oy = np.arange(-self.half[1], self.half[1] + 1)
        ix = mx[:, None] + ox[None, :] + self.half[0]
        iy = my[:, None] + oy[None, :] + self.half[1]
        flat = ix[:, :, None] * self.shape[1] + iy[:, None, :]
        return torch.as_tensor(flat, device=device)

    def crop(self, image: np.ndarray, to_scan: bool) -> tuple[np.ndarray, tuple[float, float]]:
        """The scan field (pixels of the first to the last position) or the whole covered area."""
        if to_scan:
            last = self.last_pixel
            hx, hy = self.half
            return image[hx : hx + last[0] + 1, hy : hy + last[1] + 1], (0.0, 0.0)
        origin = (-self.half[0] * self.pixel_A[0], -self.half[1] * self.pixel_A[1])
        return image, origin


def _object_pixel(
    geometry: ScanGeometry, oversampling: int, pixel_size_A: float | None, allow_fractional: bool
) -> tuple[float, float]:
    if pixel_size_A is not None:
        if not allow_fractional:
            raise ValueError("pixel_size_A is supported for AIRPI only; use oversampling")
        return pair(pixel_size_A, "pixel_size_A")
    if int(oversampling) < 1 or int(oversampling) != oversampling:
        raise ValueError(f"oversampling must be an integer >= 1, got {oversampling}")
    return geometry.step_A[0] / int(oversampling), geometry.step_A[1] / int(oversampling)


def _mask_half_width(
    mask: np.ndarray, centre: int, patch_pixel_A: float, pixel_A: tuple[float, float]
) -> tuple:
    """Footprint half-widths (object pixels) covering a patch mask, limited to the patch window."""
    where = np.argwhere(mask)
    if where.size == 0:
        raise ValueError("the probe mask is empty (no pixel above 0.1 of the maximum intensity)")
    reach_px = np.abs(where - centre).max(axis=0) + 1.0
    window_px = (mask.shape[0] // 2 - 1, mask.shape[1] // 2 - 1)
    return tuple(
        int(max(1, math.floor(min(reach_px[a], window_px[a]) * patch_pixel_A / pixel_A[a]))) for a in range(2)
    )


def _check_patterns(geometry: ScanGeometry) -> None:
    check_scan_array(geometry.data)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _detector_centre(
    geometry: ScanGeometry, centre_px: Any, progress: bool, block_rows: int | None
) -> np.ndarray:
    """Given centre, or the centre of mass of the position-averaged CBED (read in blocks of rows)."""
    if centre_px is not None:
        return np.asarray(centre_px, dtype=np.float64).reshape(2)
    rows = None if block_rows is None else max(1, block_rows * geometry.stride)
    total = np.zeros(geometry.shape[2:], dtype=np.float64)
    for _, block in iter_scan_rows(geometry.data, rows, desc="mean CBED", progress=progress):
        total += block.sum(axis=(0, 1), dtype=np.float64)
    return pattern_centre(total)


def _network_grid(
    geometry: ScanGeometry,
    centre: np.ndarray,
    pixels: int,
    gmax_invA: float | None,
    ratio_range: tuple[float, float] | None,
) -> float:
    """``gmax``: given (checked against the detector, half a detector pixel of overhang allowed) or the
    default of :func:`default_gmax_invA` for the detector about its nearest-pixel centre (``ratio_range``
    None: paper 002's)."""
    if gmax_invA is None:
        reach = _detector_reach_invA(geometry.shape[2:], geometry.k_pixel_invA, np.rint(centre), pixels)
        ratio = PAPER_RATIO_ALPHA_GMAX if ratio_range is None else tuple(ratio_range)
        return default_gmax_invA(geometry.semiangle_mrad, geometry.energy_eV, reach, ratio)
    gmax = float(gmax_invA)
    if not gmax > 0:
        raise ValueError(f"gmax_invA must be positive, got {gmax_invA}")
    reach = _detector_reach_invA(geometry.shape[2:], geometry.k_pixel_invA, centre, pixels, slack_px=0.5)
    if gmax > reach:
        raise ValueError(
            f"gmax_invA={gmax:.4g} 1/A: the network grid would leave the detector (<= {reach:.4g})"
        )
    return gmax


# ------------------------------------------------------------------------------------------------------
# AIRPI


def airpi_reconstruct(
    scan: Any,
    predictor: Predictor,
    *,
    pixels: int = 64,
    gmax_invA: float | None = None,
    ratio_alpha_gmax: tuple[float, float] | None = PAPER_RATIO_ALPHA_GMAX,
    oversampling: int = 1,
    pixel_size_A: float | None = None,
    data_repetition: bool = False,
    repetition_box: int = 5,
    repetition_stride: int = 2,
    weight_threshold: float = 0.1,
    zeta_scale: float = 50.0,
    crop_to_scan: bool = True,
    unwrap_phase: bool = True,
    detector_centre_px: Any = None,
    batch_size: int = 256,
    block_rows: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Reconstruction:
    """AIRPI reconstruction of a scan (paper 002 eq. 4-8); see the module docstring.

    ``predictor(inputs (B, 11, K, K), positions_A (B, 2))`` returns the complex real-space exit wave
    (B, K, K) on the network grid (pixel ``1 / (2 gmax)``, probe centred at pixel ``K // 2``).
    ``pixel_size_A`` (instead of ``oversampling``) puts the object on any grid: positions then fall between
    object pixels and the Fourier placement is sub-pixel. Returns the phase ``angle(T)`` (rad), unwrapped
    where it passes ``+-pi`` (``unwrap_phase``, :mod:`evaluation.unwrap`: heavy columns of thick crystals
    carry more than ``pi``; ``info['phase_wraps_removed']``); ``info['patterns_per_s']`` counts effective
    positions per second of the whole pass. Without ``gmax_invA``, ``gmax`` is the largest the detector
    covers within ``alpha / gmax`` in ``ratio_alpha_gmax`` (None: paper 002's (0.1, 0.95); a model's own
    range is applied by :func:`reconstruct_with_network`); ``info['alpha_over_gmax']`` is the ratio used.
    """
    from models.inputs import preprocess

    dev = resolve_device(device)
    geometry = ScanGeometry.from_scan(scan, data_repetition, repetition_box, repetition_stride)
    _check_patterns(geometry)
    start_time = time.perf_counter()
    centre = _detector_centre(geometry, detector_centre_px, progress, block_rows)
    gmax = _network_grid(geometry, centre, pixels, gmax_invA, ratio_alpha_gmax)
    stream = _PatternStream(geometry, pixels, gmax, centre, dev)
    d = 1.0 / (2.0 * gmax)  # patch pixel, A
    psi_in = probe(
        geometry.energy_eV, geometry.semiangle_mrad, pixels, gmax_invA=gmax,
        defocus_A=geometry.defocus_A, Cs_A=geometry.Cs_A,
    )  # fmt: skip
    intensity = np.abs(psi_in) ** 2
    native_mask = intensity > weight_threshold * intensity.max()
    pixel_A = _object_pixel(geometry, oversampling, pixel_size_A, allow_fractional=True)
    grid = _ObjectGrid(pixel_A, geometry.step_A, _mask_half_width(native_mask, pixels // 2, d, pixel_A),
                       geometry.positions_shape)  # fmt: skip
    accumulator = torch.zeros((grid.shape[0] * grid.shape[1], 2), dtype=torch.float32, device=dev)
    probe_t = torch.from_numpy(psi_in).to(dev)
    offsets = [torch.arange(-h, h + 1, dtype=torch.float64, device=dev) for h in grid.half]
    step = float(np.mean(geometry.step_A))
    _, ry = geometry.positions_shape
    rows_per_block = block_rows or _default_block_rows(ry, pixels)
    placements: dict[tuple, tuple] = {}
    count = 0
    bar = _inference_bar(geometry, progress, "AIRPI")
    for e, c, kernels in stream.kernels(rows_per_block, False, "AIRPI"):  # the bar counts patterns
        for part in _batches(len(e), batch_size):
            counts = kernels[part]
            b = counts.shape[0]
            probes = probe_t.expand(b, pixels, pixels)
            inputs = preprocess(counts, torch.full((b,), step, device=dev), probes, zeta_scale=zeta_scale)
            positions = np.stack([e[part] * geometry.step_A[0], c[part] * geometry.step_A[1]], -1)
            wave = predictor(inputs, torch.as_tensor(positions, device=dev)).to(torch.complex64)
            mx, my, frac = grid.placement(e[part], c[part])
            uniform = bool(np.all(frac == frac[:1]))
            key = tuple(np.round(frac[0], 9)) if uniform else None
            if key is None or key not in placements:
                frac_t = torch.as_tensor(frac[:1] if uniform else frac, dtype=torch.float64, device=dev)
                # object pixels of the footprint in patch coordinates (native pixels): Fourier placement
                ax = _placement_matrices(pixels, offsets[0], frac_t[:, 0], pixel_A[0] / d)
                ay = _placement_matrices(pixels, offsets[1], frac_t[:, 1], pixel_A[1] / d)
                in_obj = ax @ probe_t @ ay.transpose(-2, -1)
                weight = in_obj.abs() ** 2
                peak = weight.flatten(1).amax(1)[:, None, None]
                norm = weight.flatten(1).sum(1).clamp_min(1e-30)[:, None, None]
                weight = torch.where(
                    weight > weight_threshold * peak, weight / norm, torch.zeros_like(weight)
                )
                placement = (ax, ay.transpose(-2, -1), in_obj.conj(), weight)
                if key is not None:
                    placements[key] = placement  # the same for every batch with these remainders
            else:
                placement = placements[key]
            ax, ay_t, in_conj, weight = placement
            patch = torch.sgn((ax @ wave @ ay_t) * in_conj) * weight
            index = grid.flat_indices(mx, my, dev).reshape(-1)
            accumulator.index_add_(0, index, torch.view_as_real(patch.reshape(-1)))
            count += b
            bar.update(b)
    bar.close()
    elapsed = time.perf_counter() - start_time
    total = torch.view_as_complex(accumulator).reshape(grid.shape).cpu().numpy()
    image, origin = grid.crop(np.angle(total).astype(np.float32), crop_to_scan)
    covered, _ = grid.crop(np.abs(total) > 0, crop_to_scan)
    image, wraps = unwrap_phase_image(image, covered) if unwrap_phase else (image, 0)
    return Reconstruction(
        phase=image,
        pixel_size_A=pixel_A,
        origin_A=origin,
        method="airpi",
        info={
            "gmax_invA": gmax,
            "alpha_over_gmax": geometry.alpha_invA / gmax,
            "network_pixels": int(pixels),
            "oversampling": int(oversampling) if pixel_size_A is None else 0,
            "data_repetition": bool(data_repetition),
            "effective_step_A": float(geometry.step_A[0]),
            "phase_wraps_removed": int(wraps),
            "detector_centre_px": centre.tolist(),
            "patterns_per_s": count / max(elapsed, 1e-9),
        },
    )


# ------------------------------------------------------------------------------------------------------
# Chang U-Net


def _chang_probe_and_mask(
    geometry: ScanGeometry, pixels: int, bin_factor: int, collection_ratio: float, illuminated_fraction: float
) -> tuple[float, float, np.ndarray]:
    """(k_det 1/A, patch pixel A, illuminated mask (K, K)) with the training data's geometry.

    Uses :class:`datagen.stock_images.ChangForwardModel` (the one implementation of the Chang geometry) with
    the scan's optics: defocus ``C10 = -defocus_A`` and ``Cs_A``, no other aberrations.
    """
    from datagen.stock_images import ChangForwardModel, StockImageBank

    model = ChangForwardModel(
        energy_eV=geometry.energy_eV,
        semiangle_mrad=geometry.semiangle_mrad,
        diffraction_px=pixels,
        bin_factor=bin_factor,
        collection_ratio=collection_ratio,
        Cs_A=geometry.Cs_A,
        illuminated_fraction=illuminated_fraction,
        bank=StockImageBank(torch.zeros(1, 1, 4, 4), ["none"]),  # no images needed for the geometry
    )
    aberrations = {"C10": np.array([-geometry.defocus_A])}
    probes = model.probes(aberrations)
    mask = model.illuminated_mask(probes if probes.ndim == 3 else probes[None])[0].cpu().numpy()
    return model.k_detector_invA, model.pixel_size_A, mask


def _bin_patterns(patterns: torch.Tensor, factor: int) -> torch.Tensor:
    """Sum ``factor`` x ``factor`` blocks of the last two axes, ``(..., n * factor, m * factor) -> (..., n,
    m)``: the binning of :meth:`datagen.stock_images.ChangForwardModel.diffraction` (counts preserved)."""
    if factor == 1:
        return patterns
    *lead, h, w = patterns.shape
    return patterns.reshape(*lead, h // factor, factor, w // factor, factor).sum(dim=(-3, -1))


def _chang_detector_shortfall(
    geometry: ScanGeometry, centre_px: np.ndarray, k_det_invA: float, sim_px: int, slack_invA: float
) -> str | None:
    """Where the detector falls short of the Chang simulation grid, in words; None when it reaches it.

    The grid has ``sim_px`` pixels of ``2 k_det / sim_px`` (1/A) with zero frequency at pixel ``sim_px //
    2``: it reaches ``(sim_px // 2 + 1/2)`` pixels below zero and ``(sim_px - sim_px // 2 - 1/2)`` above. The
    detector, zero frequency at (sub-pixel) ``centre_px``, reaches ``centre + 1/2`` and ``n - 1/2 - centre``
    of its pixels (``k_pixel_invA`` per axis). ``slack_invA`` of overhang is allowed at every edge. The
    shortest side (relative to what it needs) is named.
    """
    dk = 2.0 * k_det_invA / sim_px
    needed = ((sim_px // 2 + 0.5) * dk, (sim_px - sim_px // 2 - 0.5) * dk)
    worst: tuple[float, str] | None = None
    for a, axis in enumerate("xy"):
        n, k_pixel = geometry.shape[2 + a], geometry.k_pixel_invA[a]
        available = ((centre_px[a] + 0.5) * k_pixel, (n - 0.5 - centre_px[a]) * k_pixel)
        for side, have, need in zip(("below", "above"), available, needed, strict=True):
            if have + slack_invA >= need * (1 - 1e-9):
                continue
            # the largest k_det this side allows (need and slack scale with k_det)
            reach = max(have, 0.0) * k_det_invA / (need - slack_invA)
            if worst is None or reach < worst[0]:
                where = f"pixel {centre_px[a]:.2f} of {n}, {k_pixel:.4g} 1/A per pixel"
                worst = (
                    reach,
                    f"along {axis} it reaches {reach:.4g} 1/A ({reach / geometry.alpha_invA:.3g} alpha) "
                    f"{side} its centre ({where})",
                )
    return None if worst is None else worst[1]


def chang_reconstruct(
    scan: Any,
    predictor: Predictor,
    *,
    pixels: int = 32,
    bin_factor: int = 2,
    collection_ratio: float = 2.0,
    illuminated_fraction: float = 0.9,
    oversampling: int = 1,
    max_pair_offset: int = 2,
    min_overlap_fraction: float = 0.05,
    crop_to_scan: bool = True,
    detector_centre_px: Any = None,
    batch_size: int = 256,
    block_rows: int | None = None,
    lsqr_tolerance: float = 1e-10,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Reconstruction:
    """Chang U-Net reconstruction with offsets solved by sparse least squares (paper 001 eq. 2).

    ``predictor(inputs (B, 1, K, K), positions_A)`` returns phase patches (B, K, K) (rad) on the label grid
    of :class:`datagen.stock_images.ChangForwardModel` (pixel ``1 / (2 k_det)``, centre pixel ``K // 2``).
    The inputs are the training patterns' geometry on any detector: each CBED resampled by area overlap onto
    the simulation grid (``pixels * bin_factor`` pixels over ``+-k_det = +-collection_ratio * alpha``,
    counts inside preserved), rotated onto the scan frame there and binned by ``bin_factor``;
    :class:`DetectorReachError` (a ``ValueError``) names both reaches when the detector ends short of
    ``k_det`` (half an input pixel of overhang allowed).
    Pairs are positions at most ``max_pair_offset`` steps apart along x and y whose illuminated discs share
    at least ``min_overlap_fraction`` of a disc. ``info['offsets_rad']`` holds the solved offsets
    ``(Rx, Ry)`` (``c_0 = 0``), ``info['lsqr_residual']`` the least-squares residual norm.
    """
    from scipy.signal import fftconvolve
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import lsqr

    dev = resolve_device(device)
    geometry = ScanGeometry.from_scan(scan)
    _check_patterns(geometry)
    start_time = time.perf_counter()
    centre = _detector_centre(geometry, detector_centre_px, progress, block_rows)
    k_det, d, mask = _chang_probe_and_mask(
        geometry, pixels, bin_factor, collection_ratio, illuminated_fraction
    )
    # the training geometry: patterns simulated on pixels * bin_factor pixels over +-k_det, then binned; the
    # input grid's outermost pixels (the dark rim at collection_ratio x alpha) may overhang the detector by
    # half an input pixel plus half a detector pixel: a detector that ends exactly at 2 alpha is what the
    # training data assume, and its measured centre of mass sits a fraction of a pixel off its middle
    sim_px = int(pixels) * int(bin_factor)
    slack = k_det / pixels + 0.5 * float(min(geometry.k_pixel_invA))
    shortfall = _chang_detector_shortfall(geometry, centre, k_det, sim_px, slack_invA=slack)
    if shortfall is not None:
        raise DetectorReachError(
            f"Chang input needs the detector to reach {k_det:.4g} 1/A from its centre (collection_ratio="
            f"{collection_ratio:g} x alpha, the detector of the training data); {shortfall}: the network "
            f"was trained on patterns to {collection_ratio:g} alpha (chang_unet.collection_ratio)"
        )
    # rotated scans: the corners of the rotated grid come from the detector beyond it (sqrt 2 reach)
    margin = math.ceil(sim_px * (math.sqrt(2.0) - 1.0) / 2.0) + 1
    stream = _PatternStream(geometry, sim_px, k_det, centre, dev, margin_px=margin)
    pixel_A = _object_pixel(geometry, oversampling, None, allow_fractional=False)
    os_ = int(oversampling)
    half = _mask_half_width(mask, pixels // 2, d, pixel_A)
    grid = _ObjectGrid(pixel_A, geometry.step_A, half, geometry.positions_shape)
    lx = _linear_evaluation(pixels, pixels // 2 + np.arange(-half[0], half[0] + 1) * pixel_A[0] / d)
    ly = _linear_evaluation(pixels, pixels // 2 + np.arange(-half[1], half[1] + 1) * pixel_A[1] / d)
    footprint = (lx @ mask.astype(np.float64) @ ly.T) > 1 - 1e-6  # object pixels fully inside the disc
    # overlap masks of position pairs (a, b) steps apart: pixels of patch i that patch i + (a, b) covers
    area = footprint.sum()
    shifts: list[tuple[int, int]] = []
    overlaps: list[np.ndarray] = []
    for a in range(-max_pair_offset, max_pair_offset + 1):
        for b in range(-max_pair_offset, max_pair_offset + 1):
            if (a, b) == (0, 0):
                continue
            moved = np.zeros_like(footprint)
            sx, sy = a * os_, b * os_
            nx, ny = footprint.shape
            if abs(sx) >= nx or abs(sy) >= ny:
                continue
            moved[max(sx, 0) : nx + min(sx, 0), max(sy, 0) : ny + min(sy, 0)] = footprint[
                max(-sx, 0) : nx + min(-sx, 0), max(-sy, 0) : ny + min(-sy, 0)
            ]
            common = footprint & moved
            if common.sum() >= max(1, min_overlap_fraction * area):
                shifts.append((a, b))
                overlaps.append(common / common.sum())
    lx_t = torch.as_tensor(lx, dtype=torch.float32, device=dev)
    ly_t = torch.as_tensor(ly.T, dtype=torch.float32, device=dev)
    foot_t = torch.as_tensor(footprint, dtype=torch.float32, device=dev)
    overlap_t = torch.as_tensor(np.stack(overlaps) if overlaps else np.zeros((0, *footprint.shape)),
                                dtype=torch.float32, device=dev)  # fmt: skip
    rx, ry = geometry.positions_shape
    means = np.zeros((rx, ry, len(shifts)), dtype=np.float64)
    accumulator = torch.zeros(grid.shape[0] * grid.shape[1], dtype=torch.float32, device=dev)
    kx, ky = geometry.shape[2:]
    # a block holds the raw detector rows, the half-resampled ones and the simulation-grid patterns
    row_bytes = ry * (kx * ky + sim_px * ky + sim_px * sim_px) * 4
    rows_per_block = block_rows or max(1, int(2**27 // row_bytes))
    count = 0
    bar = _inference_bar(geometry, progress, "Chang U-Net")
    for e, c, kernels in stream.kernels(rows_per_block, False, "Chang U-Net", neighbours=False):
        for part in _batches(len(e), batch_size):
            counts = _bin_patterns(kernels[part, 0], int(bin_factor))  # (B, K, K), the training binning
            total = counts.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]
            inputs = torch.sqrt(counts.clamp_min(0) / total)[:, None]
            positions = np.stack([e[part] * geometry.step_A[0], c[part] * geometry.step_A[1]], -1)
            phase = (
                predictor(inputs, torch.as_tensor(positions, device=dev)).float().reshape(-1, pixels, pixels)
            )
            patch = lx_t @ phase @ ly_t  # (B, Ox, Oy)
            means[e[part], c[part]] = torch.einsum("bxy,sxy->bs", patch, overlap_t).double().cpu().numpy()
            mx, my, _ = grid.placement(e[part], c[part])
            index = grid.flat_indices(mx, my, dev).reshape(-1)
            accumulator.index_add_(0, index, (patch * foot_t).reshape(-1))
            count += len(mx)
            bar.update(len(mx))
    bar.close()
    # least squares: (m_i[d] + c_i) - (m_j[-d] + c_j) = 0 for j = i + d, c_0 fixed at 0
    index_of = {s: n for n, s in enumerate(shifts)}
    rows, cols, values, rhs = [], [], [], []
    num_rows = 0
    ee, cc = np.meshgrid(np.arange(rx), np.arange(ry), indexing="ij")
    for (a, b), n in index_of.items():
        if (a, b) < (0, 0):
            continue  # each unordered pair once
        valid = (ee + a < rx) & (cc + b < ry) & (ee + a >= 0) & (cc + b >= 0)
        i = (ee * ry + cc)[valid]
        j = ((ee + a) * ry + cc + b)[valid]
        back = index_of[(-a, -b)]
        r = num_rows + np.arange(i.size)
        num_rows += i.size
        rows += [r, r]
        cols += [i, j]
        values += [np.ones(i.size), -np.ones(i.size)]
        rhs.append(means[ee[valid] + a, cc[valid] + b, back] - means[ee[valid], cc[valid], n])
    n_pos = rx * ry
    offsets = np.zeros(n_pos)
    residual = 0.0
    if rhs:
        rows_a, cols_a, vals_a, b_vec = (np.concatenate(x) for x in (rows, cols, values, rhs))
        keep = cols_a != 0  # c_0 = 0: drop its column
        matrix = coo_matrix(
            (vals_a[keep], (rows_a[keep], cols_a[keep] - 1)), shape=(b_vec.size, n_pos - 1)
        ).tocsr()
        solution = lsqr(matrix, b_vec, atol=lsqr_tolerance, btol=lsqr_tolerance, iter_lim=20 * n_pos + 100)
        offsets[1:] = solution[0]
        residual = float(solution[3])
    offsets = offsets.reshape(rx, ry)
    # image = (sum_n mask_n P_n + sum_n mask_n c_n) / sum_n mask_n, the last two as convolutions
    stuffed = np.zeros((grid.last_pixel[0] + 1, grid.last_pixel[1] + 1))
    ones = np.zeros_like(stuffed)
    mx_all, my_all, _ = grid.placement(ee.ravel(), cc.ravel())
    stuffed[mx_all, my_all] = offsets.ravel()
    ones[mx_all, my_all] = 1.0
    kernel = footprint.astype(np.float64)
    offset_sum = np.zeros(grid.shape)
    weight = np.zeros(grid.shape)
    full = (stuffed.shape[0] + kernel.shape[0] - 1, stuffed.shape[1] + kernel.shape[1] - 1)
    offset_sum[: full[0], : full[1]] = fftconvolve(stuffed, kernel, mode="full")
    weight[: full[0], : full[1]] = np.rint(fftconvolve(ones, kernel, mode="full"))
    summed = accumulator.reshape(grid.shape).double().cpu().numpy() + offset_sum
    image = np.divide(summed, weight, out=np.zeros_like(summed), where=weight > 0.5)
    elapsed = time.perf_counter() - start_time
    cropped, origin = grid.crop(image.astype(np.float32), crop_to_scan)
    covered, _ = grid.crop(weight, crop_to_scan)
    if np.any(covered > 0.5):
        cropped = np.where(covered > 0.5, cropped - cropped[covered > 0.5].mean(), 0.0).astype(np.float32)
    return Reconstruction(
        phase=cropped,
        pixel_size_A=pixel_A,
        origin_A=origin,
        method="chang_unet",
        info={
            "offsets_rad": offsets,
            "lsqr_residual": residual,
            "pairs": int(num_rows),
            "k_detector_invA": float(k_det),
            "network_pixels": int(pixels),
            "bin_factor": int(bin_factor),
            "collection_ratio": float(collection_ratio),
            "oversampling": os_,
            "detector_centre_px": centre.tolist(),
            "patterns_per_s": count / max(elapsed, 1e-9),
        },
    )


# ------------------------------------------------------------------------------------------------------
# PtychoNN


@dataclass
class PtychoNNPlacement:
    """What turns raw CBEDs into PtychoNN inputs and places the predicted patches (picklable: no data).

    Built once per scan by :func:`ptychonn_placement`; the local engine (:func:`ptychonn_reconstruct`) and
    ``engine=libertem`` (:mod:`evaluation.engines.libertem`, per partition on a worker) share it, so both
    pre-process, place and normalise alike. ``geometry.data`` may be any object with the scan's ``shape``.
    """

    geometry: ScanGeometry
    pixels: int
    gmax_invA: float
    centre_px: np.ndarray
    pixel_A: tuple[float, float]
    grid: _ObjectGrid
    lx: np.ndarray
    ly: np.ndarray
    weight: np.ndarray  # probe intensity inside the mask on the footprint, summing to 1
    oversampling: int

    def stream(self, device: torch.device) -> _PatternStream:
        """The resampling of raw CBEDs onto the network grid."""
        return _PatternStream(self.geometry, self.pixels, self.gmax_invA, self.centre_px, device)

    def accumulators(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed ``(complex_sum (N, 2), amplitude_sum (N,))`` over the flattened object grid."""
        size = self.grid.shape[0] * self.grid.shape[1]
        return (
            torch.zeros((size, 2), dtype=torch.float32, device=device),
            torch.zeros(size, dtype=torch.float32, device=device),
        )

    def place_batch(
        self,
        predictor: Predictor,
        centre_cbed: torch.Tensor,
        e: np.ndarray,
        c: np.ndarray,
        complex_sum: torch.Tensor,
        amplitude_sum: torch.Tensor,
    ) -> None:
        """Normalise resampled CBEDs (B, K, K) at effective positions ``(e, c)``, predict, and add the
        weighted patches into the accumulators (in place)."""
        dev = centre_cbed.device
        pixels = self.pixels
        step = self.geometry.step_A
        weight_t = torch.as_tensor(self.weight, dtype=torch.float32, device=dev)
        lx_t = torch.as_tensor(self.lx, dtype=torch.float32, device=dev)
        ly_t = torch.as_tensor(self.ly.T, dtype=torch.float32, device=dev)
        peak = centre_cbed.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        inputs = (centre_cbed / peak)[:, None]
        positions = np.stack([e * step[0], c * step[1]], -1)
        amplitude, phase = predictor(inputs, torch.as_tensor(positions, device=dev))
        amplitude = amplitude.float().reshape(-1, pixels, pixels)
        phase = phase.float().reshape(-1, pixels, pixels)
        transmission = torch.polar(amplitude, phase)
        real = lx_t @ transmission.real @ ly_t
        imag = lx_t @ transmission.imag @ ly_t
        amp = lx_t @ amplitude @ ly_t
        mx, my, _ = self.grid.placement(e, c)
        index = self.grid.flat_indices(mx, my, dev).reshape(-1)
        complex_sum.index_add_(0, index, torch.stack([real * weight_t, imag * weight_t], -1).reshape(-1, 2))
        amplitude_sum.index_add_(0, index, (amp * weight_t).reshape(-1))

    def finish(
        self,
        complex_sum: np.ndarray,
        amplitude_sum: np.ndarray,
        crop_to_scan: bool,
        unwrap_phase: bool,
        patterns_per_s: float,
    ) -> Reconstruction:
        """The stitched object from the accumulated sums (``(N, 2)`` and ``(N,)``, any engine)."""
        grid = self.grid
        rx, ry = self.geometry.positions_shape
        # the total weight is the weight map summed over the positions: a convolution, not an accumulator
        from scipy.signal import fftconvolve

        ee, cc = np.meshgrid(np.arange(rx), np.arange(ry), indexing="ij")
        mx_all, my_all, _ = grid.placement(ee.ravel(), cc.ravel())
        ones = np.zeros((grid.last_pixel[0] + 1, grid.last_pixel[1] + 1))
        ones[mx_all, my_all] = 1.0
        total_weight = np.zeros(grid.shape)
        w = self.weight
        reach = (ones.shape[0] + w.shape[0] - 1, ones.shape[1] + w.shape[1] - 1)
        total_weight[: reach[0], : reach[1]] = fftconvolve(ones, w)
        complex_sum = np.ascontiguousarray(complex_sum, dtype=np.float32)
        total = (complex_sum[:, 0] + 1j * complex_sum[:, 1]).reshape(grid.shape)
        covered = total_weight > 1e-6 * w.max()
        amplitude_image = np.divide(
            np.asarray(amplitude_sum, dtype=np.float32).reshape(grid.shape), total_weight,
            out=np.zeros(grid.shape), where=covered,
        )  # fmt: skip
        phase_image, origin = grid.crop(
            np.where(covered, np.angle(total), 0.0).astype(np.float32), crop_to_scan
        )
        covered_cropped, _ = grid.crop(covered, crop_to_scan)
        if unwrap_phase:
            phase_image, wraps = unwrap_phase_image(phase_image, covered_cropped)
        else:
            wraps = 0
        amplitude_cropped, _ = grid.crop(amplitude_image.astype(np.float32), crop_to_scan)
        return Reconstruction(
            phase=phase_image,
            pixel_size_A=self.pixel_A,
            origin_A=origin,
            method="ptychonn",
            amplitude=amplitude_cropped,
            info={
                "gmax_invA": self.gmax_invA,
                "alpha_over_gmax": self.geometry.alpha_invA / self.gmax_invA,
                "network_pixels": int(self.pixels),
                "oversampling": int(self.oversampling),
                "detector_centre_px": self.centre_px.tolist(),
                "phase_wraps_removed": int(wraps),
                "patterns_per_s": patterns_per_s,
            },
        )


def ptychonn_placement(
    scan: Any,
    *,
    pixels: int = 64,
    gmax_invA: float | None = None,
    ratio_alpha_gmax: tuple[float, float] | None = PAPER_RATIO_ALPHA_GMAX,
    oversampling: int = 1,
    weight_threshold: float = 0.1,
    detector_centre_px: Any = None,
    block_rows: int | None = None,
    progress: bool = True,
) -> PtychoNNPlacement:
    """The :class:`PtychoNNPlacement` of a scan: detector centre (the mean CBED's centre of mass unless
    given), network grid ``gmax``, probe-mask footprint and weights (see :func:`ptychonn_reconstruct`)."""
    geometry = ScanGeometry.from_scan(scan)
    _check_patterns(geometry)
    centre = _detector_centre(geometry, detector_centre_px, progress, block_rows)
    gmax = _network_grid(geometry, centre, pixels, gmax_invA, ratio_alpha_gmax)
    d = 1.0 / (2.0 * gmax)
    psi_in = probe(
        geometry.energy_eV, geometry.semiangle_mrad, pixels, gmax_invA=gmax,
        defocus_A=geometry.defocus_A, Cs_A=geometry.Cs_A,
    )  # fmt: skip
    intensity = np.abs(psi_in) ** 2
    native_mask = intensity > weight_threshold * intensity.max()
    pixel_A = _object_pixel(geometry, oversampling, None, allow_fractional=False)
    half = _mask_half_width(native_mask, pixels // 2, d, pixel_A)
    grid = _ObjectGrid(pixel_A, geometry.step_A, half, geometry.positions_shape)
    lx = _linear_evaluation(pixels, pixels // 2 + np.arange(-half[0], half[0] + 1) * pixel_A[0] / d)
    ly = _linear_evaluation(pixels, pixels // 2 + np.arange(-half[1], half[1] + 1) * pixel_A[1] / d)
    inside = (lx @ native_mask.astype(np.float64) @ ly.T) > 1 - 1e-6
    weight = np.where(inside, lx @ intensity @ ly.T, 0.0)
    return PtychoNNPlacement(
        geometry=geometry, pixels=int(pixels), gmax_invA=gmax, centre_px=centre, pixel_A=pixel_A, grid=grid,
        lx=lx, ly=ly, weight=weight / weight.sum(), oversampling=int(oversampling),
    )  # fmt: skip


def ptychonn_reconstruct(
    scan: Any,
    predictor: Predictor,
    *,
    pixels: int = 64,
    gmax_invA: float | None = None,
    ratio_alpha_gmax: tuple[float, float] | None = PAPER_RATIO_ALPHA_GMAX,
    oversampling: int = 1,
    weight_threshold: float = 0.1,
    crop_to_scan: bool = True,
    unwrap_phase: bool = True,
    detector_centre_px: Any = None,
    batch_size: int = 256,
    block_rows: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Reconstruction:
    """PtychoNN reconstruction: probe-weighted average of the predicted patches (paper 004).

    ``predictor(inputs (B, 1, K, K), positions_A)`` returns ``(amplitude, phase)`` patches (B, K, K) on the
    kernel-shard real-space grid (pixel ``1 / (2 gmax)``, probe at pixel ``K // 2``), the POA object
    ``psi_out / psi_in`` inside ``|psi_in|^2 > 0.1 max`` (the training label of
    :func:`training.datamodules.ptychonn_view`). Patches are placed with linear interpolation onto the
    object grid; the weights are the probe intensity inside the same mask. The phase is unwrapped where it
    passes ``+-pi`` (``unwrap_phase``, :mod:`evaluation.unwrap`). The pre-processing, placement and
    normalisation are :class:`PtychoNNPlacement`'s, shared with ``engine=libertem``.
    """
    dev = resolve_device(device)
    start_time = time.perf_counter()
    plan = ptychonn_placement(
        scan, pixels=pixels, gmax_invA=gmax_invA, ratio_alpha_gmax=ratio_alpha_gmax,
        oversampling=oversampling, weight_threshold=weight_threshold, detector_centre_px=detector_centre_px,
        block_rows=block_rows, progress=progress,
    )  # fmt: skip
    geometry = plan.geometry
    stream = plan.stream(dev)
    complex_sum, amplitude_sum = plan.accumulators(dev)
    _, ry = geometry.positions_shape
    rows_per_block = block_rows or _default_block_rows(ry, pixels)
    count = 0
    bar = _inference_bar(geometry, progress, "PtychoNN")
    for e, c, kernels in stream.kernels(rows_per_block, False, "PtychoNN", neighbours=False):
        for part in _batches(len(e), batch_size):
            plan.place_batch(predictor, kernels[part, 0], e[part], c[part], complex_sum, amplitude_sum)
            count += len(e[part])
            bar.update(len(e[part]))
    bar.close()
    elapsed = time.perf_counter() - start_time
    return plan.finish(
        complex_sum.cpu().numpy(), amplitude_sum.cpu().numpy(), crop_to_scan, unwrap_phase,
        count / max(elapsed, 1e-9),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# One entry for the CLI and the evaluation suite

_RECONSTRUCTORS = {
    "airpi": airpi_reconstruct,
    "chang_unet": chang_reconstruct,
    "ptychonn": ptychonn_reconstruct,
}


def reconstruct_with_network(
    scan: Any,
    method: str,
    model: torch.nn.Module | str | Path,
    params: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    precision: str = "auto",
    channels_last: bool = True,
    reconstructor: Callable[..., Reconstruction] | None = None,
) -> Reconstruction:
    """Run ``method`` with a loaded model or a checkpoint path and the method's keyword ``params``.

    ``reconstructor`` replaces the method's local reconstruction (same signature as
    :func:`ptychonn_reconstruct`: ``(scan, predictor, *, device, progress, **params)``), e.g. an engine
    that runs the predictor elsewhere (:mod:`evaluation.engines.libertem`); the checks, defaults and
    ``info`` here apply to it alike.

    ``precision`` auto | bf16 | 32 (:func:`physics.runtime.resolve_precision`: auto = bf16 where the device
    has bf16 units, fp32 otherwise); the precision used is ``info['precision']``.

    AIRPI and PtychoNN given neither ``gmax_invA`` nor ``ratio_alpha_gmax`` (or None) resample the scan to
    the ``alpha / gmax`` range the model records (:func:`model_ratio_alpha_gmax`; paper 002's (0.1, 0.95)
    when it records none): ``gmax`` = the largest the detector covers, but at most ``alpha / low``; a
    detector short of ``alpha / high`` is refused (``ValueError`` naming the range and the override).
    ``info['alpha_over_gmax']`` is the ratio used, ``info['alpha_over_gmax_from']`` where its bounds came
    from (``gmax_invA``, ``params``, ``model`` or ``paper``).
    """
    from physics.runtime import resolve_precision

    if method not in _RECONSTRUCTORS:
        raise ValueError(f"unknown network method {method!r}; choose one of {', '.join(_RECONSTRUCTORS)}")
    dev = resolve_device(device)
    if isinstance(model, (str, Path)):
        model = load_network(model, method, dev)
    used = resolve_precision(precision, dev.type)
    options = dict(params or {})
    for key in ("ratio_alpha_gmax", "detector_centre_px"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    source = None
    if method in ("airpi", "ptychonn"):
        if options.get("gmax_invA") is not None:
            source = "gmax_invA"
        elif options.get("ratio_alpha_gmax") is not None:
            source = "params"
        else:
            recorded = model_ratio_alpha_gmax(model)
            source = "paper" if recorded is None else "model"
            options["ratio_alpha_gmax"] = PAPER_RATIO_ALPHA_GMAX if recorded is None else recorded
    predictor = model_predictor(model, method, used, channels_last)
    try:
        run = reconstructor if reconstructor is not None else _RECONSTRUCTORS[method]
        result = run(scan, predictor, device=dev, progress=progress, **options)
    except DetectorReachError as err:
        if source != "model":
            raise
        low, high = training_ranges(model)["alpha_over_gmax"]
        raise DetectorReachError(
            f"{err} (the model's alpha_over_gmax training range {_format_range('alpha_over_gmax', low, high)}"
            f"; {method}.ratio_alpha_gmax=[LOW,HIGH] or {method}.gmax_invA overrides it)"
        ) from None
    if source is not None:
        result.info["alpha_over_gmax_from"] = source
    recorded = model_ratio_alpha_gmax(model) if source in ("gmax_invA", "params") else None
    ratio = result.info.get("alpha_over_gmax")
    if (
        recorded is not None
        and ratio is not None
        and not (recorded[0] * (1 - 0.02) <= ratio <= recorded[1] * (1 + 0.02))
    ):
        import warnings

        low, high = training_ranges(model)["alpha_over_gmax"]
        key = "gmax_invA" if source == "gmax_invA" else "ratio_alpha_gmax"
        warnings.warn(
            f"{method}: alpha/gmax={ratio:.3g} (set by {method}.{key}) outside the model's training range "
            f"{_format_range('alpha_over_gmax', low, high)}",
            RuntimeWarning,
            stacklevel=2,
        )
    result.info["precision"] = used
    result.info["channels_last"] = bool(channels_last)
    return result
