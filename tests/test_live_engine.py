"""``reconstruct.py engine=libertem_live``: reconstruction while frames arrive (issue #17, point 3).

End to end against LiberTEM-live's Merlin simulator (``libertem_live.detectors.merlin.sim.CameraSim``) on
127.0.0.1, on ports the system picks (port 0), replaying an 8 x 8 scan of 32 px patterns that this module
writes as a Merlin ``.mib`` + ``.hdr``. Bounded in time without wall-clock asserts: the simulator's threads
are daemons stopped after the module, the reconstruction runs in a daemon thread joined with a timeout,
the engine probes its ports with a connect timeout and waits for the acquisition at most ``live.timeout_s``.
Skipped without LiberTEM-live (``pip install -e '.[live]'``).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan

from datagen import store
from evaluation.cli import reconstruct_main, run_method
from evaluation.engines.live import LiveSettings, completed_rows, partial_path
from evaluation.io import load_4dstem, save_4dstem

pytest.importorskip("libertem_live.api", reason="LiberTEM-live is not installed (the live extra)")

ROOT = Path(__file__).resolve().parents[1]
SCAN_PX = 8
RICOM = {"kernel_size": 5, "band_pass_invA": None}
#: Merlin counter depth written into the headers (12-bit counters are stored as U16)
COUNTER_DEPTH = 12


def write_merlin(folder: Path, counts: np.ndarray) -> Path:
    """``counts`` ``(Rx, Ry, Kx, Ky)`` (integers < 4096) as a Merlin acquisition ``scan.mib`` + ``scan.hdr``;
    returns the ``.hdr`` path.

    Format (Quantum Detectors Merlin, single 1x1 Medipix3RX chip, as read by LiberTEM's ``MIBDataSet`` and
    LiberTEM-live's ``libertem_qd_mpx`` decoder): every frame is an ASCII header of ``header size`` bytes,
    ``MQ1,<sequence 6 digits from 1>,<header size 5 digits>,<chips 2>,<width 4>,<height 4>,U16,   1x1,
    <chip select hex 2>,<timestamp>,<shutter s>,<counter>,<colour mode>,<gain mode>,<8 thresholds>,
    <DACs ...>,MQ1A,<timestamp ext>,<shutter ns>ns,<counter depth>`` padded with NUL bytes, followed by
    the pixels as big-endian uint16, rows first (``height`` rows of ``width`` pixels: a frame ``(Kx, Ky)``
    has width ``Ky``). The acquisition header ``.hdr`` holds ``key:\\tvalue`` lines between ``HDR,`` and
    ``End``; the simulator reads ``Frames in Acquisition (Number)``, ``Frames per Trigger (Number)`` (frames
    per scan row) and ``Counter Depth (number)`` from it.
    """
    rx, ry, kx, ky = counts.shape
    if counts.max() >= 2**COUNTER_DEPTH or counts.min() < 0:
        raise ValueError("counts must fit the 12-bit counter")
    header_size = 384
    dacs = (
        "3RX,175,511,000,000,000,000,000,000,125,255,125,125,100,100,082,100,087,030,128,004,255,129,128,"
        "176,168,511,511"
    )
    with open(folder / "scan.mib", "wb") as handle:
        for sequence, frame in enumerate(counts.reshape(-1, kx, ky), start=1):
            thresholds = ",".join(["1.000000E+1"] + ["0.000000E+0"] * 7)
            text = (
                f"MQ1,{sequence:06d},{header_size:05d},01,{ky:04d},{kx:04d},U16,   1x1,01,"
                f"2026-01-01 00:00:00.000000,0.001000,0,0,0,{thresholds},{dacs},"
                f"MQ1A,2026-01-01T00:00:00.000000000Z,1000000ns,{COUNTER_DEPTH},"
            ).encode("ascii")
            assert len(text) <= header_size
            handle.write(text.ljust(header_size, b"\x00"))
            handle.write(np.ascontiguousarray(frame, dtype=">u2").tobytes())
    hdr = folder / "scan.hdr"
    hdr.write_text(
        "HDR,\t\n"
        "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX\n"
        "Assembly Size (NX1, 2X2):\t   1x1\n"
        f"Counter Depth (number):\t{COUNTER_DEPTH}\n"
        f"Frames in Acquisition (Number):\t{rx * ry}\n"
        f"Frames per Trigger (Number):\t{ry}\n"
        "End\t",
        encoding="latin1",
    )
    return hdr


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An 8 x 8 scan of 32 px Poisson-noisy CBEDs (1e4 electrons each) as counts: ``scan.mib`` + ``.hdr``
    for the simulator, the same counts as ``scan.h5`` for engine=local, and ``calibration.yaml``."""
    root = tmp_path_factory.mktemp("live")
    s = simulate_scan(scan_px=SCAN_PX, cbed_px=32, dose_per_cbed=1e4)
    counts = np.rint(np.asarray(s.data)).astype(np.uint16)
    calibration = {
        "energy_eV": float(s.energy_eV), "semiangle_mrad": float(s.semiangle_mrad),
        "scan_step_A": [float(v) for v in np.broadcast_to(s.scan_step_A, 2)],
        "k_pixel_invA": [float(v) for v in np.broadcast_to(s.k_pixel_invA, 2)],
    }  # fmt: skip
    save_4dstem(root / "scan.h5", counts, **calibration)
    (root / "calibration.yaml").write_text(yaml.safe_dump(calibration))
    write_merlin(root, counts)
    return root


@pytest.fixture(scope="module")
def merlin(folder):
    """LiberTEM-live's Merlin simulator replaying ``scan.hdr`` (untriggered: each connection to the data
    port receives the acquisition header and the frames) on 127.0.0.1; yields ``(control_port,
    data_port)``."""
    from libertem_live.detectors.common import UndeadException
    from libertem_live.detectors.merlin.sim import CameraSim

    sim = CameraSim(
        path=str(folder / "scan.hdr"), nav_shape=(SCAN_PX, SCAN_PX), host="127.0.0.1",
        data_port=0, control_port=0, trigger_port=0,
    )  # fmt: skip
    sim.start()
    try:
        for thread in (sim.server_t, sim.control_t, sim.trigger_t):
            thread.wait_for_listen(timeout=60)  # raises after 60 s
        yield sim.control_t.port, sim.server_t.port
    finally:
        try:
            sim.stop()
        except UndeadException:  # daemon threads: they end with the test process
            pass


def _local_ricom(folder: Path, rows: int | None = None) -> np.ndarray:
    with load_4dstem(folder / "scan.h5", progress=False) as scan:
        if rows is not None:
            scan.data = np.asarray(scan.data[:rows])
        return np.asarray(run_method(scan, "ricom", dict(RICOM), progress=False).phase)


def _run_in_thread(cfg) -> list[int]:
    """reconstruct_main(cfg) in a daemon thread joined with a timeout (bounds the test if the stream
    stalls; not a speed assertion); its exit codes."""
    import threading

    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(reconstruct_main(cfg)), daemon=True)
    runner.start()
    runner.join(timeout=600)
    assert not runner.is_alive(), "engine=libertem_live did not finish within 600 s"
    return codes


def test_cli_live_ricom_equals_local_and_writes_partials(folder, merlin, tmp_path, monkeypatch, capsys):
    """reconstruct.py engine=libertem_live (reconstruct_main, in a daemon thread joined with a timeout)
    against the simulator: a partial file + preview after rows 3, 6 and 8 of the 8, each riCOM of exactly
    the rows received so far (as engine=local on those rows); the final riCOM equals engine=local's on the
    same counts."""

    import evaluation.cli as cli

    control, data = merlin
    seen = []
    original = cli.write_reconstruction

    def record(output, result, *args, **kwargs):
        if Path(output) != tmp_path / "live.h5":  # a partial write: check it is complete on disk at once
            written = original(output, result, *args, **kwargs)
            seen.append((Path(output), int(result.info["rows_done"]), np.array(result.phase)))
            assert written[1].stat().st_size > 1000  # the preview PNG
            return written
        return original(output, result, *args, **kwargs)

    monkeypatch.setattr(cli, "write_reconstruction", record)
    cfg = _compose(
        "engine=libertem_live", "method=ricom", "ricom.kernel_size=5", "progress=true",
        f"calibration={folder / 'calibration.yaml'}", f"output={tmp_path / 'live.h5'}",
        f"live.scan_shape=[{SCAN_PX},{SCAN_PX}]", f"live.control_port={control}", f"live.data_port={data}",
        "live.preview_every_rows=3", "live.timeout_s=120",
    )  # fmt: skip
    codes = _run_in_thread(cfg)
    out, err = capsys.readouterr()
    assert codes == [0], err
    # 8 rows in partitions of one row (3 does not divide 8): partial writes after rows 3, 6 and 8
    assert [rows for _, rows, _ in seen] == [3, 6, 8]
    # anywhere on a line: a progress bar's carriage-return updates may share the line
    progress_lines = re.findall(r"live: (\d+/\d+) scan rows", err)
    assert progress_lines == ["3/8", "6/8", "8/8"]
    assert "3 partial writes" in out
    for path, rows, phase in seen:
        assert path == partial_path(tmp_path / "live.h5") == tmp_path / "live_partial.h5"
        assert phase.shape == (rows, SCAN_PX)
        assert np.max(np.abs(phase - _local_ricom(folder, rows))) <= 1e-3
    with store.open_checked(tmp_path / "live.h5", store.RECON) as handle:
        live = handle["phase"][()]
        assert handle.attrs["method"] == "ricom"
        assert handle.attrs["info_engine"] == "libertem_live"
    local = _local_ricom(folder)
    assert live.shape == local.shape == (SCAN_PX, SCAN_PX)
    assert np.max(np.abs(live - local)) <= 1e-3
    assert np.std(local) > 1e-2  # a real image, not a flat one
    assert (tmp_path / "live.png").stat().st_size > 1000
    with store.open_checked(tmp_path / "live_partial.h5", store.RECON) as handle:
        assert handle.attrs["info_rows_done"] == SCAN_PX
        np.testing.assert_allclose(handle["phase"][()], live, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


AIRPI = ["airpi.pixels=32", "precision=32", "airpi.detector_centre_px=[16.0,16.0]"]


def test_cli_live_airpi_equals_local_on_the_rows_received(folder, merlin, tmp_path, monkeypatch, capsys):
    """engine=libertem_live method=airpi (a tiny untrained AIRPI network; the detector centre given, as
    live needs): the partial after 4 of 8 rows equals engine=local's AIRPI on those 4 rows, the final
    equals engine=local's AIRPI on the whole scan."""

    from test_reconstruct_networks import save_checkpoint

    import evaluation.cli as cli

    ckpt = save_checkpoint("airpi", tmp_path / "airpi.ckpt")
    control, data = merlin
    seen = []
    original = cli.write_reconstruction

    def record(output, result, *args, **kwargs):
        if Path(output).name == "live_partial.h5":
            seen.append((int(result.info["rows_done"]), np.array(result.phase)))
        return original(output, result, *args, **kwargs)

    monkeypatch.setattr(cli, "write_reconstruction", record)
    cfg = _compose(
        "engine=libertem_live", "method=airpi", f"ckpt={ckpt}", *AIRPI, "progress=false",
        f"calibration={folder / 'calibration.yaml'}", f"output={tmp_path / 'live.h5'}",
        f"live.scan_shape=[{SCAN_PX},{SCAN_PX}]", f"live.control_port={control}", f"live.data_port={data}",
        "live.preview_every_rows=4", "live.timeout_s=120",
    )  # fmt: skip
    codes = _run_in_thread(cfg)
    assert codes == [0], capsys.readouterr().err
    assert [rows for rows, _ in seen] == [4, 8]

    def local(rows: int) -> np.ndarray:
        with load_4dstem(folder / "scan.h5", progress=False) as scan:
            data = np.asarray(scan.data[:rows])
            calibration = scan.calibration()
        save_4dstem(tmp_path / f"rows{rows}.h5", data, **calibration)
        out = tmp_path / f"local{rows}.h5"
        local_cfg = _compose(
            f"input={tmp_path / f'rows{rows}.h5'}", "method=airpi", f"ckpt={ckpt}", *AIRPI, "progress=false",
            f"output={out}",
        )  # fmt: skip
        assert reconstruct_main(local_cfg) == 0, capsys.readouterr().err
        with store.open_checked(out, store.RECON) as handle:
            return handle["phase"][()]

    partial = local(4)
    assert seen[0][1].shape == partial.shape
    assert np.max(np.abs(seen[0][1] - partial)) <= 1e-3
    whole = local(SCAN_PX)
    with store.open_checked(tmp_path / "live.h5", store.RECON) as handle:
        live = handle["phase"][()]
        assert handle.attrs["method"] == "airpi" and handle.attrs["info_engine"] == "libertem_live"
    assert live.shape == whole.shape
    assert np.max(np.abs(live - whole)) <= 1e-3
    assert np.std(whole) > 0  # the untrained network still gives a non-constant phase


def test_completed_rows_counts_leading_full_rows():
    damage = np.zeros((4, 3), dtype=bool)
    assert completed_rows(damage) == 0
    damage[0] = True
    damage[1, :2] = True
    damage[2] = True  # a later row done before row 1 finished does not count
    assert completed_rows(damage) == 1
    damage[1] = True
    assert completed_rows(damage) == 3
    damage[:] = True
    assert completed_rows(damage) == 4


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="reconstruct", overrides=list(overrides))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the probe closes: nothing listens there


def test_missing_scan_shape_is_one_clear_error(folder, tmp_path, capsys):
    cfg = _compose(
        "engine=libertem_live", "method=ricom", f"calibration={folder / 'calibration.yaml'}",
        f"output={tmp_path / 'x.h5'}",
    )  # fmt: skip
    assert reconstruct_main(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "live.scan_shape is not set" in err[0]
    assert not list(tmp_path.iterdir())


def test_connection_refused_is_one_clear_error(folder, tmp_path, capsys):
    cfg = _compose(
        "engine=libertem_live", "method=ricom", f"calibration={folder / 'calibration.yaml'}",
        f"output={tmp_path / 'x.h5'}", "live.scan_shape=[8,8]", f"live.control_port={_closed_port()}",
        f"live.data_port={_closed_port()}", "live.connect_timeout_s=5",
    )  # fmt: skip
    assert reconstruct_main(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot connect to the Merlin control port 127.0.0.1:" in err[0], err
    assert not list(tmp_path.iterdir())


def test_live_refuses_other_methods_and_bad_settings(folder, tmp_path, capsys):
    cfg = _compose("engine=libertem_live", "method=ssb", "live.scan_shape=[8,8]", "output=x.h5")
    assert reconstruct_main(cfg) == 2
    assert "does not run on engine=libertem_live" in capsys.readouterr().err
    cfg = _compose("engine=libertem_live", "method=ricom", "live.scan_shape=[8,8]")
    assert reconstruct_main(cfg) == 2
    assert "give output=PATH.h5" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"live\.preview_every_rows"):
        LiveSettings.from_config({"scan_shape": [8, 8], "preview_every_rows": 0})
    with pytest.raises(ValueError, match=r"live\.scan_shape must be \[Rx, Ry\]"):
        LiveSettings.from_config({"scan_shape": [8]})


def test_partitions_end_on_the_rows_written():
    from evaluation.engines.live import rows_per_partition

    assert rows_per_partition(2, 8, 8) == 2
    assert rows_per_partition(3, 8, 8) == 1  # 3 does not divide 8: one row per partition
    assert rows_per_partition(8, 256, 256) == 4  # at most 1024 frames per partition
    assert rows_per_partition(4, 16, 2048) == 1  # a row longer than 1024 frames is still one partition


def test_cli_live_stall_mid_scan_is_one_error_line(tmp_path):
    """The stall check below in a fresh pytest process: its in-process Merlin simulator sent nothing (the
    reconstruction then saw no acquisition within live.timeout_s) after the LiberTEM test modules had run in
    the same process; alone it passes. The isolation keeps it a test of the live engine, not of test order."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{Path(__file__).resolve()}::test_isolated_stall_check", "--basetemp", str(tmp_path / "isolated")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "DEEPSTEM_ISOLATED_STALL_TEST": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout, done.stdout[-2000:]


def test_isolated_stall_check(folder, tmp_path):
    import os

    if os.environ.get("DEEPSTEM_ISOLATED_STALL_TEST") != "1":
        pytest.skip("runs in its own process: test_cli_live_stall_mid_scan_is_one_error_line")
    _stall_check_in_this_process(folder, tmp_path)


def _stall_check_in_this_process(folder, tmp_path):
    """A detector that stops after 5 of 8 scan rows (the simulator sends 40 frames and then nothing):
    ``python reconstruct.py engine=libertem_live`` (a subprocess: the stalled receiver thread stays blocked
    in native code, which the entry point leaves with os._exit) ends with exit code 2 and one error line
    naming live.stall_timeout_s, writes no final file, and any partial file it wrote is complete."""
    import subprocess
    import sys

    from libertem_live.detectors.common import UndeadException
    from libertem_live.detectors.merlin.sim import CameraSim

    sim = CameraSim(
        path=str(folder / "scan.hdr"), nav_shape=(SCAN_PX, SCAN_PX), host="127.0.0.1",
        data_port=0, control_port=0, trigger_port=0,
    )  # fmt: skip
    inner = sim.sim
    frames_sent = 5 * SCAN_PX

    def stop_mid_scan(conn) -> None:
        for index, chunk in enumerate(inner.get_chunks()):  # a frame is two chunks: prefix, header + pixels
            if index >= 2 * frames_sent:
                break
            conn.sendall(chunk)
        inner.stop_event.wait()  # the detector hangs with the connection open

    inner.handle_acquisition = stop_mid_scan
    sim.start()
    try:
        for thread in (sim.server_t, sim.control_t, sim.trigger_t):
            thread.wait_for_listen(timeout=60)
        command = [
            sys.executable, str(ROOT / "reconstruct.py"), "engine=libertem_live", "method=ricom",
            "ricom.kernel_size=5", "progress=false", f"calibration={folder / 'calibration.yaml'}",
            f"output={tmp_path / 'live.h5'}", f"live.scan_shape=[{SCAN_PX},{SCAN_PX}]",
            f"live.control_port={sim.control_t.port}", f"live.data_port={sim.server_t.port}",
            "live.preview_every_rows=2", "live.timeout_s=120", "live.stall_timeout_s=10",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        try:
            sim.stop()
        except UndeadException:
            pass
    errors = [line for line in done.stderr.splitlines() if line.startswith("deepstem: error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "no frames for 10 s (live.stall_timeout_s)" in errors[0]
    assert "live.h5 not written" in errors[0]
    assert "panicked" not in done.stderr  # left before the interpreter shut down under the receiver
    assert not (tmp_path / "live.h5").exists()
    partial = partial_path(tmp_path / "live.h5")
    if partial.exists():  # the rows reconstructed before the stall: a complete, valid file
        with store.open_checked(partial, store.RECON) as handle:
            assert 0 < handle.attrs["info_rows_done"] <= 5
