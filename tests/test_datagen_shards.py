"""Shards, sharding and resume (datagen.shards, datagen.cli.run).

Most tests use a fast stand-in for the simulation (deterministic arrays from the sample's random stream),
so they check the bookkeeping in milliseconds; one test kills a real `python datagen.py` with SIGKILL in
the middle of a shard and checks that the rerun completes it exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from datagen import store
from datagen.cli import run
from datagen.parameters import ConfigError, sample_rng
from datagen.shards import PartialShard, read_index, shard_name, shard_range, write_index

ROOT = Path(__file__).resolve().parents[1]
K = 8


class FakeMaker:
    """Deterministic stand-in for KernelSampleMaker: every field derives from (seed, index) alone."""

    def __init__(self, seed: int = 0, fail: frozenset = frozenset(), crash_after: int | None = None):
        self.seed = seed
        self.fail = fail
        self.crash_after = crash_after
        self.calls: list[int] = []
        self.structures = ["fake"]

    def __call__(self, index: int, rejected: Counter | None = None) -> dict:
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise KeyboardInterrupt  # like a kill: not a sample failure, the run stops
        self.calls.append(index)
        if index in self.fail:
            raise RuntimeError(f"simulated failure of sample {index}")
        if rejected is not None and index % 3 == 0:
            rejected["strain"] += 1
        rng = sample_rng(self.seed, index)
        cbed = rng.random((9, K, K))
        cbed *= 0.8 / cbed.sum(axis=(-2, -1), keepdims=True)  # fractions of the beam, as the store requires
        return {
            "cbed": cbed.astype(np.float32),
            "wave": (rng.random((K, K)) + 1j * rng.random((K, K))).astype(np.complex64),
            "probe": np.full((K, K), index, dtype=np.complex64),
            "energy_eV": 1e3 * index,
            "semiangle_mrad": 20.0,
            "gmax_invA": 2.0,
            "step_A": 0.2,
            "Cs_A": 1e4,
            "defocus_A": 20.0,
            "thickness_A": 10.0,
            "rotation_deg": float(rng.uniform(0, 360)),
            "zone_axis": np.array([0, 0, 1], dtype=np.int32),
            "num_phonons": 4,
            "seed": int(rng.integers(1000)),
            "sample_index": index,
            "source_id": f"fake:{index}",
            "formula": "Si",
        }


def config(out_dir: Path, num_samples: int = 10, shard_index: int = 0, num_shards: int = 1, **extra) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="datagen")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(
        out_dir=str(out_dir),
        shard_index=shard_index,
        num_shards=num_shards,
        checkpoint_every=3,
        progress=False,
        **extra,
    )
    cfg["simulation"]["num_samples"] = num_samples
    return cfg


def read_shard(path: Path) -> dict:
    with store.open_checked(path, store.KERNEL) as handle:
        return {name: handle[name][()] for name in handle}


def test_shard_ranges_are_disjoint_and_cover_all_samples():
    for total in (0, 1, 7, 100, 1001):
        for shards in (1, 2, 3, 7, 100):
            ranges = [shard_range(total, i, shards) for i in range(shards)]
            flat = [i for r in ranges for i in r]
            assert flat == list(range(total))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1
    assert shard_name(3, 100) == "shard-00003-of-00100.h5"
    with pytest.raises(ValueError, match="shard_index"):
        shard_range(10, 5, 5)


def test_run_writes_a_complete_shard_with_schema_and_metadata(tmp_path):
    summary = run(config(tmp_path, num_samples=7), maker=FakeMaker())
    assert summary.written == 7 and not summary.failed
    assert summary.rejected["strain"] == 3
    data = read_shard(tmp_path / "shard-00000-of-00001.h5")
    assert data["sample_index"].tolist() == list(range(7))
    assert data["cbed"].shape == (7, 9, K, K) and data["cbed"].dtype == np.float32
    assert data["wave"].dtype == np.complex64 and data["zone_axis"].shape == (7, 3)
    with h5py.File(tmp_path / "shard-00000-of-00001.h5") as handle:
        assert handle.attrs["schema"] == "deepstem.kernel/1"
        assert handle.attrs["global_seed"] == 0
        assert "simulation" in handle.attrs["config"]
        assert json.loads(handle.attrs["rejected"]) == {"strain": 3}
    assert not list(tmp_path.glob(".*partial"))  # checkpoints removed


def test_samples_do_not_depend_on_the_sharding(tmp_path):
    one = tmp_path / "one"
    run(config(one, num_samples=10), maker=FakeMaker())
    three = tmp_path / "three"
    for i in range(3):
        run(config(three, num_samples=10, shard_index=i, num_shards=3), maker=FakeMaker())
    whole = read_shard(one / "shard-00000-of-00001.h5")
    parts = [read_shard(three / shard_name(i, 3)) for i in range(3)]
    assert [p["sample_index"].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    for name in ("cbed", "wave", "rotation_deg", "seed", "source_id"):
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), whole[name])
    # the dataset index and the virtual dataset read the three shards as one
    index = read_index(three)
    assert index["num_samples"] == 10 and [s["num_samples"] for s in index["shards"]] == [3, 3, 4]
    with h5py.File(three / "kernel.vds.h5") as vds:
        np.testing.assert_array_equal(vds["cbed"][()], whole["cbed"])
        np.testing.assert_array_equal(vds["sample_index"][()], np.arange(10))
        assert [s.decode() for s in vds["source_id"][()]] == [f"fake:{i}" for i in range(10)]


def test_interrupted_run_resumes_without_duplicates_or_gaps(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path, num_samples=10), maker=FakeMaker(crash_after=7))
    assert not (tmp_path / "shard-00000-of-00001.h5").exists()  # never a partial shard under the final name
    partial = PartialShard(tmp_path, 0, 1, "")
    assert partial.done() == set(range(7))  # 2 full chunks of 3 + the flush of the interrupted one
    resumed = FakeMaker()
    summary = run(config(tmp_path, num_samples=10), maker=resumed)
    assert resumed.calls == [7, 8, 9]
    assert summary.resumed == 7 and summary.written == 3
    data = read_shard(tmp_path / "shard-00000-of-00001.h5")
    reference = tmp_path / "reference"
    run(config(reference, num_samples=10), maker=FakeMaker())
    expected = read_shard(reference / "shard-00000-of-00001.h5")
    assert data["sample_index"].tolist() == list(range(10))
    for name in ("cbed", "wave", "probe", "rotation_deg", "seed"):
        np.testing.assert_array_equal(data[name], expected[name])
    # a finished shard is skipped, not recomputed
    again = FakeMaker()
    assert run(config(tmp_path, num_samples=10), maker=again).skipped_existing
    assert again.calls == []
    # overwrite=true recomputes it
    again = FakeMaker()
    run(config(tmp_path, num_samples=10, overwrite=True), maker=again)
    assert again.calls == list(range(10))


def test_a_failing_sample_is_logged_and_the_others_are_kept(tmp_path, caplog):
    with caplog.at_level("ERROR", logger="deepstem.datagen"):
        summary = run(config(tmp_path, num_samples=6, seed=11), maker=FakeMaker(seed=11, fail=frozenset({2})))
    assert set(summary.failed) == {2}
    assert "sample 2 (seed 11, index 2) failed" in caplog.text and "simulated failure" in caplog.text
    data = read_shard(tmp_path / "shard-00000-of-00001.h5")
    assert data["sample_index"].tolist() == [0, 1, 3, 4, 5]
    with h5py.File(tmp_path / "shard-00000-of-00001.h5") as handle:
        assert json.loads(handle.attrs["failed_indices"]) == [2]
    assert read_index(tmp_path)["shards"][0]["failed_indices"] == [2]
    assert any("failed sample 2" in line for line in summary.lines())


def test_resume_with_a_different_configuration_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path, num_samples=10), maker=FakeMaker(crash_after=4))
    with pytest.raises(ConfigError, match="different configuration"):
        run(config(tmp_path, num_samples=10, seed=5), maker=FakeMaker(seed=5))


def test_write_index_of_an_empty_folder(tmp_path):
    path = write_index(tmp_path)
    assert json.loads(path.read_text())["num_samples"] == 0


# ------------------------------------------------------------------ the real thing, killed


TINY = [
    "simulation.num_samples=6",
    "simulation.pixels=16",
    "simulation.phonons.num_configs=2",
    "simulation.energy_eV=[200000.0]",
    "simulation.semiangle_mrad={mean:25.0,std:2.0,low:20.0,high:30.0}",
    "simulation.ratio_alpha_gmax={low:0.4,high:0.6}",
    "simulation.thickness_A={low:3.0,high:6.0}",
    "simulation.numerics.max_sampling_A=0.3",
    "simulation.numerics.max_gpts=64",
    "simulation.numerics.probe_window_diameters=3",
    "simulation.numerics.slice_thickness_A=3.0",
    "simulation.specimen.position_jitter_A=3.0",
    "source.ids=[mp-81,mp-1265,bundled:Si]",
    "checkpoint_every=1",
    "seed=3",
]


def datagen(out_dir: Path, run_dir: Path, extra=(), **popen):
    command = [sys.executable, str(ROOT / "datagen.py"), f"out_dir={out_dir}", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        [*command, *TINY, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_kill_9_mid_shard_then_rerun_gives_the_uninterrupted_samples(tmp_path):
    killed = tmp_path / "killed"
    proc = datagen(killed, tmp_path / "run1", start_new_session=True)
    clean = tmp_path / "clean"
    reference = datagen(clean, tmp_path / "run3")  # the uninterrupted run, side by side
    partial = killed / ".shard-00000-of-00001.partial"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(partial.glob("chunk-*.npz"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"datagen finished before it could be killed: {proc.communicate()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    checkpointed = PartialShard(killed, 0, 1, "").done()
    assert 2 <= len(checkpointed) < 6
    assert not (killed / "shard-00000-of-00001.h5").exists()

    rerun = datagen(killed, tmp_path / "run2")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"{6 - len(checkpointed)} samples computed, {len(checkpointed)} resumed" in out + err
    assert "sample/s" in err  # the progress bar

    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    resumed = read_shard(killed / "shard-00000-of-00001.h5")
    expected = read_shard(clean / "shard-00000-of-00001.h5")
    assert resumed["sample_index"].tolist() == list(range(6))  # every index exactly once
    for name in expected:  # same (seed, index) -> the same sample, bit for bit (FFTW_ESTIMATE plans)
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    assert np.abs(expected["cbed"]).max() > 0 and len(set(expected["source_id"].tolist())) >= 2
    assert not partial.exists()


def test_worker_processes_give_the_same_samples_as_one_process(tmp_path):
    """workers=2: two warm processes share the shard; the samples are those of a single process."""
    pool = datagen(tmp_path / "pool", tmp_path / "run1", extra=["workers=2", "simulation.num_samples=4"])
    single = datagen(tmp_path / "single", tmp_path / "run2", extra=["simulation.num_samples=4"])
    for proc in (pool, single):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a = read_shard(tmp_path / "pool" / "shard-00000-of-00001.h5")
    b = read_shard(tmp_path / "single" / "shard-00000-of-00001.h5")
    assert a["sample_index"].tolist() == list(range(4))
    for name in ("cbed", "wave", "probe", "seed"):  # bit-identical across processes and schedulers
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
