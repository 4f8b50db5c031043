"""Callbacks: example predictions as figures, logged to every logger and saved beside the run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

__all__ = ["PredictionImages", "RandomStateCheckpoint", "ScanReconstruction", "prediction_panels"]


def _first(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: (v[:n].detach() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _squeeze(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] if x.dim() == 4 and x.shape[1] == 1 else x


@torch.no_grad()
def prediction_panels(module: L.LightningModule, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Named (B, H, W) panels of inputs, predictions and labels for the module's kind of model."""
    from models.lightning import AIRPILightning, CGRDNLightning, ChangLightning, PtychoNNLightning, as_complex
    from models.losses import object_phase

    was_training = module.training
    module.eval()
    try:
        if isinstance(module, AIRPILightning):
            predicted = module.predict_wave(batch["inputs"])
            true = as_complex(batch["wave"])
            probe = module._probe(batch)
            return {
                "input centre CBED": batch["inputs"][:, 4],
                "|psi| predicted": predicted.abs(),
                "|psi| true": true.abs(),
                "object phase predicted": object_phase(predicted, probe),
                "object phase true": object_phase(true, probe),
            }
        if isinstance(module, ChangLightning):
            mask = batch.get("mask")
            mask = torch.ones_like(_squeeze(batch["phase"])) if mask is None else _squeeze(mask)
            return {
                "sqrt intensity": _squeeze(batch["diffraction"]),
                "phase predicted": _squeeze(module(batch["diffraction"])) * mask,
                "phase true": _squeeze(batch["phase"]) * mask,
            }
        if isinstance(module, PtychoNNLightning):
            amplitude, phase = module(batch["diffraction"])
            return {
                "diffraction": _squeeze(batch["diffraction"]),
                "amplitude predicted": _squeeze(amplitude),
                "amplitude true": _squeeze(batch["amplitude"]),
                "phase predicted": _squeeze(phase),
                "phase true": _squeeze(batch["phase"]),
            }
        if isinstance(module, CGRDNLightning):
            return {
                "distorted": _squeeze(batch["distorted"]),
                "restored": _squeeze(module(batch["distorted"])),
                "clean": _squeeze(batch["clean"]),
            }
    finally:
        module.train(was_training)
    raise TypeError(f"no prediction panels for {type(module).__name__}")


def _log_image(trainer: L.Trainer, key: str, image: np.ndarray, filename: str) -> None:
    """Send an RGB image to every logger that takes images and save it under ``figures/``."""
    step = trainer.global_step
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # W&B
            logger.log_image(key=key, images=[image], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            logger.experiment.add_image(key, image, step, dataformats="HWC")
    out = Path(trainer.default_root_dir) / "figures" / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    plt.imsave(out, image)


def _figure(panels: dict[str, torch.Tensor], title: str) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    rows = next(iter(panels.values())).shape[0]
    fig, axes = plt.subplots(rows, len(names), figsize=(2.4 * len(names), 2.4 * rows), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(panels[name][r].float().cpu().numpy().T, cmap="magma" if "CBED" in name else "viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


class PredictionImages(L.Callback):
    """Every ``every_n_epochs`` validation epochs: inputs, predictions and labels of the first
    ``max_samples`` validation samples as one figure, sent to each logger (W&B image, TensorBoard
    image) and saved as ``figures/val_epoch_NNN.png`` under the trainer's root directory."""

    def __init__(self, every_n_epochs: int = 1, max_samples: int = 4) -> None:
        super().__init__()
        self.every_n_epochs, self.max_samples = int(every_n_epochs), int(max_samples)
        self._batch: dict[str, Any] | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % max(1, self.every_n_epochs) == 0

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._due(trainer):
            self._batch = _first(batch, self.max_samples)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch is None or not trainer.is_global_zero:
            return
        panels = prediction_panels(pl_module, self._batch)
        image = _figure(panels, f"{type(pl_module).__name__}, epoch {trainer.current_epoch}")
        self._batch = None
        _log_image(trainer, "val/predictions", image, f"val_epoch_{trainer.current_epoch:03d}.png")


class RandomStateCheckpoint(L.Callback):
    """Saves the global random states (Python, NumPy, torch CPU and CUDA) in every checkpoint and
    restores them on resume, so that dropout and other global draws continue exactly where they were.
    (The data modules save their own noise generators.)

    The states are restored as soon as Lightning hands them over (``load_state_dict``, after the
    seeding at the start of ``train.py`` and before the training iterator is built): restored later, at
    ``on_train_start``, a draw made in between (the DataLoader's worker seed) put dropout one draw out of
    step with the uninterrupted run.
    """

    def state_dict(self) -> dict[str, Any]:
        import random

        name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global state)
        state = {
            "python": random.getstate(),
            # plain types and tensors only: checkpoints load with torch.load(weights_only=True)
            "numpy": (
                name,
                torch.from_numpy(keys.astype(np.int64)),
                int(position),
                int(has_gauss),
                float(cached),
            ),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import random

        state = state_dict
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))  # lists after a JSON-like round trip
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ModelProvenance(L.Callback):
    """Writes what the model was trained for into every checkpoint, as ``checkpoint["deepstem"]`` (the
    section :func:`evaluation.networks.load_network` reads and ``scripts/export_checkpoint.py`` keeps):
    the data module's ``checkpoint_info()`` (``{"geometry": {...}, "trained_for": {quantity: [low,
    high]}}``), merged under what the checkpoint already holds (kernel shards: the ranges of the
    training split's optics; a scan's ePIE labels: its geometry and optics). Data modules without
    ``checkpoint_info`` leave checkpoints unchanged.

    ``reconstruct.py`` then needs no geometry options for such a model: e.g. a PtychoNN trained on a scan's
    ePIE reconstruction records its whole-detector input grid
    (:func:`evaluation.networks.checkpoints.ptychonn_geometry_params`) and the scan's optics, against which
    another scan is checked (:func:`evaluation.networks.checkpoints.optics_mismatch`).
    """

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        info_of = getattr(datamodule, "checkpoint_info", None)
        if not callable(info_of):
            return
        info = info_of()
        if not info:
            return
        section = dict(checkpoint.get("deepstem") or {})
        for key, value in info.items():
            merged = dict(section.get(key) or {})
            merged.update(value)
            section[key] = merged
        checkpoint["deepstem"] = section


_SCAN_METHODS = {"AIRPILightning": "airpi", "ChangLightning": "chang_unet", "PtychoNNLightning": "ptychonn"}


class ScanReconstruction(L.Callback):
    """Every ``every_n_epochs`` validation epochs: reconstruct a small scan with ground truth
    (``deepstem.4dstem/1`` with ``truth``, e.g. from ``datagen/scan4d.py``) with the network being
    trained, by the same stitching as ``reconstruct.py``, and log ``val/scan_xc`` and the FRC resolution
    ``val/scan_frc_0143_A`` against the truth plus an image of reconstruction and truth.

    ``scan_path=None`` switches it off; ``params`` are the method's stitching options (as in
    ``conf/reconstruct.yaml``); ``dose_e_per_A2`` adds Poisson noise (fixed seed) to a noise-free scan.
    """

    def __init__(
        self,
        scan_path: str | None = None,
        every_n_epochs: int = 5,
        params: dict[str, Any] | None = None,
        dose_e_per_A2: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.scan_path, self.every_n_epochs = scan_path, int(every_n_epochs)
        self.params = dict(params or {})
        self.dose_e_per_A2, self.seed = dose_e_per_A2, int(seed)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        method = _SCAN_METHODS.get(type(pl_module).__name__)
        if (
            self.scan_path is None
            or method is None
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or trainer.current_epoch % max(1, self.every_n_epochs) != 0
        ):
            return
        from evaluation.io import load_4dstem
        from evaluation.metrics import resample_to_grid
        from evaluation.networks import reconstruct_with_network
        from evaluation.suite import PoissonScan, score

        scan = load_4dstem(self.scan_path)
        try:
            if scan.truth_phase is None:
                raise ValueError(f"{self.scan_path}: ScanReconstruction needs a scan with a truth group")
            data = scan
            if self.dose_e_per_A2 is not None:  # dose per area -> electrons per CBED: d * step_x * step_y
                per_cbed = self.dose_e_per_A2 * float(np.prod(np.broadcast_to(scan.scan_step_A, (2,))))
                noisy = PoissonScan(scan.data, per_cbed, (self.seed,))
                data = dataclasses.replace(scan, data=noisy, _handle=None)
            was_training = pl_module.training
            pl_module.eval()
            try:
                result = reconstruct_with_network(
                    data, method, pl_module, self.params, device=pl_module.device, progress=False
                )
            finally:
                pl_module.train(was_training)
            metrics = score(scan, result)
            truth = resample_to_grid(
                scan.truth_phase, scan.truth_pixel_size_A, scan.truth_origin_A, np.shape(result.phase),
                result.pixel_size_A, result.origin_A,
            )  # fmt: skip
        finally:
            scan.close()
        pl_module.log_dict(
            {
                "val/scan_xc": float(metrics["xc"]),
                # the headline resolution against the truth is the FRC 0.5 crossing (evaluation.frc);
                # 0.143 is a half-map criterion, kept for comparison with earlier runs
                "val/scan_frc_05_A": float(metrics["frc_0.5_A"]),
                "val/scan_frc_0143_A": float(metrics["frc_0.143_A"]),
            },
            on_epoch=True,
            logger=True,
        )
        panels = {
            "reconstruction (rad)": torch.from_numpy(np.asarray(result.phase, dtype=np.float32))[None],
            "truth sigma v_z (rad)": torch.from_numpy(np.asarray(truth, dtype=np.float32))[None],
        }
        image = _figure(
            panels, f"{method} scan reconstruction, epoch {trainer.current_epoch}, xc {metrics['xc']:.3f}"
        )
        _log_image(trainer, "val/scan_reconstruction", image, f"scan_epoch_{trainer.current_epoch:03d}.png")
