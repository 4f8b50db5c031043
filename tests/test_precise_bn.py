"""Precise batch norm (training/precise_bn.py): running statistics re-estimated over many batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from training.precise_bn import PreciseBatchNorm, batchnorm_layers, recalibrate_batchnorm


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


def test_training_validates_and_checkpoints_with_the_re_estimated_statistics(tmp_path):
    """train.py with callbacks.precise_bn: the checkpoint's batch-norm buffers are the statistics of its own
    weights over the first calibration batches (fixed per-index samples of the training loader), not the
    trailing average of the training steps."""
    from hydra import compose, initialize_config_dir

    from models.lightning import ChangLightning
    from training.cli import train
    from training.datamodules import StockImagesDataModule

    root = Path(__file__).resolve().parents[1]
    overrides = [
        "model=chang_unet", "data=stock_images", f"paths.output_dir={tmp_path}", "logger=csv",
        "data.batch_size=4", "data.train_samples=16", "data.val_samples=4", "trainer.max_epochs=1",
        "callbacks.precise_bn.num_batches=3", "data.image_bank.photographs=[camera]",
        "data.image_bank.faces=2", "data.image_bank.textures=2", "data.image_bank.size_px=64",
        "trainer.precision=32-true", "model.net.channels=[4,8,16]",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    train(cfg)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    module = ChangLightning.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    data = StockImagesDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    batches = (data.on_after_batch_transfer(b, 0)["diffraction"] for b in data.train_dataloader())
    recalibrate_batchnorm(module, batches, num_batches=3, forward=module)
    name = next(k for k in saved["state_dict"] if k.endswith("running_var"))
    recomputed = dict(module.state_dict())[name]
    torch.testing.assert_close(saved["state_dict"][name], recomputed, rtol=1e-4, atol=1e-6)
    stale = saved["state_dict"][name.replace("running_var", "num_batches_tracked")]
    assert int(stale) == 3  # counted over the 3 calibration batches, not the 4 training steps
