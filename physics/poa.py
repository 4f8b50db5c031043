"""Phase-object approximation (POA): ``T(r) = exp(i sigma v_z(r))`` and ``psi_out = psi_in * T``."""

from __future__ import annotations

import numpy as np

from physics.optics import interaction_parameter

__all__ = ["transmission_function"]


def transmission_function(projected_potential_VA: np.ndarray, energy_eV: float) -> np.ndarray:
    """Transmission function ``exp(i sigma v_z)`` of a projected potential ``v_z`` in V Angstrom."""
    v_z = np.asarray(projected_potential_VA)
    if not np.all(np.isfinite(v_z)):
        raise ValueError("transmission_function: projected potential contains NaN or inf")
    phase = interaction_parameter(energy_eV) * v_z
    return np.exp(1j * phase).astype(np.complex64 if v_z.dtype == np.float32 else np.complex128)
