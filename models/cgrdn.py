"""CGRDN generator and conditional PatchGAN discriminator (thesis ch.2 figs. 2.10-2.11, Lobato et al. 2023).

Generator (image restoration, distorted x -> clean y, one channel):

* per-image standardisation ``x_s = (x - mean) / s`` and de-standardisation ``y = y_s * s + mean`` with the
  scale ``s = max(std, std_min_rel * level)``, ``level = mean |x|`` (the image's mean absolute intensity;
  ``std_min_rel = 0.1``; ``s`` is kept above the dtype's smallest normal number, so an all-zero image gives
  zeros). The floor is relative to the image's own intensity, so the model is scale-free: ``G(c x) = c G(x)``
  for every ``c > 0`` (up to float rounding), whatever the unit (fractions of the incident electrons,
  counts, detector units), and ``G(x + b) = G(x) + b`` whenever the floor is inactive for ``x`` and ``x + b``
  (``std >= std_min_rel * level`` for both). Why the mean absolute intensity: it scales with the image, is
  robust to single hot pixels (unlike the maximum), and for a HAADF image (intensities >= 0) it is the mean
  intensity, so the floor reads "contrast below 10% of the mean counts as flat": such an image is
  standardised by ``0.1 * mean`` (``x_s`` = relative contrast in units of 10%) instead of being blown up by
  its tiny std. The absolute value keeps the level non-zero for an offset-corrected (zero-mean) image.
  Legacy rule: with ``std_min`` set (checkpoints made before issue #16, whose hyper-parameters hold
  ``std_min: 0.1``) the floor is that absolute value, ``s = max(std, std_min)``, as before: those models
  load and compute exactly what they were trained with (equivariant only where ``c std > std_min``);
* conv3x3 (64) -> conv4x4 stride 2 (64) ("down-sampled features" ``f``);
* 4 grouped residual dense blocks (GRDB). A GRDB chains 4 residual dense blocks (RDB), concatenates
  their 4 outputs, fuses them 1x1 to 64 and adds its input. An RDB is 8 densely connected
  conv3x3 + ReLU layers of growth 32 (layer ``j`` sees the block input and all previous layer outputs),
  a 1x1 fusion back to 64 and a local residual;
* the 4 GRDB outputs are concatenated, fused 1x1 to 64 and added to ``f`` (semi-global residual);
* transposed conv4x4 stride 2 (64) -> conv3x3 to 1 channel + the standardised input (global residual).

Default size: exactly 7,035,521 parameters (thesis/public model: ~7.04 M). H and W must be even.

Discriminator: conditional PatchGAN on ``concat(x, y)`` (2 channels): C64 -> C128 -> C256 (4x4, stride 2,
padding 1: exact halving) -> C512 (4x4, stride 1, "same" padding) -> 1 channel (4x4, stride 1, "same"),
LeakyReLU(0.2) and instance norm on every C layer except the first, no activation on the output
(it returns the raw critic ``C``; the relativistic average sigmoid is in the loss). A 256 x 256 input
gives a 32 x 32 output (the stride-1 layers pad 1 before / 2 after, TensorFlow's "same" for an even
kernel).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CGRDN", "GRDB", "RDB", "PatchDiscriminator"]


class RDB(nn.Module):
    """Residual dense block: ``layers`` densely connected conv3x3+ReLU (growth ``growth``), 1x1 fusion, +x."""

    def __init__(self, channels: int = 64, growth: int = 32, layers: int = 8):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels + j * growth, growth, 3, padding=1), nn.ReLU())
            for j in range(layers)
        )
        self.fuse = nn.Conv2d(channels + layers * growth, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs:
            features.append(conv(torch.cat(features, dim=1)))
        return x + self.fuse(torch.cat(features, dim=1))


class GRDB(nn.Module):
    """Grouped residual dense block: ``blocks`` chained RDBs, their outputs concatenated, 1x1 fused, +x."""

    def __init__(self, channels: int = 64, growth: int = 32, layers: int = 8, blocks: int = 4):
        super().__init__()
        self.rdbs = nn.ModuleList(RDB(channels, growth, layers) for _ in range(blocks))
        self.fuse = nn.Conv2d(blocks * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        h = x
        for rdb in self.rdbs:
            h = rdb(h)
            outputs.append(h)
        return x + self.fuse(torch.cat(outputs, dim=1))


class CGRDN(nn.Module):
    """Concatenated grouped residual dense network (generator); see the module docstring.

    Parameters
    ----------
    in_channels
        1 (an ADF/HAADF image).
    features
        Feature channels (64).
    growth, rdb_layers, rdbs_per_grdb, grdbs
        Growth rate (32), conv layers per RDB (8), RDBs per GRDB (4), GRDBs (4).
    std_min
        Legacy absolute floor of the per-image standard deviation (None). Set (0.1 in checkpoints made
        before issue #16) it selects the old rule ``max(std, std_min)`` and ``std_min_rel`` is ignored.
    std_min_rel
        Floor of the standardisation scale relative to the image's mean absolute intensity (0.1): the
        scale-free rule of the module docstring, used when ``std_min`` is None (the default).
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: int = 64,
        growth: int = 32,
        rdb_layers: int = 8,
        rdbs_per_grdb: int = 4,
        grdbs: int = 4,
        std_min: float | None = None,
        std_min_rel: float = 0.1,
    ):
        super().__init__()
        if std_min_rel < 0 or (std_min is not None and std_min < 0):
            raise ValueError(f"CGRDN: std_min_rel and std_min must be >= 0, got {std_min_rel}, {std_min}")
        self.std_min_rel = float(std_min_rel)
        self.std_min = None if std_min is None else float(std_min)
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        self.down = nn.Conv2d(features, features, 4, stride=2, padding=1)
        self.grdbs = nn.ModuleList(GRDB(features, growth, rdb_layers, rdbs_per_grdb) for _ in range(grdbs))
        self.fuse = nn.Conv2d(grdbs * features, features, 1)
        self.up = nn.ConvTranspose2d(features, features, 4, stride=2, padding=1)
        self.tail = nn.Conv2d(features, in_channels, 3, padding=1)

    def standardisation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image ``(mean, scale)`` of ``x`` (B, C, H, W), each (B, 1, 1, 1), by the module docstring."""
        dims = (-3, -2, -1)
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True, unbiased=False)
        if self.std_min is not None:
            return mean, std.clamp_min(self.std_min)
        level = x.abs().mean(dim=dims, keepdim=True)
        scale = torch.maximum(std, self.std_min_rel * level)
        return mean, scale.clamp_min(torch.finfo(scale.dtype).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W), H and W even -> restored image of the same shape and intensity scale."""
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"CGRDN: H and W must be even, got {tuple(x.shape)}")
        mean, std = self.standardisation(x)
        xs = (x - mean) / std
        f = self.down(self.head(xs))
        outputs = []
        h = f
        for grdb in self.grdbs:
            h = grdb(h)
            outputs.append(h)
        h = f + self.fuse(torch.cat(outputs, dim=1))
        ys = self.tail(self.up(h)) + xs
        return ys * std + mean


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN critic ``C(x, y)`` on ``concat(x, y)``; see the module docstring.

    Parameters
    ----------
    in_channels
        Channels of ``concat(x, y)`` (2).
    channels
        Widths of the C layers; all but the last use stride 2, the last stride 1 (64, 128, 256, 512).
    negative_slope
        LeakyReLU slope (0.2).
    """

    def __init__(
        self,
        in_channels: int = 2,
        channels: tuple[int, ...] = (64, 128, 256, 512),
        negative_slope: float = 0.2,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, width in enumerate(channels):
            last = i == len(channels) - 1
            if last:
                layers += [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(c, width, 4, stride=1)]
            else:
                layers.append(nn.Conv2d(c, width, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.InstanceNorm2d(width, affine=True))
            layers.append(nn.LeakyReLU(negative_slope))
            c = width
        layers += [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(c, 1, 4, stride=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Critic map (B, 1, H / 2**(n-1), W / 2**(n-1)) for the pair (condition ``x``, image ``y``)."""
        return self.net(torch.cat([x, y], dim=1))
