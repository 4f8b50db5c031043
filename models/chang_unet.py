"""Chang et al. residual U-Net (paper 001 fig. 1d, supplemental fig. 2): sqrt(diffraction) -> phase patch.

Input (B, 1, 32, 32): the square root of the (noisy) diffraction intensity binned to 32 x 32. Output
(B, 1, 32, 32): the phase (radians) of the illuminated patch, linear output (no activation).

Building block (supplemental fig. 2, "all filters are size 3x3"): a pre-activation residual block
``BN -> ReLU -> conv3x3 (stride s) -> BN -> ReLU -> conv3x3`` plus a 3x3 convolution (stride s) on the
shortcut, followed by dropout (0.2, "at every layer"). Stride-2 blocks do the down-sampling.

Layout (our reading of fig. 1d; the paper gives no layer table): channels 16-32-64-128-256 at
32/16/8/4/2 px. Encoder stage ``i`` = ``encoder_blocks`` residual blocks, the first with stride 2 (for
``i > 0``) and the channel change; a bridge of ``bridge_blocks`` residual blocks at 2 x 2; decoder stage
``i`` = 3x3 stride-2 transposed convolution to ``channels[i]`` -> concatenation with the encoder skip
-> ``decoder_blocks`` residual blocks; a final 3x3 convolution to one channel. With 2/2/2 blocks the
network has exactly 9,437,891 parameters ("~9.4 M" in the digest of the public model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ChangUNet", "PreActResidualBlock"]


class PreActResidualBlock(nn.Module):
    """Pre-activation residual block with a 3x3 convolution on the shortcut, then dropout."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.2):
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.branch(x) + self.shortcut(x))


class ChangUNet(nn.Module):
    """Residual U-Net of Chang et al. (see module docstring for the layout and the parameter count).

    Parameters
    ----------
    in_channels, out_channels
        1 and 1 (sqrt intensity in, phase out).
    channels
        Channels per resolution level; ``len(channels) - 1`` stride-2 down-samplings (32 -> 2 px).
    encoder_blocks, decoder_blocks, bridge_blocks
        Residual blocks per encoder stage, per decoder stage and at the lowest resolution.
    dropout
        Dropout after every residual block and transposed convolution (0.2).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        encoder_blocks: int = 2,
        decoder_blocks: int = 2,
        bridge_blocks: int = 2,
        dropout: float = 0.2,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2 or min(encoder_blocks, decoder_blocks) < 1 or bridge_blocks < 0:
            raise ValueError("ChangUNet: need >= 2 levels and >= 1 encoder/decoder block per stage")
        self.levels = len(channels)
        self.encoder = nn.ModuleList()
        c = in_channels
        for i, width in enumerate(channels):
            blocks = [PreActResidualBlock(c, width, stride=1 if i == 0 else 2, dropout=dropout)]
            blocks += [PreActResidualBlock(width, width, dropout=dropout) for _ in range(encoder_blocks - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            c = width
        self.bridge = nn.Sequential(
            *[PreActResidualBlock(c, c, dropout=dropout) for _ in range(bridge_blocks)]
        )
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(self.levels - 1)):
            width = channels[i]
            self.up.append(
                nn.Sequential(
                    nn.ConvTranspose2d(c, width, 3, stride=2, padding=1, output_padding=1),
                    nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                )
            )
            blocks = [PreActResidualBlock(2 * width, width, dropout=dropout)]
            blocks += [PreActResidualBlock(width, width, dropout=dropout) for _ in range(decoder_blocks - 1)]
            self.decoder.append(nn.Sequential(*blocks))
            c = width
        self.head = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, H, W), H and W divisible by ``2 ** (levels - 1)`` -> phase (B, 1, H, W)."""
        n = 2 ** (self.levels - 1)
        if x.shape[-2] % n or x.shape[-1] % n:
            raise ValueError(f"ChangUNet: H and W must be divisible by {n}, got {tuple(x.shape)}")
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.bridge(skips.pop())
        for up, stage in zip(self.up, self.decoder, strict=True):
            x = stage(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
