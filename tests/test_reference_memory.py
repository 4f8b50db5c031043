"""Issue #17 point 6, memory of the whole-scan references: ePIE streams the scan from disk in blocks of
rows; SSB states its O(N) need and refuses, in one line and before it allocates the bright-field stack,
when the need exceeds the limit (default: the memory available now).

Scan: tests/scan4d_helpers.py's 24 x 24 positions of 48 x 48 pixels (80 kV, 20 mrad, 0.52 A) with known
phase; the streamed ePIE must reach the in-memory run's accuracy (both > 0.99 xc to the truth).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan

from evaluation.cli import reconstruct_main
from evaluation.io import save_4dstem
from evaluation.metrics import xc
from evaluation.references import epie, ssb
from evaluation.references._common import InsufficientMemoryError, mean_pattern, pattern_centre
from evaluation.references.ssb import ssb_geometry, ssb_memory_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scan():
    return simulate_scan()


class CountingRows:
    """An array stand-in that records how many scan rows each read asks for (an HDF5 dataset's role)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.reads: list[int] = []

    def __getitem__(self, index):
        block = self.array[index]
        self.reads.append(block.shape[0] if block.ndim == 4 else 1)
        return block


def _settings(s):
    return {
        "energy_eV": s.energy_eV,
        "semiangle_mrad": s.semiangle_mrad,
        "scan_step_A": s.scan_step_A,
        "k_pixel_invA": s.k_pixel_invA,
        "progress": False,
    }


def test_epie_streams_blocks_of_rows_and_reaches_the_in_memory_accuracy(scan, tmp_path):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("data", data=scan.data, chunks=(1, *scan.data.shape[1:]))
    whole = epie(scan.data, **_settings(scan), iterations=6)
    counting = CountingRows(scan.data)
    streamed_counting = epie(counting, **_settings(scan), iterations=6, block_rows=5)
    assert max(counting.reads) <= 5  # never the whole scan at once
    # every iteration reads the scan again: the preparation pass plus 6 passes of 5 blocks (24 rows)
    assert sum(counting.reads) >= 7 * scan.data.shape[0]
    with h5py.File(path, "r") as handle:
        streamed = epie(handle["data"], **_settings(scan), iterations=6, block_rows=5)
    assert whole.info["block_rows"] == 24 and streamed.info["block_rows"] == 5
    np.testing.assert_array_equal(streamed.phase, streamed_counting.phase)  # file or array: the same run
    truth = scan.phase[: whole.phase.shape[0], : whole.phase.shape[1]]
    assert xc(truth, whole.phase) > 0.99
    assert xc(truth, streamed.phase) > 0.99
    assert xc(whole.phase, streamed.phase) > 0.99
    # another visiting order, not another algorithm: the runs differ but not by much
    assert not np.array_equal(whole.phase, streamed.phase)


def test_epie_chooses_streaming_when_the_scan_exceeds_its_memory_limit(scan):
    amplitudes_GB = scan.data.size * 4 / 1e9
    small = epie(scan.data, **_settings(scan), iterations=1, memory_limit_GB=amplitudes_GB)
    roomy = epie(scan.data, **_settings(scan), iterations=1, memory_limit_GB=4 * amplitudes_GB)
    assert small.info["block_rows"] < scan.data.shape[0]  # the amplitudes exceed half the limit
    assert roomy.info["block_rows"] == scan.data.shape[0]
    with pytest.raises(ValueError, match="epie: block_rows must be a positive integer"):
        epie(scan.data, **_settings(scan), iterations=1, block_rows=0)


def test_ssb_refuses_before_allocating_when_the_scan_would_not_fit(scan):
    geometry = ssb_geometry(
        scan.data.shape,
        pattern_centre(mean_pattern(scan.data, progress=False)),
        scan.energy_eV,
        scan.semiangle_mrad,
        scan.scan_step_A,
        scan.k_pixel_invA,
    )
    need_GB = ssb_memory_bytes(geometry) / 1e9
    counting = CountingRows(scan.data)
    with pytest.raises(InsufficientMemoryError) as caught:
        ssb(counting, **_settings(scan), memory_limit_GB=0.5 * need_GB)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("ssb: a 24 x 24 scan")
    assert f"{int(geometry.in_disc.sum())} bright-field pixels" in message and "bin the detector" in message
    # only the mean pattern was read (its one pass): no bright-field stack was filled
    assert sum(counting.reads) == scan.data.shape[0]
    ssb(scan.data, **_settings(scan), memory_limit_GB=2 * need_GB)  # within the limit: runs


@pytest.mark.parametrize("boundary", ["smooth", "periodic"])
def test_ssb_memory_count_bounds_the_measured_peak(scan, boundary):
    """ssb_memory_bytes is what ssb allocates at its peak, within a margin (numpy's allocations are
    traced): an upper bound, and not a loose one. A transform in double precision would break it."""
    data = np.ascontiguousarray(scan.data)
    geometry = ssb_geometry(
        data.shape,
        pattern_centre(mean_pattern(data, progress=False)),
        scan.energy_eV,
        scan.semiangle_mrad,
        scan.scan_step_A,
        scan.k_pixel_invA,
        boundary=boundary,
    )
    tracemalloc.start()
    try:
        ssb(data, **_settings(scan), boundary=boundary)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    counted = ssb_memory_bytes(geometry)
    assert peak <= counted <= 1.5 * peak, (peak, counted)


def test_reconstruct_cli_names_the_memory_need_in_one_line(scan, tmp_path, capsys):
    path = tmp_path / "scan.h5"
    save_4dstem(
        path, scan.data, energy_eV=scan.energy_eV, semiangle_mrad=scan.semiangle_mrad,
        scan_step_A=scan.scan_step_A, k_pixel_invA=scan.k_pixel_invA,
    )  # fmt: skip
    output = tmp_path / "out.h5"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="reconstruct",
            overrides=[f"input={path}", f"output={output}", "method=ssb", "ssb.memory_limit_GB=1e-6",
                       "progress=false"],
        )  # fmt: skip
    assert reconstruct_main(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepstem: error: ssb: a 24 x 24 scan"), err
    assert "GB allowed (memory_limit_GB)" in err[0]
    assert not output.exists()
