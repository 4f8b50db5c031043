"""`python datagen.py`: configs compose (default, paper, SLURM), bad configuration exits with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from datagen.cli import run
from datagen.parameters import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def composed(overrides=(), hydra=False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="datagen", overrides=list(overrides), return_hydra_config=hydra)


def test_default_and_paper_configs():
    default = composed()
    assert default.simulation.pixels == 64 and default.source.name == "bundled"
    assert default.device == "cpu" and default.num_shards == 1
    assert default.simulation.phonons.num_configs < 30  # reduced for a laptop
    paper = composed(["simulation=kernel_paper"]).simulation
    assert paper.phonons.num_configs == 30 and paper.phonons.rms_displacement_A == 0.08
    assert paper.numerics.parametrization == "lobato"
    assert paper.semiangle_mrad == {"mean": 20.0, "std": 10.0, "low": 5.0, "high": 30.0}
    assert paper.ratio_alpha_gmax == {"low": 0.1, "high": 0.95}
    assert paper.step_A == {"low": 0.0167, "high": 0.33} and paper.step_rayleigh is None  # Table 1
    assert paper.thickness_A == {"low": 3.0, "high": 30.0}
    assert len(paper.zone_axes) == 7 and len(paper.energy_eV) == 12
    assert paper.Cs_A == 1e4 and paper.defocus_A == "scherzer"


def test_slurm_launcher_composes_to_a_submitit_array_job():
    cfg = composed(["hydra/launcher=slurm", "shard_index=3", "num_shards=100"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.array_parallelism >= 1 and launcher.timeout_min > 0
    local = composed(["hydra/launcher=submitit_local"], hydra=True).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")


@pytest.mark.parametrize(
    "overrides, parameter",
    [
        (["simulation.thickness_A.low=-3"], "simulation.thickness_A"),
        (["simulation.ratio_alpha_gmax.high=1.3"], "simulation.ratio_alpha_gmax"),
        (["simulation.zone_axes=[[1,1,0],[1,1]]"], "simulation.zone_axes"),
        (["source.elements=[Xx]"], "source.elements"),
        (["shard_index=4", "num_shards=4"], "shard_index"),
        (["num_shards=0"], "num_shards"),
        (["simulation.phonons.num_configs=-1"], "simulation.phonons.num_configs"),
    ],
)
def test_bad_configuration_raises_a_config_error_naming_the_parameter(tmp_path, overrides, parameter):
    cfg = OmegaConf.to_container(composed([f"out_dir={tmp_path}", *overrides]), resolve=True)
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert info.value.parameter == parameter, str(info.value)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "override, parameter",
    [
        ("simulation.thickness_A.low=-3", "simulation.thickness_A"),
        ("source.elements=[Xx]", "source.elements"),
    ],
)
def test_bad_configuration_exits_non_zero_with_one_line(tmp_path, override, parameter):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "datagen.py"),
            f"out_dir={tmp_path}/data",
            f"hydra.run.dir={tmp_path}/run",
            override,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"deepstem: error: {parameter}:")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()


def test_gpu_without_cupy_is_a_configuration_error(tmp_path):
    pytest.importorskip("abtem")
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    cfg = OmegaConf.to_container(composed([f"out_dir={tmp_path}", "device=gpu"]), resolve=True)
    with pytest.raises(ConfigError, match="CuPy") as info:
        run(cfg)
    assert info.value.parameter == "device"


@pytest.mark.slow
def test_submitit_local_runs_the_shard_array(tmp_path):
    """The same multirun line as on SLURM, with submitit's local launcher: two shards, then the index."""
    from test_datagen_shards import TINY

    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "datagen.py"),
            "-m",
            "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={tmp_path}/multirun",
            f"out_dir={tmp_path}/data",
            "shard_index=0,1",
            "num_shards=2",
            *[t for t in TINY if not t.startswith("checkpoint_every")],
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "data").glob("shard-*.h5")) == [
        "shard-00000-of-00002.h5",
        "shard-00001-of-00002.h5",
    ]
    import json

    index = json.loads((tmp_path / "data" / "index.json").read_text())
    assert index["num_samples"] == 6


def test_other_simulations_plug_in_through_their_runner(tmp_path):
    cfg = OmegaConf.to_container(composed([f"out_dir={tmp_path}"]), resolve=True)
    cfg["simulation"]["runner"] = "json:dumps"  # any importable callable taking the config
    assert '"out_dir"' in run(cfg)
    cfg["simulation"]["runner"] = "datagen.no_such_module:run"
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert info.value.parameter == "simulation.runner"
