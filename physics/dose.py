"""The dose model: expected electron counts of noise-free patterns (the one place this physics lives).

Convention: a pattern ``I`` is the *fraction of the incident electrons* per detector pixel (what every
deepstem simulator writes: ``sum(I) <= 1``, less where electrons scatter outside the detector). With
``D`` incident electrons per probe position (dose per area times the area per position, ``d * s_x * s_y``
for scan steps ``s``), the counts are ``Poisson(D * I)``: the mean total is ``D * sum(I)``, not ``D``,
and the per-position variation of the in-detector total is kept. Works on NumPy arrays and torch
tensors alike (broadcasting: give ``D`` the shape ``(..., 1, 1)`` for one dose per pattern).
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = ["dose_per_position", "expected_counts"]

ArrayT = TypeVar("ArrayT")


def expected_counts(intensity: ArrayT, electrons: Any) -> ArrayT:
    """Poisson rate ``D * I`` per pixel: ``intensity`` (fraction of incident electrons per pixel, negative
    values clipped to 0), ``electrons`` ``D`` incident electrons per position (scalar or broadcastable).

    The result has ``intensity``'s type (NumPy array or torch tensor) and dtype.
    """
    return intensity.clip(min=0) * electrons  # type: ignore[attr-defined]


def dose_per_position(dose_e_per_A2: float, step_A: tuple[float, float] | float) -> float:
    """Incident electrons per probe position ``D = d * s_x * s_y`` for a dose ``d`` (e/A^2) and steps (A)."""
    steps = (step_A, step_A) if isinstance(step_A, (int, float)) else tuple(step_A)
    return float(dose_e_per_A2) * float(steps[0]) * float(steps[1])
