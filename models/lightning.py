"""LightningModules of the four networks: loss, optimiser, scheduler and logging around a plain network.

Each module builds its network from a plain ``net`` mapping of constructor arguments (so checkpoints
reload with ``load_from_checkpoint`` and Hydra configs stay flat YAML) and its loss from a ``loss``
mapping. Switches shared by all: ``compile`` (wrap the network in ``torch.compile`` for the forward
passes; the state dict keeps the plain network's keys) and ``channels_last`` (network weights and
inputs in channels-last memory format). Mixed precision (bf16/16-mixed) is the Trainer's ``precision``.

Batch contract (dict keys; (B, 1, H, W) and (B, H, W) are both accepted for single-channel images):

* :class:`AIRPILightning`: ``inputs`` float (B, 11, H, W) (channel convention in :mod:`models.airpi`);
  ``wave`` the real-space exit-wave label, complex (B, H, W) or float (B, 2, H, W) = (amplitude,
  phase); optional ``probe`` likewise (default: built from input channels 9 and 10).
* :class:`ChangLightning`: ``diffraction`` float (B, 1, 32, 32), the square root of the diffraction
  intensity; ``phase`` float (B, 1, 32, 32), radians; optional ``mask`` (B, 1, 32, 32), 1 inside the
  illuminated area (default: all pixels).
* :class:`PtychoNNLightning`: ``diffraction`` float (B, 1, 64, 64); ``amplitude`` and ``phase`` float
  (B, 1, 64, 64).
* :class:`CGRDNLightning`: ``distorted`` and ``clean`` float (B, 1, H, W), H and W even (256 in the
  thesis).

Each class lists its contract in ``BATCH_KEYS`` / ``OPTIONAL_BATCH_KEYS``; ``check_batch(batch)`` raises
one clear ``KeyError`` for a wrong model/data pairing (also called at every step).

Logged metrics (stable names): ``train/loss``, ``val/loss`` for all; per-term losses under
``train/loss_<term>`` and ``val/loss_<term>``; AIRPI ``val/xc_object_phase``; Chang ``val/xc_phase``;
PtychoNN ``val/xc_amplitude``, ``val/xc_phase`` (``val/xc_phase_weighted`` given a ``weight``);
CGRDN ``train/loss_d``, ``val/psnr``, ``val/psnr_input`` (the distorted input against the clean image,
the baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from models.airpi import PROBE_AMPLITUDE_CHANNEL, PROBE_PHASE_CHANNEL, AIRPINet, output_to_wave
from models.cgrdn import CGRDN, PatchDiscriminator
from models.chang_unet import ChangUNet
from models.losses import (
    AIRPILoss,
    CGRDNGeneratorLoss,
    PtychoNNLoss,
    illuminated_mask,
    masked_l1,
    object_phase,
    pearson_xc,
    psnr,
    relativistic_discriminator_loss,
)
from models.ptychonn import PtychoNN, PtychoNNStandardisation, to_physical_units

__all__ = ["AIRPILightning", "CGRDNLightning", "ChangLightning", "PtychoNNLightning"]


def _plain(value: Any) -> Any:
    """OmegaConf containers (or anything mapping/sequence-like) -> plain dicts/lists for hparams."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _image(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, 1, H, W); (B, C, H, W) unchanged."""
    return x.unsqueeze(1) if x.dim() == 3 else x


def as_complex(x: torch.Tensor) -> torch.Tensor:
    """Complex (B, H, W) unchanged; float (B, 2, H, W) (amplitude, phase) -> complex (B, H, W)."""
    if x.is_complex():
        return x
    if x.dim() != 4 or x.shape[1] != 2:
        raise ValueError(
            f"expected a complex (B, H, W) or an amplitude/phase (B, 2, H, W) tensor, got {tuple(x.shape)}"
        )
    return torch.polar(x[:, 0].float(), x[:, 1].float())


class _NetModule(L.LightningModule):
    """Shared plumbing: the ``compile`` and ``channels_last`` switches around ``self.net``."""

    net: nn.Module
    #: keys every batch must have (the batch contract), and optional ones
    BATCH_KEYS: tuple[str, ...] = ()
    OPTIONAL_BATCH_KEYS: tuple[str, ...] = ()

    @classmethod
    def check_batch(cls, batch: Mapping[str, Any]) -> None:
        """Raise one clear ``KeyError`` when ``batch`` misses a contract key (wrong model/data pairing)."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{cls.__name__}: a batch must be a dict with keys {cls.BATCH_KEYS}, got {type(batch)}"
            )
        missing = [k for k in cls.BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(
                f"{cls.__name__}: the batch lacks {missing}; it needs {list(cls.BATCH_KEYS)} (optional "
                f"{list(cls.OPTIONAL_BATCH_KEYS)}) and has {sorted(batch)}: is the data module the right one "
                "for this model?"
            )

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The validation computation on the test split, logged under ``test/...``."""
        return self._step(batch, "test")  # type: ignore[attr-defined]  (each module defines _step)

    def _init_switches(self, compile: bool, channels_last: bool) -> None:
        self.use_compile = bool(compile)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        # Not an attribute nn.Module tracks: the state dict keeps the plain network's keys.
        object.__setattr__(self, "_compiled_net", torch.compile(self.net) if self.use_compile else None)

    def run_net(self, x: torch.Tensor) -> Any:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._compiled_net if self._compiled_net is not None else self.net
        return net(x)

    def _log_terms(
        self,
        stage: str,
        terms: Mapping[str, torch.Tensor],
        batch_size: int,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        """``<stage>/loss_<term>`` (unweighted) and, given ``weights``, ``<stage>/weighted_<term>`` (what the
        term adds to the total: the balance of the loss is visible in the logs)."""
        for name, value in terms.items():
            self.log(f"{stage}/loss_{name}", value.detach(), batch_size=batch_size)
            if weights is not None and name in weights:
                self.log(f"{stage}/weighted_{name}", weights[name] * value.detach(), batch_size=batch_size)


class AIRPILightning(_NetModule):
    """AIRPI training (paper 002): multi-term loss, Adam 5e-4, reduce-on-plateau x0.5 after 3 epochs.

    Parameters
    ----------
    net
        :class:`models.airpi.AIRPINet` arguments.
    loss
        :class:`models.losses.AIRPILoss` arguments (weights).
    lr, betas
        Adam settings (5e-4; momentum 0.9 = ``betas[0]``).
    plateau_factor, plateau_patience, monitor
        ``ReduceLROnPlateau`` on ``monitor`` (``val/loss``), factor 0.5, patience 3 epochs.
    fine_tune
        The second stage of 002: the object-phase term gets ``loss.fine_tune_object_weight`` (10).
    teacher_ckpt, distill_fraction
        Knowledge distillation (e.g. a slimmer ``net.filters`` learning from a trained full-width model):
        the AIRPI checkpoint of a teacher, read weights-only when fitting starts (never at inference, so a
        student checkpoint loads without it) and run in eval mode, without gradients, on the same noisy,
        augmented inputs. The training loss is ``(1 - f) L(pred, label) + f L(pred, teacher's wave)``, both
        the paper loss, ``f = distill_fraction``; logged as ``train/loss_label`` and ``train/loss_teacher``.
        Validation scores the student against the true labels only. The teacher is not part of the
        student's state dict.
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        lr: float = 5e-4,
        betas: Sequence[float] = (0.9, 0.999),
        plateau_factor: float = 0.5,
        plateau_patience: int = 3,
        monitor: str = "val/loss",
        fine_tune: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        teacher_ckpt: str | None = None,
        distill_fraction: float = 0.5,
    ):
        super().__init__()
        net, loss = _plain(net or {}), _plain(loss or {})
        if not 0.0 <= float(distill_fraction) <= 1.0:
            raise ValueError(f"AIRPILightning: distill_fraction must be in [0, 1], got {distill_fraction}")
        self.save_hyperparameters(
            {
                "net": net,
                "loss": loss,
                "lr": lr,
                "betas": list(betas),
                "plateau_factor": plateau_factor,
                "plateau_patience": plateau_patience,
                "monitor": monitor,
                "fine_tune": fine_tune,
                "compile": compile,
                "channels_last": channels_last,
                "teacher_ckpt": None if teacher_ckpt is None else str(teacher_ckpt),
                "distill_fraction": float(distill_fraction),
            }
        )
        self.net = AIRPINet(**net)
        self.loss = AIRPILoss(**{**loss, "fine_tune": fine_tune})
        self._init_switches(compile, channels_last)
        # the teacher is loaded by on_fit_start and kept out of nn.Module's registry (and the state dict)
        object.__setattr__(self, "_teacher", None)

    BATCH_KEYS = ("inputs", "wave")
    OPTIONAL_BATCH_KEYS = ("probe",)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 11, H, W) -> (B, 2, H, W) compressed amplitude and phase (see :class:`AIRPINet`)."""
        return self.run_net(inputs)

    def predict_wave(self, inputs: torch.Tensor) -> torch.Tensor:
        """Complex real-space exit wave (B, H, W)."""
        return output_to_wave(self(inputs), self.net.amplitude_exponent)

    @staticmethod
    def _probe(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "probe" in batch and batch["probe"] is not None:
            return as_complex(batch["probe"])
        inputs = batch["inputs"]
        return torch.polar(inputs[:, PROBE_AMPLITUDE_CHANNEL].float(), inputs[:, PROBE_PHASE_CHANNEL].float())

    def on_fit_start(self) -> None:
        if self.hparams.get("teacher_ckpt") and self._teacher is None:
            object.__setattr__(self, "_teacher", load_teacher(self.hparams.teacher_ckpt, self.channels_last))
        if self._teacher is not None:
            self._teacher.to(self.device)

    @property
    def teacher(self) -> AIRPILightning | None:
        """The distillation teacher (loaded when fitting starts), or None."""
        return self._teacher

    def _step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        self.check_batch(batch)
        out = self(batch["inputs"])
        wave_pred = output_to_wave(out, self.net.amplitude_exponent)
        wave_true = as_complex(batch["wave"])
        probe = self._probe(batch)
        total, terms = self.loss(wave_pred, wave_true, probe, out[:, 1].float())
        bs = out.shape[0]
        if stage == "train" and self._teacher is not None:
            with torch.no_grad():
                wave_teacher = self._teacher.predict_wave(batch["inputs"]).detach()
            to_teacher, _ = self.loss(wave_pred, wave_teacher, probe, out[:, 1].float())
            f = self.hparams.distill_fraction
            self.log("train/loss_label", total.detach(), batch_size=bs)
            self.log("train/loss_teacher", to_teacher.detach(), batch_size=bs)
            total = (1.0 - f) * total + f * to_teacher
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=bs)
        self._log_terms(stage, terms, bs, self.loss.effective_weights())
        if stage == "val":
            mask = illuminated_mask(probe, self.loss.mask_threshold)
            xc = pearson_xc(
                object_phase(wave_pred, probe), object_phase(wave_true.to(wave_pred.dtype), probe), mask
            )
            self.log("val/xc_object_phase", xc.mean(), prog_bar=True, batch_size=bs)
        return total

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.predict_wave(batch["inputs"])

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.hparams.plateau_factor, patience=self.hparams.plateau_patience
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.monitor, "interval": "epoch"},
        }


def load_teacher(path: str, channels_last: bool = False) -> AIRPILightning:
    """An AIRPI checkpoint as a frozen distillation teacher (eval mode, no gradients), read weights-only.

    A missing, unsafe or non-AIRPI file raises ``ValueError`` naming it.
    """
    from models.checkpoints import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except (CheckpointError, OSError) as err:
        raise ValueError(f"AIRPILightning: teacher_ckpt={path}: {err}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not any(k.startswith("net.amplitude_head.") for k in state):
        raise ValueError(f"AIRPILightning: teacher_ckpt={path} is not an AIRPI checkpoint")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.update(compile=False, channels_last=channels_last, teacher_ckpt=None)
    teacher = AIRPILightning(**hparams)
    teacher.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class ChangLightning(_NetModule):
    """Chang U-Net training (paper 001): L1 inside the illuminated area, SGD with lr 1e-4.

    Parameters
    ----------
    net
        :class:`models.chang_unet.ChangUNet` arguments.
    lr, momentum
        SGD settings (1e-4; plain SGD, momentum 0, as the paper states "stochastic gradient descent").
    optimizer
        ``"sgd"`` (the paper) or ``"adam"`` (``lr`` then its Adam step size, ``momentum`` unused): plain SGD
        at 1e-4 needs the paper's 250,000 patterns and more; Adam reaches a lower loss in the sample budget
        of a CPU run (conf/experiment/chang_hbn.yaml).
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        lr: float = 1e-4,
        momentum: float = 0.0,
        compile: bool = False,
        channels_last: bool = False,
        optimizer: str = "sgd",
    ):
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"model.optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        net = _plain(net or {})
        self.save_hyperparameters(
            {
                "net": net,
                "lr": lr,
                "momentum": momentum,
                "compile": compile,
                "channels_last": channels_last,
                "optimizer": optimizer,
            }
        )
        self.net = ChangUNet(**net)
        self._init_switches(compile, channels_last)

    BATCH_KEYS = ("diffraction", "phase")
    OPTIONAL_BATCH_KEYS = ("mask",)

    def forward(self, diffraction: torch.Tensor) -> torch.Tensor:
        """sqrt(intensity) (B, 1, H, W) -> phase (B, 1, H, W)."""
        return self.run_net(_image(diffraction))

    def _step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        self.check_batch(batch)
        pred = self(batch["diffraction"])
        target = _image(batch["phase"])
        mask = batch.get("mask")
        mask = None if mask is None else _image(mask)
        loss = masked_l1(pred, target, mask)
        bs = pred.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs)
        if stage == "val":
            self.log("val/xc_phase", pearson_xc(pred, target, mask).mean(), batch_size=bs)
        return loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["diffraction"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.get("optimizer", "sgd") == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class PtychoNNLightning(_NetModule):
    """PtychoNN training (paper 004): L1 on amplitude and phase, Adam, cyclic lr (triangular2, lr/10..lr).

    Parameters
    ----------
    net, loss
        :class:`models.ptychonn.PtychoNN` and :class:`models.losses.PtychoNNLoss` arguments.
    lr
        Adam learning rate and the top of the cycle (1e-3); the bottom is ``lr / 10``.
    half_cycle_epochs
        Epochs from the bottom to the top of a cycle (6). The step count per epoch comes from the
        Trainer (``estimated_stepping_batches / max_epochs``) or, without one, ``steps_per_epoch``.
    standardise_inputs, standardise_labels, input_px, input_std_floor
        Off by default (paper). :class:`models.ptychonn.PtychoNNStandardisation`, fitted on the training
        split when a fit starts (the data module's ``training_statistics()``) and saved in the checkpoint:
        ``standardise_inputs`` z-scores each input pixel (``input_px`` the pattern size, ``input_std_floor``
        the std floor as a fraction of the largest); ``standardise_labels`` makes the network predict
        ``(label - mean) / std`` with linear heads (``net.output`` null or ``"linear"``). The loss is taken
        on the standardised labels; :meth:`forward` returns physical units (amplitude, phase in rad), so a
        reconstruction needs nothing else.

    A batch may carry ``weight`` (B, 1, H, W), per-pixel loss weights (``data.label_weight=probe``).
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        half_cycle_epochs: float = 6.0,
        steps_per_epoch: int | None = None,
        compile: bool = False,
        channels_last: bool = False,
        standardise_inputs: bool = False,
        standardise_labels: bool = False,
        input_px: int | None = None,
        input_std_floor: float = 0.01,
    ):
        super().__init__()
        net, loss = _plain(net or {}), _plain(loss or {})
        if net.get("output") is None:  # null: the heads the label convention needs
            net["output"] = "linear" if standardise_labels else "bounded"
        if standardise_labels and net["output"] != "linear":
            raise ValueError("PtychoNNLightning: standardise_labels needs net.output=linear (or null), got "
                             f"{net['output']!r}: bounded heads miss standardised labels")  # fmt: skip
        self.save_hyperparameters(
            {
                "net": net,
                "loss": loss,
                "lr": lr,
                "half_cycle_epochs": half_cycle_epochs,
                "steps_per_epoch": steps_per_epoch,
                "compile": compile,
                "channels_last": channels_last,
                "standardise_inputs": standardise_inputs,
                "standardise_labels": standardise_labels,
                "input_px": input_px,
                "input_std_floor": input_std_floor,
            }
        )
        self.net = PtychoNN(**net)
        self.loss = PtychoNNLoss(**loss)
        self.norm = PtychoNNStandardisation(standardise_inputs, standardise_labels, input_px, input_std_floor)
        self._init_switches(compile, channels_last)

    BATCH_KEYS = ("diffraction", "amplitude", "phase")
    OPTIONAL_BATCH_KEYS = ("weight",)

    def forward_standardised(self, diffraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffraction (B, 1, H, W) -> the network's raw (amplitude, phase): standardised labels when
        ``standardise_labels``, else physical units."""
        return self.run_net(self.norm.standardise_inputs(_image(diffraction)))

    def forward(self, diffraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffraction (B, 1, H, W) -> (amplitude, phase in rad), each (B, 1, H, W)."""
        return to_physical_units(*self.forward_standardised(diffraction), self.norm)

    def on_fit_start(self) -> None:
        """Fit the standardisation on the training split (once: a resumed run keeps its checkpoint's)."""
        if not self.norm.active or bool(self.norm.fitted):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "training_statistics"):
            raise ValueError("PtychoNNLightning: standardise_inputs/standardise_labels need a data module "
                             "with training_statistics() (data=epie_labels, or data=multislice with "
                             "view=ptychonn), got "
                             f"{type(datamodule).__name__}")  # fmt: skip
        stats = datamodule.training_statistics()
        self.norm.fit(*(stats[k].to(self.device) for k in ("diffraction", "amplitude", "phase")))

    def _step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        self.check_batch(batch)
        amplitude, phase = self.forward_standardised(batch["diffraction"])
        amplitude_true, phase_true = _image(batch["amplitude"]), _image(batch["phase"])
        weight = batch.get("weight")
        total, terms = self.loss(
            amplitude, phase, *self.norm.standardise_labels(amplitude_true, phase_true), weight
        )
        bs = amplitude.shape[0]
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=bs)
        self._log_terms(stage, terms, bs)
        if stage == "val":
            amplitude, phase = to_physical_units(amplitude, phase, self.norm)
            self.log("val/xc_amplitude", pearson_xc(amplitude, amplitude_true).mean(), batch_size=bs)
            self.log("val/xc_phase", pearson_xc(phase, phase_true).mean(), batch_size=bs)
            if weight is not None:
                # pooled over the batch's weighted pixels: the region a reconstruction stitches
                flat = [t.reshape(1, -1) for t in (phase, phase_true, _image(weight).expand_as(phase))]
                self.log("val/xc_phase_weighted", pearson_xc(*flat)[0], batch_size=bs)
        return total

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def predict_step(
        self, batch: Mapping[str, torch.Tensor], batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch["diffraction"])

    def _steps_per_epoch(self) -> int:
        if self.hparams.steps_per_epoch:
            return int(self.hparams.steps_per_epoch)
        trainer = self._trainer
        if trainer is not None and trainer.max_epochs and trainer.max_epochs > 0:
            try:
                return max(1, int(trainer.estimated_stepping_batches) // int(trainer.max_epochs))
            except (RuntimeError, ValueError, TypeError):
                return 1
        return 1

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        step_size_up = max(1, math.ceil(self.hparams.half_cycle_epochs * self._steps_per_epoch()))
        scheduler = torch.optim.lr_scheduler.CyclicLR(
            optimizer,
            base_lr=self.hparams.lr / 10,
            max_lr=self.hparams.lr,
            step_size_up=step_size_up,
            mode="triangular2",
            cycle_momentum=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CGRDNLightning(_NetModule):
    """CGRDN GAN training (thesis ch.2): generator loss eq. 2.41-2.42, relativistic D loss eq. 2.43.

    Manual optimisation, one discriminator then one generator update per batch (the discriminator is
    skipped entirely when ``loss.w_adversarial == 0``: then it is plain supervised restoration).

    Parameters
    ----------
    net, discriminator, loss
        :class:`models.cgrdn.CGRDN`, :class:`models.cgrdn.PatchDiscriminator` and
        :class:`models.losses.CGRDNGeneratorLoss` arguments.
    lr_g, lr_d, betas
        Adam settings of the two optimisers (1e-4 each, betas (0.9, 0.999); the thesis does not state
        them, these are this project's defaults).

    Standardisation and loss weights are scale-free by default (``net.std_min_rel``,
    ``loss.sigma_min_rel``; issue #16); the hyper-parameters of checkpoints made before that hold
    ``net.std_min: 0.1`` and ``loss.sigma_min: 0.1``, which select the legacy absolute floor, so they load
    and compute as they were trained.
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        lr_g: float = 1e-4,
        lr_d: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        net, discriminator, loss = _plain(net or {}), _plain(discriminator or {}), _plain(loss or {})
        self.save_hyperparameters(
            {
                "net": net,
                "discriminator": discriminator,
                "loss": loss,
                "lr_g": lr_g,
                "lr_d": lr_d,
                "betas": list(betas),
                "compile": compile,
                "channels_last": channels_last,
            }
        )
        self.automatic_optimization = False
        self.net = CGRDN(**net)
        in_channels = 2 * int(net.get("in_channels", 1))
        self.discriminator = PatchDiscriminator(**{"in_channels": in_channels, **discriminator})
        if channels_last:
            self.discriminator.to(memory_format=torch.channels_last)
        self.loss = CGRDNGeneratorLoss(**loss)
        self._init_switches(compile, channels_last)

    BATCH_KEYS = ("distorted", "clean")

    def forward(self, distorted: torch.Tensor) -> torch.Tensor:
        """Distorted (B, 1, H, W) -> restored (B, 1, H, W)."""
        return self.run_net(_image(distorted))

    def _critic(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
        return self.discriminator(x, y)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.check_batch(batch)
        x, y = _image(batch["distorted"]), _image(batch["clean"])
        opt_g, opt_d = self.optimizers()
        bs = x.shape[0]
        adversarial = self.loss.w_adversarial > 0
        y_g = self(x)  # one generator forward: detached for the D update, attached for the G update
        if adversarial:
            loss_d = relativistic_discriminator_loss(self._critic(x, y), self._critic(x, y_g.detach()))
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            self.log("train/loss_d", loss_d.detach(), prog_bar=True, batch_size=bs)
        if adversarial:
            self.discriminator.requires_grad_(False)
            loss_g, terms = self.loss(y_g, y, self._critic(x, y), self._critic(x, y_g))
            self.discriminator.requires_grad_(True)
        else:
            loss_g, terms = self.loss(y_g, y)
        opt_g.zero_grad()
        if torch.isfinite(loss_g):
            self.manual_backward(loss_g)
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        else:
            finite = False
        if finite:
            opt_g.step()
        else:  # one non-finite batch must not poison the weights (Adam moments included): skip it
            opt_g.zero_grad()
        self.log("train/skipped_steps", float(not finite), reduce_fx="sum", batch_size=bs)
        self.log("train/loss", loss_g.detach(), prog_bar=True, batch_size=bs)
        self._log_terms("train", terms, bs)
        return loss_g.detach()

    def _step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        self.check_batch(batch)
        x, y = _image(batch["distorted"]), _image(batch["clean"])
        y_g = self(x)
        loss, terms = self.loss.pixel_loss(y_g, y)
        bs = x.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs)
        self._log_terms(stage, terms, bs)
        self.log(f"{stage}/psnr", psnr(y_g, y).mean(), prog_bar=True, batch_size=bs)
        self.log(f"{stage}/psnr_input", psnr(x, y).mean(), batch_size=bs)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["distorted"])

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = tuple(self.hparams.betas)
        return [
            torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr_g, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr_d, betas=betas),
        ]
