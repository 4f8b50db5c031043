"""AIRPI U-Net (paper 002 fig. 3, thesis ch.4 fig. 4.4): 3x3 CBED kernel + probe -> exit wave.

Channel convention of the input ``x`` (B, 11, H, W), H and W divisible by ``2 ** depth`` (64 x 64 in the
paper):

* channels 0-8: the 3x3 kernel of CBEDs, row-major, channel 4 = the centre position, already
  pre-processed by the data module (intensity compression ``I ** 0.1``, standardisation and the
  neighbour weights ``zeta`` of 002 eq. 10);
* channel 9: the probe amplitude ``|psi_in(r)|`` in real space (raw, normalised to ``sum |psi|^2 = 1``);
* channel 10: the probe phase ``arg psi_in(r)`` in radians (raw).

The network standardises channels 9 and 10 per image before the U-Net (so the data module can pass the
raw probe) and uses the raw values for the global residual (paper 002 "skip connections from the input
probe function to the output").

Output (B, 2, H, W): channel 0 is the compressed amplitude ``|psi_out(r)| ** 0.2`` (``amplitude_exponent``),
predicted as ``head_a * scale_a + |psi_in| ** 0.2``; channel 1 is the phase ``arg psi_out(r)``
predicted as ``head_p * scale_p + arg psi_in``. The two scales are trainable scalars initialised at
1e-4 (002, "trainable scaling factors"). :func:`output_to_wave` turns the output into the complex
real-space exit wave.

Architecture (released configuration ``filters=32, depth=3``): a block is ``block_convs`` x (conv3x3 ->
batch norm -> swish -> dropout 0.05). Encoder level ``i`` (64/32/16 px) runs a block with
``filters * 2**i`` channels and keeps it as the skip; a stride-2 3x3 "convolution layer" (conv -> BN ->
swish -> dropout) halves the size and doubles the filters (32/64/128/256 at 64/32/16/8 px). The
decoder up-samples with a stride-2 3x3 transposed convolution (to ``filters * 2**i`` channels, no
normalisation), concatenates the skip and runs a block. Heads are 3x3 convolutions to one channel.
With these choices (all convolutions with bias, BN with affine parameters; running statistics are
buffers, not parameters) the default network has exactly 2,129,028 parameters, 0.5 % below the
"about 2.14 M" of the paper (the paper gives no layer-level table; the residual difference is within
what bias/normalisation details of the TensorFlow original would account for).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AIRPINet", "output_to_wave"]

#: input channel of the probe amplitude and of the probe phase
PROBE_AMPLITUDE_CHANNEL = 9
PROBE_PHASE_CHANNEL = 10


class ConvLayer(nn.Sequential):
    """conv (k x k, stride s) -> batch norm -> swish (SiLU) -> dropout: AIRPI's "convolution layer"."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.05, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2),
            nn.BatchNorm2d(c_out),
            nn.SiLU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )


class ConvBlock(nn.Sequential):
    """``n`` consecutive :class:`ConvLayer` (stride 1): AIRPI's "convolution block"."""

    def __init__(self, c_in: int, c_out: int, n: int = 3, dropout: float = 0.05):
        super().__init__(*[ConvLayer(c_in if i == 0 else c_out, c_out, 1, dropout) for i in range(n)])


class OutputHead(nn.Module):
    """3x3 conv to one channel times a trainable scalar ``scale`` (initialised at ``scale_init``)."""

    def __init__(self, c_in: int, scale_init: float = 1e-4):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 1, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[:, 0] * self.scale


class AIRPINet(nn.Module):
    """The AIRPI U-Net with amplitude/phase heads and the probe global residual (see module docstring).

    Parameters
    ----------
    in_channels
        9 CBEDs + probe amplitude + probe phase = 11.
    filters
        Filters of the first level (32); level ``i`` has ``filters * 2**i``.
    depth
        Number of stride-2 down-samplings (3: 64 -> 8 px).
    block_convs
        Convolution layers per block (3).
    dropout
        Dropout after every convolution layer (0.05).
    scale_init
        Initial value of the two trainable output scales (1e-4).
    phase_scale_init
        Initial value of the phase head's scale instead (None: ``scale_init``). With both scales at 1e-4
        the phase scale was seen to oscillate about 0 for hundreds of Adam steps (its gradient averages out
        while the head's output is still uncorrelated with the target, and the head's gradient flips sign
        with it), so short trainings learn nothing; the phase enters the loss linearly, unlike the
        amplitude (``|psi|^2 = a^10``), so a scale of 1 is safe for it.
    amplitude_exponent
        The amplitude is predicted as ``|psi| ** amplitude_exponent`` (0.2).
    standardize_probe
        Standardise the probe channels per image before the U-Net (the residual uses the raw ones).
    """

    def __init__(
        self,
        in_channels: int = 11,
        filters: int = 32,
        depth: int = 3,
        block_convs: int = 3,
        dropout: float = 0.05,
        scale_init: float = 1e-4,
        amplitude_exponent: float = 0.2,
        phase_scale_init: float | None = None,
        standardize_probe: bool = True,
    ):
        super().__init__()
        if in_channels < PROBE_PHASE_CHANNEL + 1:
            raise ValueError(
                f"AIRPINet: in_channels must be >= 11 (probe in channels 9, 10), got {in_channels}"
            )
        if depth < 1:
            raise ValueError(f"AIRPINet: depth must be >= 1, got {depth}")
        self.depth = int(depth)
        self.amplitude_exponent = float(amplitude_exponent)
        self.standardize_probe = bool(standardize_probe)
        widths = [filters * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList()
        self.down = nn.ModuleList()
        c = in_channels
        for i in range(depth):
            self.encoder.append(ConvBlock(c, widths[i], block_convs, dropout))
            self.down.append(ConvLayer(widths[i], widths[i + 1], stride=2, dropout=dropout))
            c = widths[i + 1]
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(c, widths[i], 3, stride=2, padding=1, output_padding=1))
            self.decoder.append(ConvBlock(2 * widths[i], widths[i], block_convs, dropout))
            c = widths[i]
        self.amplitude_head = OutputHead(c, scale_init)
        self.phase_head = OutputHead(c, scale_init if phase_scale_init is None else phase_scale_init)

    @staticmethod
    def _standardize(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True, unbiased=False).clamp_min(1e-8)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 11, H, W) -> (B, 2, H, W): ``|psi| ** 0.2`` and ``arg psi`` (real space)."""
        if x.shape[1] <= PROBE_PHASE_CHANNEL:
            raise ValueError(f"AIRPINet: expected >= 11 input channels, got shape {tuple(x.shape)}")
        n = 2**self.depth
        if x.shape[-2] % n or x.shape[-1] % n:
            raise ValueError(f"AIRPINet: H and W must be divisible by 2**depth = {n}, got {tuple(x.shape)}")
        probe_amp = x[:, PROBE_AMPLITUDE_CHANNEL]
        probe_phase = x[:, PROBE_PHASE_CHANNEL]
        h = x
        if self.standardize_probe:
            probe = self._standardize(x[:, PROBE_AMPLITUDE_CHANNEL : PROBE_PHASE_CHANNEL + 1])
            h = torch.cat([x[:, :PROBE_AMPLITUDE_CHANNEL], probe, x[:, PROBE_PHASE_CHANNEL + 1 :]], dim=1)
        skips = []
        for block, down in zip(self.encoder, self.down, strict=True):
            h = block(h)
            skips.append(h)
            h = down(h)
        for up, block in zip(self.up, self.decoder, strict=True):
            h = block(torch.cat([up(h), skips.pop()], dim=1))
        amplitude = self.amplitude_head(h) + probe_amp.clamp_min(0) ** self.amplitude_exponent
        phase = self.phase_head(h) + probe_phase
        return torch.stack([amplitude, phase], dim=1)

    def to_wave(self, output: torch.Tensor) -> torch.Tensor:
        """Complex real-space exit wave from the network output (see :func:`output_to_wave`)."""
        return output_to_wave(output, self.amplitude_exponent)


def output_to_wave(output: torch.Tensor, amplitude_exponent: float = 0.2) -> torch.Tensor:
    """``(B, 2, H, W)`` (``|psi| ** e``, phase) -> complex ``psi = max(a, 0) ** (1 / e) exp(i phase)``."""
    amplitude = output[:, 0].float().clamp_min(0) ** (1.0 / amplitude_exponent)
    return torch.polar(amplitude, output[:, 1].float())
