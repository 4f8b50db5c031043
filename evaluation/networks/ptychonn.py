"""PtychoNN reconstruction of a scan (paper 004): the probe-weighted average of the predicted patches.

:class:`PtychoNNPlacement` holds what turns raw CBEDs into inputs (centre CBED / its maximum, as in
:func:`training.datamodules.ptychonn_view`) and places the predicted ``(amplitude, phase)`` patches:
``sum w_n A_n exp(i phi_n) / sum w_n`` with ``w_n`` the probe intensity where ``|psi_in|^2 > 0.1 max``;
phase = its angle, amplitude = the weighted mean of ``A_n``. The local engine (:func:`ptychonn_reconstruct`)
and ``engine=libertem`` (:mod:`evaluation.engines.libertem`) share it. The local engine's trust map
(:mod:`evaluation.networks.consistency`, both engines) compares ``|F[psi_in A exp(i phi)]|^2`` with each
input CBED.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluation.networks.consistency import (
    ConsistencyMap,
    diffraction_intensity,
    map_and_summary,
    normalised_poisson_deviance,
)
from evaluation.networks.geometry import (
    PAPER_RATIO_ALPHA_GMAX,
    Predictor,
    ScanGeometry,
    _batches,
    _check_patterns,
    _default_block_rows,
    _detector_centre,
    _inference_bar,
    _linear_evaluation,
    _mask_half_width,
    _network_grid,
    _object_pixel,
    _ObjectGrid,
    _PatternStream,
    resolve_device,
)
from evaluation.references import Reconstruction
from evaluation.unwrap import unwrap_phase_image
from physics import probe

__all__ = ["PtychoNNPlacement", "default_oversampling", "ptychonn_placement", "ptychonn_reconstruct"]


@dataclass
class PtychoNNPlacement:
    """What turns raw CBEDs into PtychoNN inputs and places the predicted patches (picklable: no data).

    Built once per scan by :func:`ptychonn_placement`; the local engine (:func:`ptychonn_reconstruct`) and
    ``engine=libertem`` (:mod:`evaluation.engines.libertem`, per partition on a worker) share it, so both
    pre-process, place and normalise alike. ``geometry.data`` may be any object with the scan's ``shape``.
    """

    geometry: ScanGeometry
    pixels: int
    gmax_invA: float
    centre_px: np.ndarray
    pixel_A: tuple[float, float]
    grid: _ObjectGrid
    lx: np.ndarray
    ly: np.ndarray
    weight: np.ndarray  # probe intensity inside the mask on the footprint, summing to 1
    oversampling: int
    probe: np.ndarray | None = None  # psi_in (K, K) on the network grid, the trust map's illumination
    consistency: bool = True  # trust map: |F[psi_in A exp(i phi)]|^2 against the CBEDs
    consistency_counts_per_unit: float | None = None  # electrons per unit of the data; None: counts

    def stream(self, device: torch.device) -> _PatternStream:
        """The resampling of raw CBEDs onto the network grid."""
        return _PatternStream(self.geometry, self.pixels, self.gmax_invA, self.centre_px, device)

    def accumulators(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed ``(complex_sum (N, 2), amplitude_sum (N,))`` over the flattened object grid."""
        size = self.grid.shape[0] * self.grid.shape[1]
        return (
            torch.zeros((size, 2), dtype=torch.float32, device=device),
            torch.zeros(size, dtype=torch.float32, device=device),
        )

    def place_batch(
        self,
        predictor: Predictor,
        centre_cbed: torch.Tensor,
        e: np.ndarray,
        c: np.ndarray,
        complex_sum: torch.Tensor,
        amplitude_sum: torch.Tensor,
    ) -> torch.Tensor | None:
        """Normalise resampled CBEDs (B, K, K) at effective positions ``(e, c)``, predict, and add the
        weighted patches into the accumulators (in place). Returns the batch's forward-model consistency
        (B,) (:func:`evaluation.networks.consistency.normalised_poisson_deviance` of ``|F[psi_in A exp(i
        phi)]|^2`` against the CBEDs) where :attr:`consistency` is set and :attr:`probe` known, else None."""
        dev = centre_cbed.device
        pixels = self.pixels
        step = self.geometry.step_A
        weight_t = torch.as_tensor(self.weight, dtype=torch.float32, device=dev)
        lx_t = torch.as_tensor(self.lx, dtype=torch.float32, device=dev)
        ly_t = torch.as_tensor(self.ly.T, dtype=torch.float32, device=dev)
        peak = centre_cbed.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        inputs = (centre_cbed / peak)[:, None]
        positions = np.stack([e * step[0], c * step[1]], -1)
        amplitude, phase = predictor(inputs, torch.as_tensor(positions, device=dev))
        amplitude = amplitude.float().reshape(-1, pixels, pixels)
        phase = phase.float().reshape(-1, pixels, pixels)
        transmission = torch.polar(amplitude, phase)
        values = None
        if self.consistency and self.probe is not None:
            probe_t = torch.as_tensor(self.probe, dtype=torch.complex64, device=dev)
            predicted = diffraction_intensity(probe_t * transmission)
            values = normalised_poisson_deviance(centre_cbed, predicted, self.consistency_counts_per_unit)
        real = lx_t @ transmission.real @ ly_t
        imag = lx_t @ transmission.imag @ ly_t
        amp = lx_t @ amplitude @ ly_t
        mx, my, _ = self.grid.placement(e, c)
        index = self.grid.flat_indices(mx, my, dev).reshape(-1)
        complex_sum.index_add_(0, index, torch.stack([real * weight_t, imag * weight_t], -1).reshape(-1, 2))
        amplitude_sum.index_add_(0, index, (amp * weight_t).reshape(-1))
        return values

    def finish(
        self,
        complex_sum: np.ndarray,
        amplitude_sum: np.ndarray,
        crop_to_scan: bool,
        unwrap_phase: bool,
        patterns_per_s: float,
        consistency: np.ndarray | None = None,
    ) -> Reconstruction:
        """The stitched object from the accumulated sums (``(N, 2)`` and ``(N,)``, any engine), with the
        trust map ``consistency`` (Rx, Ry) where one was computed."""
        grid = self.grid
        rx, ry = self.geometry.positions_shape
        # the total weight is the weight map summed over the positions: a convolution, not an accumulator
        from scipy.signal import fftconvolve

        ee, cc = np.meshgrid(np.arange(rx), np.arange(ry), indexing="ij")
        mx_all, my_all, _ = grid.placement(ee.ravel(), cc.ravel())
        ones = np.zeros((grid.last_pixel[0] + 1, grid.last_pixel[1] + 1))
        ones[mx_all, my_all] = 1.0
        total_weight = np.zeros(grid.shape)
        w = self.weight
        reach = (ones.shape[0] + w.shape[0] - 1, ones.shape[1] + w.shape[1] - 1)
        total_weight[: reach[0], : reach[1]] = fftconvolve(ones, w)
        complex_sum = np.ascontiguousarray(complex_sum, dtype=np.float32)
        total = (complex_sum[:, 0] + 1j * complex_sum[:, 1]).reshape(grid.shape)
        covered = total_weight > 1e-6 * w.max()
        amplitude_image = np.divide(
            np.asarray(amplitude_sum, dtype=np.float32).reshape(grid.shape), total_weight,
            out=np.zeros(grid.shape), where=covered,
        )  # fmt: skip
        phase_image, origin = grid.crop(
            np.where(covered, np.angle(total), 0.0).astype(np.float32), crop_to_scan
        )
        covered_cropped, _ = grid.crop(covered, crop_to_scan)
        if unwrap_phase:
            phase_image, wraps = unwrap_phase_image(phase_image, covered_cropped)
        else:
            wraps = 0
        amplitude_cropped, _ = grid.crop(amplitude_image.astype(np.float32), crop_to_scan)
        consistency, extra = map_and_summary(consistency)
        return Reconstruction(
            phase=phase_image,
            pixel_size_A=self.pixel_A,
            origin_A=origin,
            method="ptychonn",
            amplitude=amplitude_cropped,
            info={
                "gmax_invA": self.gmax_invA,
                "alpha_over_gmax": self.geometry.alpha_invA / self.gmax_invA,
                "network_pixels": int(self.pixels),
                "oversampling": int(self.oversampling),
                "detector_centre_px": self.centre_px.tolist(),
                "phase_wraps_removed": int(wraps),
                "patterns_per_s": patterns_per_s,
                **extra,
            },
            consistency=consistency,
        )


def ptychonn_placement(
    scan: Any,
    *,
    pixels: int = 64,
    gmax_invA: float | None = None,
    ratio_alpha_gmax: tuple[float, float] | None = PAPER_RATIO_ALPHA_GMAX,
    oversampling: int | None = None,
    weight_threshold: float = 0.1,
    detector_centre_px: Any = None,
    block_rows: int | None = None,
    consistency: bool = True,
    consistency_counts_per_unit: float | None = None,
    progress: bool = True,
) -> PtychoNNPlacement:
    """The :class:`PtychoNNPlacement` of a scan: detector centre (the mean CBED's centre of mass unless
    given), network grid ``gmax``, probe-mask footprint and weights, the probe (see
    :func:`ptychonn_reconstruct`) and the trust-map options. ``oversampling`` None: the smallest integer
    that makes the object pixel (``step / oversampling``) no coarser than the network's ``1 / (2 gmax)``,
    so that the patches' sub-step detail is kept (:func:`default_oversampling`)."""
    geometry = ScanGeometry.from_scan(scan)
    _check_patterns(geometry)
    centre = _detector_centre(geometry, detector_centre_px, progress, block_rows)
    gmax = _network_grid(geometry, centre, pixels, gmax_invA, ratio_alpha_gmax)
    d = 1.0 / (2.0 * gmax)
    if oversampling is None:
        oversampling = default_oversampling(geometry.step_A, d)
    psi_in = probe(
        geometry.energy_eV, geometry.semiangle_mrad, pixels, gmax_invA=gmax,
        defocus_A=geometry.defocus_A, Cs_A=geometry.Cs_A,
    )  # fmt: skip
    intensity = np.abs(psi_in) ** 2
    native_mask = intensity > weight_threshold * intensity.max()
    pixel_A = _object_pixel(geometry, oversampling, None, allow_fractional=False)
    half = _mask_half_width(native_mask, pixels // 2, d, pixel_A)
    grid = _ObjectGrid(pixel_A, geometry.step_A, half, geometry.positions_shape)
    lx = _linear_evaluation(pixels, pixels // 2 + np.arange(-half[0], half[0] + 1) * pixel_A[0] / d)
    ly = _linear_evaluation(pixels, pixels // 2 + np.arange(-half[1], half[1] + 1) * pixel_A[1] / d)
    inside = (lx @ native_mask.astype(np.float64) @ ly.T) > 1 - 1e-6
    weight = np.where(inside, lx @ intensity @ ly.T, 0.0)
    return PtychoNNPlacement(
        geometry=geometry, pixels=int(pixels), gmax_invA=gmax, centre_px=centre, pixel_A=pixel_A, grid=grid,
        lx=lx, ly=ly, weight=weight / weight.sum(), oversampling=int(oversampling), probe=psi_in,
        consistency=bool(consistency), consistency_counts_per_unit=consistency_counts_per_unit,
    )  # fmt: skip


def default_oversampling(step_A: Any, network_pixel_A: float) -> int:
    """The smallest integer ``n`` with ``step / n <= network_pixel_A`` on both scan axes (at least 1).

    >>> default_oversampling((0.35, 0.35), 0.164)
    3
    """
    steps = np.broadcast_to(np.asarray(step_A, dtype=float), (2,))
    return max(1, math.ceil(float(steps.max()) / float(network_pixel_A) - 1e-6))


def ptychonn_reconstruct(
    scan: Any,
    predictor: Predictor,
    *,
    pixels: int = 64,
    gmax_invA: float | None = None,
    ratio_alpha_gmax: tuple[float, float] | None = PAPER_RATIO_ALPHA_GMAX,
    oversampling: int | None = None,
    weight_threshold: float = 0.1,
    crop_to_scan: bool = True,
    unwrap_phase: bool = True,
    detector_centre_px: Any = None,
    batch_size: int = 256,
    block_rows: int | None = None,
    consistency: bool = True,
    consistency_counts_per_unit: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Reconstruction:
    """PtychoNN reconstruction: probe-weighted average of the predicted patches (paper 004).

    ``predictor(inputs (B, 1, K, K), positions_A)`` returns ``(amplitude, phase)`` patches (B, K, K) on the
    kernel-shard real-space grid (pixel ``1 / (2 gmax)``, probe at pixel ``K // 2``), the POA object
    ``psi_out / psi_in`` inside ``|psi_in|^2 > 0.1 max`` (the training label of
    :func:`training.datamodules.ptychonn_view`). Patches are placed with linear interpolation onto the
    object grid; the weights are the probe intensity inside the same mask. The phase is unwrapped where it
    passes ``+-pi`` (``unwrap_phase``, :mod:`evaluation.unwrap`). The pre-processing, placement and
    normalisation are :class:`PtychoNNPlacement`'s, shared with ``engine=libertem``.

    ``consistency``: the trust map ``Reconstruction.consistency`` (Rx, Ry): ``|F[psi_in A exp(i phi)]|^2``
    (``psi_in`` the probe of the weights; the network's vacuum ``(1, 0)`` outside the mask included)
    against the CBED the network saw, before its division by the maximum; see
    :mod:`evaluation.networks.consistency` (``consistency_counts_per_unit`` electrons per unit of the data;
    None: counts). ``info['consistency_median']`` its median.
    """
    dev = resolve_device(device)
    start_time = time.perf_counter()
    plan = ptychonn_placement(
        scan, pixels=pixels, gmax_invA=gmax_invA, ratio_alpha_gmax=ratio_alpha_gmax,
        oversampling=oversampling, weight_threshold=weight_threshold, detector_centre_px=detector_centre_px,
        block_rows=block_rows, consistency=consistency,
        consistency_counts_per_unit=consistency_counts_per_unit, progress=progress,
    )  # fmt: skip
    geometry = plan.geometry
    stream = plan.stream(dev)
    complex_sum, amplitude_sum = plan.accumulators(dev)
    _, ry = geometry.positions_shape
    rows_per_block = block_rows or _default_block_rows(ry, pixels)
    count = 0
    trust = (
        ConsistencyMap(geometry.positions_shape, dev, plan.consistency_counts_per_unit)
        if plan.consistency
        else None
    )
    bar = _inference_bar(geometry, progress, "PtychoNN")
    for e, c, kernels in stream.kernels(rows_per_block, False, "PtychoNN", neighbours=False):
        for part in _batches(len(e), batch_size):
            cbed = kernels[part, 0]
            values = plan.place_batch(predictor, cbed, e[part], c[part], complex_sum, amplitude_sum)
            if trust is not None and values is not None:
                trust.put(e[part], c[part], values)
            count += len(e[part])
            bar.update(len(e[part]))
    bar.close()
    elapsed = time.perf_counter() - start_time
    return plan.finish(
        complex_sum.cpu().numpy(), amplitude_sum.cpu().numpy(), crop_to_scan, unwrap_phase,
        count / max(elapsed, 1e-9), None if trust is None else trust.array(),
    )  # fmt: skip
