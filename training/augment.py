"""AIRPI noise augmentation and pre-processing as batch-wise torch operations (paper 002, REFERENCE.md 2).

All functions take and return tensors on the batch's device (no NumPy round trips) and draw random numbers
from an explicit generator: one ``torch.Generator`` for the whole batch (training) or one generator per
sample (validation/test, :func:`per_sample_generators`, seeded by the dataset index so that a sample's
noise does not depend on the batch it is in). :class:`AirpiAugmentation` composes them and is meant to be
called from a DataModule's ``on_after_batch_transfer``, i.e. on the GPU when training on one.

Conventions (kernel shards, ARCHITECTURE.md contract 1)
------------------------------------------------------
* ``cbed`` (B, 9, K, K) float: noise-free CBED intensities (fraction of incident electrons per pixel) of
  the 3x3 kernel, row-major (index 4 = centre, 1/3/5/7 = neighbours along x or y, 0/2/6/8 = diagonal
  neighbours), diffraction plane centred: zero frequency at pixel ``(K // 2, K // 2)`` (``fftshift``
  order), axes ``[kx, ky]``.
* ``probe`` and ``wave`` (B, K, K) complex: real-space probe and exit wave, pixel ``1 / (2 gmax)``; the
  probe is normalised to ``sum |psi|^2 = 1``.
* ``step_A`` (B,): scan step in Angstrom. Doses are in electrons per CBED.

Pipeline of :class:`AirpiAugmentation` (each step optional, probabilities per sample):
``symmetry operation of the square (training only, off by default) -> no-specimen replacement (3 %)
-> centre shift + rotation -> Poisson dose -> scintillator/PMT response -> Gaussian readout noise
-> dead/hot pixels -> x^0.1 -> zeta step weights -> standardisation -> probe amplitude and phase channels``,
giving the ``(B, 11, K, K)`` float32 network input. The deterministic steps (the probe intensity, the
rotation of patterns, the pre-processing from ``x^0.1`` on) are the network input contract shared with
inference and live in :mod:`models.inputs`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from models.inputs import preprocess, probe_intensity, rotate_patterns
from physics import fourier_shift
from physics.dose import expected_counts
from training.distortions import (
    Generators,
    PMTParameters,
    SeededModule,
    make_generator,
    per_sample_generators,
    pmt_noise,
    poisson,
    rand,
    randn,
    sample_seed,
    uniform_range,
)

__all__ = [
    "AirpiAugmentation",
    "PMTParameters",
    "apply_dose",
    "dead_hot_pixels",
    "dihedral_transform",
    "draw_no_specimen",
    "flip_about_centre",
    "gaussian_readout_noise",
    "make_generator",
    "per_sample_generators",
    "replace_no_specimen",
    "sample_seed",
    "shift_patterns",
]


def _bview(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------------------------
# "No specimen" replacement
# ----------------------------------------------------------------------------------------------------------


def draw_no_specimen(
    generator: Generators, batch: int, prob: float = 0.03, device: torch.device | str | None = None
) -> Tensor:
    """``(batch,)`` bool mask, each ``True`` with probability ``prob`` (paper 002: 3 %)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be a probability, got {prob}")
    return rand(generator, batch, device=device, dtype=torch.float64) < prob


def replace_no_specimen(cbed: Tensor, wave: Tensor, probe: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Replace, where ``mask`` (B,), all 9 CBEDs by the probe intensity and the label by the probe.

    The replacement is what vacuum gives: the probe intensity as a fraction of the incident electrons
    (:func:`probe_intensity`, summing to 1 for a normalised probe: the kernel's detector, ``+-gmax`` with
    ``gmax > alpha``, holds the whole bright field), so the dose that follows draws ``D`` electrons.
    """
    if not bool(mask.any()):
        return cbed, wave
    empty = probe_intensity(probe).to(cbed.dtype)[:, None].expand_as(cbed)  # (B, 9, K, K)
    m = mask.to(torch.bool)
    cbed = torch.where(_bview(m, cbed.ndim), empty, cbed)
    wave = torch.where(_bview(m, wave.ndim), probe.to(wave.dtype), wave)
    return cbed, wave


# ----------------------------------------------------------------------------------------------------------
# Symmetry operations of the square grid (8-fold data augmentation)
# ----------------------------------------------------------------------------------------------------------


def flip_about_centre(x: Tensor, dim: int) -> Tensor:
    """Mirror ``x`` along ``dim`` about pixel ``K // 2``: index ``a -> (K - a) mod K``.

    That is ``x -> -x`` for the centred grids of CBEDs (zero frequency at ``K // 2``), waves and probes
    (the probe position at ``K // 2``); a plain ``torch.flip`` would move the centre by one pixel.
    """
    return torch.roll(torch.flip(x, (dim,)), 1, dim)


def _select_per_sample(on: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where the (B,) mask ``on`` is set, ``old`` elsewhere."""
    return torch.where(_bview(on.to(torch.bool), old.ndim), new, old)


def dihedral_transform(
    cbed: Tensor, wave: Tensor, probe: Tensor, transpose: Tensor, flip_x: Tensor, flip_y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply one of the 8 symmetry operations of the square per sample to a kernel sample.

    The operation is ``transpose`` (swap x and y) first, then ``flip_x`` (x -> -x), then ``flip_y``
    (y -> -y), each a (B,) bool. Mirroring or transposing the specimen *and* the probe maps the whole
    experiment onto another valid one (no magnetic field; the probe, aberrations included, is transformed
    with it and reaches the network as input), so the transformed sample is exactly what the multislice
    gives for the transformed specimen: the real-space ``wave`` and ``probe`` (B, K, K) and every CBED
    (B, 9, K, K) are transformed alike (a real-space mirror mirrors the diffraction plane), and the 3x3
    kernel positions are permuted (position ``3 i + j`` sits at ``((i - 1), (j - 1))`` steps along
    ``(x, y)``). Zeta weights depend only on the step and are unchanged.
    """
    b, k = cbed.shape[0], cbed.shape[-1]
    grid = cbed.reshape(b, 3, 3, k, k)  # (B, i, j, x, y)
    select = _select_per_sample
    grid = select(transpose, grid.transpose(1, 2).transpose(3, 4), grid)
    wave = select(transpose, wave.transpose(1, 2), wave)
    probe = select(transpose, probe.transpose(1, 2), probe)
    for on, kernel_dim, dim in ((flip_x, 1, 1), (flip_y, 2, 2)):
        grid = select(on, flip_about_centre(torch.flip(grid, (kernel_dim,)), kernel_dim + 2), grid)
        wave = select(on, flip_about_centre(wave, dim), wave)
        probe = select(on, flip_about_centre(probe, dim), probe)
    return grid.reshape(b, 9, k, k), wave, probe


#: the 8 symmetry operations of the square as ``(transpose, flip_x, flip_y)``, identity first
DIHEDRAL_OPERATIONS: tuple[tuple[bool, bool, bool], ...] = tuple(
    (t, fx, fy) for t in (False, True) for fx in (False, True) for fy in (False, True)
)


def undo_dihedral(wave: Tensor, transpose: Tensor, flip_x: Tensor, flip_y: Tensor) -> Tensor:
    """The inverse of :func:`dihedral_transform` for a real-space ``wave`` (B, K, K): the flips (each its
    own inverse, and they commute) first, then the transpose. Maps a prediction made on a transformed
    kernel back onto the untransformed specimen (dihedral test-time averaging)."""
    for on, dim in ((flip_y, 2), (flip_x, 1)):
        wave = _select_per_sample(on, flip_about_centre(wave, dim), wave)
    return _select_per_sample(transpose, wave.transpose(1, 2), wave)


# ----------------------------------------------------------------------------------------------------------
# Experimental misalignment: centre shifts and rotations of the diffraction patterns
# ----------------------------------------------------------------------------------------------------------


def shift_patterns(cbed: Tensor, shift_px: Tensor, *, clamp_negative: bool = True) -> Tensor:
    """Shift all patterns of each sample by ``shift_px`` (B, 2) = ``(sx, sy)`` pixels (sub-pixel).

    Uses :func:`physics.fourier_shift` (band-limited, periodic): the centre of mass moves by
    ``+shift_px`` along ``[kx, ky]``. ``cbed`` is (B, C, K, K) or (B, K, K). The Fourier interpolation of
    sharp disc edges rings slightly; negative values are clamped to zero by default.
    """
    shift = shift_px.to(cbed.device)
    if cbed.ndim == 4:
        shift = shift[:, None, :]
    out = fourier_shift(cbed, shift)
    return out.clamp_min(0) if clamp_negative else out


# ----------------------------------------------------------------------------------------------------------
# Dose and detector noise
# ----------------------------------------------------------------------------------------------------------


def apply_dose(cbed: Tensor, dose_e: Tensor | float, generator: Generators) -> Tensor:
    """Electron counts ``Poisson(D * I)`` per pattern (:func:`physics.dose.expected_counts`).

    ``cbed`` (B, C, K, K) (or (B, K, K)) noise-free intensities as fractions of the incident electrons
    per pixel (``sum <= 1``); ``dose_e`` ``D`` incident electrons per probe position, scalar or (B,) (the
    same for all patterns of a sample, as in a scan). The mean total count of a pattern is
    ``D * sum(I)``: electrons scattered outside the detector stay lost, and the totals of a kernel's
    patterns keep their physical differences. Returns float counts of ``cbed``'s dtype; exact Poisson for
    any rate (``torch.poisson``).
    """
    dose = torch.as_tensor(dose_e, dtype=torch.float64, device=cbed.device)
    if dose.ndim == 0:
        dose = dose.expand(cbed.shape[0])
    rate = expected_counts(cbed.double(), _bview(dose, cbed.ndim)).to(cbed.dtype)
    return poisson(rate, generator)


def gaussian_readout_noise(counts: Tensor, std_e: Tensor | float, generator: Generators) -> Tensor:
    """Add ``N(0, std_e)`` (electrons; scalar or (B,)) to every pixel: detector readout noise."""
    std = torch.as_tensor(std_e, dtype=counts.dtype, device=counts.device)
    std = std.expand(counts.shape[0]) if std.ndim == 0 else std
    noise = randn(generator, counts.shape[0], counts.shape[1:], device=counts.device, dtype=counts.dtype)
    return counts + noise * _bview(std, counts.ndim)


def dead_hot_pixels(
    counts: Tensor,
    dead_fraction: Tensor | float,
    hot_fraction: Tensor | float,
    hot_level: Tensor | float,
    generator: Generators,
) -> Tensor:
    """Detector defects: dead pixels read 0, hot pixels read ``hot_level`` x the pattern's maximum.

    ``counts`` (B, C, K, K); the defect map (fractions scalar or (B,)) is one per sample and shared by its
    C patterns (the same detector records the whole kernel).
    """
    b, k1, k2 = counts.shape[0], counts.shape[-2], counts.shape[-1]
    dev, dt = counts.device, counts.dtype

    def per_sample(v: Tensor | float) -> Tensor:
        t = torch.as_tensor(v, dtype=torch.float64, device=dev)
        return t.expand(b) if t.ndim == 0 else t

    u_dead = rand(generator, b, (k1, k2), device=dev, dtype=torch.float64)
    u_hot = rand(generator, b, (k1, k2), device=dev, dtype=torch.float64)
    dead = u_dead < per_sample(dead_fraction)[:, None, None]
    hot = (u_hot < per_sample(hot_fraction)[:, None, None]) & ~dead
    if counts.ndim == 4:
        dead, hot = dead[:, None], hot[:, None]
    peak = counts.amax(dim=(-2, -1), keepdim=True)
    hot_value = peak * _bview(per_sample(hot_level).to(dt), counts.ndim)
    out = torch.where(hot, hot_value, counts)
    return out.masked_fill(dead, 0)


# ----------------------------------------------------------------------------------------------------------
# The composable augmentation
# ----------------------------------------------------------------------------------------------------------


class AirpiAugmentation(SeededModule):
    """Noise augmentation + AIRPI pre-processing of kernel batches, on the batch's device.

    Parameters (ranges ``(low, high)`` are drawn uniformly per sample, the dose log-uniformly; every
    ``*_prob`` is the probability per sample). Defaults reproduce the released AIRPI model: Poisson dose
    3 .. 3e9 e/CBED and 3 % no-specimen samples; the other distortions are off until configured.

    dihedral : apply a random one of the 8 symmetry operations of the square to each training sample
        (:func:`dihedral_transform`: CBEDs, kernel order, label and probe alike; exact for multislice
        data), which multiplies the distinct samples of a small dataset by 8. Off by default (the
        published training had enough data); validation/test batches are never transformed.
    dose_e_range : electrons per CBED; ``None`` = noise free (infinite dose).
    no_specimen_prob : probability that the 9 CBEDs become the probe intensity and the label the probe.
    misalignment_prob, max_shift_px, max_rotation_deg : centre shift uniform in a disc of radius
        ``max_shift_px`` and rotation uniform in ``+-max_rotation_deg``, the same for the 9 patterns of a
        sample.
    readout_prob, readout_std_e_range : Gaussian readout noise (electrons).
    pmt_prob, pmt : scintillator/PMT response (:class:`PMTParameters`, thesis eq. 2.11-2.13).
    defect_prob, dead_fraction_range, hot_fraction_range, hot_level_range : dead and hot pixels;
        hot pixels read ``hot_level`` x the pattern's maximum.
    exponent, zeta_scale, standardise_input : pre-processing (paper 002: 0.1, 50, standardised).
    seed : seed of the training generator (one per device, created on first use; give every DDP rank a
        different seed). eval_seed : base seed of the per-index validation/test noise.
    """

    def __init__(
        self,
        dose_e_range: tuple[float, float] | None = (3.0, 3e9),
        no_specimen_prob: float = 0.03,
        dihedral: bool = False,
        misalignment_prob: float = 0.0,
        max_shift_px: float = 1.0,
        max_rotation_deg: float = 2.0,
        readout_prob: float = 0.0,
        readout_std_e_range: tuple[float, float] = (0.0, 0.5),
        pmt_prob: float = 0.0,
        pmt: PMTParameters | None = None,
        defect_prob: float = 0.0,
        dead_fraction_range: tuple[float, float] = (0.0, 2e-3),
        hot_fraction_range: tuple[float, float] = (0.0, 1e-3),
        hot_level_range: tuple[float, float] = (0.5, 5.0),
        exponent: float = 0.1,
        zeta_scale: float = 50.0,
        standardise_input: bool = True,
        seed: int = 0,
        eval_seed: int = 1234,
    ) -> None:
        super().__init__(seed)
        for name, p in (
            ("no_specimen_prob", no_specimen_prob),
            ("misalignment_prob", misalignment_prob),
            ("readout_prob", readout_prob),
            ("pmt_prob", pmt_prob),
            ("defect_prob", defect_prob),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        if dose_e_range is not None and not 0 < dose_e_range[0] <= dose_e_range[1]:
            raise ValueError(f"dose_e_range must be positive and ordered, got {dose_e_range}")
        self.dose_e_range = None if dose_e_range is None else (float(dose_e_range[0]), float(dose_e_range[1]))
        self.no_specimen_prob = no_specimen_prob
        self.dihedral = bool(dihedral)
        self.misalignment_prob = misalignment_prob
        self.max_shift_px = max_shift_px
        self.max_rotation_deg = max_rotation_deg
        self.readout_prob = readout_prob
        self.readout_std_e_range = tuple(readout_std_e_range)
        self.pmt_prob = pmt_prob
        self.pmt = pmt if pmt is not None else PMTParameters()
        self.defect_prob = defect_prob
        self.dead_fraction_range = tuple(dead_fraction_range)
        self.hot_fraction_range = tuple(hot_fraction_range)
        self.hot_level_range = tuple(hot_level_range)
        self.exponent = exponent
        self.zeta_scale = zeta_scale
        self.standardise_input = standardise_input
        self.eval_seed = int(eval_seed)

    def augment(
        self, cbed: Tensor, probe: Tensor, wave: Tensor, step_A: Tensor, generator: Generators
    ) -> dict[str, Tensor]:
        """Apply the pipeline with an explicit generator (one, or one per sample).

        Returns ``inputs`` (B, 11, K, K) float32, ``wave`` (B, K, K) label (the probe for no-specimen
        samples), ``cbed`` (B, 9, K, K) the augmented patterns in electron counts (before
        pre-processing), ``dose_e`` (B,) electrons per CBED (``inf`` when noise free) and
        ``no_specimen`` (B,) bool. Random numbers are drawn in a fixed order, so one seed (or one
        per-sample seed) reproduces the result exactly.
        """
        if cbed.ndim != 4 or cbed.shape[1] != 9:
            raise ValueError(f"expected cbed of shape (B, 9, K, K), got {tuple(cbed.shape)}")
        b, dev = cbed.shape[0], cbed.device
        x = cbed if cbed.is_floating_point() else cbed.float()
        step = torch.as_tensor(step_A, device=dev).reshape(-1).expand(b)

        empty = draw_no_specimen(generator, b, self.no_specimen_prob, device=dev)
        x, wave = replace_no_specimen(x, wave, probe, empty)

        if self.misalignment_prob > 0:
            on = rand(generator, b, device=dev, dtype=torch.float64) < self.misalignment_prob
            u = rand(generator, b, (3,), device=dev, dtype=torch.float64)
            radius = self.max_shift_px * torch.sqrt(u[:, 0]) * on
            direction = 2.0 * math.pi * u[:, 1]
            shift = torch.stack([radius * torch.cos(direction), radius * torch.sin(direction)], dim=1)
            angle = self.max_rotation_deg * (2.0 * u[:, 2] - 1.0) * on
            x = shift_patterns(x, shift.to(x.dtype))
            x = rotate_patterns(x, angle.to(x.dtype))

        if self.dose_e_range is not None:
            dose = uniform_range(generator, b, *self.dose_e_range, log=True, device=dev, dtype=torch.float64)
            x = apply_dose(x, dose, generator)
        else:
            dose = torch.full((b,), math.inf, dtype=torch.float64, device=dev)

        if self.pmt_prob > 0:
            on = rand(generator, b, device=dev, dtype=torch.float64) < self.pmt_prob
            x = torch.where(_bview(on, x.ndim), pmt_noise(x, self.pmt, generator), x)

        if self.readout_prob > 0:
            on = rand(generator, b, device=dev, dtype=torch.float64) < self.readout_prob
            std = uniform_range(generator, b, *self.readout_std_e_range, device=dev) * on
            x = gaussian_readout_noise(x, std, generator)

        if self.defect_prob > 0:
            on = rand(generator, b, device=dev, dtype=torch.float64) < self.defect_prob
            dead = uniform_range(generator, b, *self.dead_fraction_range, device=dev, dtype=torch.float64)
            hot = uniform_range(generator, b, *self.hot_fraction_range, device=dev, dtype=torch.float64)
            level = uniform_range(generator, b, *self.hot_level_range, device=dev)
            x = dead_hot_pixels(x, dead * on, hot * on, level, generator)

        inputs = preprocess(
            x,
            step,
            probe,
            exponent=self.exponent,
            zeta_scale=self.zeta_scale,
            standardise_input=self.standardise_input,
        )
        return {
            "inputs": inputs,
            "wave": wave,
            "cbed": x,
            "dose_e": dose.to(torch.float32),
            "no_specimen": empty,
        }

    def forward(
        self,
        batch: Mapping[str, Tensor],
        *,
        generator: Generators | None = None,
        deterministic: bool | None = None,
    ) -> dict[str, Tensor]:
        """Augment a kernel batch dict (keys ``cbed``, ``probe``, ``wave``, ``step_A``, optional ``index``).

        ``deterministic`` (default: ``not self.training``) seeds every sample's noise by its dataset
        ``index`` and ``eval_seed`` (validation/test); otherwise ``generator`` or the module's own
        training generator is used. Returns a new dict: the input keys, with ``cbed``, ``wave`` and
        ``probe`` replaced by their augmented versions (the probe changes only with ``dihedral``), plus
        ``inputs``, ``dose_e`` and ``no_specimen``.
        """
        cbed = batch["cbed"]
        if deterministic is None:
            deterministic = not self.training
        if deterministic:
            if "index" not in batch:
                raise KeyError("deterministic augmentation needs the samples' dataset 'index' in the batch")
            generator = per_sample_generators(batch["index"], self.eval_seed, cbed.device)
        elif generator is None:
            generator = self.generator_for(cbed.device)
        wave, probe = batch["wave"], batch["probe"]
        if self.dihedral and not deterministic:
            ops = rand(generator, cbed.shape[0], (3,), device=cbed.device, dtype=torch.float64) < 0.5
            cbed, wave, probe = dihedral_transform(cbed, wave, probe, ops[:, 0], ops[:, 1], ops[:, 2])
        out = dict(batch)
        out["probe"] = probe
        out.update(self.augment(cbed, probe, wave, batch["step_A"], generator))
        return out
