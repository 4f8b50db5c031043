"""Restoring 2D (HA)ADF-STEM images with a CGRDN (``python reconstruct.py input=IMAGE method=cgrdn``).

Pipeline:

1. :func:`evaluation.image_io.load_image` reads the image (rows = scan lines, columns = fast scan) and its
   pixel size, in the file's intensity units.
2. :func:`restore_image` cuts it into ``tile_px`` x ``tile_px`` tiles (the training size, 256) that overlap
   by at least ``overlap_px`` (32): along an axis of ``n > tile_px`` pixels the tiles start every
   ``tile_px - overlap_px`` pixels and the last one ends at ``n`` (so it may overlap more); an axis of
   ``n <= tile_px`` pixels is one tile of ``n`` pixels (padded by one reflected pixel when ``n`` is odd:
   the CGRDN needs even sizes, the padding is cut away). Each tile is restored on its own, with the
   network's per-tile standardisation as in training; being scale-free (:class:`models.cgrdn.CGRDN`), the
   result does not depend on the intensity unit: restoring ``c x`` gives ``c`` times the restoration of
   ``x`` for any ``c > 0``.
3. Tiles are blended with separable weights that rise as ``sin^2`` over the first ``overlap_px`` pixels of
   every tile edge that lies inside the image (1 elsewhere, and at the image's own edges); the sum of the
   weighted tiles is divided by the sum of the weights, so a network that returns its input returns the
   image exactly and overlaps of exactly ``overlap_px`` cross-fade with weights summing to 1.
4. :func:`write_restored` writes ``deepstem.restored/1`` (:data:`datagen.store.RESTORED`: dataset ``image``
   float32 in the input's units, attributes ``pixel_size_A``, ``method``, ``checkpoint``) and a PNG
   ``input | restored`` beside it, both atomically.

Without ``ckpt`` the shipped CGRDN of ``pretrained/`` is used (:func:`evaluation.cli.choose_checkpoint`);
none ships yet, which is one clear error asking for ``ckpt=``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datagen import store
from evaluation.image_io import Image2D, ImageError, load_image
from models.checkpoints import CheckpointError, load_checkpoint
from physics.runtime import report_error, resolve_precision

__all__ = ["blend_weights", "load_cgrdn", "restore_command", "restore_image", "tile_starts", "write_restored"]

METHOD = "cgrdn"


def load_cgrdn(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The :class:`models.lightning.CGRDNLightning` of a Lightning checkpoint, in eval mode on ``device``.

    Read weights-only (:func:`models.checkpoints.load_checkpoint`); a checkpoint of another model raises
    :class:`~models.checkpoints.CheckpointError` naming the model it holds. Hyper-parameters of checkpoints
    made before issue #16 (``net.std_min: 0.1``) select the generator's legacy absolute standardisation.
    """
    from evaluation.networks import NETWORK_CLASSES, identify_checkpoint, resolve_device
    from models.lightning import CGRDNLightning

    path = Path(path)
    checkpoint = load_checkpoint(path)
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    held = identify_checkpoint(checkpoint)
    if held != METHOD:
        hint = f"; use method={held}" if held in NETWORK_CLASSES else ""
        raise CheckpointError(f"{path}: the checkpoint holds model '{held}', not '{METHOD}'{hint}")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams["compile"] = False
    try:
        model = CGRDNLightning(**hparams)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (TypeError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: the {METHOD} checkpoint does not load: {first}") from None
    model.deepstem_info = dict(checkpoint.get("deepstem") or {})
    return model.to(resolve_device(device)).eval()


def tile_starts(n: int, tile_px: int, overlap_px: int) -> list[int]:
    """First pixels of the tiles along an axis of ``n`` pixels (``[0]`` when ``n <= tile_px``)."""
    if n <= tile_px:
        return [0]
    step = tile_px - overlap_px
    starts = list(range(0, n - tile_px, step))
    return [*starts, n - tile_px]


def blend_weights(length: int, overlap_px: int, rise_start: bool, rise_end: bool) -> np.ndarray:
    """1D blending weight of a tile of ``length`` pixels: ``sin^2`` ramps over ``overlap_px`` pixels at the
    ends that lie inside the image (``rise_start``, ``rise_end``), 1 elsewhere; always > 0."""
    weight = np.ones(length, dtype=np.float64)
    ramp_px = min(overlap_px, length // 2)
    if ramp_px > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(ramp_px) + 0.5) / ramp_px) ** 2
        if rise_start:
            weight[:ramp_px] = ramp
        if rise_end:
            weight[length - ramp_px :] = ramp[::-1]
    return weight


def _axis_plan(n: int, tile_px: int, overlap_px: int) -> tuple[list[int], int, int]:
    """``(starts, tile length, padding)`` along one axis: an axis shorter than a tile is one tile padded
    to an even length."""
    if n <= tile_px:
        return [0], n + n % 2, n % 2
    return tile_starts(n, tile_px, overlap_px), tile_px, 0


def restore_image(
    model: Any,
    image: np.ndarray,
    tile_px: int = 256,
    overlap_px: int = 32,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    precision: str = "32",
) -> np.ndarray:
    """Restore a 2D image of any size and intensity unit by overlapping tiles (module docstring).

    ``model`` maps (B, 1, H, W) float32 tensors to restored ones of the same shape (a CGRDN or
    :class:`~models.lightning.CGRDNLightning`; any callable). ``precision`` ``"32"`` or ``"bf16"`` (resolve
    ``auto`` first: :func:`physics.runtime.resolve_precision`). Returns float32 (rows, columns) in the
    input's units. Raises ValueError for a bad tiling or an image that is not 2D.
    """
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"restore_image: expected a 2D image, got shape {array.shape}")
    if tile_px < 2 or tile_px % 2:
        raise ValueError(f"cgrdn.tile_px must be an even number >= 2, got {tile_px}")
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"cgrdn.overlap_px must be in [0, tile_px), got {overlap_px} (tile_px {tile_px})")
    if batch_size < 1:
        raise ValueError(f"cgrdn.batch_size must be >= 1, got {batch_size}")
    if precision not in ("32", "bf16"):
        raise ValueError(f"restore_image: precision must be '32' or 'bf16', got {precision!r}")
    if device is None:
        parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    rows, cols = array.shape
    row_starts, tile_rows, pad_rows = _axis_plan(rows, tile_px, overlap_px)
    col_starts, tile_cols, pad_cols = _axis_plan(cols, tile_px, overlap_px)
    padded = array
    if pad_rows or pad_cols:
        padded = np.pad(array, ((0, pad_rows), (0, pad_cols)), mode="reflect")
    total = np.zeros((rows, cols), dtype=np.float64)
    weight_sum = np.zeros((rows, cols), dtype=np.float64)
    origins = [(r, c) for r in row_starts for c in col_starts]
    use_bf16 = precision == "bf16"
    for first in range(0, len(origins), batch_size):
        chunk = origins[first : first + batch_size]
        tiles = np.stack([padded[r : r + tile_rows, c : c + tile_cols] for r, c in chunk])
        inputs = torch.from_numpy(tiles.astype(np.float32))[:, None].to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            outputs = model(inputs)
        restored = outputs.float()[:, 0].cpu().numpy().astype(np.float64)
        for (r, c), tile in zip(chunk, restored, strict=True):
            keep_rows, keep_cols = min(tile_rows, rows - r), min(tile_cols, cols - c)
            w_rows = blend_weights(keep_rows, overlap_px, r > 0, r + keep_rows < rows)
            w_cols = blend_weights(keep_cols, overlap_px, c > 0, c + keep_cols < cols)
            weight = np.outer(w_rows, w_cols)
            total[r : r + keep_rows, c : c + keep_cols] += weight * tile[:keep_rows, :keep_cols]
            weight_sum[r : r + keep_rows, c : c + keep_cols] += weight
    return (total / weight_sum).astype(np.float32)


def _save_png(path: Path, image: Image2D, restored: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = restored.shape
    extent = (0.0, cols * image.pixel_size_A[1], rows * image.pixel_size_A[0], 0.0)  # x right, y down
    low, high = np.percentile(restored, [0.5, 99.5])  # shared limits: the noisy input saturates, not hides
    high = high if high > low else low + 1.0
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.3), dpi=120, sharex=True, sharey=True)
    for ax, data, name in zip(axes, (image.data, restored), ("input", "restored"), strict=True):
        ax.imshow(data, cmap="gray", extent=extent, vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x (Å)")
    axes[0].set_ylabel("y (Å)")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def write_restored(
    output: Path,
    image: Image2D,
    restored: np.ndarray,
    checkpoint: Path,
    attrs: dict[str, Any] | None = None,
    config: Any = None,
    overwrite: bool = True,
) -> tuple[Path, Path]:
    """Write ``deepstem.restored/1`` to ``output`` and the PNG ``input | restored`` beside it, both
    atomically (all or nothing): the PNG under a hidden temporary name, renamed after the HDF5 is whole."""
    png = output.with_suffix(".png")
    if not overwrite:
        for existing in (output, png):
            if existing.exists():
                raise FileExistsError(f"{existing}: exists (set overwrite=true to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary_png = png.with_name(f".{png.name}.tmp-{os.getpid()}")
    all_attrs: dict[str, Any] = {
        "pixel_size_A": np.asarray(image.pixel_size_A, dtype=np.float64),
        "method": METHOD,
        "checkpoint": checkpoint.name,
        "checkpoint_path": str(checkpoint),
        "input": str(image.path),
        "input_format": image.source_format,
        **(attrs or {}),
    }
    try:
        _save_png(temporary_png, image, restored, f"{METHOD} ({checkpoint.name}): {image.path.name}")
        store.write(
            output, store.RESTORED, {"image": np.asarray(restored, dtype=np.float32)}, attrs=all_attrs,
            config=config, overwrite=True,
        )  # fmt: skip
        os.replace(temporary_png, png)
    finally:
        if temporary_png.exists():
            temporary_png.unlink()
    return output, png


def restore_command(cfg: DictConfig, input_path: Path, output: Path, threads: int) -> int:
    """The ``method=cgrdn`` branch of :func:`evaluation.cli.reconstruct_main`; returns the exit code.

    The given checkpoint is checked before the input is read; without ``ckpt`` the shipped CGRDN is used,
    and when none ships that is the error. Errors: one ``deepstem: error: ...`` line, exit 2, nothing
    written.
    """
    from hydra.utils import to_absolute_path

    from evaluation.cli import choose_checkpoint, pretrained_dir

    section = cfg.get(METHOD)
    params = dict(OmegaConf.to_container(section, resolve=True)) if section is not None else {}
    device = str(cfg.get("device", "auto"))
    try:
        if cfg.get("ckpt"):
            ckpt = Path(to_absolute_path(str(cfg.ckpt)))
            model = load_cgrdn(ckpt, device)
        else:
            choice = choose_checkpoint(METHOD)
            if choice is None:
                return _fail(
                    f"no CGRDN model ships yet (none in {pretrained_dir()}): give ckpt=PATH, a checkpoint of "
                    "python train.py model=cgrdn data=haadf"
                )
            ckpt, reason = choice
            print(f"reconstruct: ckpt not given; using the shipped model {ckpt} ({reason})", file=sys.stderr)
            model = load_cgrdn(ckpt, device)
        calibration = to_absolute_path(str(cfg.calibration)) if cfg.get("calibration") else None
        image = load_image(
            input_path, calibration, index=params.get("index"), pixel_size_A=params.get("pixel_size_A")
        )
        parameter = next(model.parameters())
        used = resolve_precision(cfg.get("precision", "auto"), parameter.device.type)
        start = time.perf_counter()
        restored = restore_image(
            model, image.data, tile_px=int(params.get("tile_px", 256)),
            overlap_px=int(params.get("overlap_px", 32)), batch_size=int(params.get("batch_size", 8)),
            device=parameter.device, precision=used,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        if not np.all(np.isfinite(restored)):
            return _fail(f"{METHOD} produced NaN or inf; nothing written")
        h5, png = write_restored(
            output, image, restored, ckpt, attrs={"precision": used, "seconds": float(elapsed)}, config=cfg,
            overwrite=bool(cfg.get("overwrite", True)),
        )  # fmt: skip
    except (ImageError, CheckpointError, store.StoreError, ValueError, OSError, RuntimeError) as err:
        return _fail(str(err))
    rows, cols = image.shape
    plural = "s" if threads != 1 else ""
    print(
        f"{METHOD}: {rows} x {cols} px image in {elapsed:.3f} s ({threads} thread{plural}, "
        f"precision {used}); wrote {h5} and {png}"
    )
    return 0


def _fail(message: str) -> int:
    text = str(message).strip()
    return report_error(text.splitlines()[0] if text else "failed")
