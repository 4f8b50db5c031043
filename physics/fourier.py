"""Sub-pixel shifts by Fourier phase ramps, for NumPy arrays and torch tensors alike.

A shift of ``(sx, sy)`` pixels moves content towards higher indices along the last two axes
(``result[x + sx, y + sy] = array[x, y]``) with periodic wrap-around. Integer shifts equal
``numpy.roll``; fractional shifts are band-limited (exact for band-limited content).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["fourier_shift", "phase_ramp"]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def phase_ramp(gpts: Sequence[int], shift_px: Any) -> Any:
    """``exp(-2 pi i (fx sx + fy sy))`` in FFT order, shape ``(..., Nx, Ny)`` for shifts ``(..., 2)``.

    Multiplying a spectrum (FFT order) by it shifts the real-space content by ``shift_px`` pixels.
    ``shift_px`` may be a NumPy array or a torch tensor; the result follows its type and device.
    """
    nx, ny = (int(n) for n in gpts)
    if _is_torch(shift_px):
        import torch

        shift = shift_px.to(torch.float64) if shift_px.dtype != torch.float32 else shift_px
        fx = torch.fft.fftfreq(nx, device=shift.device, dtype=shift.dtype)
        fy = torch.fft.fftfreq(ny, device=shift.device, dtype=shift.dtype)
        arg = fx[:, None] * shift[..., 0, None, None] + fy[None, :] * shift[..., 1, None, None]
        return torch.polar(torch.ones_like(arg), -2.0 * torch.pi * arg)
    shift = np.asarray(shift_px, dtype=np.float64)
    if shift.shape[-1:] != (2,):
        raise ValueError(f"shift_px must have a last axis of length 2 (x, y), got shape {shift.shape}")
    fx = np.fft.fftfreq(nx)
    fy = np.fft.fftfreq(ny)
    arg = fx[:, None] * shift[..., 0, None, None] + fy[None, :] * shift[..., 1, None, None]
    return np.exp(-2j * np.pi * arg)


def fourier_shift(array: Any, shift_px: Any) -> Any:
    """Shift the last two axes of ``array`` by ``shift_px`` = ``(sx, sy)`` pixels (or ``(..., 2)``).

    Real input gives real output of the same dtype; complex input stays complex.
    """
    if _is_torch(array):
        import torch

        shift = torch.as_tensor(shift_px, device=array.device)
        real_dtype = torch.float32 if array.dtype in (torch.float32, torch.complex64) else torch.float64
        ramp = phase_ramp(array.shape[-2:], shift.to(real_dtype))
        shifted = torch.fft.ifft2(torch.fft.fft2(array) * ramp)
        return shifted if array.is_complex() else shifted.real.to(array.dtype)
    arr = np.asarray(array)
    ramp = phase_ramp(arr.shape[-2:], shift_px)
    shifted = np.fft.ifft2(np.fft.fft2(arr) * ramp)
    if np.iscomplexobj(arr):
        return shifted.astype(np.result_type(arr.dtype, np.complex64))
    return shifted.real.astype(arr.dtype if arr.dtype.kind == "f" else np.float64)
