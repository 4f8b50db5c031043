"""Precise batch norm (training/precise_bn.py): running statistics re-estimated over many batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from training.precise_bn import PreciseBatchNorm, batchnorm_layers, recalibrate_batchnorm

ROOT = Path(__file__).resolve().parents[1]


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.Dropout(0.5), nn.BatchNorm2d(3), nn.ReLU())


def test_statistics_become_the_plain_average_over_the_batches_and_modes_are_restored():
    torch.manual_seed(0)
    net = _net()
    bn = net[2]
    bn.running_mean.fill_(100.0)  # a stale trailing average
    net.train()
    net[1].eval()  # a mixed state, restored afterwards
    # batches whose channel means differ by orders of magnitude (as doses do)
    batches = [torch.randn(4, 1, 5, 5) * scale + scale for scale in (0.1, 1.0, 10.0, 3.0)]
    used = recalibrate_batchnorm(net, batches, num_batches=3)
    assert used == 3
    with torch.no_grad():
        features = [net[0](x) for x in batches[:3]]  # dropout off while estimating
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 3
    assert bn.momentum == 0.1 and net.training and net[0].training and not net[1].training and bn.training


def test_eval_output_then_matches_the_data_and_bad_input_is_refused():
    torch.manual_seed(1)
    net = _net()
    batches = [torch.randn(8, 1, 4, 4) * 5 + 20 for _ in range(10)]
    recalibrate_batchnorm(net, batches, num_batches=10)
    net.eval()
    with torch.no_grad():
        out = net[2](net[0](torch.cat(batches)))
    # normalised with the data's own statistics: per-channel mean ~0, std ~1
    assert out.mean(dim=(0, 2, 3)).abs().max() < 0.05 and (out.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_batchnorm(net, batches, num_batches=0)
    with pytest.raises(ValueError, match="yielded nothing"):
        recalibrate_batchnorm(net, [], num_batches=4)
    assert recalibrate_batchnorm(nn.Conv2d(1, 1, 1), batches, num_batches=4) == 0  # no batch norm: untouched
    with pytest.raises(ValueError, match=r"callbacks\.precise_bn\.num_batches"):
        PreciseBatchNorm(num_batches=0)
    assert len(batchnorm_layers(net)) == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch Chang run of train.py (tiny network and image bank) with callbacks.precise_bn at 3."""
    from hydra import compose, initialize_config_dir

    from training.cli import train

    folder = tmp_path_factory.mktemp("precise_bn_run")
    overrides = [
        "model=chang_unet", "data=stock_images", f"paths.output_dir={folder}", "logger=csv",
        "data.batch_size=4", "data.train_samples=16", "data.val_samples=4", "trainer.max_epochs=1",
        "callbacks.precise_bn.num_batches=3", "data.image_bank.photographs=[camera]",
        "data.image_bank.faces=2", "data.image_bank.textures=2", "data.image_bank.size_px=64",
        "trainer.precision=32-true", "model.net.channels=[4,8,16]",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    train(cfg)
    return folder, cfg


def _recalibrated_copy(path: Path, cfg, num_batches: int) -> nn.Module:
    """The checkpoint's network with its statistics re-estimated here over the calibration batches."""
    from models.lightning import ChangLightning
    from training.datamodules import StockImagesDataModule

    module = ChangLightning.load_from_checkpoint(path, map_location="cpu")
    data = StockImagesDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    batches = (data.on_after_batch_transfer(b, 0)["diffraction"] for b in data.train_dataloader())
    recalibrate_batchnorm(module, batches, num_batches=num_batches, forward=module)
    return module


def _first_running_var(state: dict) -> str:
    return next(k for k in state if k.endswith("running_var"))


def test_training_validates_and_checkpoints_with_the_re_estimated_statistics(tiny_run):
    """train.py with callbacks.precise_bn: the checkpoint's batch-norm buffers are the statistics of its own
    weights over the first calibration batches (fixed per-index samples of the training loader), not the
    trailing average of the training steps."""
    folder, cfg = tiny_run
    saved = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    module = _recalibrated_copy(folder / "checkpoints" / "last.ckpt", cfg, 3)
    name = _first_running_var(saved["state_dict"])
    torch.testing.assert_close(saved["state_dict"][name], module.state_dict()[name], rtol=1e-4, atol=1e-6)
    counted = saved["state_dict"][name.replace("running_var", "num_batches_tracked")]
    assert int(counted) == 3  # counted over the 3 calibration batches, not the 4 training steps


def test_recalibrate_script_writes_the_new_statistics_and_reports_both_scores(tiny_run, tmp_path):
    folder, cfg = tiny_run
    out = tmp_path / "recalibrated.ckpt"
    script = str(ROOT / "scripts" / "recalibrate_batchnorm.py")
    source = str(folder / "checkpoints" / "last.ckpt")
    command = [sys.executable, script, source, str(out), "--batches", "2", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["metric"] == "val/xc_phase" and report["batches"] == 2 and report["out"] == str(out)
    assert -1 <= report["val_as_saved"] <= 1 and -1 <= report["val_recalibrated"] <= 1
    written = torch.load(out, map_location="cpu", weights_only=True)
    expected = _recalibrated_copy(folder / "checkpoints" / "last.ckpt", cfg, 2).state_dict()
    name = _first_running_var(written["state_dict"])
    torch.testing.assert_close(written["state_dict"][name], expected[name], rtol=1e-4, atol=1e-6)
    assert not list(tmp_path.glob(".*partial*"))
    # bad input: one line naming the file, exit 2, nothing written
    missing = tmp_path / "missing.ckpt"
    result = subprocess.run([*command[:2], str(missing), str(tmp_path / "x.ckpt")], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("deepstem: error:")
    assert str(missing) in result.stderr and not (tmp_path / "x.ckpt").exists()


def test_recalibrate_script_on_an_exported_airpi_model_resolves_its_kernel_data(tmp_path):
    """An exported AIRPI (pretrained/-style, its training config inside; data.view=auto given as an override)
    is scored on the validation split of its kernel shards, before and after, as train.py builds them."""
    from hydra import compose, initialize_config_dir

    from tests.test_datasets import write_shard
    from training.cli import train

    data = tmp_path / "data" / "kernel"
    data.mkdir(parents=True)
    for i in range(3):
        write_shard(data / f"shard-{i:05d}-of-00003.h5", 12 * i, 12, [f"mp-{i}{j}" for j in range(2)])
    run = tmp_path / "run"
    overrides = [
        "model=airpi", "data=multislice", f"paths.output_dir={run}", f"paths.data_dir={tmp_path / 'data'}",
        "logger=csv", "model.net.filters=8", "data.batch_size=4", "data.num_workers=0",
        "trainer.max_epochs=1", "trainer.precision=32-true", "callbacks.precise_bn.num_batches=2",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train(compose(config_name="train", overrides=overrides))
    exported = tmp_path / "airpi.ckpt"
    source = str(run / "checkpoints" / "last.ckpt")
    export = [sys.executable, str(ROOT / "scripts" / "export_checkpoint.py"), source, str(exported),
              "--config", str(run / "config.yaml")]  # fmt: skip
    assert subprocess.run(export, capture_output=True, text=True, timeout=300).returncode == 0
    # data.view=auto (as in exports of older runs' configs): resolved from the model as train.py does
    script = [sys.executable, str(ROOT / "scripts" / "recalibrate_batchnorm.py"), str(exported),
              "--batches", "2", "--threads", "1", "data.view=auto"]  # fmt: skip
    result = subprocess.run(script, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        report["method"] == "airpi" and report["metric"] == "val/xc_object_phase" and report["batches"] == 2
    )
