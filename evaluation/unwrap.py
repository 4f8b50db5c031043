"""Phase unwrapping of reconstructed phase images (the one place this lives).

Reconstructions that stitch complex waves (AIRPI, PtychoNN, ePIE) return ``angle(T)``, which wraps into
``(-pi, pi]``. Heavy columns of a thick crystal carry more than ``pi`` (SrTiO3 [001] at 23 A: up to 6 rad of
projected phase), so the wrapped image has columns that jump to ``-pi`` and read as holes; every score against
the truth (xc, FRC) then measures the wrap, not the method. Direct methods (SSB, iCOM) return linear phase
estimates and never wrap.

:func:`unwrap_phase_image` removes the wraps with the reliability-sorting unwrapper of Herraez et al.
(Appl. Opt. 41, 7437 (2002); ``skimage.restoration.unwrap_phase``). Convention: the result differs from the
input by integer multiples of ``2 pi`` pixel by pixel, and the common ``2 pi`` offset is chosen so that the
median of the valid pixels stays in ``(-pi, pi]`` (the background, most of a field, keeps its value).
An image without any wrap (no neighbour difference above ``pi``) is returned unchanged.
"""

from __future__ import annotations

import numpy as np

__all__ = ["count_wraps", "unwrap_phase_image"]


def count_wraps(phase: np.ndarray, valid: np.ndarray | None = None) -> int:
    """Number of neighbouring pixel pairs (both valid) whose phase differs by more than ``pi``."""
    p = np.asarray(phase, dtype=np.float64)
    ok = np.ones(p.shape, bool) if valid is None else np.asarray(valid, bool)
    jumps = 0
    for axis in range(p.ndim):
        both = np.logical_and(
            np.take(ok, range(1, p.shape[axis]), axis), np.take(ok, range(p.shape[axis] - 1), axis)
        )
        jumps += int(np.count_nonzero((np.abs(np.diff(p, axis=axis)) > np.pi) & both))
    return jumps


def unwrap_phase_image(phase: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``(unwrapped phase, number of wraps removed)`` of a 2D phase image in rad.

    ``valid`` (bool, same shape) marks the pixels that carry a phase (e.g. the illuminated field); the others
    keep their input value and do not steer the unwrapping. The result has ``phase``'s dtype.
    """
    p = np.asarray(phase)
    if p.ndim != 2:
        raise ValueError(f"unwrap_phase_image: expected a 2D phase image, got shape {p.shape}")
    ok = np.ones(p.shape, bool) if valid is None else np.asarray(valid, bool)
    if ok.shape != p.shape:
        raise ValueError(f"unwrap_phase_image: valid has shape {ok.shape}, phase {p.shape}")
    wraps = count_wraps(p, ok)
    if wraps == 0 or ok.sum() < 2:
        return p.copy(), 0
    from skimage.restoration import unwrap_phase

    wrapped = np.angle(np.exp(1j * p.astype(np.float64)))  # into (-pi, pi], as the unwrapper expects
    unwrapped = unwrap_phase(np.ma.masked_array(wrapped, mask=~ok))
    values = np.ma.getdata(unwrapped).astype(np.float64)
    # the unwrapper fixes the solution up to 2 pi n: keep the median of the valid pixels where it was
    offset = 2 * np.pi * np.round((np.median(values[ok]) - np.median(wrapped[ok])) / (2 * np.pi))
    out = np.where(ok, values - offset, p)
    return out.astype(p.dtype, copy=False), wraps
