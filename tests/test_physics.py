"""Physics core against the check values of REFERENCE.md section 1, abTEM 1.0.11 and analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from physics import (
    Grid,
    aberration_phase,
    fft_friendly_size,
    fourier_shift,
    fresnel_propagator,
    interaction_parameter,
    probe,
    probe_diameter_A,
    rayleigh_radius_A,
    scherzer_defocus,
    transmission_function,
    wavelength,
)


def assert_matches_quoted(value: float, quoted: str) -> None:
    """``value`` agrees with a published number to 1e-5 relative, or to the digits it was quoted with.

    Check values quoted with five significant digits (1.5433e-3) carry a rounding error of up to
    3e-5 relative; for those the test demands that ``value`` rounds to the quoted digits.
    """
    ref = float(quoted)
    mantissa = quoted.lower().split("e")[0]
    exponent = int(quoted.lower().split("e")[1]) if "e" in quoted.lower() else 0
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    half_last_digit = 0.5 * 10.0 ** (exponent - decimals)
    tolerance = max(1e-5 * abs(ref), half_last_digit * (1 + 1e-9))
    assert abs(value - ref) <= tolerance, f"{value} vs quoted {quoted} (tolerance {tolerance:.3g})"


ENERGIES_eV = [30e3, 80e3, 200e3, 300e3]


@pytest.mark.parametrize(
    "energy_eV, quoted", zip(ENERGIES_eV, ["0.069791", "0.041757", "0.025079", "0.019687"], strict=True)
)
def test_wavelength_check_values(energy_eV, quoted):
    assert_matches_quoted(wavelength(energy_eV), quoted)


@pytest.mark.parametrize(
    "energy_eV, quoted",
    zip(ENERGIES_eV, ["1.5433e-3", "1.0087e-3", "7.2884e-4", "6.5262e-4"], strict=True),
)
def test_interaction_parameter_check_values(energy_eV, quoted):
    assert_matches_quoted(interaction_parameter(energy_eV), quoted)


@pytest.mark.parametrize(
    "energy_eV, quoted", zip(ENERGIES_eV, ["32.355", "25.027", "19.396", "17.185"], strict=True)
)
def test_scherzer_defocus_check_values(energy_eV, quoted):
    assert_matches_quoted(scherzer_defocus(1e4, energy_eV), quoted)


def test_wavelength_and_sigma_agree_with_abtem():
    from abtem.core.energy import energy2sigma, energy2wavelength

    for energy in [30e3, 60e3, 120e3, 300e3]:
        assert wavelength(energy) == pytest.approx(energy2wavelength(energy), rel=1e-7)
        assert interaction_parameter(energy) == pytest.approx(energy2sigma(energy), rel=1e-7)


def test_non_relativistic_limit():
    # at 1 eV the relativistic correction is ~1e-6: lambda = h / sqrt(2 m e E) = 12.2643 A
    assert wavelength(1.0) == pytest.approx(12.264259, rel=1e-5)


@pytest.mark.parametrize("bad", [0.0, -200e3, float("nan")])
def test_bad_energy_is_rejected(bad):
    with pytest.raises(ValueError, match="energy_eV"):
        wavelength(bad)


def test_aberration_function_matches_closed_form_for_defocus_and_cs():
    energy, Cs, df = 200e3, 1.2e4, 45.0
    lam = wavelength(energy)
    k = np.linspace(0, 1.2, 50)
    chi = aberration_phase(k, np.zeros_like(k), energy, {"C10": -df, "C30": Cs})
    expected = np.pi * lam * k**2 * (0.5 * Cs * lam**2 * k**2 - df)
    np.testing.assert_allclose(chi, expected, rtol=1e-12, atol=1e-12)


def test_aberration_angles_rotate_the_pattern():
    # A two-fold astigmatism with angle phi12 is the phi12 = 0 case rotated by phi12.
    energy, k = 300e3, np.full(8, 0.5)
    phi = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    rotated = aberration_phase(k, phi, energy, {"C12": 30.0, "phi12": 0.4})
    reference = aberration_phase(k, phi - 0.4, energy, {"C12": 30.0})
    np.testing.assert_allclose(rotated, reference, atol=1e-12)
    # and three-fold astigmatism has period 2 pi / 3 in azimuth
    c23 = aberration_phase(k, phi, energy, {"C23": 500.0, "phi23": 0.1})
    np.testing.assert_allclose(
        c23, aberration_phase(k, phi + 2 * np.pi / 3, energy, {"C23": 500.0, "phi23": 0.1}), atol=1e-9
    )


def test_unknown_aberration_name_is_one_clear_error():
    with pytest.raises(ValueError, match="C13"):
        aberration_phase(np.ones(2), np.zeros(2), 80e3, {"C13": 1.0})
    with pytest.raises(ValueError, match="no angle"):
        aberration_phase(np.ones(2), np.zeros(2), 80e3, {"phi30": 1.0})


def _abtem_probe_intensity(energy, semiangle, gpts, sampling, defocus, Cs, soft, aberrations=None):
    import abtem

    parameters = dict(aberrations or {})
    parameters.update({"C10": -float(defocus), "C30": float(Cs)})
    wave = abtem.Probe(
        energy=float(energy),
        semiangle_cutoff=float(semiangle),
        gpts=gpts,
        sampling=float(sampling),
        soft=soft,
        aberrations=parameters,
    ).build(lazy=False)
    intensity = np.abs(wave.array) ** 2
    return intensity / intensity.sum()


ABTEM_CASES = [
    # energy eV, semiangle mrad, N, pixel A, defocus A, Cs A, soft aperture
    (30e3, 25.0, 96, 0.12, 0.0, 0.0, False),
    (80e3, 20.0, 128, 0.08, scherzer_defocus(1e4, 80e3), 1e4, False),
    (200e3, 10.0, 128, 0.1, 80.0, 1e4, True),
    (300e3, 30.0, 64, 0.05, -40.0, 0.0, True),
    (300e3, 17.1, 128, 0.07, 150.0, 2e4, False),
]


@pytest.mark.parametrize("energy, semiangle, n, pixel, defocus, Cs, soft", ABTEM_CASES)
def test_probe_intensity_agrees_with_abtem(energy, semiangle, n, pixel, defocus, Cs, soft):
    ours = probe(energy, semiangle, n, sampling_A=pixel, defocus_A=defocus, Cs_A=Cs, soft_aperture=soft)
    ours_intensity = np.abs(ours) ** 2
    theirs = _abtem_probe_intensity(energy, semiangle, n, pixel, defocus, Cs, soft)
    assert ours.shape == theirs.shape == (n, n)
    assert np.abs(ours_intensity - theirs).max() <= 1e-3 * theirs.max()


def test_probe_with_higher_order_aberrations_agrees_with_abtem():
    aberrations = {"C12": 25.0, "phi12": 0.7, "C21": 400.0, "phi21": -1.1, "C23": 300.0, "phi23": 0.3}
    energy, semiangle, n, pixel = 200e3, 20.0, 128, 0.06
    ours = np.abs(probe(energy, semiangle, n, sampling_A=pixel, defocus_A=30.0, aberrations=aberrations)) ** 2
    theirs = _abtem_probe_intensity(energy, semiangle, n, pixel, 30.0, 0.0, False, aberrations)
    assert np.abs(ours - theirs).max() <= 1e-3 * theirs.max()
    # the aberrations matter: without them the agreement is lost
    plain = np.abs(probe(energy, semiangle, n, sampling_A=pixel, defocus_A=30.0)) ** 2
    assert np.abs(plain - theirs).max() > 0.05 * theirs.max()


def test_probe_from_gmax_is_the_same_probe_as_from_pixel_size():
    gmax = 2.5
    from_gmax = probe(80e3, 20.0, 64, gmax_invA=gmax, Cs_A=1e4, defocus_A=25.0)
    from_pixel = probe(80e3, 20.0, 64, sampling_A=1 / (2 * gmax), Cs_A=1e4, defocus_A=25.0)
    np.testing.assert_array_equal(from_gmax, from_pixel)
    theirs = _abtem_probe_intensity(80e3, 20.0, 64, 1 / (2 * gmax), 25.0, 1e4, False)
    assert np.abs(np.abs(from_gmax) ** 2 - theirs).max() <= 1e-3 * theirs.max()


def test_probe_is_normalised_in_both_spaces_and_reciprocal_is_the_aperture():
    energy, semiangle, n, pixel = 200e3, 15.0, 128, 0.1
    real = probe(energy, semiangle, n, sampling_A=pixel, Cs_A=5e4, defocus_A=60.0)
    recip = probe(energy, semiangle, n, sampling_A=pixel, Cs_A=5e4, defocus_A=60.0, space="reciprocal")
    assert np.sum(np.abs(real) ** 2) == pytest.approx(1.0, rel=1e-5)
    assert np.sum(np.abs(recip) ** 2) == pytest.approx(1.0, rel=1e-5)
    # hard aperture: uniform modulus inside the disc, zero outside, centred on pixel n // 2
    kx = np.fft.fftshift(np.fft.fftfreq(n, d=pixel))
    kk = np.hypot(kx[:, None], kx[None, :])
    inside = kk <= semiangle * 1e-3 / wavelength(energy)
    modulus = np.abs(recip)
    assert np.all(modulus[~inside] == 0)
    np.testing.assert_allclose(modulus[inside], 1 / np.sqrt(inside.sum()), rtol=1e-5)
    assert inside[n // 2, n // 2] and not inside[0, 0]  # zero frequency at pixel n // 2


def test_defocus_sign_convention():
    """Positive defocus = C10 < 0 = focus below the entrance plane; propagating forward by it focuses."""
    energy, semiangle, n, pixel, df = 200e3, 25.0, 128, 0.08, 120.0
    defocused = probe(energy, semiangle, n, sampling_A=pixel, defocus_A=df)
    via_c10 = probe(energy, semiangle, n, sampling_A=pixel, aberrations={"C10": -df})
    np.testing.assert_array_equal(defocused, via_c10)
    focused = probe(energy, semiangle, n, sampling_A=pixel)
    grid = Grid.from_sampling(pixel, n)
    propagated = np.fft.ifft2(np.fft.fft2(defocused) * fresnel_propagator(grid, energy, df))
    np.testing.assert_allclose(propagated, focused, atol=1e-5 * np.abs(focused).max())
    # propagating the wrong way doubles the defocus instead and spreads the probe out
    wrong = np.fft.ifft2(np.fft.fft2(defocused) * fresnel_propagator(grid, energy, -df))
    assert np.abs(wrong).max() < 0.5 * np.abs(focused).max()
    # abTEM agrees on the sign: its defocus=+df equals ours
    theirs = _abtem_probe_intensity(energy, semiangle, n, pixel, df, 0.0, False)
    assert np.abs(np.abs(defocused) ** 2 - theirs).max() <= 1e-3 * theirs.max()


def test_scherzer_probe_is_sharper_than_gaussian_focus_with_cs():
    energy, semiangle, n, pixel, Cs = 300e3, 25.0, 128, 0.05, 2e5
    peak_scherzer = np.abs(
        probe(energy, semiangle, n, sampling_A=pixel, Cs_A=Cs, defocus_A=scherzer_defocus(Cs, energy))
    ).max()
    peak_gaussian = np.abs(probe(energy, semiangle, n, sampling_A=pixel, Cs_A=Cs)).max()
    assert peak_scherzer > peak_gaussian


def test_airy_zero_sits_at_rayleigh_radius_and_probe_diameter_is_two_radii():
    energy, semiangle, n, pixel = 300e3, 20.0, 1024, 0.02
    intensity = np.abs(probe(energy, semiangle, n, sampling_A=pixel, soft_aperture=True)) ** 2
    profile = intensity[n // 2 :, n // 2]
    r = np.arange(profile.size) * pixel
    first_min = r[np.argmax(np.diff(profile) > 0)]
    assert first_min == pytest.approx(rayleigh_radius_A(semiangle, energy), abs=pixel)
    assert probe_diameter_A(semiangle, energy) == pytest.approx(
        2 * rayleigh_radius_A(semiangle, energy), rel=2e-3
    )
    # paper 002's anchor: MgO at 300 kV and 20 mrad has a probe diameter of 1.2 A
    assert probe_diameter_A(20.0, 300e3) == pytest.approx(1.2, abs=0.005)


def test_probe_position_is_an_exact_subpixel_shift():
    n, pixel = 64, 0.1
    centred = probe(80e3, 25.0, n, sampling_A=pixel)
    moved = probe(80e3, 25.0, n, sampling_A=pixel, position_A=(n // 2 * pixel + 0.37, n // 2 * pixel - 1.21))
    np.testing.assert_allclose(moved, fourier_shift(centred, (3.7, -12.1)), atol=1e-6)
    # the sign: the peak moves towards +x and -y (centre of mass in a window around the peak)
    intensity = np.abs(moved) ** 2
    px, py = np.unravel_index(np.argmax(intensity), intensity.shape)
    window = intensity[px - 6 : px + 7, py - 6 : py + 7]
    offsets = np.arange(-6, 7)
    cx = px + np.sum(offsets[:, None] * window) / window.sum()
    cy = py + np.sum(offsets[None, :] * window) / window.sum()
    assert (cx, cy) == (pytest.approx(n // 2 + 3.7, abs=0.15), pytest.approx(n // 2 - 12.1, abs=0.15))


def test_probe_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        probe(80e3, 20.0, 64)
    with pytest.raises(ValueError, match="exactly one"):
        probe(80e3, 20.0, 64, sampling_A=0.1, gmax_invA=2.0)
    with pytest.raises(ValueError, match="C10 given twice"):
        probe(80e3, 20.0, 64, sampling_A=0.1, defocus_A=5.0, aberrations={"C10": 1.0})
    with pytest.raises(ValueError, match="smaller than one reciprocal pixel"):
        probe(80e3, 1.0, 8, sampling_A=0.1)


def test_fourier_shift_integer_equals_roll_and_inverts():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 30, 24)).astype(np.float32)
    np.testing.assert_allclose(
        fourier_shift(image, (3, -5)), np.roll(image, (3, -5), axis=(-2, -1)), atol=1e-5
    )
    # sub-pixel shifts are exact for band-limited content (no power at the Nyquist frequency)
    spectrum = np.fft.fft2(image)
    fx, fy = np.fft.fftfreq(30)[:, None], np.fft.fftfreq(24)[None, :]
    image = np.fft.ifft2(spectrum * (np.hypot(fx, fy) < 0.4)).real.astype(np.float32)
    there_and_back = fourier_shift(fourier_shift(image, (0.3, 1.7)), (-0.3, -1.7))
    np.testing.assert_allclose(there_and_back, image, atol=1e-5)
    assert fourier_shift(image, (0.5, 0.5)).dtype == np.float32


def test_fourier_shift_batched_and_torch_match_numpy():
    rng = np.random.default_rng(1)
    waves = (rng.normal(size=(3, 16, 16)) + 1j * rng.normal(size=(3, 16, 16))).astype(np.complex64)
    shifts = np.array([[0.25, -1.5], [2.0, 0.0], [-0.75, 3.3]])
    batched = fourier_shift(waves, shifts)
    for i in range(3):
        np.testing.assert_allclose(batched[i], fourier_shift(waves[i], shifts[i]), atol=1e-5)
    as_torch = fourier_shift(torch.from_numpy(waves), torch.from_numpy(shifts))
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.complex64
    np.testing.assert_allclose(as_torch.numpy(), batched, atol=1e-5)
    real_t = fourier_shift(torch.from_numpy(waves.real.copy()), torch.tensor([0.5, 0.5]))
    assert real_t.dtype == torch.float32


def test_transmission_function_is_a_pure_phase_of_sigma_vz():
    v_z = np.linspace(0, 50, 11).astype(np.float32)
    t = transmission_function(v_z, 200e3)
    np.testing.assert_allclose(np.abs(t), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.angle(t), interaction_parameter(200e3) * v_z, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        transmission_function(np.array([np.nan]), 200e3)


def test_grid_from_gmax_and_fft_sizes():
    grid = Grid.from_gmax(2.0, 64)
    assert grid.sampling_A == (0.25, 0.25)
    assert grid.extent_A == (16.0, 16.0)
    assert grid.gmax_invA == (2.0, 2.0)
    assert grid.reciprocal_sampling_invA == (1 / 16, 1 / 16)
    assert fft_friendly_size(254) == 256
    assert fft_friendly_size(127) == 128
    assert fft_friendly_size(97) == 100
    assert all(fft_friendly_size(n) >= n for n in range(1, 300))
    assert math.isclose(grid.antialias_cutoff_invA, 4 / 3)


def test_transmission_function_agrees_with_abtem_potential():
    import abtem
    from ase.build import bulk

    atoms = bulk("MgO", "rocksalt", a=4.212, cubic=True)
    potential = abtem.Potential(atoms, sampling=0.05, slice_thickness=atoms.cell[2, 2], projection="infinite")
    built = potential.build(lazy=False)
    theirs = built.transmission_function(energy=80e3).array[0]
    ours = transmission_function(built.array[0], 80e3)
    assert np.angle(ours).max() > 0.3  # a real, non-trivial phase
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_batched_probe_equals_individual_probes():
    defoci = np.array([0.0, 40.0, -25.0])
    c12 = np.array([0.0, 15.0, 30.0])
    phi12 = np.array([0.0, 0.5, -1.0])
    positions = np.array([[3.2, 3.2], [2.9, 3.5], [3.3, 3.0]])
    batch = probe(
        200e3, 20.0, 64, sampling_A=0.1, defocus_A=defoci, Cs_A=1e4,
        aberrations={"C12": c12, "phi12": phi12}, position_A=positions,
    )  # fmt: skip
    assert batch.shape == (3, 64, 64)
    for i in range(3):
        single = probe(
            200e3, 20.0, 64, sampling_A=0.1, defocus_A=defoci[i], Cs_A=1e4,
            aberrations={"C12": c12[i], "phi12": phi12[i]}, position_A=positions[i],
        )  # fmt: skip
        np.testing.assert_allclose(batch[i], single, atol=1e-6)
    np.testing.assert_allclose(np.sum(np.abs(batch) ** 2, axis=(1, 2)), 1.0, rtol=1e-5)


def test_aperture_edge_is_a_linear_ramp_of_the_given_width_per_sample():
    """``aperture_edge_invA``: transmission 1/2 at the cut-off, 0 and 1 half a width either side, the
    transmitted area (sum |A|^2 before normalisation ~ sum A) unchanged to first order; one width per sample
    gives each sample's own ramp, equal to the single-width call."""
    from physics import polar_frequencies

    energy, semiangle, n, pixel = 300e3, 20.0, 128, 0.05
    cutoff = semiangle * 1e-3 / wavelength(energy)
    widths = np.array([0.0, 0.1, 0.2])
    batch = probe(energy, semiangle, n, sampling_A=pixel, aperture_edge_invA=widths, space="reciprocal")
    assert batch.shape == (3, n, n)
    grid = Grid.from_sampling(pixel, n)
    k = np.fft.fftshift(polar_frequencies(grid)[0])
    for i, width in enumerate(widths):
        single = probe(energy, semiangle, n, sampling_A=pixel, aperture_edge_invA=width, space="reciprocal")
        np.testing.assert_allclose(batch[i], single, atol=1e-6)
        amplitude = np.abs(single) / np.abs(single).max()
        if width == 0:
            assert set(np.unique(np.round(amplitude, 6))) <= {0.0, 1.0}
            continue
        ramp = (k > cutoff - width / 2) & (k < cutoff + width / 2)
        np.testing.assert_allclose(amplitude[ramp], 0.5 + (cutoff - k[ramp]) / width, atol=1e-5)
        assert amplitude[k >= cutoff + width / 2].max() < 1e-6
        assert amplitude[k <= cutoff - width / 2].min() > 1 - 1e-6
    with pytest.raises(ValueError, match="aperture_edge_invA must be >= 0"):
        probe(energy, semiangle, n, sampling_A=pixel, aperture_edge_invA=-0.1)
