"""Batch-norm statistics estimated over many training batches ("precise BN", Wu & Johnson 2021).

A network in eval mode normalises with the batch-norm *running* statistics: an exponential average with
momentum 0.1 over the last ~10 training batches. With the small batches of a CPU run (16-32) and inputs that
vary by orders of magnitude between batches (doses 1e1-1e9 electrons, phase spans 0.1-pi rad) that average
is noisy and lags the weights, so the same weights score very differently from one validation to the next
(measured on experiment=chang_graphene: validation xc swinging 0.38-0.57 between epochs at Adam 1e-4; the
same checkpoint 0.418 as saved and 0.680 with its statistics re-estimated over 50 or 200 fresh training
batches; docs/results_chang.md). Training itself is not affected: in train mode every batch normalises with
its own statistics, and the re-estimate changes only the buffers used in eval mode.

:func:`recalibrate_batchnorm` resets every batch-norm layer's running mean and variance and re-estimates
them as the plain (cumulative) average over ``num_batches`` training batches, the network otherwise in eval
mode (dropout off) and without gradients; :class:`PreciseBatchNorm` does it before every validation, so the
validation score and the checkpoints saved after it use the re-estimated statistics
(``callbacks.precise_bn`` in conf/callbacks/default.yaml; ``scripts/recalibrate_batchnorm.py`` does it to a
saved checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

__all__ = ["PreciseBatchNorm", "batchnorm_layers", "recalibrate_batchnorm"]


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``module`` that keep running statistics."""
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def recalibrate_batchnorm(
    module: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    forward: Callable[[Any], Any] | None = None,
) -> int:
    """Re-estimate the running statistics of every batch-norm layer of ``module`` over ``num_batches``
    of ``batches`` (each passed to ``forward``, default ``module``); returns the number of batches used.

    Every batch counts equally (cumulative average: ``momentum=None`` while estimating); the rest of the
    network stays in eval mode (dropout off); no gradients; the training/eval mode and the momentum of
    every layer are restored afterwards. A module without batch norm is left alone (returns 0).
    ValueError for ``num_batches < 1`` or when ``batches`` yields nothing.
    """
    if num_batches < 1:
        raise ValueError(f"precise_bn.num_batches must be >= 1, got {num_batches}")
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    run = forward if forward is not None else module
    modes = {m: m.training for m in module.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    used = 0
    try:
        module.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        with torch.no_grad():
            for batch in batches:
                if used >= num_batches:
                    break
                run(batch)
                used += 1
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    if used == 0:
        raise ValueError("recalibrate_batchnorm: the batches yielded nothing; the statistics were reset")
    return used


class PreciseBatchNorm(L.Callback):
    """Before every validation: the batch-norm running statistics re-estimated over ``num_batches`` fresh
    training batches (:func:`recalibrate_batchnorm`), so that validation and the checkpoints saved after
    it see statistics of the current weights instead of a noisy trailing average. Costs ``num_batches``
    forward passes per validation (~5 % of a 313-step Chang epoch at 16). The network's first batch key
    (``BATCH_KEYS[0]``, e.g. ``diffraction``, ``inputs``) is its input.

    The batches are the first ``num_batches`` of a fresh training loader, transformed as the data module
    transforms batches outside a training step (``training.datamodules``: no random augmentation, noise
    and on-the-fly samples drawn from per-index seeds), so the same calibration batches serve every
    epoch and the training random stream is not consumed: a resumed run stays exact. Place it after
    ``weight_averaging`` (which swaps the averaged weights in at the same hook) so that it calibrates the
    weights that are validated. Under DDP each rank estimates its own statistics (rank 0's are saved).
    """

    def __init__(self, num_batches: int = 50, enabled: bool = True) -> None:
        if num_batches < 1:
            raise ValueError(f"callbacks.precise_bn.num_batches must be >= 1, got {num_batches}")
        self.num_batches = int(num_batches)
        self.enabled = bool(enabled)
        self.last_used = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or not batchnorm_layers(pl_module):
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            return
        key = pl_module.BATCH_KEYS[0]

        def batches() -> Iterable[Mapping[str, torch.Tensor]]:
            for batch in datamodule.train_dataloader():
                yield pl_module._apply_batch_transfer_handler(batch, pl_module.device, 0)

        self.last_used = recalibrate_batchnorm(
            pl_module, batches(), self.num_batches, forward=lambda batch: pl_module(batch[key])
        )
