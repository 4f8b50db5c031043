"""PtychoNN (paper 004 fig. 1, PyTorch variant): one diffraction pattern -> amplitude and phase.

Input (B, 1, 64, 64): the diffraction intensity (cropped/resized, no log). Output: a pair of (B, 1, 64, 64)
tensors, the amplitude in (0, 1) (sigmoid) and the phase in (-pi, pi) (``pi * tanh``).

Encoder: ``len(channels)`` levels of [conv3x3-ReLU, conv3x3-ReLU, maxpool 2] with 32/64/128 channels.
Each decoder mirrors it: levels of [conv3x3-ReLU, conv3x3-ReLU, 2x nearest up-sampling] with 128/64/32
channels, then a 3x3 conv to one channel and the output activation. The default network has exactly
1,154,210 parameters (paper: ~1.15 M).

``output="linear"`` drops the output activations: the heads then predict *standardised* labels
(``(label - mean) / std``), which :class:`PtychoNNStandardisation` turns back into radians and amplitude.
Why (issue #15, docs/results_ptychonn.md): on ePIE labels of a thin specimen the amplitude sits at
0.84-1.15 (sigmoid saturates near 1 and cannot exceed it) and the phase spans -0.13..1.0 rad with std
0.14 rad, a sliver of ``pi tanh``'s range; the paper's bounded heads then collapse to a constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PtychoNN", "PtychoNNStandardisation", "to_physical_units"]


def _double_conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU()]


class PtychoNN(nn.Module):
    """Encoder + amplitude decoder (sigmoid) + phase decoder (``pi * tanh``).

    Parameters
    ----------
    in_channels
        1 (one diffraction pattern).
    channels
        Encoder widths per level (32, 64, 128); the decoders use them in reverse order.
    output
        ``"bounded"`` (paper): amplitude ``sigmoid``, phase ``pi tanh`` (radians). ``"linear"``: the raw
        head outputs (standardised labels, see :class:`PtychoNNStandardisation`).
    """

    OUTPUTS = ("bounded", "linear")

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128), output: str = "bounded"
    ):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"PtychoNN: output must be one of {self.OUTPUTS}, got {output!r}")
        self.output = output
        channels = [int(c) for c in channels]
        layers: list[nn.Module] = []
        c = in_channels
        for width in channels:
            layers += [*_double_conv(c, width), nn.MaxPool2d(2)]
            c = width
        self.encoder = nn.Sequential(*layers)
        self.levels = len(channels)
        self.amplitude_decoder = self._decoder(c, channels)
        self.phase_decoder = self._decoder(c, channels)

    @staticmethod
    def _decoder(c: int, channels: list[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for width in reversed(channels):
            layers += [*_double_conv(c, width), nn.Upsample(scale_factor=2, mode="nearest")]
            c = width
        layers.append(nn.Conv2d(c, 1, 3, padding=1))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, 1, H, W) -> (amplitude, phase), each (B, 1, H, W)."""
        n = 2**self.levels
        if x.shape[-2] % n or x.shape[-1] % n:
            raise ValueError(f"PtychoNN: H and W must be divisible by {n}, got {tuple(x.shape)}")
        z = self.encoder(x)
        amplitude, phase = self.amplitude_decoder(z), self.phase_decoder(z)
        if self.output == "linear":
            return amplitude, phase
        return torch.sigmoid(amplitude), math.pi * torch.tanh(phase)


def to_physical_units(
    amplitude: torch.Tensor, phase: torch.Tensor, norm: PtychoNNStandardisation | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised network outputs -> (amplitude, phase in rad): ``value * std + mean`` per label.

    The inverse of the label standardisation a model was trained with (``norm`` = its
    :class:`PtychoNNStandardisation`, stored in the checkpoint); identity for ``norm=None`` or labels not
    standardised. :meth:`models.lightning.PtychoNNLightning.forward` already applies it, so a
    reconstruction that calls the LightningModule gets physical units without calling this.
    """
    if norm is None or not norm.labels:
        return amplitude, phase
    return (
        amplitude * norm.amplitude_std + norm.amplitude_mean,
        phase * norm.phase_std + norm.phase_mean,
    )


class PtychoNNStandardisation(nn.Module):
    """Input and label standardisation of a PtychoNN, fitted on the training split, saved as buffers.

    * inputs (``inputs=True``): per detector pixel ``(x - mean) / max(std, floor * max(std))`` over the
      training patterns (as the data module gives them: each divided by its maximum), shape
      ``(1, 1, input_px, input_px)``. The informative part of a thin-specimen pattern is a ~20 % variation
      on a bright-field disc that looks the same at every position; standardising makes it O(1).
    * labels (``labels=True``): scalar mean and std of the training amplitude and phase (rad).

    ``fitted`` is 0 until :meth:`fit` has run (a model reloaded from a checkpoint keeps its statistics).
    """

    def __init__(self, inputs: bool = False, labels: bool = False, input_px: int | None = None,
                 input_std_floor: float = 0.01) -> None:  # fmt: skip
        super().__init__()
        if inputs and not input_px:
            raise ValueError("PtychoNNStandardisation: inputs=True needs input_px (the pattern size)")
        self.inputs, self.labels = bool(inputs), bool(labels)
        self.input_std_floor = float(input_std_floor)
        shape = (1, 1, int(input_px), int(input_px)) if inputs else (1, 1, 1, 1)
        self.register_buffer("input_mean", torch.zeros(shape))
        self.register_buffer("input_std", torch.ones(shape))
        for name, value in (("amplitude_mean", 0.0), ("amplitude_std", 1.0), ("phase_mean", 0.0),
                            ("phase_std", 1.0), ("fitted", 0.0)):  # fmt: skip
            self.register_buffer(name, torch.tensor(value))

    @property
    def active(self) -> bool:
        return self.inputs or self.labels

    @torch.no_grad()
    def fit(self, patterns: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> None:
        """Statistics from training patterns (N, 1, K, K) (each over its maximum) and labels (N, 1, H, W)."""
        if self.inputs:
            if tuple(patterns.shape[-2:]) != tuple(self.input_mean.shape[-2:]):
                raise ValueError(f"PtychoNNStandardisation: patterns {tuple(patterns.shape[-2:])}, expected "
                                 f"{tuple(self.input_mean.shape[-2:])} (model.input_px)")  # fmt: skip
            p = patterns.double().reshape(-1, *patterns.shape[-2:])
            std = p.std(0)
            floor = max(self.input_std_floor * float(std.max()), 1e-6)  # inputs in [0, 1]; none constant
            self.input_mean.copy_(p.mean(0).reshape(self.input_mean.shape))
            self.input_std.copy_(std.clamp_min(floor).reshape(self.input_std.shape))
        if self.labels:
            for name, label in (("amplitude", amplitude), ("phase", phase)):
                getattr(self, f"{name}_mean").fill_(float(label.double().mean()))
                getattr(self, f"{name}_std").fill_(max(float(label.double().std()), 1e-6))
        self.fitted.fill_(1.0)

    def standardise_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Network input (B, 1, K, K) -> the standardised input (identity when ``inputs`` is off)."""
        if not self.inputs:
            return x
        if tuple(x.shape[-2:]) != tuple(self.input_mean.shape[-2:]):
            expected = tuple(self.input_mean.shape[-2:])
            raise ValueError(f"PtychoNN: this model standardises {expected} px patterns, got "
                             f"{tuple(x.shape[-2:])}: give its training ptychonn.pixels")  # fmt: skip
        return (x - self.input_mean) / self.input_std

    def standardise_labels(
        self, amplitude: torch.Tensor, phase: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels in physical units -> standardised (identity when ``labels`` is off)."""
        if not self.labels:
            return amplitude, phase
        return (amplitude - self.amplitude_mean) / self.amplitude_std, (
            phase - self.phase_mean
        ) / self.phase_std
