"""A PtychoNN trained on a scan's own ePIE labels records its input geometry (issue #15): reconstruct.py
needs no ``pixels`` / ``gmax_invA`` / ``detector_centre_px`` and feeds the network what it was trained on."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from evaluation.networks.checkpoints import ptychonn_geometry_params
from tests.test_ptychonn_epie import TINY
from tests.test_train import compose_train

WHOLE_64_TO_32 = {"deepstem": {"geometry": {"network_px": 32.0, "detector_px": 64.0, "whole_detector": 1.0}}}


def test_whole_detector_geometry_is_the_binning_of_training():
    """64 -> 32 px: network pixel 16 is detector coordinate 32.5, gmax the detector's half-width; the
    values docs/results_ptychonn.md had to give by hand."""
    filled, messages = ptychonn_geometry_params(WHOLE_64_TO_32, {"pixels": None}, (64, 64), (0.0635, 0.0635))
    assert messages == []
    assert filled["pixels"] == 32
    assert filled["gmax_invA"] == pytest.approx(64 * 0.0635 / 2)
    assert filled["detector_centre_px"] == pytest.approx((32.5, 32.5))
    # 96 -> 48 (the WS2 command of the docs): [48.5, 48.5]
    info = {"deepstem": {"geometry": {"network_px": 48.0, "detector_px": 96.0, "whole_detector": 1.0}}}
    assert ptychonn_geometry_params(info, {}, (96, 96), (0.05, 0.05))[0]["detector_centre_px"] == (48.5, 48.5)


def test_conflicting_or_foreign_geometry_is_named():
    kept, messages = ptychonn_geometry_params(WHOLE_64_TO_32, {"pixels": 64}, (64, 64), (0.06, 0.06))
    assert kept["pixels"] == 64 and len(messages) == 1 and "ptychonn.pixels=64" in messages[0]
    _, messages = ptychonn_geometry_params(WHOLE_64_TO_32, {}, (128, 128), (0.06, 0.06))
    assert len(messages) == 1 and "128 x 128" in messages[0] and "64 x 64" in messages[0]
    # a model without the record (kernel-trained) is left alone
    assert ptychonn_geometry_params({}, {"pixels": 64}, (64, 64), (0.06, 0.06)) == ({"pixels": 64}, [])


def test_trained_checkpoint_records_geometry_and_reconstruction_sees_the_training_inputs(tmp_path):
    from evaluation.io import load_4dstem
    from evaluation.networks import ptychonn_reconstruct, reconstruct_with_network
    from evaluation.networks.checkpoints import load_network, optics_mismatch
    from tests.test_datamodules import _epie_fixture
    from training.cli import train
    from training.datamodules import EpieLabelsDataModule

    _, scan_path, recon_path = _epie_fixture(tmp_path)  # 12 x 12 positions, 32 px detector
    cfg = compose_train(["experiment=ptychonn_epie", f"data.scan_path={scan_path}",
                         f"data.recon_path={recon_path}", f"paths.output_dir={tmp_path}/run", *TINY,
                         "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "test=false"])  # fmt: skip
    train(cfg)
    model = load_network(tmp_path / "run" / "checkpoints" / "last.ckpt", "ptychonn")
    geometry = model.deepstem_info["geometry"]
    assert geometry == {
        "network_px": 16.0,
        "detector_px": 32.0,
        "whole_detector": 1.0,
        "weight_threshold": 0.1,
    }
    scan = load_4dstem(scan_path)
    assert model.deepstem_info["trained_for"]["energy_eV"] == [scan.energy_eV] * 2
    assert optics_mismatch(model, scan) == []

    seen: list[torch.Tensor] = []

    def capturing(scan_, predictor, **options):
        def wrapped(inputs, positions_A):
            seen.append(inputs.detach().clone())
            return predictor(inputs, positions_A)

        return ptychonn_reconstruct(scan_, wrapped, **options)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no geometry conflict with the recorded grid
        result = reconstruct_with_network(
            scan, "ptychonn", model, {"batch_size": 200, "consistency": False}, device="cpu",
            progress=False, precision="32", reconstructor=capturing,
        )  # fmt: skip
    assert np.isfinite(result.phase).all()
    inputs = torch.cat(seen)[:, 0]
    assert inputs.shape[-1] == 16
    dm = EpieLabelsDataModule(str(scan_path), str(recon_path), patch_px=16)
    dm.setup()
    ry = scan.data.shape[1]
    for index in (0, 17, 77, 143):  # the patterns the network saw in training, scaled as the reconstruction
        trained = dm.pattern(index // ry, index % ry)
        shown = inputs[index]
        np.testing.assert_allclose(
            (shown / shown.max()).numpy(), (trained / trained.max()).numpy(), atol=1e-5
        )


def test_default_object_pixel_is_no_coarser_than_the_network_pixel():
    from evaluation.networks.ptychonn import default_oversampling

    assert default_oversampling((0.35, 0.35), 0.164) == 3  # 0.117 A <= 0.164 A, 0.175 A would not be
    assert default_oversampling((0.3, 0.2), 0.15) == 2  # the coarser axis decides
    assert default_oversampling(0.1, 0.15) == 1  # never below one object pixel per step
    assert default_oversampling(0.3, 0.15) == 2  # exact multiples are not rounded up


def test_recorded_loss_footprint_becomes_the_stitching_footprint(tmp_path):
    geometry = {**WHOLE_64_TO_32["deepstem"]["geometry"], "weight_threshold": 0.01}
    info = {"deepstem": {"geometry": geometry}}
    filled, messages = ptychonn_geometry_params(info, {}, (64, 64), (0.0635, 0.0635))
    assert filled["weight_threshold"] == 0.01 and messages == []
    kept, messages = ptychonn_geometry_params(info, {"weight_threshold": 0.1}, (64, 64), (0.0635, 0.0635))
    assert kept["weight_threshold"] == 0.1
    assert len(messages) == 1 and "weight_threshold=0.1" in messages[0] and "loss footprint" in messages[0]
    # models without the record keep the stitching's default
    assert "weight_threshold" not in ptychonn_geometry_params(WHOLE_64_TO_32, {}, (64, 64), (0.06, 0.06))[0]
    # the ePIE-label data module records what its loss used
    from tests.test_datamodules import _epie_fixture
    from training.datamodules import EpieLabelsDataModule

    _, scan_path, recon_path = _epie_fixture(tmp_path)
    dm = EpieLabelsDataModule(scan_path, recon_path, patch_px=16, label_weight="probe", weight_threshold=0.02)
    dm.setup()
    assert dm.checkpoint_info()["geometry"]["weight_threshold"] == 0.02
