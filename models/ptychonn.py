"""PtychoNN (paper 004 fig. 1, PyTorch variant): one diffraction pattern -> amplitude and phase.

Input (B, 1, 64, 64): the diffraction intensity (cropped/resized, no log). Output: a pair of (B, 1, 64, 64)
tensors, the amplitude in (0, 1) (sigmoid) and the phase in (-pi, pi) (``pi * tanh``).

Encoder: ``len(channels)`` levels of [conv3x3-ReLU, conv3x3-ReLU, maxpool 2] with 32/64/128 channels.
Each decoder mirrors it: levels of [conv3x3-ReLU, conv3x3-ReLU, 2x nearest up-sampling] with 128/64/32
channels, then a 3x3 conv to one channel and the output activation. The default network has exactly
1,154,210 parameters (paper: ~1.15 M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PtychoNN"]


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
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
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
        amplitude = torch.sigmoid(self.amplitude_decoder(z))
        phase = math.pi * torch.tanh(self.phase_decoder(z))
        return amplitude, phase
