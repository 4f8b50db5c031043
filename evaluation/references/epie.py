"""Extended ptychographical iterative engine (ePIE, Maiden & Rodenburg 2009) with probe update.

For each probe position (random order each iteration): exit wave ``psi = P O_n``; its Fourier modulus is
replaced by the measured ``sqrt(I)``; then ``O_n += alpha conj(P) (psi' - psi) / max |P|^2`` and
``P += beta conj(O_n) (psi' - psi) / max |O_n|^2`` (``O_n`` before its update). The Fourier error of an
iteration is ``sum_n sum_k (|Psi_n| - sqrt(I_n))^2 / sum_n sum_k I_n``, accumulated as the positions are
visited.

Robust defaults: the paper's unit steps with the probe updated from the start diverge on noisy data (a
few hundred to a thousand electrons per pattern: the probe absorbs the noise, the error grows without
bound). The defaults are an object step ``alpha = 0.3``, a probe step ``beta = 0.02`` and probe
updates from iteration 5 on, starting from the probe of the calibration (energy, semi-angle, defocus,
Cs). The Fourier error is watched: the iterate with the lowest error is returned, and when the error
rises above ``(1 + divergence_tolerance)`` times the lowest so far the run warns (naming the iteration
at which the error started to rise) and, with ``stop_on_divergence``, stops.

Geometry: the object pixel is the real-space pixel of the detector, ``1 / (K k_pixel_invA)``; patterns are
put on the scan frame (transpose, rotation) and centred (integer shift of the bright-field disc to pixel
``K // 2``, the zero frequency of the probe grid) before the iterations; sub-pixel scan positions are
handled by Fourier-shifting the probe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import trange

from evaluation.references._common import (
    Reconstruction,
    check_scan_array,
    iter_scan_rows,
    mean_pattern,
    memory_limit_bytes,
    pair,
    pattern_centre,
)
from evaluation.unwrap import unwrap_phase_image
from physics import fourier_shift, probe

__all__ = ["epie"]


def _prepare_block(
    block: np.ndarray, shift: np.ndarray, scan_rotation_deg: float, transpose: bool
) -> np.ndarray:
    """Measured Fourier amplitudes ``sqrt(I)`` of a block of patterns in FFT order on the scan frame,
    float32 ``(rows, Ry, Kx, Ky)``: centring shift, transpose, rotation."""
    block = np.roll(block, tuple(shift), axis=(2, 3))
    if transpose:
        block = np.swapaxes(block, 2, 3)
    if scan_rotation_deg:
        from scipy import ndimage

        block = np.clip(
            ndimage.rotate(block, scan_rotation_deg, axes=(2, 3), reshape=False, order=1), 0, None
        )
    return np.sqrt(np.fft.ifftshift(block, axes=(2, 3))).astype(np.float32, copy=False)


def _block_rows(shape: Sequence[int], block_rows: int | None, memory_limit_GB: float | None) -> int:
    """Scan rows per block: ``block_rows`` if given; else the whole scan when its float32 amplitudes fit in
    half of ``memory_limit_GB`` (None: of the memory available now), otherwise blocks of ~64 MB (at most a
    quarter of the limit)."""
    rx, ry, kx, ky = (int(n) for n in shape)
    if block_rows is not None:
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise ValueError(f"epie: block_rows must be a positive integer or null, got {block_rows!r}")
        return min(int(block_rows), rx)
    limit, _ = memory_limit_bytes(memory_limit_GB, "epie")
    if limit is None or 4.0 * rx * ry * kx * ky <= 0.5 * limit:
        return rx
    block_bytes = min(2.0**26, 0.25 * limit)  # ~64 MB, less when the limit is tight
    return max(1, min(rx, int(block_bytes // (4 * ry * kx * ky))))


def _visit(
    blocks: list[slice],
    whole: np.ndarray | None,
    prepared: Callable[[slice], np.ndarray],
    ry: int,
    rng: np.random.Generator,
) -> Iterator[tuple[int, np.ndarray]]:
    """One iteration's ``(position index, measured amplitudes)``: all positions in random order from the
    patterns in memory (``whole``), or block by block (blocks in random order, then their positions),
    each block read and prepared by ``prepared(rows)``."""
    if whole is not None:
        flat = whole.reshape(-1, *whole.shape[2:])
        for n in rng.permutation(flat.shape[0]):
            yield int(n), flat[n]
        return
    for b in rng.permutation(len(blocks)):
        rows = blocks[b]
        block = prepared(rows)
        flat = block.reshape(-1, *block.shape[2:])
        offset = rows.start * ry
        for local in rng.permutation(flat.shape[0]):
            yield offset + int(local), flat[local]


def epie(
    data: Any,
    energy_eV: float,
    semiangle_mrad: float,
    scan_step_A: float | Sequence[float],
    k_pixel_invA: float | Sequence[float],
    iterations: int = 30,
    alpha: float = 0.3,
    beta: float = 0.02,
    probe_update_start: int = 5,
    scan_rotation_deg: float = 0.0,
    transpose: bool = False,
    defocus_A: float = 0.0,
    Cs_A: float = 0.0,
    aberrations: dict[str, float] | None = None,
    initial_probe: np.ndarray | None = None,
    seed: int = 0,
    divergence_tolerance: float = 0.1,
    stop_on_divergence: bool = True,
    unwrap_phase: bool = True,
    block_rows: int | None = None,
    memory_limit_GB: float | None = None,
    progress: bool = True,
) -> Reconstruction:
    """ePIE reconstruction; returns the object phase (rad) and amplitude over the scanned field.

    Parameters
    ----------
    iterations, alpha, beta
        Number of passes over all positions and the object / probe step sizes (1 and 1 in the paper;
        the defaults 0.3 and 0.02 are the robust ones, see the module docstring).
    probe_update_start
        First iteration (0-based) in which the probe is updated; before it only the object is.
    divergence_tolerance, stop_on_divergence
        The run counts as diverging when an iteration's Fourier error exceeds the lowest one so far by
        more than this fraction: it emits a ``RuntimeWarning`` and, with ``stop_on_divergence``, stops.
    defocus_A, Cs_A, aberrations, initial_probe
        Initial probe: ``initial_probe`` (real space, complex, ``(Kx, Ky)``, centred) if given, otherwise
        :func:`physics.probe` with these aberrations; it is scaled to the mean pattern intensity.
    block_rows, memory_limit_GB
        Memory: with ``block_rows=None`` the prepared patterns (float32 amplitudes, ``4 Rx Ry Kx Ky`` bytes)
        are held in memory when they fit in half of ``memory_limit_GB`` (None: of the memory available
        now); otherwise, or with ``block_rows`` given, the scan is streamed from ``data`` (an HDF5 dataset
        or memmap stays on disk) in blocks of that many scan rows (by default ~64 MB, at most a quarter of
        the limit), read and prepared again in every iteration. Each iteration then visits the blocks in
        random order and the positions of a block in random order (one block: a random order of all
        positions, as in the paper); memory is one block plus the object and probe.

    The result is on the object grid (pixel ``1 / (K k_pixel)``), cropped to the scanned field, pixel
    (0, 0) at the first probe position (``origin_A = (0, 0)``); the phase has the phase of the mean
    transmission removed and is unwrapped where it passes ``+-pi`` (``unwrap_phase``,
    :mod:`evaluation.unwrap`; ``info['phase_wraps_removed']``). The returned iterate is the object and probe
    after the iteration with the lowest Fourier error (an iteration's error is accumulated during its pass
    over the positions), so
    ``epie(..., iterations=info["best_iteration"] + 1)`` gives the same result. ``info`` holds
    ``fourier_error`` (the error of every iteration run), ``best_iteration`` (0-based index of the lowest
    error), ``diverged`` (bool), ``divergence_iteration`` (where the error started to rise: the iteration
    after the best one when the rise was first seen, or -1) and ``probe`` (the probe of the returned iterate).
    """
    if not divergence_tolerance >= 0:
        raise ValueError(f"epie: divergence_tolerance must be >= 0, got {divergence_tolerance!r}")
    rx, ry, kx, ky = check_scan_array(data)
    step = pair(scan_step_A, "scan_step_A")
    k_pixel = pair(k_pixel_invA, "k_pixel_invA")
    pixel_A = (1.0 / (kx * k_pixel[0]), 1.0 / (ky * k_pixel[1]))
    if transpose and kx != ky:
        raise ValueError("epie: a transposed detector needs square patterns")
    rows_per_block = _block_rows(data.shape, block_rows, memory_limit_GB)
    centre = pattern_centre(mean_pattern(data, progress=progress, rows_per_chunk=rows_per_block))
    shift = np.rint(np.array([kx // 2, ky // 2]) - centre).astype(int)

    def prepared(rows: slice) -> np.ndarray:
        return _prepare_block(np.asarray(data[rows], dtype=np.float32), shift, scan_rotation_deg, transpose)

    blocks = [slice(start, min(rx, start + rows_per_block)) for start in range(0, rx, rows_per_block)]
    whole = np.empty((rx, ry, kx, ky), dtype=np.float32) if len(blocks) == 1 else None
    intensity_total = 0.0  # of the prepared patterns (a rotation clips and interpolates)
    for rows, block in iter_scan_rows(data, rows_per_block, desc="ePIE read", progress=progress):
        amplitudes = _prepare_block(block, shift, scan_rotation_deg, transpose)
        intensity_total += float(np.sum(amplitudes.astype(np.float64) ** 2))
        if whole is not None:
            whole[rows] = amplitudes
    if not intensity_total > 0:
        raise ValueError("epie: the patterns hold no counts")
    mean_counts = intensity_total / (rx * ry)
    if initial_probe is None:
        p = probe(
            energy_eV,
            semiangle_mrad,
            (kx, ky),
            sampling_A=pixel_A,
            defocus_A=defocus_A,
            Cs_A=Cs_A,
            aberrations=aberrations,
            dtype=np.complex128,
        )
    else:
        p = np.asarray(initial_probe, dtype=np.complex128)
        if p.shape != (kx, ky):
            raise ValueError(f"epie: initial_probe has shape {p.shape}, patterns are {(kx, ky)}")
    p = p * np.sqrt(mean_counts / np.sum(np.abs(p) ** 2))  # orthonormal FFT: sum |Psi|^2 = sum |psi|^2
    positions_px = np.stack(
        np.meshgrid(
            np.arange(rx) * step[0] / pixel_A[0], np.arange(ry) * step[1] / pixel_A[1], indexing="ij"
        ),
        axis=-1,
    ).reshape(-1, 2)
    corner = np.rint(positions_px).astype(int)
    fraction = positions_px - corner  # in [-0.5, 0.5]
    subpixel = bool(np.any(np.abs(fraction) > 1e-3))
    pad = 1
    size = (corner[:, 0].max() + kx + 2 * pad, corner[:, 1].max() + ky + 2 * pad)
    obj = np.ones(size, dtype=np.complex128)
    rng = np.random.default_rng(seed)
    errors: list[float] = []
    best = (np.inf, -1, obj.copy(), p.copy())  # (error, iteration, object and probe after it)
    diverged, divergence_iteration = False, -1
    for iteration in trange(iterations, desc="ePIE", disable=not progress, leave=False):
        error = 0.0
        update_probe = iteration >= probe_update_start and beta > 0
        for n, measured in _visit(blocks, whole, prepared, ry, rng):
            x0, y0 = corner[n] + pad
            view = (slice(x0, x0 + kx), slice(y0, y0 + ky))
            p_n = fourier_shift(p, fraction[n]) if subpixel else p
            o_n = obj[view].copy()
            exit_wave = p_n * o_n
            spectrum = np.fft.fft2(exit_wave, norm="ortho")
            modulus = np.abs(spectrum)
            error += float(np.sum((modulus - measured) ** 2))
            corrected = measured * np.exp(1j * np.angle(spectrum))
            difference = np.fft.ifft2(corrected, norm="ortho") - exit_wave
            obj[view] = o_n + alpha * np.conj(p_n) * difference / np.max(np.abs(p_n) ** 2)
            if update_probe:
                step_p = beta * np.conj(o_n) * difference / np.max(np.abs(o_n) ** 2)
                p = p + (fourier_shift(step_p, -fraction[n]) if subpixel else step_p)
        errors.append(error / intensity_total)
        if not np.isfinite(errors[-1]) or errors[-1] > (1.0 + divergence_tolerance) * best[0]:
            if not diverged:  # the error started to rise after the best iteration so far
                diverged, divergence_iteration = True, best[1] + 1
            if stop_on_divergence:
                break
        elif errors[-1] < best[0]:
            best = (errors[-1], iteration, obj.copy(), p.copy())
    best_iteration, obj, p = best[1], best[2], best[3]  # iteration -1: the start (no finite error)
    if diverged:
        curve = ", ".join(f"{e:.3g}" for e in errors)
        warnings.warn(
            f"epie: the Fourier error started to rise at iteration {divergence_iteration} (lowest "
            f"{best[0]:.3g} after iteration {best_iteration}; errors by iteration {curve})"
            + ("; stopped" if stop_on_divergence else "")
            + f"; returning iteration {best_iteration}. Lower alpha / beta or raise probe_update_start.",
            RuntimeWarning,
            stacklevel=2,
        )
    # the scanned field: pixel (0, 0) at the first probe position, i.e. the window centre of corner 0
    x_start, y_start = pad + kx // 2, pad + ky // 2
    field = obj[
        x_start : x_start + int(np.ceil(positions_px[:, 0].max())) + 1,
        y_start : y_start + int(np.ceil(positions_px[:, 1].max())) + 1,
    ]
    mean_transmission = field.mean()
    field = field * np.exp(-1j * np.angle(mean_transmission))
    phase = np.angle(field).astype(np.float32)
    phase, wraps = unwrap_phase_image(phase) if unwrap_phase else (phase, 0)
    return Reconstruction(
        phase=phase,
        amplitude=np.abs(field).astype(np.float32),
        pixel_size_A=pixel_A,
        origin_A=(0.0, 0.0),
        method="epie",
        info={
            "fourier_error": errors,
            "probe": p.astype(np.complex64),
            "iterations": int(iterations),
            "iterations_run": len(errors),
            "best_iteration": int(best_iteration),
            "diverged": bool(diverged),
            "phase_wraps_removed": int(wraps),
            "divergence_iteration": int(divergence_iteration),
            "block_rows": int(rows_per_block),
        },
    )
