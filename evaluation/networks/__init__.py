"""Network reconstructions of whole scans: AIRPI, Chang U-Net and PtychoNN patches stitched into one object.

One module a network, behind the registry :data:`RECONSTRUCTORS` (method name -> reconstruction) and the one
entry :func:`reconstruct_with_network`:

* :mod:`evaluation.networks.airpi`, :mod:`~evaluation.networks.chang`, :mod:`~evaluation.networks.ptychonn`:
  ``*_reconstruct(scan, predictor, *, device, progress, **params)``, one each;
* :mod:`evaluation.networks.geometry`: scan geometry, pattern streaming, the network and object grids;
* :mod:`evaluation.networks.checkpoints`: loading and identifying checkpoints, the optics a model was
  trained for, the predictor around a loaded model;
* the network input contract shared with training: :mod:`models.inputs`.

A fifth network is one new module here with its ``*_reconstruct`` and one line in :data:`RECONSTRUCTORS`
(and, to load its checkpoints, one in :data:`~evaluation.networks.checkpoints.NETWORK_CLASSES`).

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

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from evaluation.networks.airpi import airpi_reconstruct
from evaluation.networks.chang import chang_reconstruct
from evaluation.networks.checkpoints import (
    ABSOLUTE_TOLERANCE,
    AUTO_BATCH_SIZE,
    CHANG_GEOMETRY,
    COMPILE_AUTO_DEVICES,
    COMPILE_AUTO_MIN_POSITIONS,
    NETWORK_CLASSES,
    TRAINED_FOR_UNITS,
    CheckpointError,
    _format_range,
    chang_geometry_params,
    detector_mismatch,
    identify_checkpoint,
    load_network,
    model_predictor,
    model_ratio_alpha_gmax,
    optics_mismatch,
    ptychonn_geometry_params,
    recorded_geometry,
    resolve_batch_size,
    resolve_compile,
    training_ranges,
)
from evaluation.networks.geometry import (
    PAPER_RATIO_ALPHA_GMAX,
    DetectorReachError,
    ScanGeometry,
    default_gmax_invA,
    overlap_matrix,
    resolve_device,
)
from evaluation.networks.ptychonn import PtychoNNPlacement, ptychonn_placement, ptychonn_reconstruct
from evaluation.references import Reconstruction
from evaluation.references._common import pair

__all__ = [
    "ABSOLUTE_TOLERANCE",
    "AUTO_BATCH_SIZE",
    "BF16_CHECK_PATTERNS",
    "BF16_CHECK_TOLERANCE",
    "CHANG_GEOMETRY",
    "COMPILE_AUTO_DEVICES",
    "COMPILE_AUTO_MIN_POSITIONS",
    "FP32_AUTO_METHODS",
    "NETWORK_CLASSES",
    "PAPER_RATIO_ALPHA_GMAX",
    "RECONSTRUCTORS",
    "TRAINED_FOR_UNITS",
    "CheckpointError",
    "DetectorReachError",
    "PtychoNNPlacement",
    "ScanGeometry",
    "airpi_reconstruct",
    "chang_geometry_params",
    "chang_reconstruct",
    "default_gmax_invA",
    "detector_mismatch",
    "identify_checkpoint",
    "load_network",
    "model_predictor",
    "model_ratio_alpha_gmax",
    "optics_mismatch",
    "overlap_matrix",
    "precision_checked_predictor",
    "ptychonn_geometry_params",
    "ptychonn_placement",
    "ptychonn_reconstruct",
    "reconstruct_with_network",
    "recorded_geometry",
    "resolve_batch_size",
    "resolve_compile",
    "resolve_device",
    "training_ranges",
]

#: method name -> its reconstruction ``(scan, predictor, *, device, progress, **params) -> Reconstruction``
RECONSTRUCTORS: dict[str, Callable[..., Reconstruction]] = {
    "airpi": airpi_reconstruct,
    "chang_unet": chang_reconstruct,
    "ptychonn": ptychonn_reconstruct,
}


#: Networks that ``precision=auto`` does not simply run in bf16 where bf16 is native: the first shipped
#: PtychoNN's phase varied by ~1e-3 rad around a 0.23 rad offset per pattern, below bf16's resolution there
#: (2^-10), and its weak-phase test scan scored xc 0.03 in bf16 against > 0.5 in fp32. For these, auto runs
#: the first batch in both precisions and keeps bf16 only where the phases agree
#: (:data:`BF16_CHECK_TOLERANCE`; measured in session 13: the shipped PtychoNN on that scan r = 0.006, xc
#: 0.717 against 0.718 in fp32); on an engine's ``reconstructor`` and when compiled, fp32.
#: ``precision=bf16`` still forces bf16.
FP32_AUTO_METHODS = ("ptychonn",)
#: auto's bf16 check: RMS of (bf16 phase - fp32 phase) over the first batch, at most this fraction r of the
#: fp32 phase's standard deviation over that batch. An error uncorrelated with the phase costs xc ~ r^2 / 2:
#: 0.1 allows ~0.005, half the 0.01 within which issue #17 asks bf16 to stay (measured: an ePIE-label PtychoNN
#: on its WS2 scan r = 0.027, same xc to 3 digits)
BF16_CHECK_TOLERANCE = 0.1
#: patterns of the first batch that auto's bf16 check also runs in fp32 (32 x 32 x 32 = 32 k phase pixels;
#: the whole first batch cost as much as bf16 saved on a 2,304-pattern scan, session 13)
BF16_CHECK_PATTERNS = 32


def _phase_of(method: str, output: Any) -> torch.Tensor:
    """The phase a predictor returns for ``method`` (AIRPI: of its complex wave)."""
    if method == "ptychonn":
        return output[1]
    return torch.angle(output) if torch.is_complex(output) else output


def precision_checked_predictor(
    model: torch.nn.Module,
    method: str,
    channels_last: bool = True,
    tolerance: float = BF16_CHECK_TOLERANCE,
    check_patterns: int = BF16_CHECK_PATTERNS,
) -> Any:
    """A predictor that runs its first batch in bf16 and its first ``check_patterns`` patterns also in fp32,
    and then keeps bf16 if the two phases agree (RMS difference <= ``tolerance`` x the fp32 phase's standard
    deviation over those patterns), else fp32 (the first batch then comes back in fp32).
    ``predictor.chosen()`` is ``"bf16"``, ``"32"`` or None before the first call; ``predictor.check()`` the
    measured ratio. Local reconstruction only: each process of an engine would decide on its own batch."""
    fp32 = model_predictor(model, method, "32", channels_last)
    bf16 = model_predictor(model, method, "bf16", channels_last)
    state: dict[str, Any] = {"chosen": None, "ratio": None}

    def predict(inputs: torch.Tensor, positions_A: torch.Tensor | None = None) -> Any:
        if state["chosen"] is None:
            # fp32 on the first patterns only: the check then costs a fraction of a batch, not one
            n = min(len(inputs), check_patterns)
            fast = bf16(inputs, positions_A)
            exact = fp32(inputs[:n], None if positions_A is None else positions_A[:n])
            reference = _phase_of(method, exact).double()
            low = _phase_of(method, fast)[:n].double()
            spread = float(reference.std())
            error = float((low - reference).pow(2).mean().sqrt())
            state["ratio"] = error / spread if spread > 0 else float("inf")
            state["chosen"] = "bf16" if state["ratio"] <= tolerance else "32"
            if state["chosen"] == "bf16":
                return fast
            return exact if n == len(inputs) else fp32(inputs, positions_A)
        return (bf16 if state["chosen"] == "bf16" else fp32)(inputs, positions_A)

    predict.compiled = lambda: False  # type: ignore[attr-defined]
    predict.chosen = lambda: state["chosen"]  # type: ignore[attr-defined]
    predict.check = lambda: state["ratio"]  # type: ignore[attr-defined]
    return predict


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
    compile: bool | str = "auto",
) -> Reconstruction:
    """Run ``method`` with a loaded model or a checkpoint path and the method's keyword ``params``.

    ``reconstructor`` replaces the method's local reconstruction (same signature as
    :func:`ptychonn_reconstruct`: ``(scan, predictor, *, device, progress, **params)``), e.g. an engine
    that runs the predictor elsewhere (:mod:`evaluation.engines.libertem`); the checks, defaults and
    ``info`` here apply to it alike.

    ``precision`` auto | bf16 | 32 (:func:`physics.runtime.resolve_precision`: auto = bf16 where the device
    has bf16 units, fp32 otherwise; :data:`FP32_AUTO_METHODS` bf16 only where their first batch agrees with
    fp32, :func:`precision_checked_predictor`, recorded as ``info['bf16_check']``); the precision used is
    ``info['precision']``. ``compile`` auto | true |
    false (:func:`resolve_compile`: auto = on CUDA for scans of :data:`COMPILE_AUTO_MIN_POSITIONS` or more,
    where compiling pays; never on the CPU) wraps the network in
    :func:`torch.compile` (local reconstruction only: an engine's ``reconstructor`` runs it uncompiled);
    ``info['compiled']`` says whether it ran compiled. ``params['batch_size']`` ``auto`` (or unset) is
    :data:`AUTO_BATCH_SIZE` of the device (scaled to the network input's pixels); ``info['batch_size']`` is
    the one used.

    AIRPI and PtychoNN given neither ``gmax_invA`` nor ``ratio_alpha_gmax`` (or None) resample the scan to
    the ``alpha / gmax`` range the model records (:func:`model_ratio_alpha_gmax`; paper 002's (0.1, 0.95)
    when it records none): ``gmax`` = the largest the detector covers, but at most ``alpha / low``; a
    detector short of ``alpha / high`` is refused (``ValueError`` naming the range and the override).
    ``info['alpha_over_gmax']`` is the ratio used, ``info['alpha_over_gmax_from']`` where its bounds came
    from (``gmax_invA``, ``params``, ``model`` or ``paper``).

    The Chang U-Net takes ``pixels``, ``bin_factor``, ``collection_ratio`` and ``illuminated_fraction`` left
    unset (None) from the model's recorded training geometry (:func:`chang_geometry_params`; the defaults of
    :func:`chang_reconstruct`, paper 001's 32 / 2 / 2.0 / 0.9, when it records none) and warns for a value
    set otherwise.
    """
    from physics.runtime import check_compile, check_precision, resolve_precision

    if method not in RECONSTRUCTORS:
        raise ValueError(f"unknown network method {method!r}; choose one of {', '.join(RECONSTRUCTORS)}")
    dev = resolve_device(device)
    if isinstance(model, (str, Path)):
        model = load_network(model, method, dev)
    used = resolve_precision(precision, dev.type)
    if method in FP32_AUTO_METHODS and check_precision(precision) == "auto":
        checked, used = used == "bf16", "32"  # bf16 only if the first batch agrees (below)
    else:
        checked = False
    options = dict(params or {})
    for key in ("ratio_alpha_gmax", "detector_centre_px"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    source = None
    if method == "chang_unet":
        # the patterns must have the geometry the model was trained on: unset keywords take the recorded one
        options, conflicts = chang_geometry_params(model, options)
        if conflicts:
            import warnings

            for message in conflicts:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        options = {k: v for k, v in options.items() if v is not None}
    if method == "ptychonn":
        # a PtychoNN trained on a scan's own ePIE labels saw whole detectors resized to its grid
        options, conflicts = ptychonn_geometry_params(
            model, options, tuple(scan.data.shape[2:]), pair(scan.k_pixel_invA, "k_pixel_invA")
        )
        if conflicts:
            import warnings

            for message in conflicts:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        options = {k: v for k, v in options.items() if v is not None}
    if method in ("airpi", "ptychonn"):
        if options.get("gmax_invA") is not None:
            source = "gmax_invA"
        elif options.get("ratio_alpha_gmax") is not None:
            source = "params"
        else:
            recorded = model_ratio_alpha_gmax(model)
            source = "paper" if recorded is None else "model"
            options["ratio_alpha_gmax"] = PAPER_RATIO_ALPHA_GMAX if recorded is None else recorded
    pixels = options.get("pixels") or 64  # the network input grid (Chang: the recorded 32 px)
    options["batch_size"] = resolve_batch_size(options.get("batch_size"), dev.type, pixels)
    use_compile = resolve_compile(compile, dev.type, getattr(scan, "num_positions", None))
    if use_compile and reconstructor is not None:
        if check_compile(compile) == "true":
            import warnings

            warnings.warn(
                "compile=true applies to the local engine only; this engine runs the network uncompiled",
                RuntimeWarning,
                stacklevel=2,
            )
        use_compile = False
    if checked and reconstructor is None and not use_compile:
        predictor = precision_checked_predictor(model, method, channels_last)
    else:
        checked = False
        predictor = model_predictor(model, method, used, channels_last, compile=use_compile)
    try:
        run = reconstructor if reconstructor is not None else RECONSTRUCTORS[method]
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
    if checked:
        used = predictor.chosen() or "32"  # type: ignore[attr-defined]
        result.info["bf16_check"] = predictor.check()  # type: ignore[attr-defined]
    result.info["precision"] = used
    result.info["channels_last"] = bool(channels_last)
    result.info["compiled"] = bool(predictor.compiled())  # type: ignore[attr-defined]
    result.info["batch_size"] = options["batch_size"]
    return result
