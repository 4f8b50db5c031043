"""Datagen reliability (issue 18 points 3, 6, 7; issue 12 section 3).

One job owns a shard (lock with host, pid and staleness), identical duplicate checkpoints are merged,
every deepstem error is one ``deepstem: error:`` line, a broken finished shard is recomputed, stale
temporaries are removed, a finished output is reused only under the fingerprint that made it, and abTEM
runs with a planning effort that makes samples bit-identical between processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_datagen_shards import FakeMaker, config, read_shard

from datagen import store
from datagen.cli import command, run
from datagen.parameters import ConfigError
from datagen.shards import PartialShard, ShardLock, ShardLockError, read_index, shard_name

ROOT = Path(__file__).resolve().parents[1]
SHARD = shard_name(0, 1)


def write_lock(out_dir: Path, pid: int, host: str | None = None, age_s: float = 0.0) -> Path:
    """A lock file as another job would leave it (``age_s``: seconds since its last heartbeat)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = ShardLock(out_dir, 0, 1).path
    owner = {"host": host or socket.gethostname(), "pid": pid, "started": "2024-01-01T00:00:00+00:00"}
    path.write_text(json.dumps({**owner, "token": "someone-else"}))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ point 3: one job per shard


def test_a_live_lock_refuses_a_second_job_in_one_line(tmp_path):
    lock = write_lock(tmp_path, os.getpid())
    maker = FakeMaker()
    with pytest.raises(ShardLockError) as info:
        run(config(tmp_path, num_samples=4), maker=maker)
    message = str(info.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert SHARD in message and str(lock) in message
    assert maker.calls == [] and lock.is_file() and not (tmp_path / SHARD).exists()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    lock = write_lock(tmp_path, dead_pid())
    summary = run(config(tmp_path, num_samples=4), maker=FakeMaker())
    assert summary.written == 4
    assert read_shard(tmp_path / SHARD)["sample_index"].tolist() == [0, 1, 2, 3]
    assert not lock.exists()  # released at the end


def test_a_lock_of_another_host_is_stale_only_after_lock_stale_s(tmp_path):
    write_lock(tmp_path, 1, host="elsewhere.invalid", age_s=30)
    with pytest.raises(ShardLockError, match=r"elsewhere\.invalid"):
        run(config(tmp_path, num_samples=3, lock_stale_s=600), maker=FakeMaker())
    write_lock(tmp_path, 1, host="elsewhere.invalid", age_s=1200)
    assert run(config(tmp_path, num_samples=3, lock_stale_s=600), maker=FakeMaker()).written == 3


def test_the_lock_is_held_while_computing_and_checked_by_a_second_acquirer(tmp_path):
    first = ShardLock(tmp_path, 0, 1)
    with first:
        owner = json.loads(first.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(ShardLockError, match="being computed"):
            ShardLock(tmp_path, 0, 1).acquire()
    assert not first.path.exists()


def test_identical_duplicate_checkpoints_are_kept_once(tmp_path):
    """Two jobs that both checkpointed the same samples (the old wedge): the rerun completes."""
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path, num_samples=6), maker=FakeMaker(crash_after=3))
    partial = PartialShard(tmp_path, 0, 1, "")
    maker = FakeMaker()
    partial.save([maker(i) for i in range(3)])  # the second job's copy of the same samples
    assert len(partial.chunks()) == 2
    summary = run(config(tmp_path, num_samples=6), maker=FakeMaker())
    assert summary.written == 3 and summary.resumed == 3
    assert read_shard(tmp_path / SHARD)["sample_index"].tolist() == list(range(6))


def test_different_duplicate_checkpoints_name_the_way_out(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path, num_samples=6), maker=FakeMaker(crash_after=3))
    partial = PartialShard(tmp_path, 0, 1, "")
    other = FakeMaker(seed=99)(1)
    other["sample_index"] = 1
    partial.save([other])
    with pytest.raises(store.StoreError) as info:
        run(config(tmp_path, num_samples=6), maker=FakeMaker())
    message = str(info.value)
    assert "\n" not in message and "sample 1" in message and "overwrite=true" in message
    assert str(partial.folder) in message


# ------------------------------------------------------------------ point 6: errors, broken shards, temps


def test_every_deepstem_error_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = command(config(blocker / "data", num_samples=2), maker=FakeMaker())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("deepstem: error: ") and str(blocker) in err[0]

    write_lock(tmp_path / "locked", os.getpid())
    assert command(config(tmp_path / "locked", num_samples=2), maker=FakeMaker()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "being computed" in err[0]

    assert command(config(tmp_path / "zero", num_samples=0), maker=FakeMaker()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepstem: error: simulation.num_samples:")


def test_a_truncated_finished_shard_is_recomputed_not_trusted(tmp_path):
    run(config(tmp_path, num_samples=5), maker=FakeMaker())
    path = tmp_path / SHARD
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    maker = FakeMaker()
    summary = run(config(tmp_path, num_samples=5), maker=maker)
    assert not summary.skipped_existing and maker.calls == list(range(5))
    assert read_shard(path)["sample_index"].tolist() == list(range(5))
    assert read_index(tmp_path)["num_samples"] == 5


def test_write_index_reports_an_unreadable_shard_instead_of_crashing(tmp_path):
    from datagen.shards import write_index

    run(config(tmp_path, num_samples=4, shard_index=0, num_shards=2), maker=FakeMaker())
    (tmp_path / shard_name(1, 2)).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # a truncated file
    index = json.loads(write_index(tmp_path).read_text())
    assert index["num_samples"] == 2
    assert [entry["file"] for entry in index["unreadable"]] == [shard_name(1, 2)]


def test_stale_temporaries_of_a_killed_job_are_removed(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale_shard = tmp_path / f".{SHARD}.tmp-999999-deadbeef"
    stale_shard.write_bytes(b"half a shard")
    stale_index = tmp_path / ".index.json.tmp-999999-deadbeef"
    stale_index.write_text("{")
    old = time.time() - 7200
    os.utime(stale_index, (old, old))
    fresh_index = tmp_path / ".index.json.tmp-1-cafecafe"  # maybe another job writing right now
    fresh_index.write_text("{")
    other_shard = tmp_path / f".{shard_name(1, 2)}.tmp-999999-deadbeef"  # not this job's shard
    other_shard.write_bytes(b"x")
    run(config(tmp_path, num_samples=3), maker=FakeMaker())
    assert not stale_shard.exists() and not stale_index.exists()
    assert fresh_index.exists() and other_shard.exists()


def test_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", str(src)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.write(tmp_path / "x.h5", store.IMAGE, {"image": np.zeros((1, 2, 2)), "pixel_size_A": [0.1]})
    renamed = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert renamed, events
    temporary = events[renamed[-1]][1]
    synced = [i for i, (kind, name) in enumerate(events) if kind == "fsync" and name == temporary]
    assert synced and synced[0] < renamed[-1], events


# ------------------------------------------------------------------ issue 12 section 3: fingerprints


def test_a_finished_shard_of_another_configuration_is_not_reused(tmp_path):
    run(config(tmp_path, num_samples=3), maker=FakeMaker())
    maker = FakeMaker()
    with pytest.raises(ConfigError) as info:
        run(config(tmp_path, num_samples=5), maker=maker)
    message = str(info.value)
    assert "\n" not in message and "simulation.num_samples" in message
    assert "overwrite=true" in message and "out_dir" in message
    assert maker.calls == []
    with pytest.raises(ConfigError, match="seed"):
        run(config(tmp_path, num_samples=3, seed=4), maker=maker)
    # the same configuration is still skipped; overwrite=true recomputes under the new one
    assert run(config(tmp_path, num_samples=3), maker=maker).skipped_existing
    run(config(tmp_path, num_samples=5, overwrite=True), maker=FakeMaker())
    assert read_shard(tmp_path / SHARD)["sample_index"].tolist() == list(range(5))


def test_a_shard_written_before_fingerprints_is_checked_against_its_stored_config(tmp_path):
    run(config(tmp_path, num_samples=3), maker=FakeMaker())
    with h5py.File(tmp_path / SHARD, "a") as handle:
        if "fingerprint" in handle.attrs:
            del handle.attrs["fingerprint"]
    assert run(config(tmp_path, num_samples=3), maker=FakeMaker()).skipped_existing
    with pytest.raises(ConfigError, match=r"simulation\.num_samples"):
        run(config(tmp_path, num_samples=4), maker=FakeMaker())


def test_a_partial_shard_of_another_configuration_names_the_keys(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path, num_samples=10), maker=FakeMaker(crash_after=4))
    with pytest.raises(ConfigError) as info:
        run(config(tmp_path, num_samples=10, seed=5), maker=FakeMaker(seed=5))
    assert "seed" in str(info.value) and "overwrite=true" in str(info.value)


def test_zero_samples_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        run(config(tmp_path, num_samples=0), maker=FakeMaker())
    assert info.value.parameter == "simulation.num_samples"
    assert not list(tmp_path.iterdir())


def test_a_finished_scan_of_other_settings_is_not_reused(tmp_path):
    from test_datagen_runners import tiny_scans

    run(tiny_scans(tmp_path, "num_shards=2", "shard_index=1"))
    assert run(tiny_scans(tmp_path, "num_shards=2", "shard_index=1")).skipped_existing
    changed = tiny_scans(tmp_path, "num_shards=2", "shard_index=1")
    changed["simulation"]["settings"]["scan_gpts"] = [5, 5]
    with pytest.raises(ConfigError) as info:
        run(changed)
    message = str(info.value)
    assert "scan_gpts" in message and "overwrite=true" in message and "\n" not in message


# ------------------------------------------------------------------ threads and reproducibility


def test_threads_are_configured_at_the_start_of_the_run(tmp_path, monkeypatch):
    import datagen.cli

    calls = []
    monkeypatch.setattr(datagen.cli, "configure_threads", lambda t, w: calls.append((t, w)))
    assert command(config(tmp_path, num_samples=2, threads=1), maker=FakeMaker()) == 0
    assert calls == [(1, 0)]
    monkeypatch.setattr(datagen.cli, "run", lambda cfg, maker=None: None)  # no worker processes here
    assert command(config(tmp_path / "pool", num_samples=2, workers=3)) == 0
    assert calls[-1] == ("auto", 3)  # auto: the cores left after one per worker process
    with pytest.raises(ConfigError) as info:
        run(config(tmp_path / "bad", num_samples=2, threads=0), maker=FakeMaker())
    assert info.value.parameter == "threads"


def test_the_default_config_plans_ffts_reproducibly(tmp_path):
    """FFTW_MEASURE picks plans by timing, so two processes round differently (seen: 2.3e-6 relative)."""
    pytest.importorskip("abtem")
    import abtem

    from datagen.cli import KernelSampleMaker, structures_of

    cfg = config(tmp_path, num_samples=1)
    assert cfg["fftw_planning"] == "FFTW_ESTIMATE" and cfg["threads"] == "auto"
    abtem.config.set({"fftw.planning_effort": "FFTW_MEASURE"})
    KernelSampleMaker(cfg["simulation"], structures_of(cfg)[:1], 0, fftw_planning=cfg["fftw_planning"])
    assert abtem.config.get("fftw.planning_effort") == "FFTW_ESTIMATE"
    with pytest.raises(ConfigError) as info:
        run(config(tmp_path, num_samples=1, fftw_planning="FFTW_FAST"))
    assert info.value.parameter == "fftw_planning"
