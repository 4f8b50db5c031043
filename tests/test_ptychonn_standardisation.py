"""PtychoNN remedies for the collapse on ePIE labels (issue #15): label and input standardisation (fitted on
the training split, stored in the checkpoint, inverted in ``forward``), L2 and xc loss terms, probe loss
weights. Each test fails without its option."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.lightning import PtychoNNLightning
from models.losses import PtychoNNLoss
from models.ptychonn import PtychoNN, PtychoNNStandardisation, to_physical_units

SMALL = {"channels": [4, 8]}


def _module(**kw) -> PtychoNNLightning:
    torch.manual_seed(0)
    return PtychoNNLightning(net=dict(SMALL), **kw)


def _fit(model: PtychoNNLightning, px: int = 8, n: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    stats = {
        "diffraction": 0.5 + 0.1 * torch.rand(n, 1, px, px, generator=g),
        "amplitude": 1.0 + 0.02 * torch.randn(n, 1, px, px, generator=g),
        "phase": -0.05 + 0.15 * torch.randn(n, 1, px, px, generator=g),
    }
    model.norm.fit(stats["diffraction"], stats["amplitude"], stats["phase"])
    return stats


def test_linear_heads_reach_labels_the_bounded_heads_cannot():
    x = torch.rand(2, 1, 8, 8)
    net = PtychoNN(channels=[4, 8], output="linear")
    for head in (net.amplitude_decoder, net.phase_decoder):
        torch.nn.init.zeros_(head[-1].weight)
        torch.nn.init.constant_(head[-1].bias, 5.0)
    amplitude, phase = net(x)
    assert torch.allclose(amplitude, torch.tensor(5.0)) and torch.allclose(phase, torch.tensor(5.0))
    net.output = "bounded"
    amplitude, phase = net(x)
    assert amplitude.max() < 1 and phase.max() < math.pi
    with pytest.raises(ValueError, match="output"):
        PtychoNN(output="relu")


def test_standardised_labels_come_back_in_radians_from_forward():
    model = _module(standardise_labels=True)
    assert model.net.output == "linear" and model.hparams.net["output"] == "linear"
    stats = _fit(model)
    head = model.net.phase_decoder[-1]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, 2.0)  # the network says "2 std above the mean"
    _, phase = model(torch.rand(3, 1, 8, 8))
    expected = float(stats["phase"].mean() + 2.0 * stats["phase"].std())
    assert torch.allclose(phase, torch.tensor(expected), atol=1e-5)
    assert abs(float(model.norm.phase_std) - 0.15) < 0.03
    # the loss sees standardised labels: the training label mean is 0 there
    a, p = model.norm.standardise_labels(stats["amplitude"], stats["phase"])
    assert abs(float(p.mean())) < 1e-5 and abs(float(p.std()) - 1) < 1e-3
    # and to_physical_units is the exact inverse
    a2, p2 = to_physical_units(a, p, model.norm)
    assert torch.allclose(p2, stats["phase"], atol=1e-5) and torch.allclose(a2, stats["amplitude"], atol=1e-5)
    with pytest.raises(ValueError, match="linear"):
        PtychoNNLightning(net={"channels": [4, 8], "output": "bounded"}, standardise_labels=True)


def test_standardised_inputs_are_z_scores_per_pixel():
    model = _module(standardise_inputs=True, input_px=8)
    stats = _fit(model)
    z = model.norm.standardise_inputs(stats["diffraction"])
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1).abs().max() < 1e-3
    # the mean pattern enters the network as zeros
    net_only = model.net(torch.zeros(1, 1, 8, 8))[1]
    assert torch.allclose(model(model.norm.input_mean)[1], net_only, atol=1e-6)
    with pytest.raises(ValueError, match=r"ptychonn\.pixels"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="input_px"):
        PtychoNNStandardisation(inputs=True)


def test_the_standardisation_travels_in_the_checkpoint(tmp_path):
    from evaluation.networks.checkpoints import load_network

    model = _module(standardise_inputs=True, standardise_labels=True, input_px=8)
    _fit(model)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    loaded = load_network(path, "ptychonn")
    assert bool(loaded.norm.fitted) and loaded.norm.inputs and loaded.norm.labels
    x = 0.5 + 0.1 * torch.rand(2, 1, 8, 8)
    model.eval()
    for got, want in zip(loaded(x), model(x), strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    fresh = _module(standardise_inputs=True, standardise_labels=True, input_px=8).eval()
    assert not torch.allclose(fresh(x)[1], model(x)[1], atol=1e-3)  # unfitted statistics differ


def test_old_style_modules_are_unchanged():
    model = _module()
    assert model.net.output == "bounded" and not model.norm.active
    x = torch.rand(2, 1, 8, 8)
    amplitude, phase = model(x)
    assert torch.equal(phase, model.net(x)[1]) and amplitude.max() < 1


def test_loss_kinds_weights_and_xc():
    true = torch.zeros(2, 1, 4, 4)
    pred = torch.zeros(2, 1, 4, 4)
    pred[:, :, 0, 0] = 2.0
    l1 = PtychoNNLoss()(pred, pred, true, true)[1]["phase"]
    l2 = PtychoNNLoss(kind="l2")(pred, pred, true, true)[1]["phase"]
    assert float(l1) == pytest.approx(2 / 16) and float(l2) == pytest.approx(4 / 16)
    weight = torch.zeros(1, 1, 4, 4)
    weight[..., 1:, 1:] = 1.0  # the wrong pixel is outside the weights
    assert float(PtychoNNLoss(kind="l2")(pred, pred, true, true, weight)[0]) == 0.0
    weight[..., 0, 0] = 1.0
    assert float(PtychoNNLoss()(pred, pred, true, true, weight)[1]["phase"]) == pytest.approx(2 / 10)
    # xc: a prediction with the right pattern at the wrong scale and offset has xc 1; a flat one 0
    phase = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    amp = torch.ones_like(phase)
    loss = PtychoNNLoss(w_amplitude=0.0, w_phase=0.0, w_xc=1.0)
    assert float(loss(amp, 3 * phase + 1, amp, phase)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(amp, torch.zeros_like(phase), amp, phase)[1]["xc"]) == pytest.approx(1.0, abs=1e-6)
    assert "xc" not in PtychoNNLoss()(amp, phase, amp, phase)[1]
    with pytest.raises(ValueError, match="kind"):
        PtychoNNLoss(kind="huber")


def test_probe_weights_sit_on_the_label_centre(tmp_path):
    from tests.test_datamodules import _epie_fixture
    from training.datamodules import EpieLabelsDataModule

    _, scan_path, recon_path = _epie_fixture(tmp_path)
    dm = EpieLabelsDataModule(str(scan_path), str(recon_path), patch_px=16, train_fraction=0.5,
                              val_fraction=0.34, batch_size=4, label_weight="probe")  # fmt: skip
    dm.setup()
    w = dm.weight[0].numpy()
    assert w.shape == (16, 16) and np.unravel_index(w.argmax(), w.shape) == (8, 8) and w.max() == 1.0
    assert 0 < (w > 0).sum() < 16 * 16 and w[w > 0].min() > 0.1 and w[0, 0] == 0.0
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch["weight"].shape == (4, 1, 16, 16) and torch.equal(batch["weight"][3, 0], dm.weight[0])
    stats = dm.training_statistics()
    assert stats["diffraction"].shape[0] == len(dm.positions["train"]) == stats["phase"].shape[0]
    assert torch.allclose(stats["diffraction"].flatten(1).amax(1), torch.tensor(1.0))
    uniform = EpieLabelsDataModule(str(scan_path), str(recon_path), patch_px=16, train_fraction=0.5,
                                   val_fraction=0.34, batch_size=4)  # fmt: skip
    assert "weight" not in uniform.on_after_batch_transfer(next(iter(uniform.val_dataloader())), 0)
    with pytest.raises(ValueError, match="label_weight"):
        EpieLabelsDataModule("s", "r", label_weight="gauss")


def test_fit_start_fits_on_the_training_split_only(tmp_path):
    """on_fit_start takes the statistics from the data module's training lines, not validation or test."""
    from tests.test_datamodules import _epie_fixture
    from training.datamodules import EpieLabelsDataModule

    _, scan_path, recon_path = _epie_fixture(tmp_path)
    dm = EpieLabelsDataModule(str(scan_path), str(recon_path), patch_px=16, train_fraction=0.5,
                              val_fraction=0.34, batch_size=4)  # fmt: skip
    model = PtychoNNLightning(net=dict(SMALL), standardise_inputs=True, standardise_labels=True, input_px=16)

    class _Trainer:
        datamodule = dm

    object.__setattr__(model, "_trainer", _Trainer())
    model.on_fit_start()
    stats = dm.training_statistics()
    assert bool(model.norm.fitted)
    assert float(model.norm.phase_mean) == pytest.approx(float(stats["phase"].mean()), abs=1e-6)
    assert torch.allclose(model.norm.input_mean[0, 0], stats["diffraction"].mean(0)[0], atol=1e-6)
    model.norm.phase_mean.fill_(123.0)  # a resumed run keeps its checkpoint's statistics
    model.on_fit_start()
    assert float(model.norm.phase_mean) == 123.0
