"""Stitching of network patches into whole objects, tested with ORACLE networks that return the truth.

An oracle gets the stitcher's inputs and the positions (Angstrom) of the batch and returns what a perfect
network would: for AIRPI the POA exit wave ``probe * exp(i phase_truth)`` on the network grid, for PtychoNN
the object patch (amplitude 1, true phase inside the 0.1-max mask), for Chang the true phase inside the
illuminated disc with its mean removed (as the labels) plus a random constant offset. Stitching must then
give back the true object, so any error in placement, weighting, resampling or least squares shows up.
"""

from __future__ import annotations

import dataclasses
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from scan4d_helpers import as_scan4d as as_scan
from scan4d_helpers import simulate_scan, truth_at, truth_on

from evaluation.io import Scan4D, load_4dstem, save_4dstem
from evaluation.metrics import xc
from evaluation.networks import (
    ScanGeometry,
    airpi_reconstruct,
    chang_reconstruct,
    default_gmax_invA,
    overlap_matrix,
    ptychonn_reconstruct,
)
from evaluation.networks.chang import _chang_probe_and_mask
from evaluation.networks.geometry import _PatternStream
from models.inputs import preprocess, probe_intensity
from physics import probe, wavelength

K = 32  # network grid of the oracle tests (pixels)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sim():
    # 16 x 16 positions, CBEDs of 32 px covering +-4 alpha; object pixel = step / 2 = 1 / (2 gmax)
    return simulate_scan(scan_px=16, cbed_px=K)


def gmax_of(s) -> float:
    return s.k_pixel_invA * s.data.shape[-1] / 2


def window(s, x: float, y: float, pixel_A: float, n: int) -> np.ndarray:
    u = (np.arange(n) - n // 2) * pixel_A
    return truth_at(s, *np.meshgrid(x + u, y + u, indexing="ij"))


def airpi_oracle(s, calls: list | None = None):
    gmax = gmax_of(s)
    psi = probe(s.energy_eV, s.semiangle_mrad, K, gmax_invA=gmax)

    def predict(inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append((inputs.clone(), positions.clone()))
        waves = [psi * np.exp(1j * window(s, x, y, 1 / (2 * gmax), K)) for x, y in positions.numpy()]
        return torch.from_numpy(np.stack(waves).astype(np.complex64))

    return predict


@pytest.mark.parametrize(
    "options, bound",
    [
        ({"oversampling": 1}, 0.9999),
        ({"oversampling": 2}, 0.9999),
        ({"oversampling": 2, "data_repetition": True}, 0.9999),
        ({"pixel_size_A": "step/1.5"}, 0.99),  # positions between object pixels: sub-pixel placement
    ],
)
def test_airpi_oracle_reproduces_the_object(sim, options, bound):
    options = dict(options)
    if options.get("pixel_size_A") == "step/1.5":
        options["pixel_size_A"] = sim.scan_step_A / 1.5
    recon = airpi_reconstruct(
        as_scan(sim),
        airpi_oracle(sim),
        pixels=K,
        gmax_invA=gmax_of(sim),
        progress=False,
        batch_size=100,
        **options,
    )
    truth = truth_on(sim, recon)
    value = xc(truth, recon.phase)
    assert value > bound, value
    if bound > 0.999:  # object pixels on patch pixels: exact up to float32
        assert np.abs(recon.phase - truth).max() < 1e-5
    step = sim.scan_step_A * (2 if options.get("data_repetition") else 1)
    expected_pixel = options.get("pixel_size_A", step / options.get("oversampling", 1))
    assert recon.pixel_size_A == pytest.approx((expected_pixel, expected_pixel))
    assert recon.origin_A == (0.0, 0.0)
    assert recon.info["patterns_per_s"] > 0


def test_airpi_inference_stride_runs_the_network_on_a_sub_grid_and_still_tiles_the_field(sim):
    """inference_stride=2: the network sees every 2nd position in x and y plus the last row and column
    (9 x 9 of 16 x 16 here), each still with its full 3x3 kernel of neighbours at the scan step; the oracle's
    footprints (probe intensity > 0.1 max, radius ~0.96 A) tile the 1.04 A sub-grid, so the object comes
    back exactly; the trust map is NaN where the network did not run."""
    calls: list = []
    recon = airpi_reconstruct(
        as_scan(sim), airpi_oracle(sim, calls), pixels=K, gmax_invA=gmax_of(sim), oversampling=2,
        inference_stride=2, progress=False, batch_size=1000,
    )  # fmt: skip
    positions = torch.cat([p for _, p in calls]).numpy() / sim.scan_step_A
    on_grid = sorted({*range(0, 16, 2), 15})
    assert sorted({round(v) for v in positions[:, 0]}) == on_grid and len(positions) == len(on_grid) ** 2
    assert recon.info["network_passes"] == 81 and recon.info["inference_stride"] == 2
    inputs = torch.cat([i for i, _ in calls])
    assert inputs.shape[1] == 11  # the full kernel (9 CBEDs) and the probe channels, as at stride 1
    truth = truth_on(sim, recon)
    assert np.abs(recon.phase - truth).max() < 1e-5
    trust = recon.consistency
    assert np.isfinite(trust[::2, ::2]).all() and np.isnan(trust[1:-1:2, 1:-1:2]).all()
    with pytest.raises(ValueError, match=r"airpi\.inference_stride"):
        airpi_reconstruct(
            as_scan(sim), airpi_oracle(sim), pixels=K, gmax_invA=gmax_of(sim), inference_stride=0
        )


def test_airpi_uncropped_field_extends_by_the_probe_footprint(sim):
    recon = airpi_reconstruct(
        as_scan(sim), airpi_oracle(sim), pixels=K, gmax_invA=gmax_of(sim), oversampling=2, crop_to_scan=False,
        progress=False,
    )  # fmt: skip
    assert recon.origin_A[0] < 0 and recon.phase.shape[0] > 31
    covered = recon.phase != 0
    assert xc(truth_on(sim, recon)[covered], recon.phase[covered]) > 0.9999


def test_airpi_kernels_are_row_major_with_edges_reusing_the_nearest_cbeds(sim):
    """Position (i, j) gets a flat pattern of value 1 + 16 i + j: each kernel channel names its source."""
    label = 1.0 + 16 * np.arange(16)[:, None] + np.arange(16)[None, :]
    data = np.broadcast_to(label[:, :, None, None], (16, 16, K, K)).astype(np.float32)
    geometry = ScanGeometry.from_scan(as_scan(sim, data))
    stream = _PatternStream(geometry, K, gmax_of(sim), np.array([K // 2, K // 2]), torch.device("cpu"))
    seen = {}
    for e, c, kernels in stream.kernels(block_rows=3, progress=False, desc=""):
        for n, (i, j) in enumerate(zip(e, c, strict=True)):
            seen[(i, j)] = kernels[n, :, K // 2, K // 2].numpy()  # same grid: values carried over
    assert len(seen) == 256
    for (i, j), values in seen.items():
        expected = [
            label[min(max(i + a, 0), 15), min(max(j + b, 0), 15)] for a in (-1, 0, 1) for b in (-1, 0, 1)
        ]
        np.testing.assert_allclose(values, expected, rtol=1e-6)


class _RecordedRows:
    """Scan data that records which thread read which raw rows (and when, relative to the consumer)."""

    def __init__(self, data: np.ndarray, log: list) -> None:
        self.data, self.log = data, log
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __getitem__(self, key):
        if isinstance(key, slice):
            self.log.append(("read", threading.current_thread().name, key.start, key.stop))
        return self.data[key]


def _wait_for(condition, timeout_s: float) -> bool:
    event = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        event.wait(0.01)
    return condition()


@pytest.mark.parametrize("neighbours", [True, False])
def test_kernels_read_the_next_block_ahead_in_a_reader_thread(sim, neighbours):
    """While the caller holds block n, block n + 1's raw rows are being read by the reader thread; the
    kernels equal those of reading each block in place (rows() without read-ahead)."""
    label = 1.0 + 16 * np.arange(16)[:, None] + np.arange(16)[None, :]
    plain = np.broadcast_to(label[:, :, None, None], (16, 16, K, K)).astype(np.float32)
    log: list = []
    geometry = ScanGeometry.from_scan(as_scan(sim, plain))
    stream = _PatternStream(geometry, K, gmax_of(sim), np.array([K // 2, K // 2]), torch.device("cpu"))
    recorded = _PatternStream(
        dataclasses.replace(geometry, data=_RecordedRows(plain, log)), K, gmax_of(sim),
        np.array([K // 2, K // 2]), torch.device("cpu"),
    )  # fmt: skip
    blocks = 0
    for (e, c, kernels), (e0, c0, expected) in zip(
        recorded.kernels(4, False, "", neighbours=neighbours),
        stream.kernels(4, False, "", neighbours=neighbours),
        strict=True,
    ):
        blocks += 1
        log.append(("consumer has block", blocks))
        if blocks == 1:  # holding block 1, the reader reads block 2 meanwhile (waits only if it does not)
            assert _wait_for(lambda: sum(entry[0] == "read" for entry in log) >= 2, 30.0)
        np.testing.assert_array_equal(e, e0)
        np.testing.assert_array_equal(c, c0)
        torch.testing.assert_close(kernels, expected, rtol=0, atol=0)
    assert blocks == 4
    reads = [entry for entry in log if entry[0] == "read"]
    assert len(reads) == 4 and all(name.startswith("deepstem-read") for _, name, _, _ in reads)
    assert reads[0][2] == 0 and reads[-1][3] == 16  # the scan's rows, first to last
    # never more than one block ahead: before the caller has block n, at most n + 1 blocks were read
    assert all(
        sum(1 for entry in log[: log.index(("consumer has block", n))] if entry[0] == "read") <= n + 1
        for n in range(1, 5)
    )


def test_airpi_network_inputs_are_the_training_preprocessing(sim):
    calls: list = []
    airpi_reconstruct(
        as_scan(sim),
        airpi_oracle(sim, calls),
        pixels=K,
        gmax_invA=gmax_of(sim),
        progress=False,
        batch_size=512,
    )
    inputs, positions = calls[0]
    n = int(np.flatnonzero((positions[:, 0] == 0) & (positions[:, 1] == 0))[0])  # corner: edge reuse
    idx = [(min(max(a, 0), 15), min(max(b, 0), 15)) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    kernel = torch.from_numpy(np.stack([sim.data[i, j] for i, j in idx]))[None]
    psi = torch.from_numpy(probe(sim.energy_eV, sim.semiangle_mrad, K, gmax_invA=gmax_of(sim)))[None]
    expected = preprocess(kernel, torch.tensor([sim.scan_step_A]), psi)
    torch.testing.assert_close(inputs[n], expected[0], rtol=1e-4, atol=1e-4)


def test_resampling_preserves_counts_and_matches_the_training_grid(sim):
    """A vacuum CBED on a finer, off-centre detector lands on the network grid as the training probe's."""
    gmax = gmax_of(sim)
    fine = probe(sim.energy_eV, sim.semiangle_mrad, 96, gmax_invA=1.5 * gmax)  # detector +-1.5 gmax, 96 px
    vacuum = np.roll(probe_intensity(torch.from_numpy(fine)[None])[0].numpy(), (3, -2), axis=(0, 1))
    mx = overlap_matrix(96, 3 * gmax / 96, 48 + 3, K, 2 * gmax / K)
    my = overlap_matrix(96, 3 * gmax / 96, 48 - 2, K, 2 * gmax / K)
    resampled = mx @ vacuum @ my.T
    assert resampled.sum() == pytest.approx(vacuum.sum(), rel=1e-6)  # all counts lie inside +-gmax
    expected = probe_intensity(
        torch.from_numpy(probe(sim.energy_eV, sim.semiangle_mrad, K, gmax_invA=gmax))[None]
    )
    # the training CBED point-samples the hard aperture edge, the detector integrates it: xc 0.983 measured
    assert xc(expected[0].numpy(), resampled) > 0.98
    k = np.arange(K) - K // 2
    centre = [(resampled.sum(1) * k).sum() / resampled.sum(), (resampled.sum(0) * k).sum() / resampled.sum()]
    np.testing.assert_allclose(centre, 0.0, atol=0.02)  # zero frequency at pixel K // 2
    radius = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    disc_px = sim.semiangle_mrad * 1e-3 / 0.041757 / (2 * gmax / K)  # alpha in network pixels (80 kV)
    assert resampled[radius > disc_px + 1].sum() < 1e-3 * resampled.sum()


def test_scan_rotation_rotates_patterns_onto_the_scan_frame(sim):
    """A spot at detector vector (+x) appears at R(90 deg) (+x) = +y on the network grid."""
    data = np.zeros((3, 3, K, K), np.float32)
    data[..., K // 2 + 6, K // 2] = 1.0
    scan = as_scan(sim, data)
    scan.scan_rotation_deg = 90.0
    stream = _PatternStream(
        ScanGeometry.from_scan(scan), K, gmax_of(sim), np.array([K // 2, K // 2]), torch.device("cpu")
    )
    pattern = stream.rows(0, 1)[0, 0].numpy()
    assert np.unravel_index(pattern.argmax(), pattern.shape) == (K // 2, K // 2 + 6)
    assert pattern.sum() == pytest.approx(1.0, rel=1e-5)


def test_data_repetition_sums_a_clamped_5x5_box_at_twice_the_step(sim):
    label = (1.0 + 16 * np.arange(16)[:, None] + np.arange(16)[None, :]).astype(np.float32)
    data = np.broadcast_to(label[:, :, None, None], (16, 16, K, K)).astype(np.float32)
    geometry = ScanGeometry.from_scan(as_scan(sim, data), data_repetition=True)
    assert geometry.positions_shape == (8, 8) and geometry.step_A[0] == pytest.approx(2 * sim.scan_step_A)
    stream = _PatternStream(geometry, K, gmax_of(sim), np.array([K // 2, K // 2]), torch.device("cpu"))
    rows = stream.rows(0, 8)[:, :, K // 2, K // 2].numpy()
    for e, c in [(0, 0), (3, 5), (7, 7)]:
        box = [
            label[min(max(2 * e + a, 0), 15), min(max(2 * c + b, 0), 15)]
            for a in range(-2, 3)
            for b in range(-2, 3)
        ]
        assert rows[e, c] == pytest.approx(sum(box), rel=1e-6)


def test_default_gmax_follows_the_detector_and_the_training_ratio():
    alpha = 20e-3 / 0.041757  # 80 kV, 20 mrad: alpha in 1/A
    assert default_gmax_invA(20, 80e3, 2 * alpha) == pytest.approx(2 * alpha, rel=1e-3)
    assert default_gmax_invA(20, 80e3, 50 * alpha) == pytest.approx(10 * alpha, rel=1e-3)  # alpha/gmax >= 0.1
    with pytest.raises(ValueError, match="not trained"):
        default_gmax_invA(20, 80e3, 0.9 * alpha)


def test_chang_offsets_are_removed_exactly_by_least_squares(sim):
    """True phase patches with random constant offsets: lsqr recovers the offsets and the object."""
    geometry = ScanGeometry.from_scan(as_scan(sim))
    ratio = gmax_of(sim) / geometry.alpha_invA  # detector = +-4 alpha: Chang patch pixel = object pixel
    _, pixel_A, mask = _chang_probe_and_mask(geometry, 32, 2, ratio, 0.9)
    rng = np.random.default_rng(3)
    added: dict[tuple[int, int], float] = {}

    def oracle(inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert inputs.shape[1:] == (1, 32, 32)
        torch.testing.assert_close(inputs.square().sum((1, 2, 3)), torch.ones(len(inputs)))  # sqrt(I / total)
        patches = []
        for x, y in positions.numpy():
            phase = window(sim, x, y, pixel_A, 32)
            offset = rng.uniform(-3, 3)
            key = (round(x / sim.scan_step_A), round(y / sim.scan_step_A))
            added[key] = offset - phase[mask].mean()  # total constant added to the truth
            patches.append(np.where(mask, phase - phase[mask].mean() + offset, 0.0))
        return torch.from_numpy(np.stack(patches).astype(np.float32))

    for oversampling in (1, 2):
        added.clear()
        recon = chang_reconstruct(
            as_scan(sim),
            oracle,
            collection_ratio=ratio,
            oversampling=oversampling,
            progress=False,
            batch_size=100,
        )
        truth = truth_on(sim, recon)
        assert xc(truth, recon.phase) > 0.99999
        assert np.abs((recon.phase - recon.phase.mean()) - (truth - truth.mean())).max() < 1e-4
        solved = recon.info["offsets_rad"]
        injected = np.array([[added[(i, j)] for j in range(16)] for i in range(16)])
        # c_n cancels the injected constant: c_n - c_0 = -(injected_n - injected_0)
        np.testing.assert_allclose(solved - solved[0, 0], -(injected - injected[0, 0]), atol=1e-4)
        assert recon.info["pairs"] > 2 * 16 * 15


def test_ptychonn_oracle_probe_weighted_average(sim):
    gmax = gmax_of(sim)
    psi = probe(sim.energy_eV, sim.semiangle_mrad, K, gmax_invA=gmax)
    inside = np.abs(psi) ** 2 > 0.1 * (np.abs(psi) ** 2).max()

    def oracle(inputs: torch.Tensor, positions: torch.Tensor):
        assert float(inputs.amax()) == pytest.approx(1.0)  # centre CBED / its maximum
        phases = [np.where(inside, window(sim, x, y, 1 / (2 * gmax), K), 0.0) for x, y in positions.numpy()]
        phase = torch.from_numpy(np.stack(phases).astype(np.float32))
        return torch.ones_like(phase), phase

    for oversampling in (1, 2):
        recon = ptychonn_reconstruct(
            as_scan(sim), oracle, pixels=K, gmax_invA=gmax, oversampling=oversampling, progress=False
        )
        assert xc(truth_on(sim, recon), recon.phase) > 0.9999
        np.testing.assert_allclose(recon.amplitude, 1.0, atol=1e-5)


class _RowLog:
    """A lazily readable scan that records the scan rows of every read."""

    def __init__(self, data: np.ndarray):
        self.data, self.reads = data, []
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, key):
        assert isinstance(key, slice), f"reads must be blocks of rows, got {key!r}"
        rows = range(*key.indices(self.shape[0]))
        self.reads.append(len(rows))
        return np.array(self.data[key])


def test_scan_is_streamed_in_blocks_of_rows(sim):
    log = _RowLog(sim.data)
    airpi_reconstruct(
        as_scan(sim, log), airpi_oracle(sim), pixels=K, gmax_invA=gmax_of(sim), block_rows=2, progress=False
    )
    assert max(log.reads) <= 2 + 2  # a block plus one halo row per side
    assert sum(log.reads) <= 16 * 3 + 16  # mean-CBED pass + blocks with their halos


def _peak_bytes(path, sim) -> int:
    scan = load_4dstem(path, validate=False)
    try:
        tracemalloc.start()
        airpi_reconstruct(
            scan, airpi_oracle(sim), pixels=K, gmax_invA=gmax_of(sim), block_rows=2, progress=False
        )
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        scan.close()


def test_memory_grows_with_the_object_not_with_the_data(sim, tmp_path):
    """tracemalloc (NumPy/h5py allocations) peak for 16 vs 64 scan rows of 16 positions, 64x64-pixel CBEDs.

    The data grow from 4 to 16 MB; a block of rows stays the same, so the peak may only grow by what the
    object accumulator needs (a few kB here). The peak holds two blocks of raw rows (the one in use and the
    one the reader reads ahead: ~1 MB each here), 3.8 MB measured (1.7 MB before the read-ahead).
    """
    peaks, sizes = [], []
    for rows in (16, 64):
        data = np.tile(np.kron(sim.data, np.ones((1, 1, 2, 2), np.float32)) / 4, (rows // 16, 1, 1, 1))
        path = tmp_path / f"scan{rows}.h5"
        save_4dstem(
            path, data, energy_eV=sim.energy_eV, semiangle_mrad=sim.semiangle_mrad,
            scan_step_A=sim.scan_step_A, k_pixel_invA=sim.k_pixel_invA / 2,
        )  # fmt: skip
        sizes.append(data.nbytes)
        peaks.append(_peak_bytes(path, sim))
    assert peaks[1] < 0.3 * sizes[1], (peaks, sizes)
    assert peaks[1] - peaks[0] < 0.02 * (sizes[1] - sizes[0]), (peaks, sizes)


@pytest.mark.parametrize("detector_px", [64, 128])
def test_chang_accepts_a_detector_that_ends_at_twice_the_aperture(detector_px):
    """The simulated scans' detectors end at 2 alpha: Chang's default input (collection ratio 2) must run
    on them (its outermost input pixels overhang the detector by up to half a pixel); 2.2 alpha must not."""
    energy, alpha_mrad = 300e3, 20.0
    alpha_invA = alpha_mrad * 1e-3 / wavelength(energy)
    k = (np.arange(detector_px) - detector_px // 2) * 4 * alpha_invA / detector_px
    disc = (np.hypot(k[:, None], k[None, :]) <= alpha_invA).astype(np.float32)  # bright field at K // 2
    data = np.broadcast_to(disc, (4, 4, detector_px, detector_px)).copy()
    scan = Scan4D(
        data=data,
        energy_eV=energy,
        semiangle_mrad=alpha_mrad,
        scan_step_A=(0.3, 0.3),
        k_pixel_invA=(4 * alpha_invA / detector_px,) * 2,
    )

    def zero_phase(inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(inputs), 32, 32)

    recon = chang_reconstruct(scan, zero_phase, progress=False)
    assert np.isfinite(recon.phase).all()
    with pytest.raises(ValueError, match="Chang input needs the detector to reach"):
        chang_reconstruct(scan, zero_phase, collection_ratio=2.2, progress=False)


def test_without_read_ahead_the_caller_reads_each_block_in_place(sim, monkeypatch):
    monkeypatch.setattr(_PatternStream, "read_ahead", False)
    label = 1.0 + 16 * np.arange(16)[:, None] + np.arange(16)[None, :]
    plain = np.broadcast_to(label[:, :, None, None], (16, 16, K, K)).astype(np.float32)
    log: list = []
    geometry = ScanGeometry.from_scan(as_scan(sim, _RecordedRows(plain, log)))
    stream = _PatternStream(geometry, K, gmax_of(sim), np.array([K // 2, K // 2]), torch.device("cpu"))
    for blocks, _ in enumerate(stream.kernels(4, False, ""), start=1):
        log.append(("consumer has block", blocks))
    names = {entry[1] for entry in log if entry[0] == "read"}
    assert names == {threading.current_thread().name}
    # each block is read just before the caller gets it, not ahead
    assert [entry[0] for entry in log] == ["read", "consumer has block"] * 4
