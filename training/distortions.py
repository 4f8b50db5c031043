"""STEM image distortion models (thesis ch.2, REFERENCE.md section 5) as batch-wise torch functions.

Every function works on ``(B, H, W)`` image batches on whatever device they live on and draws its random
numbers from an explicit generator, so distortions are reproducible and can run in a DataModule's
``on_after_batch_transfer`` hook on the GPU.

Conventions
-----------
* Image axes ``(B, H, W)`` = (sample, scan line, position along the line): axis -2 is the slow-scan
  direction ``y`` (one row per scan line), axis -1 is the fast-scan direction ``x`` along which the beam
  moves within a line. Pixel indices are the nominal probe positions.
* Clean images ``I`` are in the units of the simulation (e.g. fraction of incident electrons reaching the
  annular detector). The electron budget of a pixel is ``alpha = d * dx * dy`` (dose ``d`` in e/A^2,
  pixel size ``dx, dy`` in A), so the expected number of detected electrons is ``alpha * I``.
  Noise functions return images in the original units (counts divided by ``alpha``, thesis eq. 2.13:
  "dividing by alpha brings x back to approximately its original range").
* Randomness: ``generator`` is either one ``torch.Generator`` (on the batch's device) used for the whole
  batch (training), or a sequence of ``B`` generators, one per sample (validation/test: see
  :func:`per_sample_generators`), in which case each sample's noise depends only on its own generator
  and not on the composition of the batch.

Implemented equations (thesis = paper 003):
* shot noise, eq. 2.1 with lambda = I d dx dy: :func:`shot_noise`;
* scintillator/PMT detector noise, eq. 2.5-2.13: :class:`PMTParameters`, :func:`pmt_noise`,
  :func:`detector_noise` (the same implementation is used for CBED augmentation in
  ``training.augment``);
* AR(1) scan-line jitter, eq. 2.14-2.15: :func:`ar1_series`, :func:`scan_jitter`;
* fast-scan point spread, eq. 2.16-2.18: :func:`fast_scan_kernel`, :func:`fast_scan_blur`;
* dead pixels and saturation: :func:`dead_pixels`, :func:`saturate`;
* :class:`StemDistortion`: the composable pipeline with parameters drawn per sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Generators",
    "PMTParameters",
    "SeededModule",
    "StemDistortion",
    "ar1_series",
    "batch_size_of",
    "dead_pixels",
    "detector_noise",
    "electrons_per_intensity",
    "fast_scan_blur",
    "fast_scan_kernel",
    "make_generator",
    "per_sample_generators",
    "pmt_noise",
    "poisson",
    "rand",
    "randn",
    "sample_seed",
    "saturate",
    "scan_jitter",
    "shot_noise",
    "uniform_range",
]

Generators = torch.Generator | Sequence[torch.Generator]
"""One generator for the whole batch, or one generator per sample."""

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------
# Random-number plumbing shared by training.distortions and training.augment
# ----------------------------------------------------------------------------------------------------------


def make_generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (default CPU) seeded with ``seed``."""
    gen = torch.Generator(device=torch.device(device) if device is not None else torch.device("cpu"))
    gen.manual_seed(int(seed) & ((1 << 63) - 1))
    return gen


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(base_seed: int, index: int) -> int:
    """Counter-based seed for sample ``index``: a splitmix64 hash of ``(base_seed, index)`` (63 bits).

    Different indices (or base seeds) give statistically independent streams; the same pair always gives
    the same seed, on every machine.
    """
    return _splitmix64(_splitmix64(int(base_seed) & _MASK64) ^ (int(index) & _MASK64)) & ((1 << 63) - 1)


def per_sample_generators(
    indices: Sequence[int] | Tensor, base_seed: int, device: torch.device | str | None = None
) -> list[torch.Generator]:
    """One generator per sample, seeded by :func:`sample_seed` of its dataset index.

    Used for validation and test noise: sample ``i`` receives the same noise whatever batch it is in and
    wherever it sits in that batch.
    """
    if isinstance(indices, Tensor):
        indices = indices.detach().reshape(-1).cpu().tolist()
    return [make_generator(sample_seed(base_seed, int(i)), device) for i in indices]


def batch_size_of(generator: Generators) -> int | None:
    """``len(generator)`` for per-sample generators, ``None`` for a single batch generator."""
    return None if isinstance(generator, torch.Generator) else len(generator)


def _check_per_sample(generator: Sequence[torch.Generator], batch: int) -> None:
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} per-sample generators for a batch of {batch} samples")


def rand(
    generator: Generators,
    batch: int,
    shape: Sequence[int] = (),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform ``U[0, 1)`` numbers of shape ``(batch, *shape)``."""
    if isinstance(generator, torch.Generator):
        return torch.rand((batch, *shape), generator=generator, device=device, dtype=dtype)
    _check_per_sample(generator, batch)
    return torch.stack([torch.rand(tuple(shape), generator=g, device=device, dtype=dtype) for g in generator])


def randn(
    generator: Generators,
    batch: int,
    shape: Sequence[int] = (),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal numbers of shape ``(batch, *shape)``."""
    if isinstance(generator, torch.Generator):
        return torch.randn((batch, *shape), generator=generator, device=device, dtype=dtype)
    _check_per_sample(generator, batch)
    return torch.stack(
        [torch.randn(tuple(shape), generator=g, device=device, dtype=dtype) for g in generator]
    )


def poisson(rate: Tensor, generator: Generators) -> Tensor:
    """Poisson counts with mean ``rate`` (any shape ``(B, ...)``, float), same dtype as ``rate``.

    ``torch.poisson`` samples large rates correctly (tested up to 3e9 per pixel in
    ``tests/test_augment.py``); negative rates are clamped to zero.
    """
    rate = rate.clamp_min(0)
    if isinstance(generator, torch.Generator):
        return torch.poisson(rate, generator=generator)
    _check_per_sample(generator, rate.shape[0])
    return torch.stack([torch.poisson(r, generator=g) for r, g in zip(rate, generator, strict=True)])


def uniform_range(
    generator: Generators,
    batch: int,
    low: float,
    high: float,
    *,
    log: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(batch,)`` numbers uniform in ``[low, high]``, or log-uniform if ``log`` (needs ``low > 0``).

    Drawn in float64 and cast to ``dtype``; ``low == high`` returns the constant (one draw is still
    consumed so that the random stream does not depend on the configuration's ranges).
    """
    if high < low:
        raise ValueError(f"empty range [{low}, {high}]")
    u = rand(generator, batch, device=device, dtype=torch.float64)
    if log:
        if low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0, got [{low}, {high}]")
        lo, hi = math.log(low), math.log(high)
        return torch.exp(lo + (hi - lo) * u).to(dtype)
    return (low + (high - low) * u).to(dtype)


def _per_sample(value: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A ``(batch,)`` tensor on ``like``'s device from a scalar or ``(batch,)`` value (float64)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=like.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t


def _bshape(t: Tensor, ndim: int) -> Tensor:
    """Reshape a ``(B,)`` tensor to broadcast against a ``ndim``-dimensional ``(B, ...)`` tensor."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------------------------
# Shot noise and the scintillator/PMT detector (thesis eq. 2.1, 2.5-2.13)
# ----------------------------------------------------------------------------------------------------------


def electrons_per_intensity(
    dose_e_per_A2: float | Tensor, pixel_size_A: float | Sequence[float] | Tensor, batch: int, like: Tensor
) -> Tensor:
    """``alpha = d * dx * dy`` (electrons per unit of image intensity) as a ``(B,)`` float64 tensor.

    ``pixel_size_A`` is a scalar (square pixels), a ``(dx, dy)`` pair for all samples, a ``(B,)`` tensor
    (square pixels per sample) or a ``(B, 2)`` tensor.
    """
    dose = _per_sample(dose_e_per_A2, batch, like)
    px = torch.as_tensor(pixel_size_A, dtype=torch.float64, device=like.device)
    if px.ndim == 0:
        area = px * px
    elif px.shape == (2,) and batch != 2:
        area = px[0] * px[1]
    elif px.shape == (batch,):
        area = px * px
    elif px.shape == (batch, 2):
        area = px[:, 0] * px[:, 1]
    else:
        raise ValueError(f"pixel_size_A of shape {tuple(px.shape)} does not fit a batch of {batch}")
    return dose * area


def shot_noise(
    image: Tensor,
    dose_e_per_A2: float | Tensor,
    pixel_size_A: float | Sequence[float] | Tensor,
    generator: Generators,
    *,
    rescale: bool = True,
) -> Tensor:
    """Poisson shot noise, thesis eq. 2.1 with ``lambda = I * d * dx * dy``.

    Parameters
    ----------
    image : (B, H, W) clean, non-negative intensities.
    dose_e_per_A2 : dose ``d`` in e/A^2, scalar or ``(B,)``.
    pixel_size_A : pixel size in A (see :func:`electrons_per_intensity`).
    rescale : divide the counts by ``alpha = d dx dy`` (default), so the result has mean ``I`` and
        variance ``I / alpha``; otherwise return the electron counts (mean = variance = ``alpha I``).
    """
    alpha = electrons_per_intensity(dose_e_per_A2, pixel_size_A, image.shape[0], image)
    alpha_b = _bshape(alpha, image.ndim)
    counts = poisson((image.double() * alpha_b).to(image.dtype), generator)
    return (counts.double() / alpha_b).to(image.dtype) if rescale else counts


@dataclass(frozen=True)
class PMTParameters:
    """Scintillator + photomultiplier detector (thesis section 2.2.1, eq. 2.5-2.11).

    Defaults are the thesis' estimates: about 1 collected photon per kV of acceleration voltage
    (``m_c``; YAP scintillator, ~20 photons/kV and ~5 % light transport), photocathode quantum efficiency
    ``eta`` ~ 0.25, ``n = 10`` dynodes of secondary-emission yield ``delta = 4`` (gain ``4^10``).

    Attributes
    ----------
    energy_kV : acceleration voltage in kV.
    photons_per_kV : collected photons per incident electron and kV, so ``m_c = photons_per_kV * energy_kV``.
    quantum_efficiency : photocathode efficiency ``eta`` (eq. 2.5-2.6).
    dynode_gain : secondary-emission yield ``delta`` of one dynode.
    n_dynodes : number of dynodes ``n`` (gain ``delta^n``, eq. 2.8).
    photon_count_std : standard deviation ``sigma_c`` (written ``delta_c`` in eq. 2.11) of the number of
        collected photons per electron; ``None`` = Poisson photon statistics, ``sqrt(m_c)``.
    dark_noise_e : additive Gaussian baseline noise (anode dark current, amplifier) in units of the mean
        single-electron response; 0 by default (not part of eq. 2.11).
    """

    energy_kV: float = 300.0
    photons_per_kV: float = 1.0
    quantum_efficiency: float = 0.25
    dynode_gain: float = 4.0
    n_dynodes: int = 10
    photon_count_std: float | None = None
    dark_noise_e: float = 0.0

    def __post_init__(self) -> None:
        if self.energy_kV <= 0 or self.photons_per_kV <= 0:
            raise ValueError("energy_kV and photons_per_kV must be positive")
        if not 0 < self.quantum_efficiency <= 1:
            raise ValueError(f"quantum_efficiency must be in (0, 1], got {self.quantum_efficiency}")
        if self.dynode_gain <= 1 or self.n_dynodes < 1:
            raise ValueError("dynode_gain must exceed 1 and n_dynodes be at least 1")
        if self.dark_noise_e < 0 or (self.photon_count_std is not None and self.photon_count_std < 0):
            raise ValueError("noise standard deviations must be non-negative")

    @property
    def collected_photons(self) -> float:
        """``m_c``: photons reaching the photocathode per incident electron."""
        return self.photons_per_kV * self.energy_kV

    @property
    def photoelectrons(self) -> float:
        """``n_p = m_c * eta`` (eq. 2.5): photoelectrons per incident electron."""
        return self.collected_photons * self.quantum_efficiency

    @property
    def multiplier_gain(self) -> float:
        """``G = delta^n`` (eq. 2.8 with equal dynode gains)."""
        return float(self.dynode_gain**self.n_dynodes)

    @property
    def anode_electrons_per_electron(self) -> float:
        """Mean anode charge per incident electron, ``m_c eta delta^n`` (eq. 2.9)."""
        return self.photoelectrons * self.multiplier_gain

    @property
    def single_electron_std(self) -> float:
        """Standard deviation of one electron's response relative to its mean (eq. 2.11 / eq. 2.9).

        ``sigma / (m_c eta G) = sqrt((1 - eta + 1/(delta - 1)) / (m_c eta) + sigma_c^2 / m_c^2)``: the
        photoemission term (eq. 2.6-2.7), the Poisson multiplier cascade ``1/(delta - 1)`` and the photon
        count fluctuation of the scintillator. With the defaults (300 kV): 0.133.
        """
        m_c, eta, delta = self.collected_photons, self.quantum_efficiency, self.dynode_gain
        sigma_c = math.sqrt(m_c) if self.photon_count_std is None else self.photon_count_std
        return math.sqrt((1.0 - eta + 1.0 / (delta - 1.0)) / (m_c * eta) + sigma_c**2 / m_c**2)

    def response_std(self, counts: Tensor) -> Tensor:
        """``sigma(x)`` of eq. 2.13 for ``x = counts`` detected electrons, in single-electron units.

        The response to ``k`` electrons is the sum of ``k`` independent single-electron responses
        (the cascade rules eq. 2.3-2.4), so its variance is ``k * single_electron_std^2``; the optional
        dark noise adds in quadrature. (The thesis' wording "m_c must be scaled accordingly" substitutes
        ``m_c -> k m_c`` in eq. 2.11 but keeps ``delta_c`` fixed, which adds a constant ``delta_c / m_c``
        even at ``k = 0``; that reading is ``dark_noise_e = photon_count_std / m_c`` here.)
        """
        var = counts.clamp_min(0) * self.single_electron_std**2 + self.dark_noise_e**2
        return var.sqrt()


def pmt_noise(counts: Tensor, params: PMTParameters, generator: Generators) -> Tensor:
    """Gaussian scintillator/PMT response to detected electron counts (the noise term of eq. 2.13).

    ``counts`` (any shape ``(B, ...)``) are integer-valued electron numbers (e.g. from :func:`poisson`);
    returns ``counts + N(0, sigma(counts))`` in units of the mean single-electron response, so the
    histogram of a low-count image shows one peak per electron number (thesis fig. 2.3). Shared by the
    STEM image distortions and the CBED augmentation.
    """
    noise = randn(generator, counts.shape[0], counts.shape[1:], device=counts.device, dtype=counts.dtype)
    return counts + noise * params.response_std(counts)


def detector_noise(
    image: Tensor,
    dose_e_per_A2: float | Tensor,
    pixel_size_A: float | Sequence[float] | Tensor,
    params: PMTParameters,
    generator: Generators,
) -> Tensor:
    """Scintillator/PMT detector noise, thesis eq. 2.12-2.13 with ``alpha = d dx dy``.

    ``x <- P(alpha x)`` then ``x <- (x + N(0, sigma(x))) / alpha``. Returns the image in its original
    units (mean ``I``).
    """
    alpha = electrons_per_intensity(dose_e_per_A2, pixel_size_A, image.shape[0], image)
    alpha_b = _bshape(alpha, image.ndim)
    counts = poisson((image.double() * alpha_b).to(image.dtype), generator)
    return (pmt_noise(counts, params, generator).double() / alpha_b).to(image.dtype)


# ----------------------------------------------------------------------------------------------------------
# Scan-line jitter (thesis eq. 2.14-2.15)
# ----------------------------------------------------------------------------------------------------------


def ar1_series(
    n_lines: int,
    phi: float | Tensor,
    sigma_px: float | Tensor,
    generator: Generators,
    *,
    batch: int,
    stationary_start: bool,
    device: torch.device | str | None = None,
) -> Tensor:
    """AR(1) line shifts ``Delta_j = phi Delta_{j-1} + a_j``, ``a_j ~ N(0, sigma)`` (eq. 2.14-2.15).

    Parameters
    ----------
    n_lines : number of scan lines ``J``.
    phi, sigma_px : coupling ``phi`` (|phi| < 1) and innovation standard deviation in pixels, scalars or
        ``(batch,)`` tensors.
    stationary_start : ``False`` starts with ``Delta_1 = a_1`` (x-jitter, eq. 2.14); ``True`` starts with
        ``Delta_1 = a_1 / sqrt(1 - phi^2)`` (y-jitter, eq. 2.15), which makes the series stationary with
        variance ``sigma^2 / (1 - phi^2)``.

    Returns ``(batch, n_lines)`` float32 shifts in pixels. The recursion is evaluated as the causal linear
    filter ``Delta_j = sum_k phi^k a'_{j-k}`` by zero-padded FFT convolution in float64 (exact, no loop
    over lines).
    """
    like = torch.empty(0, device=device)
    phi_t = _per_sample(phi, batch, like)
    sigma_t = _per_sample(sigma_px, batch, like)
    if bool((phi_t.abs() >= 1).any()):
        raise ValueError("AR(1) coupling phi must satisfy |phi| < 1")
    a = randn(generator, batch, (n_lines,), device=like.device, dtype=torch.float64) * sigma_t[:, None]
    if stationary_start:
        a = torch.cat([a[:, :1] / torch.sqrt(1.0 - phi_t[:, None] ** 2), a[:, 1:]], dim=1)
    lags = torch.arange(n_lines, device=like.device, dtype=torch.float64)
    impulse = torch.where(
        lags == 0, torch.ones_like(lags), phi_t[:, None] ** lags
    )  # phi^0 = 1 also for phi = 0
    n_fft = 2 * n_lines
    series = torch.fft.irfft(torch.fft.rfft(a, n_fft) * torch.fft.rfft(impulse, n_fft), n_fft)
    return series[:, :n_lines].to(torch.float32)


def scan_jitter(image: Tensor, shift_x_px: Tensor, shift_y_px: Tensor) -> Tensor:
    """Re-interpolate an image scanned along displaced lines (thesis section 2.2.2).

    The probe of scan line ``j`` at nominal position ``(y, x) = (j, i)`` actually sat at
    ``(j + shift_y_px[j], i + shift_x_px[j])``: x-jitter shifts the whole line along the scan direction,
    y-jitter moves the line's position across it. The recorded image is the clean image sampled there
    by bilinear interpolation (edge values are extended beyond the field of view).

    Parameters
    ----------
    image : (B, H, W).
    shift_x_px, shift_y_px : (B, H) per-line shifts in pixels (e.g. from :func:`ar1_series`).
    """
    b, h, w = image.shape
    if shift_x_px.shape != (b, h) or shift_y_px.shape != (b, h):
        raise ValueError(f"line shifts must have shape {(b, h)}")
    dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    rows = torch.arange(h, device=image.device, dtype=dtype)
    cols = torch.arange(w, device=image.device, dtype=dtype)
    y = (rows[None, :] + shift_y_px.to(dtype))[:, :, None].expand(b, h, w)
    x = cols[None, None, :] + shift_x_px.to(dtype)[:, :, None]
    grid = torch.stack([2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0], dim=-1)
    out = F.grid_sample(
        image[:, None].to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return out[:, 0].to(image.dtype)


# ----------------------------------------------------------------------------------------------------------
# Fast-scan point spread (thesis eq. 2.16-2.18)
# ----------------------------------------------------------------------------------------------------------

FastScanModel = Literal["lorentzian", "exponential"]


def fast_scan_kernel(
    length: int,
    hwhm_px: float | Tensor,
    model: FastScanModel = "lorentzian",
    *,
    batch: int = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """One-sided detector response ``g(t)``, ``t = 0 .. length-1`` pixels after the signal, unit sum.

    The thesis writes the point spread as ``h(x)`` supported on ``x <= 0`` (eq. 2.17-2.18); with the lag
    ``t = -x >= 0`` behind the beam:

    * ``"exponential"`` (eq. 2.17): ``g(t) = exp(-beta t)`` with ``beta = ln 2 / hwhm_px``;
    * ``"lorentzian"`` (half-Lorentzian, eq. 2.18): ``g(t) = alpha / (4 pi^2 t^2 + alpha^2)`` with
      ``alpha = 2 pi hwhm_px``.

    ``hwhm_px`` is the half width at half maximum of the tail in pixels (detector response time divided by
    the pixel dwell time), scalar or ``(batch,)``; ``hwhm_px = 0`` gives the identity (a delta).
    Returns ``(batch, length)`` float64.
    """
    like = torch.empty(0, device=device)
    hwhm = _per_sample(hwhm_px, batch, like)
    if bool((hwhm < 0).any()):
        raise ValueError("fast-scan hwhm_px must be non-negative")
    t = torch.arange(length, device=like.device, dtype=torch.float64)[None, :]
    width = hwhm[:, None].clamp_min(1e-12)
    if model == "exponential":
        g = torch.exp(-(math.log(2.0) / width) * t)
    elif model == "lorentzian":
        alpha = 2.0 * math.pi * width
        g = alpha / (4.0 * math.pi**2 * t**2 + alpha**2)
    else:
        raise ValueError(f"unknown fast-scan model {model!r}; use 'lorentzian' or 'exponential'")
    g = torch.where(hwhm[:, None] > 0, g, (t == 0).to(g.dtype))
    return g / g.sum(dim=1, keepdim=True)


def fast_scan_blur(image: Tensor, kernel: Tensor) -> Tensor:
    """Convolve every scan line with a causal response along the fast-scan axis (eq. 2.16).

    ``out[.., i] = sum_t kernel[t] * image[.., i - t]``: the tail trails each feature in the scan
    direction (increasing column index) and the slow-scan direction is untouched. Before the first pixel
    of a line the line's first value is assumed (edge extension), so a flat image stays flat.

    Parameters
    ----------
    image : (B, H, W).
    kernel : (B, L) or (L,) response with unit sum (from :func:`fast_scan_kernel`).
    """
    b, h, w = image.shape
    if kernel.ndim == 1:
        kernel = kernel[None].expand(b, -1)
    length = kernel.shape[1]
    x = image.to(torch.float64)
    padded = torch.cat([x[:, :, :1].expand(b, h, length - 1), x], dim=2)  # (B, H, W + L - 1)
    n_fft = padded.shape[2] + length - 1
    spec = (
        torch.fft.rfft(padded, n_fft, dim=2)
        * torch.fft.rfft(kernel.to(x.device, torch.float64), n_fft)[:, None, :]
    )
    out = torch.fft.irfft(spec, n_fft, dim=2)[:, :, length - 1 : length - 1 + w]
    return out.to(image.dtype)


# ----------------------------------------------------------------------------------------------------------
# Dead pixels and saturation
# ----------------------------------------------------------------------------------------------------------


def dead_pixels(image: Tensor, fraction: float | Tensor, generator: Generators) -> Tensor:
    """Set a random ``fraction`` (scalar or ``(B,)``) of the pixels of each image to zero."""
    b = image.shape[0]
    frac = _per_sample(fraction, b, image).to(torch.float32)
    u = rand(generator, b, image.shape[1:], device=image.device)
    return image.masked_fill(u < _bshape(frac, image.ndim), 0)


def saturate(image: Tensor, level: float | Tensor) -> Tensor:
    """Clip each image at its saturation ``level`` (scalar or ``(B,)``, image units); ``inf`` = none."""
    lvl = _bshape(_per_sample(level, image.shape[0], image), image.ndim)
    return torch.minimum(image, lvl.to(image.dtype))


# ----------------------------------------------------------------------------------------------------------
# The composable pipeline
# ----------------------------------------------------------------------------------------------------------


def _bernoulli(generator: Generators, batch: int, prob: float, device: torch.device | str | None) -> Tensor:
    return rand(generator, batch, device=device, dtype=torch.float64) < prob


class SeededModule(nn.Module):
    """A module that draws training noise from one seeded generator per device (created on first use).

    :meth:`generator_states` and :meth:`restore_generators` let a checkpoint carry the generators, so a
    resumed run continues with exactly the noise it would have drawn.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator_for(self, device: torch.device | str) -> torch.Generator:
        key = str(torch.device(device))
        if key not in self._generators:
            self._generators[key] = make_generator(self.seed, device)
        return self._generators[key]

    def generator_states(self) -> dict[str, Tensor]:
        return {device: generator.get_state() for device, generator in self._generators.items()}

    def restore_generators(self, states: Mapping[str, Tensor]) -> None:
        for device, state in states.items():
            self.generator_for(device).set_state(state)


class StemDistortion(SeededModule):
    """Distort clean STEM images with parameters drawn per sample (thesis ch.2, table 2.2).

    Order (the physics of acquisition): scan jitter (where the probe was) -> shot noise or PMT detector
    noise (what the detector counted) -> fast-scan response (the detector's lag smears the signal,
    noise included, thesis fig. 2.6) -> dead pixels -> saturation. The output is in the clean image's
    units (counts / ``alpha``), float, same shape and device as the input.

    Parameters (ranges are ``(low, high)``, drawn uniformly per sample; the dose log-uniformly)
    ----------
    dose_e_per_A2_range : dose range in e/A^2 (thesis doses: 5e2 .. 5e5); ``None`` = no noise.
    detector : ``"pmt"`` (eq. 2.12-2.13 with ``pmt``), ``"poisson"`` (eq. 2.1) or ``None``.
    pmt : detector parameters for ``detector="pmt"``.
    jitter_prob : probability that a sample gets scan jitter.
    phi_x_range, sigma_x_px_range, phi_y_range, sigma_y_px_range : AR(1) parameters (table 2.2:
        0.5, 0.5 px, 0.5, 0.25 px).
    fast_scan_prob, fast_scan_model, fast_scan_hwhm_px_range : fast-scan response (see
        :func:`fast_scan_kernel`); the HWHM range in pixels is a configuration choice (the thesis gives
        the dwell time, 0.5 us, not the detector time constant).
    dead_pixel_prob, dead_pixel_fraction_range : dead pixels.
    saturation_prob, saturation_fraction_range : clip at this fraction of the sample's maximum.
    seed : seed of the module's own training generator (one per device, created on first use).
    """

    def __init__(
        self,
        dose_e_per_A2_range: tuple[float, float] | None = (5e2, 5e5),
        detector: Literal["pmt", "poisson"] | None = "pmt",
        pmt: PMTParameters | None = None,
        jitter_prob: float = 1.0,
        phi_x_range: tuple[float, float] = (0.5, 0.5),
        sigma_x_px_range: tuple[float, float] = (0.5, 0.5),
        phi_y_range: tuple[float, float] = (0.5, 0.5),
        sigma_y_px_range: tuple[float, float] = (0.25, 0.25),
        fast_scan_prob: float = 1.0,
        fast_scan_model: FastScanModel = "lorentzian",
        fast_scan_hwhm_px_range: tuple[float, float] = (0.2, 1.5),
        dead_pixel_prob: float = 0.0,
        dead_pixel_fraction_range: tuple[float, float] = (1e-4, 1e-3),
        saturation_prob: float = 0.0,
        saturation_fraction_range: tuple[float, float] = (0.7, 1.0),
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if detector not in ("pmt", "poisson", None):
            raise ValueError(f"detector must be 'pmt', 'poisson' or None, got {detector!r}")
        if fast_scan_model not in ("lorentzian", "exponential"):
            raise ValueError(f"unknown fast_scan_model {fast_scan_model!r}")
        for name, p in (
            ("jitter_prob", jitter_prob),
            ("fast_scan_prob", fast_scan_prob),
            ("dead_pixel_prob", dead_pixel_prob),
            ("saturation_prob", saturation_prob),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        self.dose_e_per_A2_range = None if dose_e_per_A2_range is None else tuple(dose_e_per_A2_range)
        self.detector = detector
        self.pmt = pmt if pmt is not None else PMTParameters()
        self.jitter_prob = jitter_prob
        self.phi_x_range, self.sigma_x_px_range = tuple(phi_x_range), tuple(sigma_x_px_range)
        self.phi_y_range, self.sigma_y_px_range = tuple(phi_y_range), tuple(sigma_y_px_range)
        self.fast_scan_prob = fast_scan_prob
        self.fast_scan_model: FastScanModel = fast_scan_model
        self.fast_scan_hwhm_px_range = tuple(fast_scan_hwhm_px_range)
        self.dead_pixel_prob = dead_pixel_prob
        self.dead_pixel_fraction_range = tuple(dead_pixel_fraction_range)
        self.saturation_prob = saturation_prob
        self.saturation_fraction_range = tuple(saturation_fraction_range)

    def draw_parameters(
        self, batch: int, generator: Generators, device: torch.device | str | None
    ) -> dict[str, Tensor]:
        """Draw every per-sample parameter (``(B,)`` tensors) in a fixed order."""
        u = uniform_range
        p: dict[str, Tensor] = {}
        if self.dose_e_per_A2_range is not None:
            lo, hi = self.dose_e_per_A2_range
            p["dose_e_per_A2"] = u(generator, batch, lo, hi, log=True, device=device, dtype=torch.float64)
        jit = _bernoulli(generator, batch, self.jitter_prob, device)
        p["phi_x"] = u(generator, batch, *self.phi_x_range, device=device, dtype=torch.float64)
        p["sigma_x_px"] = (
            u(generator, batch, *self.sigma_x_px_range, device=device, dtype=torch.float64) * jit
        )
        p["phi_y"] = u(generator, batch, *self.phi_y_range, device=device, dtype=torch.float64)
        p["sigma_y_px"] = (
            u(generator, batch, *self.sigma_y_px_range, device=device, dtype=torch.float64) * jit
        )
        fs = _bernoulli(generator, batch, self.fast_scan_prob, device)
        hw = u(generator, batch, *self.fast_scan_hwhm_px_range, device=device, dtype=torch.float64)
        p["fast_scan_hwhm_px"] = hw * fs
        dead = _bernoulli(generator, batch, self.dead_pixel_prob, device)
        df = u(generator, batch, *self.dead_pixel_fraction_range, device=device, dtype=torch.float64)
        p["dead_pixel_fraction"] = df * dead
        sat = _bernoulli(generator, batch, self.saturation_prob, device)
        sf = u(generator, batch, *self.saturation_fraction_range, device=device, dtype=torch.float64)
        p["saturation_fraction"] = torch.where(sat, sf, torch.full_like(sf, math.inf))
        return p

    def forward(
        self,
        image: Tensor,
        pixel_size_A: float | Sequence[float] | Tensor,
        *,
        generator: Generators | None = None,
        indices: Sequence[int] | Tensor | None = None,
        return_parameters: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Distort ``image`` (B, H, W) of pixel size ``pixel_size_A`` (A).

        Randomness: ``indices`` (dataset indices) -> per-sample generators seeded by ``(seed, index)``
        (deterministic validation/test noise); else ``generator``; else the module's own generator.
        """
        if image.ndim != 3:
            raise ValueError(f"expected a (B, H, W) image batch, got shape {tuple(image.shape)}")
        b, h, w = image.shape
        if indices is not None:
            generator = per_sample_generators(indices, self.seed, image.device)
        elif generator is None:
            generator = self.generator_for(image.device)
        dev = image.device
        x = image if image.is_floating_point() else image.float()
        p = self.draw_parameters(b, generator, dev)

        dx = ar1_series(
            h, p["phi_x"], p["sigma_x_px"], generator, batch=b, stationary_start=False, device=dev
        )
        dy = ar1_series(h, p["phi_y"], p["sigma_y_px"], generator, batch=b, stationary_start=True, device=dev)
        if bool((p["sigma_x_px"] > 0).any() or (p["sigma_y_px"] > 0).any()):
            x = scan_jitter(x, dx, dy)

        if self.dose_e_per_A2_range is not None and self.detector == "pmt":
            x = detector_noise(x, p["dose_e_per_A2"], pixel_size_A, self.pmt, generator)
        elif self.dose_e_per_A2_range is not None and self.detector == "poisson":
            x = shot_noise(x, p["dose_e_per_A2"], pixel_size_A, generator)

        kernel = fast_scan_kernel(w, p["fast_scan_hwhm_px"], self.fast_scan_model, batch=b, device=dev)
        if bool((p["fast_scan_hwhm_px"] > 0).any()):
            x = fast_scan_blur(x, kernel)
        x = dead_pixels(x, p["dead_pixel_fraction"], generator)
        frac = p["saturation_fraction"]
        peak = x.flatten(1).amax(dim=1).double()
        x = saturate(x, torch.where(torch.isfinite(frac), frac * peak, frac))
        if return_parameters:
            p["shift_x_px"], p["shift_y_px"] = dx, dy
            return x, p
        return x
