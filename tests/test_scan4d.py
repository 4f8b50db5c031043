"""Simulated 4D-STEM scans: vacuum, registration of scan and truth, specimens, file round trip."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from datagen.scan4d import ScanSettings, simulate_scan, twisted_bilayer, with_point_defect, write_scan
from physics import wavelength


def centre_of_mass_invA(data: np.ndarray, k_pixel_invA: float) -> np.ndarray:
    """(Rx, Ry, 2) centre of mass of each pattern in 1/A, zero frequency at pixel K // 2."""
    k = (np.arange(data.shape[-1]) - data.shape[-1] // 2) * k_pixel_invA
    total = data.sum(axis=(-2, -1))
    return np.stack([(data.sum(-1) * k).sum(-1) / total, (data.sum(-2) * k).sum(-1) / total], axis=-1)


FAST = dict(energy_eV=200e3, semiangle_mrad=20.0, sampling_A=0.08, detector_px=32,
            detector_max_angle_mrad=40.0, num_phonons=2, slice_thickness_A=2.0)  # fmt: skip


def test_vacuum_scan_is_the_centred_aperture_disc():
    atoms = Atoms(cell=[8.0, 8.0, 4.0], pbc=True)
    settings = ScanSettings(**{**FAST, "num_phonons": 0}, scan_gpts=(4, 3), scan_step_A=0.5)
    result = simulate_scan(atoms, settings)
    data = result.data
    assert data.shape == (4, 3, 32, 32) and data.dtype == np.float32
    np.testing.assert_allclose(data.sum(axis=(-2, -1)), 1.0, atol=2e-3)  # detector holds the whole disc
    np.testing.assert_allclose(data, np.broadcast_to(data[:1, :1], data.shape), atol=1e-6)  # same everywhere
    assert np.abs(centre_of_mass_invA(data, settings.k_pixel_invA)).max() < 1e-3
    # disc radius alpha / lambda: K // 2 * (semiangle / max angle) = 8 px
    k = np.hypot(*np.meshgrid(np.arange(32) - 16, np.arange(32) - 16, indexing="ij"))
    assert data[0, 0][k > 9.5].sum() < 1e-4 and data[0, 0][k < 7].min() > 0.5 * data[0, 0].max()
    assert np.all(result.truth_phase == 0)


def test_single_atom_scan_and_truth_are_registered():
    """The COM deflection points at the atom and vanishes where the truth's atom sits."""
    atom_xy = np.array([5.13, 4.71])
    atoms = Atoms("Au", positions=[(*atom_xy, 3.0)], cell=[10.0, 10.0, 6.0], pbc=True)
    step = 0.25
    settings = ScanSettings(**FAST, scan_gpts=(13, 13), scan_step_A=step, scan_start_A=(3.5, 3.2))
    result = simulate_scan(atoms, settings)
    # truth: the atom in scan coordinates (centroid of the phase peak)
    phase = result.truth_phase
    px = np.asarray(result.truth_pixel_size_A)
    peak = np.unravel_index(np.argmax(phase), phase.shape)
    window = phase[peak[0] - 3 : peak[0] + 4, peak[1] - 3 : peak[1] + 4]
    offsets = np.arange(-3, 4)
    centroid_px = np.array(peak) + np.array(
        [(offsets[:, None] * window).sum() / window.sum(), (offsets[None, :] * window).sum() / window.sum()]
    )
    truth_atom_scan_A = centroid_px * px + np.asarray(result.truth_origin_A)
    np.testing.assert_allclose(truth_atom_scan_A, atom_xy - np.array([3.5, 3.2]), atol=0.05)
    # data: COM of each pattern points from the probe towards the atom (attractive potential)
    com = centre_of_mass_invA(result.data, settings.k_pixel_invA)
    grid = np.stack(np.meshgrid(np.arange(13) * step, np.arange(13) * step, indexing="ij"), axis=-1)
    towards = truth_atom_scan_A - grid
    distance = np.linalg.norm(towards, axis=-1)
    ring = (distance > 0.3) & (distance < 1.5)
    assert np.all(np.sum(com[ring] * towards[ring], axis=-1) > 0)
    # and the COM x-component changes sign at the atom's x, to a fraction of a scan step
    row = round(truth_atom_scan_A[1] / step)
    com_x = com[:, row, 0]
    crossing = np.flatnonzero((com_x[:-1] > 0) & (com_x[1:] <= 0))
    assert crossing.size == 1
    i = crossing[0]
    zero_x = (i + com_x[i] / (com_x[i] - com_x[i + 1])) * step
    assert zero_x == pytest.approx(truth_atom_scan_A[0], abs=0.3 * step)
    # the truth is the phonon-averaged sigma * v_z: a single Au atom reaches ~1-3 rad at 200 kV
    assert 0.5 < phase.max() < 5.0


def test_twisted_bilayer_and_point_defects():
    bilayer = twisted_bilayer("MoS2", twist_deg=7.0, size_A=24.0)
    a = 3.16
    per_layer = 3 * 24.0**2 / (np.sqrt(3) / 2 * a**2)
    assert len(bilayer) == pytest.approx(2 * per_layer, rel=0.05)
    z = np.sort(np.unique(np.round(bilayer.positions[:, 2], 2)))
    assert z[3] - z[0] == pytest.approx(6.15, abs=0.01)  # layer period
    assert np.all(bilayer.positions[:, :2] >= 0) and np.all(bilayer.positions[:, :2] < 24.0)

    # the top layer's Mo-Mo directions are those of the bottom rotated by the twist
    def mo_angles(layer_atoms):
        mo = layer_atoms.positions[np.array(layer_atoms.get_chemical_symbols()) == "Mo", :2]
        d = mo[None] - mo[:, None]
        near = np.abs(np.linalg.norm(d, axis=-1) - a) < 0.05
        return np.mod(np.degrees(np.arctan2(d[near][:, 1], d[near][:, 0])), 60)

    bottom = bilayer[bilayer.positions[:, 2] < z[0] + 3.2]
    top = bilayer[bilayer.positions[:, 2] > z[0] + 3.2]
    twist = np.mod(np.median(mo_angles(top)) - np.median(mo_angles(bottom)), 60)
    assert twist == pytest.approx(7.0, abs=0.1)
    # the projected column nearest to the point loses all its atoms (both layers, both S of an S2 pair)
    point = np.array([10.0, 13.0])
    lateral = np.linalg.norm(bilayer.positions[:, :2] - point, axis=1)
    column = lateral <= lateral.min() + 0.3
    vacancy = with_point_defect(bilayer, point, kind="vacancy")
    assert len(bilayer) - len(vacancy) == column.sum() >= 1
    remaining = np.linalg.norm(vacancy.positions[:, :2] - bilayer.positions[column][0, :2], axis=1)
    assert remaining.min() > 0.3
    substituted = with_point_defect(bilayer, point, kind="substitution", element="W")
    assert substituted.get_chemical_symbols().count("W") == column.sum()
    with pytest.raises(ValueError, match="unknown 2D material"):
        twisted_bilayer("unobtainium")


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="detector_max_angle_mrad"):
        ScanSettings(energy_eV=300e3, sampling_A=0.2, detector_max_angle_mrad=60.0)
    with pytest.raises(ValueError, match="scan_gpts"):
        ScanSettings(scan_gpts=(2, 10))
    with pytest.raises(ValueError, match="leaves the cell"):
        simulate_scan(Atoms(cell=[4.0, 4.0, 4.0], pbc=True), ScanSettings(**FAST, scan_gpts=(30, 30)))


def test_written_scan_reads_back_with_truth(tmp_path):
    from evaluation.io import load_4dstem

    atoms = Atoms("C", positions=[(3.0, 3.0, 2.0)], cell=[6.0, 6.0, 4.0], pbc=True)
    settings = ScanSettings(**FAST, scan_gpts=(4, 4), scan_step_A=0.4)
    result = simulate_scan(atoms, settings)
    path = write_scan(tmp_path / "scan.h5", result, config={"simulation": "scan4d"})
    scan = load_4dstem(path)
    try:
        np.testing.assert_array_equal(np.asarray(scan.data[:]), result.data)
        assert scan.energy_eV == 200e3 and scan.semiangle_mrad == 20.0
        np.testing.assert_allclose(scan.k_pixel_invA, 2 * 40e-3 / wavelength(200e3) / 32)
        np.testing.assert_array_equal(scan.truth_phase, result.truth_phase)
        assert scan.truth_origin_A == pytest.approx(result.truth_origin_A)
    finally:
        scan.close()


def test_no_pattern_holds_more_electrons_than_the_beam():
    """Gold on a coarse grid: abTEM's band-limited slices raised patterns above 1; now at most 1."""
    from ase.build import bulk

    au = bulk("Au", "fcc", a=4.078, cubic=True).repeat((2, 2, 4))
    settings = ScanSettings(
        energy_eV=300e3, semiangle_mrad=20.0, sampling_A=0.15, detector_px=32, detector_max_angle_mrad=40.0,
        num_phonons=0, slice_thickness_A=2.0, scan_gpts=(4, 4), scan_step_A=0.5,
    )  # fmt: skip
    totals = simulate_scan(au, settings).data.astype(np.float64).sum(axis=(-2, -1))
    assert totals.max() <= 1.0 + 1e-5, totals.max()
    assert totals.min() > 0.5
