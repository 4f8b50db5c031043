"""Chang U-Net reconstruction of a scan (paper 001 eq. 2): phase patches, offsets by sparse least squares.

The inputs follow the training data's own geometry (:class:`datagen.stock_images.ChangForwardModel`): each
CBED resampled onto its simulation grid (``pixels * bin_factor`` pixels over ``+-collection_ratio * alpha``,
zero frequency at the centre pixel), rotated onto the scan frame there and summed in ``bin_factor`` x
``bin_factor`` blocks (:func:`_bin_patterns`), then ``sqrt(counts / total)``. Each predicted phase patch
carries an unknown constant offset ``c_n``; the offsets minimise ``sum over overlapping pairs (mean_ij(P_i) +
c_i - mean_ij(P_j) - c_j)^2`` (:func:`scipy.sparse.linalg.lsqr`, ``c_0 = 0``); image = mean of ``P_n + c_n``
over the patches covering a pixel. The trust map (:mod:`evaluation.networks.consistency`) compares
``|F[P exp(i phi)]|^2``, binned, with each binned input pattern in the same loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from evaluation.networks.consistency import ConsistencyMap, diffraction_intensity, map_and_summary
from evaluation.networks.geometry import (
    DetectorReachError,
    Predictor,
    ScanGeometry,
    _batches,
    _check_patterns,
    _detector_centre,
    _inference_bar,
    _linear_evaluation,
    _mask_half_width,
    _object_pixel,
    _ObjectGrid,
    _PatternStream,
    resolve_device,
)
from evaluation.references import Reconstruction

__all__ = ["chang_reconstruct"]


def _chang_probe_and_mask(
    geometry: ScanGeometry, pixels: int, bin_factor: int, collection_ratio: float, illuminated_fraction: float
) -> tuple[float, float, np.ndarray]:
    """(k_det 1/A, patch pixel A, illuminated mask (K, K)) with the training data's geometry.

    Uses :class:`datagen.stock_images.ChangForwardModel` (the one implementation of the Chang geometry) with
    the scan's optics: defocus ``C10 = -defocus_A`` and ``Cs_A``, no other aberrations.
    """
    k_det, pixel_A, mask, _ = _chang_geometry(
        geometry, pixels, bin_factor, collection_ratio, illuminated_fraction
    )
    return k_det, pixel_A, mask


def _chang_geometry(
    geometry: ScanGeometry, pixels: int, bin_factor: int, collection_ratio: float, illuminated_fraction: float
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """As :func:`_chang_probe_and_mask`, plus the probe (``pixels * bin_factor`` square, complex64, centred
    at pixel ``pixels * bin_factor // 2``) on the simulation grid: the ``P`` of the exit wave ``P exp(i
    phi)`` that the trust map (:mod:`evaluation.networks.consistency`) propagates."""
    from datagen.stock_images import ChangForwardModel, StockImageBank

    model = ChangForwardModel(
        energy_eV=geometry.energy_eV,
        semiangle_mrad=geometry.semiangle_mrad,
        diffraction_px=pixels,
        bin_factor=bin_factor,
        collection_ratio=collection_ratio,
        Cs_A=geometry.Cs_A,
        illuminated_fraction=illuminated_fraction,
        bank=StockImageBank(torch.zeros(1, 1, 4, 4), ["none"]),  # no images needed for the geometry
    )
    aberrations = {"C10": np.array([-geometry.defocus_A])}
    probes = model.probes(aberrations)
    probes = probes if probes.ndim == 3 else probes[None]
    mask = model.illuminated_mask(probes)[0].cpu().numpy()
    return model.k_detector_invA, model.pixel_size_A, mask, probes[0].cpu().numpy()


def _chang_exit_intensity(
    probe_sim: torch.Tensor, phase: torch.Tensor, mask: torch.Tensor, bin_factor: int
) -> torch.Tensor:
    """Binned ``|F[P exp(i phi)]|^2`` (B, K, K) of predicted phase patches (B, K, K) on the simulation grid.

    ``phi`` = the patch inside the illuminated ``mask`` (K, K), placed at the label window (the central
    ``K`` of the ``K * bin_factor`` grid, :meth:`datagen.stock_images.ChangForwardModel.label_window`), and
    0 elsewhere; binned like :meth:`~datagen.stock_images.ChangForwardModel.diffraction`.
    """
    sim_px = probe_sim.shape[-1]
    pixels = phase.shape[-1]
    start = sim_px // 2 - pixels // 2
    full = torch.zeros((phase.shape[0], sim_px, sim_px), dtype=torch.float32, device=phase.device)
    full[:, start : start + pixels, start : start + pixels] = torch.where(
        mask, phase, torch.zeros_like(phase)
    )
    intensity = diffraction_intensity(probe_sim * torch.polar(torch.ones_like(full), full))
    return _bin_patterns(intensity, bin_factor)


def _bin_patterns(patterns: torch.Tensor, factor: int) -> torch.Tensor:
    """Sum ``factor`` x ``factor`` blocks of the last two axes, ``(..., n * factor, m * factor) -> (..., n,
    m)``: the binning of :meth:`datagen.stock_images.ChangForwardModel.diffraction` (counts preserved)."""
    if factor == 1:
        return patterns
    *lead, h, w = patterns.shape
    return patterns.reshape(*lead, h // factor, factor, w // factor, factor).sum(dim=(-3, -1))


def _chang_detector_shortfall(
    geometry: ScanGeometry, centre_px: np.ndarray, k_det_invA: float, sim_px: int, slack_invA: float
) -> str | None:
    """Where the detector falls short of the Chang simulation grid, in words; None when it reaches it.

    The grid has ``sim_px`` pixels of ``2 k_det / sim_px`` (1/A) with zero frequency at pixel ``sim_px //
    2``: it reaches ``(sim_px // 2 + 1/2)`` pixels below zero and ``(sim_px - sim_px // 2 - 1/2)`` above. The
    detector, zero frequency at (sub-pixel) ``centre_px``, reaches ``centre + 1/2`` and ``n - 1/2 - centre``
    of its pixels (``k_pixel_invA`` per axis). ``slack_invA`` of overhang is allowed at every edge. The
    shortest side (relative to what it needs) is named.
    """
    dk = 2.0 * k_det_invA / sim_px
    needed = ((sim_px // 2 + 0.5) * dk, (sim_px - sim_px // 2 - 0.5) * dk)
    worst: tuple[float, str] | None = None
    for a, axis in enumerate("xy"):
        n, k_pixel = geometry.shape[2 + a], geometry.k_pixel_invA[a]
        available = ((centre_px[a] + 0.5) * k_pixel, (n - 0.5 - centre_px[a]) * k_pixel)
        for side, have, need in zip(("below", "above"), available, needed, strict=True):
            if have + slack_invA >= need * (1 - 1e-9):
                continue
            # the largest k_det this side allows (need and slack scale with k_det)
            reach = max(have, 0.0) * k_det_invA / (need - slack_invA)
            if worst is None or reach < worst[0]:
                where = f"pixel {centre_px[a]:.2f} of {n}, {k_pixel:.4g} 1/A per pixel"
                worst = (
                    reach,
                    f"along {axis} it reaches {reach:.4g} 1/A ({reach / geometry.alpha_invA:.3g} alpha) "
                    f"{side} its centre ({where})",
                )
    return None if worst is None else worst[1]


def chang_reconstruct(
    scan: Any,
    predictor: Predictor,
    *,
    pixels: int = 32,
    bin_factor: int = 2,
    collection_ratio: float = 2.0,
    illuminated_fraction: float = 0.9,
    oversampling: int = 1,
    max_pair_offset: int = 2,
    min_overlap_fraction: float = 0.05,
    crop_to_scan: bool = True,
    detector_centre_px: Any = None,
    batch_size: int = 256,
    block_rows: int | None = None,
    lsqr_tolerance: float = 1e-10,
    consistency: bool = True,
    consistency_counts_per_unit: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stream_factory: Callable[..., _PatternStream] = _PatternStream,
) -> Reconstruction:
    """Chang U-Net reconstruction with offsets solved by sparse least squares (paper 001 eq. 2).

    ``predictor(inputs (B, 1, K, K), positions_A)`` returns phase patches (B, K, K) (rad) on the label grid
    of :class:`datagen.stock_images.ChangForwardModel` (pixel ``1 / (2 k_det)``, centre pixel ``K // 2``).
    The inputs are the training patterns' geometry on any detector: each CBED resampled by area overlap onto
    the simulation grid (``pixels * bin_factor`` pixels over ``+-k_det = +-collection_ratio * alpha``,
    counts inside preserved), rotated onto the scan frame there and binned by ``bin_factor``;
    :class:`DetectorReachError` (a ``ValueError``) names both reaches when the detector ends short of
    ``k_det`` (half an input pixel of overhang allowed).
    Pairs are positions at most ``max_pair_offset`` steps apart along x and y whose illuminated discs share
    at least ``min_overlap_fraction`` of a disc. ``info['offsets_rad']`` holds the solved offsets
    ``(Rx, Ry)`` (``c_0 = 0``), ``info['lsqr_residual']`` the least-squares residual norm.

    ``consistency``: the trust map ``Reconstruction.consistency`` (Rx, Ry): ``|F[P exp(i phi)]|^2`` with
    the training geometry's probe ``P`` and the predicted phase inside the disc (0 outside), binned, against
    the binned pattern the network saw (its counts, before ``sqrt(counts / total)``); see
    :mod:`evaluation.networks.consistency` (``consistency_counts_per_unit`` electrons per unit of the data;
    None: counts). ``info['consistency_median']`` its median.
    ``stream_factory`` makes the pattern stream (the signature of
    :class:`evaluation.networks.geometry._PatternStream`, the default); ``engine=libertem`` passes one over
    patterns its workers resampled (:mod:`evaluation.engines.libertem`).
    """
    from scipy.signal import fftconvolve
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import lsqr

    dev = resolve_device(device)
    geometry = ScanGeometry.from_scan(scan)
    _check_patterns(geometry)
    start_time = time.perf_counter()
    centre = _detector_centre(geometry, detector_centre_px, progress, block_rows)
    k_det, d, mask, probe_sim = _chang_geometry(
        geometry, pixels, bin_factor, collection_ratio, illuminated_fraction
    )
    # the training geometry: patterns simulated on pixels * bin_factor pixels over +-k_det, then binned; the
    # input grid's outermost pixels (the dark rim at collection_ratio x alpha) may overhang the detector by
    # half an input pixel plus half a detector pixel: a detector that ends exactly at 2 alpha is what the
    # training data assume, and its measured centre of mass sits a fraction of a pixel off its middle
    sim_px = int(pixels) * int(bin_factor)
    slack = k_det / pixels + 0.5 * float(min(geometry.k_pixel_invA))
    shortfall = _chang_detector_shortfall(geometry, centre, k_det, sim_px, slack_invA=slack)
    if shortfall is not None:
        raise DetectorReachError(
            f"Chang input needs the detector to reach {k_det:.4g} 1/A from its centre (collection_ratio="
            f"{collection_ratio:g} x alpha, the detector of the training data); {shortfall}: the network "
            f"was trained on patterns to {collection_ratio:g} alpha (chang_unet.collection_ratio)"
        )
    # rotated scans: the corners of the rotated grid come from the detector beyond it (sqrt 2 reach)
    margin = math.ceil(sim_px * (math.sqrt(2.0) - 1.0) / 2.0) + 1
    stream = stream_factory(geometry, sim_px, k_det, centre, dev, margin_px=margin)
    pixel_A = _object_pixel(geometry, oversampling, None, allow_fractional=False)
    os_ = int(oversampling)
    half = _mask_half_width(mask, pixels // 2, d, pixel_A)
    grid = _ObjectGrid(pixel_A, geometry.step_A, half, geometry.positions_shape)
    lx = _linear_evaluation(pixels, pixels // 2 + np.arange(-half[0], half[0] + 1) * pixel_A[0] / d)
    ly = _linear_evaluation(pixels, pixels // 2 + np.arange(-half[1], half[1] + 1) * pixel_A[1] / d)
    footprint = (lx @ mask.astype(np.float64) @ ly.T) > 1 - 1e-6  # object pixels fully inside the disc
    # overlap masks of position pairs (a, b) steps apart: pixels of patch i that patch i + (a, b) covers
    area = footprint.sum()
    shifts: list[tuple[int, int]] = []
    overlaps: list[np.ndarray] = []
    for a in range(-max_pair_offset, max_pair_offset + 1):
        for b in range(-max_pair_offset, max_pair_offset + 1):
            if (a, b) == (0, 0):
                continue
            moved = np.zeros_like(footprint)
            sx, sy = a * os_, b * os_
            nx, ny = footprint.shape
            if abs(sx) >= nx or abs(sy) >= ny:
                continue
            moved[max(sx, 0) : nx + min(sx, 0), max(sy, 0) : ny + min(sy, 0)] = footprint[
                max(-sx, 0) : nx + min(-sx, 0), max(-sy, 0) : ny + min(-sy, 0)
            ]
            common = footprint & moved
            if common.sum() >= max(1, min_overlap_fraction * area):
                shifts.append((a, b))
                overlaps.append(common / common.sum())
    lx_t = torch.as_tensor(lx, dtype=torch.float32, device=dev)
    ly_t = torch.as_tensor(ly.T, dtype=torch.float32, device=dev)
    foot_t = torch.as_tensor(footprint, dtype=torch.float32, device=dev)
    overlap_t = torch.as_tensor(np.stack(overlaps) if overlaps else np.zeros((0, *footprint.shape)),
                                dtype=torch.float32, device=dev)  # fmt: skip
    rx, ry = geometry.positions_shape
    means = np.zeros((rx, ry, len(shifts)), dtype=np.float64)
    accumulator = torch.zeros(grid.shape[0] * grid.shape[1], dtype=torch.float32, device=dev)
    kx, ky = geometry.shape[2:]
    # a block holds the raw detector rows, the half-resampled ones and the simulation-grid patterns
    row_bytes = ry * (kx * ky + sim_px * ky + sim_px * sim_px) * 4
    rows_per_block = block_rows or max(1, int(2**27 // row_bytes))
    count = 0
    trust = ConsistencyMap((rx, ry), dev, consistency_counts_per_unit) if consistency else None
    probe_t = torch.as_tensor(probe_sim, dtype=torch.complex64, device=dev)
    mask_t = torch.as_tensor(mask, dtype=torch.bool, device=dev)
    bar = _inference_bar(geometry, progress, "Chang U-Net")
    for e, c, kernels in stream.kernels(rows_per_block, False, "Chang U-Net", neighbours=False):
        for part in _batches(len(e), batch_size):
            counts = _bin_patterns(kernels[part, 0], int(bin_factor))  # (B, K, K), the training binning
            total = counts.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]
            inputs = torch.sqrt(counts.clamp_min(0) / total)[:, None]
            positions = np.stack([e[part] * geometry.step_A[0], c[part] * geometry.step_A[1]], -1)
            phase = (
                predictor(inputs, torch.as_tensor(positions, device=dev)).float().reshape(-1, pixels, pixels)
            )
            if trust is not None:  # the binned input counts against |F[P exp(i phi)]|^2, binned
                trust.add(
                    e[part], c[part], counts, _chang_exit_intensity(probe_t, phase, mask_t, int(bin_factor))
                )
            patch = lx_t @ phase @ ly_t  # (B, Ox, Oy)
            means[e[part], c[part]] = torch.einsum("bxy,sxy->bs", patch, overlap_t).double().cpu().numpy()
            mx, my, _ = grid.placement(e[part], c[part])
            index = grid.flat_indices(mx, my, dev).reshape(-1)
            accumulator.index_add_(0, index, (patch * foot_t).reshape(-1))
            count += len(mx)
            bar.update(len(mx))
    bar.close()
    # least squares: (m_i[d] + c_i) - (m_j[-d] + c_j) = 0 for j = i + d, c_0 fixed at 0
    index_of = {s: n for n, s in enumerate(shifts)}
    rows, cols, values, rhs = [], [], [], []
    num_rows = 0
    ee, cc = np.meshgrid(np.arange(rx), np.arange(ry), indexing="ij")
    for (a, b), n in index_of.items():
        if (a, b) < (0, 0):
            continue  # each unordered pair once
        valid = (ee + a < rx) & (cc + b < ry) & (ee + a >= 0) & (cc + b >= 0)
        i = (ee * ry + cc)[valid]
        j = ((ee + a) * ry + cc + b)[valid]
        back = index_of[(-a, -b)]
        r = num_rows + np.arange(i.size)
        num_rows += i.size
        rows += [r, r]
        cols += [i, j]
        values += [np.ones(i.size), -np.ones(i.size)]
        rhs.append(means[ee[valid] + a, cc[valid] + b, back] - means[ee[valid], cc[valid], n])
    n_pos = rx * ry
    offsets = np.zeros(n_pos)
    residual = 0.0
    if rhs:
        rows_a, cols_a, vals_a, b_vec = (np.concatenate(x) for x in (rows, cols, values, rhs))
        keep = cols_a != 0  # c_0 = 0: drop its column
        matrix = coo_matrix(
            (vals_a[keep], (rows_a[keep], cols_a[keep] - 1)), shape=(b_vec.size, n_pos - 1)
        ).tocsr()
        solution = lsqr(matrix, b_vec, atol=lsqr_tolerance, btol=lsqr_tolerance, iter_lim=20 * n_pos + 100)
        offsets[1:] = solution[0]
        residual = float(solution[3])
    offsets = offsets.reshape(rx, ry)
    # image = (sum_n mask_n P_n + sum_n mask_n c_n) / sum_n mask_n, the last two as convolutions
    stuffed = np.zeros((grid.last_pixel[0] + 1, grid.last_pixel[1] + 1))
    ones = np.zeros_like(stuffed)
    mx_all, my_all, _ = grid.placement(ee.ravel(), cc.ravel())
    stuffed[mx_all, my_all] = offsets.ravel()
    ones[mx_all, my_all] = 1.0
    kernel = footprint.astype(np.float64)
    offset_sum = np.zeros(grid.shape)
    weight = np.zeros(grid.shape)
    full = (stuffed.shape[0] + kernel.shape[0] - 1, stuffed.shape[1] + kernel.shape[1] - 1)
    offset_sum[: full[0], : full[1]] = fftconvolve(stuffed, kernel, mode="full")
    weight[: full[0], : full[1]] = np.rint(fftconvolve(ones, kernel, mode="full"))
    summed = accumulator.reshape(grid.shape).double().cpu().numpy() + offset_sum
    image = np.divide(summed, weight, out=np.zeros_like(summed), where=weight > 0.5)
    elapsed = time.perf_counter() - start_time
    cropped, origin = grid.crop(image.astype(np.float32), crop_to_scan)
    covered, _ = grid.crop(weight, crop_to_scan)
    if np.any(covered > 0.5):
        cropped = np.where(covered > 0.5, cropped - cropped[covered > 0.5].mean(), 0.0).astype(np.float32)
    trust_map, extra = map_and_summary(trust)
    return Reconstruction(
        phase=cropped,
        pixel_size_A=pixel_A,
        origin_A=origin,
        method="chang_unet",
        info={
            "offsets_rad": offsets,
            "lsqr_residual": residual,
            "pairs": int(num_rows),
            "k_detector_invA": float(k_det),
            "network_pixels": int(pixels),
            "bin_factor": int(bin_factor),
            "collection_ratio": float(collection_ratio),
            "oversampling": os_,
            "detector_centre_px": centre.tolist(),
            "patterns_per_s": count / max(elapsed, 1e-9),
            **extra,
        },
        consistency=trust_map,
    )
