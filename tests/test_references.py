"""Conventional references on a simulated POA scan whose answer is known (tests/scan4d_helpers.py).

Scan: 24 x 24 positions, 48 x 48 CBEDs, 80 kV, 20 mrad, step 0.52 A, Gaussian "atoms" of up to 0.3 rad.
Bounds (noise-free, measured values in brackets when written): SSB xc > 0.95 (0.978), normalised SSB
> 0.99 (0.998), SSB at 200 A defocus with compensation > 0.9 (0.967) and without < 0.5 (-0.69), iCOM
> 0.9 (0.952), riCOM-21 > 0.85 (0.917), ePIE > 0.99 (0.9998), ADF > 0.8 and BF < -0.8 (+-0.872); at
1000 e/CBED SSB > 0.85 (0.913) and iCOM > 0.75 (0.824).
"""

from __future__ import annotations

import numpy as np
import pytest
from scan4d_helpers import simulate_scan

from evaluation.metrics import xc
from evaluation.references import (
    centre_of_mass,
    epie,
    estimate_scan_rotation,
    icom,
    ricom,
    ricom_kernel,
    ssb,
    virtual_detector,
)
from evaluation.references._common import iter_scan_rows


@pytest.fixture(scope="module")
def scan():
    return simulate_scan()


def _calibration(s):
    return {"scan_step_A": s.scan_step_A, "k_pixel_invA": s.k_pixel_invA, "progress": False}


def _optics(s):
    return {"energy_eV": s.energy_eV, "semiangle_mrad": s.semiangle_mrad}


def test_ssb_recovers_the_phase(scan):
    result = ssb(scan.data, **_optics(scan), **_calibration(scan))
    assert result.phase.shape == (24, 24) and result.phase.dtype == np.float32
    assert result.pixel_size_A == pytest.approx((scan.scan_step_A,) * 2)
    assert xc(scan.truth_on_scan, result.phase) > 0.95
    flat = ssb(scan.data, **_optics(scan), **_calibration(scan), normalize=True)
    assert xc(scan.truth_on_scan, flat.phase) > 0.99
    # normalised SSB is quantitative inside 2 alpha: the truth band-limited to 2 alpha has the same range
    assert np.ptp(flat.phase) == pytest.approx(np.ptp(scan.truth_on_scan), rel=0.15)


def test_ssb_aberration_compensation():
    defocused = simulate_scan(defocus_A=200.0)
    kwargs = {**_optics(defocused), **_calibration(defocused), "defocus_A": 200.0}
    compensated = ssb(defocused.data, **kwargs, aberration_compensation=True)
    plain = ssb(defocused.data, **kwargs, aberration_compensation=False)
    assert xc(defocused.truth_on_scan, compensated.phase) > 0.9
    assert xc(defocused.truth_on_scan, plain.phase) < 0.5


def test_ssb_chunking_does_not_change_the_result(scan):
    one = ssb(scan.data, **_optics(scan), **_calibration(scan), q_chunk=576)
    many = ssb(scan.data, **_optics(scan), **_calibration(scan), q_chunk=7)
    np.testing.assert_allclose(one.phase, many.phase, atol=1e-6)


def test_ssb_and_icom_at_finite_dose():
    """1000 electrons per CBED (Poisson): still close to the truth (measured 0.913 and 0.824)."""
    noisy = simulate_scan(dose_per_cbed=1e3)
    assert noisy.data.dtype == np.float32 and np.all(noisy.data == np.round(noisy.data))
    assert xc(noisy.truth_on_scan, ssb(noisy.data, **_optics(noisy), **_calibration(noisy)).phase) > 0.85
    assert xc(noisy.truth_on_scan, icom(noisy.data, **_calibration(noisy)).phase) > 0.75


def test_icom_recovers_the_phase(scan):
    result = icom(scan.data, **_calibration(scan))
    assert xc(scan.truth_on_scan, result.phase) > 0.9
    # the COM of a centred probe over a flat object is zero; over atoms it points towards them
    com = centre_of_mass(scan.data, scan.k_pixel_invA, progress=False)
    assert np.abs(com.mean(axis=(0, 1))).max() < 1e-9


@pytest.mark.parametrize(
    ("angle_deg", "transposed"), [(30.0, False), (-70.0, False), (120.0, False), (30.0, True)]
)
def test_scan_rotation_is_recovered(angle_deg, transposed):
    rotated = simulate_scan(scan_rotation_deg=angle_deg)
    data = np.swapaxes(rotated.data, 2, 3) if transposed else rotated.data
    com = centre_of_mass(data, rotated.k_pixel_invA, progress=False)
    found_deg, found_transpose = estimate_scan_rotation(com, rotated.scan_step_A)
    assert found_transpose is transposed
    assert ((found_deg - angle_deg + 180) % 360) - 180 == pytest.approx(0.0, abs=1.0)
    result = icom(data, **_calibration(rotated), estimate_rotation=True)
    assert xc(rotated.truth_on_scan, result.phase) > 0.9
    # the wrong rotation loses the image
    wrong = icom(data, **_calibration(rotated), scan_rotation_deg=angle_deg + 90, transpose=transposed)
    assert xc(rotated.truth_on_scan, wrong.phase) < 0.5


def test_ssb_uses_the_scan_rotation():
    rotated = simulate_scan(scan_rotation_deg=30.0)
    good = ssb(rotated.data, **_optics(rotated), **_calibration(rotated), scan_rotation_deg=30.0)
    assert xc(rotated.truth_on_scan, good.phase) > 0.95


def test_ricom_kernel_geometry():
    kernel = ricom_kernel(5, scan_step_A=0.5)
    assert kernel.shape == (5, 5, 2)
    assert np.all(kernel[2, 2] == 0)
    # entry at offset r - r_p = (1, 0) pixels: (r_p - r) / |r_p - r|^2 * step^2 / (2 pi)
    assert kernel[3, 2] == pytest.approx([-1 / 0.5 * 0.25 / (2 * np.pi), 0.0])
    np.testing.assert_allclose(kernel, -kernel[::-1, ::-1])  # point antisymmetric
    with pytest.raises(ValueError):
        ricom_kernel(4)


def test_ricom_recovers_the_phase(scan):
    small = ricom(scan.data, **_calibration(scan), kernel_size=21)
    assert xc(scan.truth_on_scan, small.phase) > 0.85
    # a kernel as large as the scan approaches iCOM
    large = ricom(scan.data, **_calibration(scan), kernel_size=47)
    reference = icom(scan.data, **_calibration(scan))
    assert xc(reference.phase, large.phase) > 0.95


def _kernel_power_fraction(kernel: np.ndarray, step_A: float, select) -> float:
    padded = np.zeros((128, 128, 2))
    padded[: kernel.shape[0], : kernel.shape[1]] = kernel
    power = (np.abs(np.fft.fft2(padded, axes=(0, 1))) ** 2).sum(-1)
    f = np.fft.fftfreq(128, step_A)
    return power[select(np.hypot(f[:, None], f[None, :]))].sum() / power.sum()


def test_ricom_band_pass_is_folded_into_the_kernel(scan):
    """Eq. 3.8-3.9: the band-pass removes the kernel's transfer outside [k_min, k_max]."""
    step = scan.scan_step_A
    plain = ricom_kernel(21, step)
    low_pass = ricom_kernel(21, step, band_pass_invA=(0.0, 0.4))
    high_pass = ricom_kernel(21, step, band_pass_invA=(0.2, 0.9))
    above = _kernel_power_fraction(plain, step, lambda k: k > 0.6)
    assert _kernel_power_fraction(low_pass, step, lambda k: k > 0.6) < 0.1 * above
    below = _kernel_power_fraction(plain, step, lambda k: k < 0.1)
    assert _kernel_power_fraction(high_pass, step, lambda k: k < 0.1) < 0.1 * below
    # and the image follows: less high-frequency content with the low-pass kernel
    image_plain = ricom(scan.data, **_calibration(scan), kernel_size=21).phase
    image_low = ricom(scan.data, **_calibration(scan), kernel_size=21, band_pass_invA=(0.0, 0.4)).phase
    f = np.fft.fftfreq(24, step)
    high = np.hypot(f[:, None], f[None, :]) > 0.6

    def high_fraction(image):
        power = np.abs(np.fft.fft2(image - image.mean())) ** 2
        return power[high].sum() / power.sum()

    assert high_fraction(image_low) < high_fraction(image_plain)


def test_virtual_detectors_contrast(scan):
    alpha = scan.semiangle_mrad
    bf = virtual_detector(scan.data, scan.k_pixel_invA, scan.energy_eV, 0.0, alpha, progress=False)
    adf = virtual_detector(scan.data, scan.k_pixel_invA, scan.energy_eV, alpha, 1e3, progress=False)
    # a weak phase object scatters out of the bright-field disc at the atoms: BF dark, ADF bright
    assert xc(scan.truth_on_scan, bf.phase) < -0.8
    assert xc(scan.truth_on_scan, adf.phase) > 0.8
    # the two detectors together collect every electron (noise-free data sum to 1 per pattern)
    np.testing.assert_allclose(bf.phase + adf.phase, 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="no detector pixel"):
        virtual_detector(scan.data, scan.k_pixel_invA, scan.energy_eV, 500.0, 600.0, progress=False)


def test_epie_converges_monotonically(scan):
    result = epie(scan.data, **_optics(scan), **_calibration(scan), iterations=8)
    errors = np.asarray(result.info["fourier_error"])
    assert errors.shape == (8,)
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 0.02 * errors[0]
    truth = scan.phase[: result.phase.shape[0], : result.phase.shape[1]]
    assert result.pixel_size_A == pytest.approx((scan.object_pixel_A,) * 2)
    assert xc(truth, result.phase) > 0.99
    assert result.info["probe"].shape == (48, 48)


def test_epie_without_probe_update_and_subpixel_positions(scan):
    """Steps that are not whole object pixels go through the Fourier-shifted probe."""
    step = scan.scan_step_A * 1.25
    sparse = simulate_scan()
    result = epie(
        sparse.data[:12, :12],
        **_optics(sparse),
        scan_step_A=step,
        k_pixel_invA=sparse.k_pixel_invA,
        iterations=3,
        beta=0.0,
        progress=False,
    )
    # 12 positions at 2.5 object pixels: field of 11 * 2.5 + 1 pixels, rounded up
    assert result.phase.shape == (29, 29)
    assert np.all(np.isfinite(result.phase))


def test_chunked_reading_matches_whole_array(scan):
    blocks = [block for _, block in iter_scan_rows(scan.data, rows_per_chunk=5, progress=False)]
    assert [b.shape[0] for b in blocks] == [5, 5, 5, 5, 4]
    np.testing.assert_array_equal(np.concatenate(blocks), scan.data)


@pytest.mark.parametrize("bad_shape", [(24, 24, 48), (2, 24, 48, 48)])
def test_references_reject_bad_shapes(bad_shape):
    with pytest.raises(ValueError):
        icom(np.ones(bad_shape, np.float32), scan_step_A=0.5, k_pixel_invA=0.1, progress=False)
