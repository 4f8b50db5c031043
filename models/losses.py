"""Training losses of the four networks.

* :class:`AIRPILoss`: paper 002 eq. 11-14 (thesis eq. 4.11-4.14) plus the output-layer penalties.
* :func:`masked_l1`: Chang et al. (paper 001), L1 inside the illuminated area.
* :class:`PtychoNNLoss`: paper 004, L1 (mean absolute error) on amplitude and phase; options L2, a phase
  xc term and per-pixel weights (issue #15).
* :class:`CGRDNGeneratorLoss`, :func:`relativistic_generator_loss`, :func:`relativistic_discriminator_loss`:
  thesis ch.2 eq. 2.30-2.43.

Conventions: images are ``(B, H, W)`` or ``(B, 1, H, W)``; "L2" is the mean squared error over pixels
and batch unless a mask says otherwise. Fourier transforms are orthonormal (``norm="ortho"``) so that
``sum |psi(k)|^2 = sum |psi(r)|^2``; k-space arrays are centred (``fftshift``), matching
``physics.optics``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AIRPILoss",
    "CGRDNGeneratorLoss",
    "PtychoNNLoss",
    "illuminated_mask",
    "masked_l1",
    "object_phase",
    "object_phase_spread",
    "pearson_xc",
    "psnr",
    "relativistic_discriminator_loss",
    "relativistic_generator_loss",
    "whitening_transform",
    "wrap_phase",
]


def _squeeze_channel(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] if x.dim() == 4 and x.shape[1] == 1 else x


def wrap_phase(phase: torch.Tensor) -> torch.Tensor:
    """Wrap radians into ``(-pi, pi]``."""
    return torch.atan2(torch.sin(phase), torch.cos(phase))


def pearson_xc(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """Pearson cross-correlation per image (paper 002 eq. 14), optionally over weighted pixels.

    ``x``, ``y`` (B, H, W) (or (B, 1, H, W)); ``weight`` broadcastable, e.g. a 0/1 mask. Returns (B,).
    Means and (co)variances use the weights; ``xc = cov / sqrt(var_x var_y)``.
    """
    x, y = _squeeze_channel(x), _squeeze_channel(y)
    w = torch.ones_like(x) if weight is None else _squeeze_channel(weight).to(x.dtype).expand_as(x)
    x, y, w = x.flatten(1), y.flatten(1), w.flatten(1)
    total = w.sum(1, keepdim=True).clamp_min(eps)
    xc = x - (w * x).sum(1, keepdim=True) / total
    yc = y - (w * y).sum(1, keepdim=True) / total
    cov = (w * xc * yc).sum(1)
    var = (w * xc * xc).sum(1) * (w * yc * yc).sum(1)
    return cov / torch.sqrt(var.clamp_min(eps))


def illuminated_mask(probe: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """0/1 float mask where ``|psi_in|^2 > threshold * max |psi_in|^2`` per image (paper 002 eq. 5-6)."""
    intensity = probe.abs() ** 2
    peak = intensity.flatten(1).amax(1).view(-1, *([1] * (intensity.dim() - 1)))
    return (intensity > threshold * peak).to(intensity.dtype)


def object_phase(wave: torch.Tensor, probe: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """POA object phase ``arg(psi_out / psi_in) = arg(psi_out conj(psi_in))`` (paper 002 eq. 5)."""
    z = wave * probe.conj()
    return torch.atan2(z.imag, z.real + eps * (z.real == 0))


def object_phase_spread(wave: torch.Tensor, probe: torch.Tensor, mask_threshold: float = 0.1) -> torch.Tensor:
    """Standard deviation (rad) of the :func:`object_phase` over the :func:`illuminated_mask` of each
    image (B, H, W) -> (B,): how strong a phase object the probe sees. A thin, light crystal gives a few
    hundredths of a radian, and its xc (:func:`pearson_xc`) rests on that small signal."""
    phase = object_phase(wave, probe).flatten(1).double()
    weight = illuminated_mask(probe, mask_threshold).flatten(1).double()
    count = weight.sum(1).clamp_min(1.0)
    mean = (weight * phase).sum(1) / count
    return torch.sqrt((weight * (phase - mean[:, None]) ** 2).sum(1) / count).float()


def _unit_phasor(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sin, cos)`` of ``arg z`` as ``(Im z, Re z) / |z|`` with a smooth floor ``eps`` on ``|z|``."""
    norm = torch.sqrt(z.real**2 + z.imag**2 + eps**2)
    return z.imag / norm, z.real / norm


def _fft2c(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


class AIRPILoss(nn.Module):
    """AIRPI multi-objective loss (paper 002 eq. 11-14) with the output penalties of 002 "CNN architecture".

    ``L = w_int_k L2(I(k)) + w_phase_k [L2(sin phi(k)) + L2(cos phi(k))] + w_int_r L2(I(r))
    + w_phase_r [L2(sin phi(r)) + L2(cos phi(r))] + w_object L2(phi_obj) + w_xc (1 - xc(phi_obj)) / 2
    + w_intensity_penalty mean(relu(sum I(r) - 1)) + w_phase_penalty mean(relu(|phi(r)| - pi))``

    with the published weights ``w_phase_k = 3`` and all others 1; ``w_object = 10`` in the fine-tuning
    stage (:attr:`fine_tune_object_weight`, switched on by ``fine_tune=True``).

    Conventions (the paper leaves them open):

    * ``psi(r)`` is the real-space exit wave normalised like the probe (``sum |psi|^2 = 1``);
      ``psi(k)`` is its centred orthonormal FFT. Intensities ``I = |psi|^2`` enter the L2 terms scaled
      by the number of pixels (``intensity_scale="pixels"``: mean intensity ~1, otherwise an
      unnormalised 64 x 64 intensity would be ~1e-4 per pixel and the terms would vanish);
      ``intensity_scale=1.0`` (a number) uses that factor instead.
    * ``sin``/``cos`` of ``phi(k)`` are ``Im/|psi|``, ``Re/|psi|`` with a floor ``phase_eps`` on
      ``|psi|`` (relative to the pixel-mean amplitude), which keeps gradients finite at zeros.
    * The object phase ``phi_obj = arg(psi_out / psi_in)`` counts only pixels with ``|psi_in|^2 > 0.1
      max`` (002 eq. 6); its L2 uses the wrapped difference ``wrap(phi_pred - phi_true)`` (equal to the
      plain difference for ``|difference| < pi``) and the xc is the mask-weighted Pearson coefficient.
    * eq. 13 is applied as ``(1 - xc) / 2``: 0 for a perfect, 1 for an anti-correlated object phase (the
      extracted text of 002 reads ``1 - xc / 2``, which has the same gradient up to a factor 1/2 and a
      constant offset; the public code uses ``(1 - xc) / 2``).
    * Penalties (002): integrated exit-wave intensity above 1 and predicted phase outside ``+-pi``.

    ``normalization="balanced"`` (issue #13: with the paper convention the real-space intensity term was 60 %
    of the total and the k-space phase term sat at chance level, so the eq. 11-14 weights were nominal)
    rescales the four wave terms so that each is O(1) for an uninformed prediction and measures what it
    names: the intensity terms become relative squared errors ``sum (I_p - I_t)^2 / sum I_t^2`` per image
    (1 for a zero prediction; ``intensity_scale`` then plays no role), and the phase terms weight each
    pixel's phasor error ``(sin_p - sin_t)^2 + (cos_p - cos_t)^2`` by the true intensity ``|psi_t|^2``
    (normalised per image), so the phase where ``|psi| ~ 0`` (noise) no longer counts. Each term lies in
    [0, 4]; 2 is chance for a random phase. ``"paper"`` (default) keeps the published convention.
    """

    TERMS = (
        "intensity_k",
        "phase_k",
        "intensity_r",
        "phase_r",
        "object",
        "xc",
        "intensity_penalty",
        "phase_penalty",
    )

    def __init__(
        self,
        w_intensity_k: float = 1.0,
        w_phase_k: float = 3.0,
        w_intensity_r: float = 1.0,
        w_phase_r: float = 1.0,
        w_object: float = 1.0,
        w_xc: float = 1.0,
        w_intensity_penalty: float = 1.0,
        w_phase_penalty: float = 1.0,
        fine_tune_object_weight: float = 10.0,
        fine_tune: bool = False,
        mask_threshold: float = 0.1,
        intensity_scale: str | float = "pixels",
        phase_eps: float = 1e-3,
        normalization: str = "paper",
    ):
        super().__init__()
        if normalization not in ("paper", "balanced"):
            raise ValueError(f"AIRPILoss: normalization must be 'paper' or 'balanced', got {normalization!r}")
        self.normalization = normalization
        self.weights = {
            "intensity_k": float(w_intensity_k),
            "phase_k": float(w_phase_k),
            "intensity_r": float(w_intensity_r),
            "phase_r": float(w_phase_r),
            "object": float(w_object),
            "xc": float(w_xc),
            "intensity_penalty": float(w_intensity_penalty),
            "phase_penalty": float(w_phase_penalty),
        }
        self.fine_tune_object_weight = float(fine_tune_object_weight)
        self.fine_tune = bool(fine_tune)
        self.mask_threshold = float(mask_threshold)
        if isinstance(intensity_scale, str) and intensity_scale != "pixels":
            raise ValueError(
                f"AIRPILoss: intensity_scale must be 'pixels' or a number, got {intensity_scale!r}"
            )
        self.intensity_scale = intensity_scale
        self.phase_eps = float(phase_eps)

    def effective_weights(self) -> dict[str, float]:
        """The weights in use (the object weight replaced by the fine-tuning one when ``fine_tune``)."""
        weights = dict(self.weights)
        if self.fine_tune:
            weights["object"] = self.fine_tune_object_weight
        return weights

    def terms(
        self, wave_pred: torch.Tensor, wave_true: torch.Tensor, probe: torch.Tensor, phase_pred: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Unweighted loss terms (scalars).

        ``wave_pred``, ``wave_true``, ``probe``: complex real-space waves (B, H, W); ``phase_pred``: the
        network's unwrapped phase output (B, H, W), ``arg wave_pred`` (the phase terms in real space and the
        object phase use it directly, which keeps their gradients bounded; the phase penalty acts on it).
        """
        wave_pred = wave_pred.to(torch.complex64)
        wave_true = wave_true.to(torch.complex64)
        probe = probe.to(torch.complex64)
        npix = wave_true.shape[-1] * wave_true.shape[-2]
        scale = float(npix) if self.intensity_scale == "pixels" else float(self.intensity_scale)
        eps = self.phase_eps / math.sqrt(npix)
        out: dict[str, torch.Tensor] = {}
        phase_pred = phase_pred.float()
        balanced = self.normalization == "balanced"
        for space, pred, true in (
            ("r", wave_pred, wave_true),
            ("k", _fft2c(wave_pred), _fft2c(wave_true)),
        ):
            if space == "r":  # the predicted phase itself: no arg() of a vanishing amplitude
                sin_p, cos_p = torch.sin(phase_pred), torch.cos(phase_pred)
            else:
                sin_p, cos_p = _unit_phasor(pred, eps)
            sin_t, cos_t = _unit_phasor(true, eps)
            intensity_p, intensity_t = pred.abs() ** 2, true.abs() ** 2
            if balanced:
                error = ((intensity_p - intensity_t) ** 2).flatten(1).sum(1)
                norm = (intensity_t**2).flatten(1).sum(1).clamp_min(1e-30)
                out[f"intensity_{space}"] = (error / norm).mean()
                weight = intensity_t / intensity_t.flatten(1).sum(1).clamp_min(1e-30)[:, None, None]
                phasor = (sin_p - sin_t) ** 2 + (cos_p - cos_t) ** 2
                out[f"phase_{space}"] = (weight * phasor).flatten(1).sum(1).mean()
            else:
                out[f"intensity_{space}"] = F.mse_loss(scale * intensity_p, scale * intensity_t)
                out[f"phase_{space}"] = F.mse_loss(sin_p, sin_t) + F.mse_loss(cos_p, cos_t)
        mask = illuminated_mask(probe, self.mask_threshold)
        # arg(psi_out / psi_in) from the predicted phase (equal where |psi_out| > 0): atan2 of a wave whose
        # amplitude is clamped to 0 has an unbounded gradient, which turned training into NaN
        obj_pred = wrap_phase(phase_pred - torch.angle(probe))
        obj_true = object_phase(wave_true, probe)
        diff = wrap_phase(obj_pred - obj_true)
        out["object"] = ((mask * diff**2).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)).mean()
        out["xc"] = ((1 - pearson_xc(obj_pred, obj_true, mask)) / 2).mean()
        total_intensity = (wave_pred.abs() ** 2).flatten(1).sum(1)
        out["intensity_penalty"] = F.relu(total_intensity - 1).mean()
        out["phase_penalty"] = F.relu(phase_pred.abs() - math.pi).mean()
        return out

    def forward(
        self, wave_pred: torch.Tensor, wave_true: torch.Tensor, probe: torch.Tensor, phase_pred: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and the unweighted terms (see :meth:`terms`)."""
        terms = self.terms(wave_pred, wave_true, probe, phase_pred)
        weights = self.effective_weights()
        total = sum(weights[name] * terms[name] for name in self.TERMS)
        return total, terms


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Chang et al. (paper 001): mean absolute error over the pixels where ``mask`` is non-zero.

    ``mask`` (B, H, W) or (B, 1, H, W), 0/1 or weights; ``None`` = all pixels. The mean runs over the
    masked pixels of the whole batch: ``sum(m |p - t|) / sum(m)``.
    """
    pred, target = _squeeze_channel(pred), _squeeze_channel(target)
    if mask is None:
        return F.l1_loss(pred, target)
    mask = _squeeze_channel(mask).to(pred.dtype).expand_as(pred)
    return (mask * (pred - target).abs()).sum() / mask.sum().clamp_min(1e-12)


class PtychoNNLoss(nn.Module):
    """PtychoNN (paper 004): ``w_amplitude E(amplitude) + w_phase E(phase) + w_xc (1 - xc(phase))``.

    Parameters
    ----------
    w_amplitude, w_phase
        Weights of the per-pixel errors (1, 1).
    kind
        ``"l1"`` (paper: mean absolute error) or ``"l2"`` (mean squared error). L1's minimiser is the
        median: on sparse atomic phases (mostly near 0, peaks to 1 rad) a network can sit there (issue #15).
    w_xc
        Weight of ``1 - xc`` of the phase, the Pearson cross-correlation pooled over the batch's pixels
        (weighted by ``weight``): scale- and offset-free, it rewards contrast a flat output lacks (0: off).

    ``forward(..., weight=None)``: optional per-pixel weights broadcastable to (B, H, W) (e.g. the probe
    intensity on the label window, ``data.label_weight=probe``); errors are the weighted means
    ``sum(w e) / sum(w)``. The terms are in the units of the tensors given (rad, or standardised labels).
    """

    KINDS = ("l1", "l2")

    def __init__(self, w_amplitude: float = 1.0, w_phase: float = 1.0, kind: str = "l1", w_xc: float = 0.0):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"PtychoNNLoss: kind must be one of {self.KINDS}, got {kind!r}")
        self.w_amplitude = float(w_amplitude)
        self.w_phase = float(w_phase)
        self.kind = kind
        self.w_xc = float(w_xc)

    def _error(self, pred: torch.Tensor, true: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        diff = _squeeze_channel(pred) - _squeeze_channel(true)
        err = diff.abs() if self.kind == "l1" else diff * diff
        if weight is None:
            return err.mean()
        w = _squeeze_channel(weight).to(err.dtype).expand_as(err)
        return (w * err).sum() / w.sum().clamp_min(1e-12)

    def forward(
        self,
        amplitude_pred: torch.Tensor,
        phase_pred: torch.Tensor,
        amplitude_true: torch.Tensor,
        phase_true: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = {
            "amplitude": self._error(amplitude_pred, amplitude_true, weight),
            "phase": self._error(phase_pred, phase_true, weight),
        }
        total = self.w_amplitude * terms["amplitude"] + self.w_phase * terms["phase"]
        if self.w_xc:
            pred, true = _squeeze_channel(phase_pred), _squeeze_channel(phase_true)
            w = (
                None
                if weight is None
                else _squeeze_channel(weight).to(pred.dtype).expand_as(pred).reshape(1, -1)
            )
            terms["xc"] = 1.0 - pearson_xc(pred.reshape(1, -1), true.reshape(1, -1), w)[0]
            total = total + self.w_xc * terms["xc"]
        return total, terms


def whitening_transform(y: torch.Tensor, window: int, std_min: float | torch.Tensor) -> torch.Tensor:
    """Local whitening (thesis eq. 2.35): ``(y - E_S[y]) / max(std_min, Std_S[y])`` over S x S windows.

    Local mean and standard deviation come from an S x S box (average pooling, stride 1, reflect padding
    so the output keeps the input size; for even S the window covers ``S // 2`` pixels before and
    ``S // 2 - 1`` after the centre). ``y`` (B, C, H, W); ``std_min`` a number or a per-example floor
    broadcastable to ``y`` (e.g. (B, 1, 1, 1), in ``y``'s units).
    """
    pad = (window // 2, window - 1 - window // 2, window // 2, window - 1 - window // 2)
    padded = F.pad(y, pad, mode="reflect") if min(y.shape[-2:]) > window else F.pad(y, pad, mode="replicate")
    mean = F.avg_pool2d(padded, window, stride=1)
    var = (F.avg_pool2d(padded**2, window, stride=1) - mean**2).clamp_min(0)
    floor = torch.as_tensor(std_min, dtype=var.dtype, device=var.device)
    return (y - mean) / torch.maximum(torch.sqrt(var), floor)


class CGRDNGeneratorLoss(nn.Module):
    """Pixel-wise CGRDN generator loss (thesis eq. 2.32-2.39, 2.42) plus ``w_adversarial L_Adv`` (2.41).

    * ``L1 = E{w_y |y - y_g|}``, ``L2 = E{w_y^2 |y - y_g|^2}``, ``w_y = 1 / sigma_y`` per example with
      ``sigma_y = max(sigma_min_rel * level, Std{y})`` (eq. 2.32-2.34, floor as below; ``w_y^2`` in L2
      makes it dimensionless, as the thesis's ``w_y`` does for its unit-scale images);
    * ``L_mlwt = 1/4 sum_{S=2,4,8,16} E{|y^S - y_g^S|}`` with the local whitening transform (2.35-2.36),
      local std floored at ``sigma_min_rel * level``;
    * ``L_fs = E{|F(w_y (y - y_g))|^gamma}``, orthonormal 2D FFT, ``gamma = 0.125`` (2.37);
    * ``L_mean = E_batch w_y |mean(y) - mean(y_g)|``, ``L_std = E_batch w_y |Std(y) - Std(y_g)|`` per image
      (2.38-2.39);
    * ``L_Adv``: :func:`relativistic_generator_loss` of the critic outputs (2.40), added by the caller
      through :meth:`forward`'s ``critic_real``/``critic_fake``.

    Default weights: the public code's committed values (``w_l1 = 10``, ``w_adversarial = 5e-4``, the rest
    0).

    Scale-free floor (the default; the generator's rule, :class:`models.cgrdn.CGRDN`): ``level`` is the
    larger of the per-example mean absolute intensities of the target and of the prediction (the latter
    detached: it only sets the floor), ``mean |y|`` in the usual case that the prediction is about as bright
    as the target, and non-zero for an empty (all-zero) target, whose weight would otherwise be ``1 / 0``.
    Every term (the pixel-wise ones, L1, L2, FS, mean, std, through ``w_y``, and MLWT by construction) is then
    invariant to the intensity unit: rescaling ``y`` and ``y_g`` together by any ``c > 0`` leaves the loss
    unchanged, so a model trained on fractions of the incident electrons and one trained on counts see the
    same loss. (The thesis weight ``1 / max(0.1, Std{y})`` assumes images normalised to unit scale; on this
    project's intensities, std 0.0015-0.043, it was a constant 10.)
    Legacy rule: ``sigma_min`` set (0.1 in checkpoints made before issue #16) is the absolute floor of
    ``w_y = 1 / max(sigma_min, Std{y})`` and of the local std, L2 is ``E{w_y |y - y_g|^2}``, and FS, mean
    and std are unweighted, exactly as before (``sigma_min_rel`` is then ignored).
    ``fs_delta`` keeps the gradient of ``|F|^gamma`` finite at 0: below ``|F| = fs_delta`` the power is
    replaced by the straight line ``|F| delta^(gamma - 1)`` (continuous at ``delta``, exactly 0 at 0);
    above it the term is exactly ``|F|^gamma``.
    """

    TERMS = ("l1", "l2", "mlwt", "fs", "mean", "std")

    def __init__(
        self,
        w_l1: float = 10.0,
        w_l2: float = 0.0,
        w_mlwt: float = 0.0,
        w_fs: float = 0.0,
        w_mean: float = 0.0,
        w_std: float = 0.0,
        w_adversarial: float = 5e-4,
        sigma_min: float | None = None,
        sigma_min_rel: float = 0.1,
        windows: tuple[int, ...] = (2, 4, 8, 16),
        gamma: float = 0.125,
        fs_delta: float = 1e-6,
    ):
        super().__init__()
        self.weights = {
            "l1": float(w_l1),
            "l2": float(w_l2),
            "mlwt": float(w_mlwt),
            "fs": float(w_fs),
            "mean": float(w_mean),
            "std": float(w_std),
        }
        self.w_adversarial = float(w_adversarial)
        if sigma_min_rel < 0 or (sigma_min is not None and sigma_min < 0):
            raise ValueError(
                f"CGRDN loss: sigma_min_rel and sigma_min must be >= 0, got {sigma_min_rel}, {sigma_min}"
            )
        self.sigma_min = None if sigma_min is None else float(sigma_min)
        self.sigma_min_rel = float(sigma_min_rel)
        self.windows = tuple(int(w) for w in windows)
        self.gamma = float(gamma)
        self.fs_delta = float(fs_delta)

    @staticmethod
    def _as_4d(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x

    def terms(self, y_g: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted pixel-wise terms for generated ``y_g`` and ground truth ``y`` (B, [1,] H, W)."""
        y_g, y = self._as_4d(y_g), self._as_4d(y)
        dims = (1, 2, 3)
        std_y = y.std(dim=dims, unbiased=False, keepdim=True)
        floor: float | torch.Tensor
        if self.sigma_min is not None:  # legacy absolute floor; FS, mean and std unweighted
            floor = self.sigma_min
            w = 1.0 / std_y.clamp_min(floor)
            w_l2, w_other = w, torch.ones_like(w)
        else:
            level = torch.maximum(
                y.abs().mean(dim=dims, keepdim=True), y_g.detach().abs().mean(dim=dims, keepdim=True)
            )
            floor = (self.sigma_min_rel * level).clamp_min(torch.finfo(level.dtype).tiny)
            w = 1.0 / torch.maximum(std_y, floor)
            w_l2, w_other = w**2, w
        diff = y - y_g
        out = {
            "l1": (w * diff.abs()).mean(),
            "l2": (w_l2 * diff**2).mean(),
        }
        mlwt = [
            (whitening_transform(y, s, floor) - whitening_transform(y_g, s, floor)).abs().mean()
            for s in self.windows
        ]
        out["mlwt"] = torch.stack(mlwt).mean()
        spectrum = torch.fft.fft2(w_other * diff, norm="ortho").abs()
        delta = self.fs_delta
        power = torch.where(
            spectrum >= delta, spectrum.clamp_min(delta) ** self.gamma, spectrum * delta ** (self.gamma - 1)
        )
        out["fs"] = power.mean()
        w_image = w_other.flatten()
        out["mean"] = (w_image * (y.mean(dim=dims) - y_g.mean(dim=dims)).abs()).mean()
        out["std"] = (
            w_image * (y.std(dim=dims, unbiased=False) - y_g.std(dim=dims, unbiased=False)).abs()
        ).mean()
        return out

    def pixel_loss(self, y_g: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_pixel-wise`` (eq. 2.42) and its unweighted terms; zero-weight terms are still reported."""
        terms = self.terms(y_g, y)
        return sum(self.weights[n] * terms[n] for n in self.TERMS), terms

    def forward(
        self,
        y_g: torch.Tensor,
        y: torch.Tensor,
        critic_real: torch.Tensor | None = None,
        critic_fake: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_G = L_pixel-wise + w_adversarial L_Adv`` (eq. 2.41); L_Adv only when critic maps are given."""
        total, terms = self.pixel_loss(y_g, y)
        if critic_real is not None and critic_fake is not None:
            terms["adversarial"] = relativistic_generator_loss(critic_real, critic_fake)
            total = total + self.w_adversarial * terms["adversarial"]
        return total, terms


def _relativistic_logits(critic_a: torch.Tensor, critic_b: torch.Tensor) -> torch.Tensor:
    """Logit of ``D_Rap(a, b) = sigmoid(C(a) - E[C(b)])`` (eq. 2.30-2.31); E over batch and patches."""
    return critic_a - critic_b.mean()


def relativistic_generator_loss(critic_real: torch.Tensor, critic_fake: torch.Tensor) -> torch.Tensor:
    """``L_Adv = -E log(1 - D_Rap(y, y_g)) - E log D_Rap(y_g, y)`` (thesis eq. 2.40), from critic maps.

    Written with ``binary_cross_entropy_with_logits`` for stability (targets 0 for real, 1 for fake).
    """
    real = _relativistic_logits(critic_real, critic_fake)
    fake = _relativistic_logits(critic_fake, critic_real)
    return F.binary_cross_entropy_with_logits(
        real, torch.zeros_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def relativistic_discriminator_loss(critic_real: torch.Tensor, critic_fake: torch.Tensor) -> torch.Tensor:
    """``L_D = -E log D_Rap(y, y_g) - E log(1 - D_Rap(y_g, y))`` (thesis eq. 2.43), from critic maps."""
    real = _relativistic_logits(critic_real, critic_fake)
    fake = _relativistic_logits(critic_fake, critic_real)
    return F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def psnr(
    pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, ``10 log10(range^2 / MSE)``; range = target max - min."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    if data_range is None:
        data_range = target.amax(1) - target.amin(1)
    mse = ((pred - target) ** 2).mean(1).clamp_min(1e-20)
    return 10 * torch.log10(torch.as_tensor(data_range, dtype=mse.dtype) ** 2 / mse)
