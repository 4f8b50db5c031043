"""Electron optics shared by every part of deepstem (see ``physics.optics`` for the conventions)."""

from physics.fourier import fourier_shift, phase_ramp
from physics.optics import (
    aberration_phase,
    aperture,
    fresnel_propagator,
    interaction_parameter,
    probe,
    probe_diameter_A,
    rayleigh_radius_A,
    scherzer_defocus,
    wavelength,
)
from physics.poa import transmission_function
from physics.sampling import Grid, fft_friendly_size, polar_frequencies, spatial_frequencies

__all__ = [
    "Grid",
    "aberration_phase",
    "aperture",
    "fft_friendly_size",
    "fourier_shift",
    "fresnel_propagator",
    "interaction_parameter",
    "phase_ramp",
    "polar_frequencies",
    "probe",
    "probe_diameter_A",
    "rayleigh_radius_A",
    "scherzer_defocus",
    "spatial_frequencies",
    "transmission_function",
    "wavelength",
]
