"""Chang U-Net on detectors of any size: every pattern lands on the training geometry of the model.

One simulated object (80 kV, 20 mrad, 100 A underfocus, 16 x 16 positions) is "recorded" by four detectors:

* ``empad_128``: 128 x 128 pixels over +-4 alpha (pixel alpha / 16: the pixel of the Chang simulation grid
  at collection ratio 2, zero frequency on pixel 64), the simulation itself;
* ``binned_48``: its central 96 pixels binned 2 x 2 (pixel alpha / 8 over +-3 alpha, zero frequency
  between pixels, at 23.75);
* ``merlin_256``: every pixel split 2 x 2 (pixel alpha / 32 over +-4 alpha, zero between pixels, at 128.5);
* ``crop_100x90``: an off-centre 100 x 90 crop with other pixels along x and y (0.066 and 0.06875 alpha),
  the simulation redistributed onto it by area overlap (written here, independently of the stitcher).

The training patterns (:class:`datagen.stock_images.ChangForwardModel`) are the intensity on 64 pixels over
+-2 alpha, binned 2 x 2, i.e. the central 64 pixels of ``empad_128`` binned: the expected network input is
``sqrt(counts / total)`` of that. Detectors whose pixels nest in the training pixels must give it exactly;
the crop only to the resampling error of a hard aperture edge on a misaligned grid (measured: 0.27 % off the
disc edge, 14.6 % within 2 network pixels of it).
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scan4d_helpers import simulate_scan
from scipy.ndimage import map_coordinates

from evaluation.cli import reconstruct_main
from evaluation.io import Scan4D, save_4dstem
from evaluation.metrics import xc
from evaluation.networks import DetectorReachError, ScanGeometry, chang_reconstruct
from evaluation.networks.chang import _bin_patterns, _chang_probe_and_mask
from evaluation.networks.geometry import _PatternStream
from models.lightning import ChangLightning

ROOT = Path(__file__).resolve().parents[1]
DEFOCUS_A = 100.0  # a ptychography-style probe as in the Chang training data (80-200 A underfocus)
N = 16  # scan positions per axis


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rebin_axis(n_in: int, pixel_in: float, zero_in: float, n_out: int, pixel_out: float, zero_out: float):
    """(n_out, n_in) fractions of each input pixel that fall in each output pixel (1D area overlap): input
    pixel ``i`` spans ``(i - zero_in -+ 1/2) pixel_in``, output pixel ``j`` ``(j - zero_out -+ 1/2)
    pixel_out`` (1/A)."""
    edges_in = (np.arange(n_in + 1) - 0.5 - zero_in) * pixel_in
    edges_out = (np.arange(n_out + 1) - 0.5 - zero_out) * pixel_out
    position = np.interp(edges_out, edges_in, np.arange(n_in + 1.0))  # output edges in input pixels
    index = np.arange(n_in)
    return np.clip(
        np.minimum(position[1:, None], index + 1) - np.maximum(position[:-1, None], index), 0.0, None
    )


@pytest.fixture(scope="module")
def sim():
    return simulate_scan(scan_px=N, cbed_px=128, defocus_A=DEFOCUS_A)


@pytest.fixture(scope="module")
def alpha_invA(sim) -> float:
    return sim.k_pixel_invA * 16  # empad_128: pixel alpha / 16


@pytest.fixture(scope="module")
def detectors(sim, alpha_invA):
    """name -> (data, k_pixel_invA (x, y), zero-frequency pixel (x, y))."""
    fine = sim.data
    p = sim.k_pixel_invA
    crop_pixel = (0.066 * alpha_invA, 0.06875 * alpha_invA)
    crop_zero = (47.3, 44.6)
    mx = torch.from_numpy(rebin_axis(128, p, 64, 100, crop_pixel[0], crop_zero[0])).float()
    my = torch.from_numpy(rebin_axis(128, p, 64, 90, crop_pixel[1], crop_zero[1])).float()
    binned = fine[:, :, 16:112, 16:112].reshape(N, N, 48, 2, 48, 2).sum(axis=(3, 5))
    return {
        "empad_128": (fine, (p, p), (64.0, 64.0)),
        "binned_48": (binned, (2 * p, 2 * p), (23.75, 23.75)),
        "merlin_256": (np.kron(fine, np.ones((1, 1, 2, 2), np.float32)) / 4, (p / 2, p / 2), (128.5, 128.5)),
        "crop_100x90": ((mx @ torch.from_numpy(fine) @ my.T).numpy(), crop_pixel, crop_zero),
    }


@pytest.fixture(scope="module")
def training_inputs(sim) -> torch.Tensor:
    """(N * N, 32, 32) the training data's input for every position (row-major): ``sqrt(counts / total)``
    of the +-2 alpha window on 64 pixels binned 2 x 2 (ChangForwardModel.diffraction)."""
    window = torch.from_numpy(sim.data[:, :, 32:96, 32:96]).reshape(N * N, 32, 2, 32, 2).sum((2, 4))
    return torch.sqrt(window / window.sum((-2, -1), keepdim=True))


def as_scan(sim, data, k_pixel) -> Scan4D:
    return Scan4D(
        data=data,
        energy_eV=sim.energy_eV,
        semiangle_mrad=sim.semiangle_mrad,
        scan_step_A=(sim.scan_step_A, sim.scan_step_A),
        k_pixel_invA=k_pixel,
        defocus_A=DEFOCUS_A,
    )


def _index(sim, positions: torch.Tensor) -> np.ndarray:
    """Row-major position index of each position (Angstrom)."""
    ij = np.rint(positions.numpy() / sim.scan_step_A).astype(int)
    return ij[:, 0] * N + ij[:, 1]


def recording_oracle(sim, seen: dict):
    def predict(inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for n, index in enumerate(_index(sim, positions)):
            seen[int(index)] = inputs[n, 0].clone()
        return torch.zeros(len(inputs), 32, 32)

    return predict


def inputs_of(sim, data, k_pixel, centre=None) -> torch.Tensor:
    seen: dict[int, torch.Tensor] = {}
    chang_reconstruct(as_scan(sim, data, k_pixel), recording_oracle(sim, seen), detector_centre_px=centre,
                      progress=False)  # fmt: skip
    assert sorted(seen) == list(range(N * N))
    return torch.stack([seen[i] for i in range(N * N)])


@pytest.mark.parametrize("name", ["empad_128", "binned_48", "merlin_256"])
def test_nested_detectors_give_the_training_input_exactly(sim, detectors, training_inputs, name):
    """Detector pixels that nest in the training pixels (zero frequency on or between pixels): the network
    input is the training binning to float32 precision; with the centre measured by the centre of mass of
    the mean CBED (not exactly the zero frequency of a not quite symmetric object) to 3 % (L2)."""
    data, k_pixel, zero = detectors[name]
    exact = inputs_of(sim, data, k_pixel, centre=zero)
    torch.testing.assert_close(exact, training_inputs, atol=2e-6, rtol=0)
    measured = inputs_of(sim, data, k_pixel)
    error = float((measured - training_inputs).norm() / training_inputs.norm())
    assert error < 0.03, error  # measured 1e-8 (128, 256), 0.015 (48: centre of mass 0.005 px off)


def test_a_rotated_detector_is_rotated_onto_the_scan_frame_on_the_training_grid(sim, training_inputs):
    """The 128-pixel detector turned by -90 degrees (``np.rot90(k=-1)``: detector vector ``v`` shows what
    the scan frame has at ``R(90) v``) with ``scan_rotation_deg=90``: the inputs are the training ones
    (rotated about the zero frequency, pixel 64, which the rotation moves to (64, 63)), the corners of the
    rotated grid included (they come from the detector beyond +-2 alpha)."""
    turned = np.ascontiguousarray(np.rot90(sim.data, k=-1, axes=(2, 3)))
    scan = as_scan(sim, turned, (sim.k_pixel_invA, sim.k_pixel_invA))
    scan.scan_rotation_deg = 90.0
    seen: dict[int, torch.Tensor] = {}
    chang_reconstruct(scan, recording_oracle(sim, seen), detector_centre_px=(64.0, 63.0), progress=False)
    got = torch.stack([seen[i] for i in range(N * N)])
    # bilinear sampling at float32 grid coordinates: 1.6e-5 measured, of inputs up to 0.077
    torch.testing.assert_close(got, training_inputs, atol=5e-5, rtol=0)


def test_an_odd_off_centre_crop_gives_the_training_input_up_to_the_aperture_edge(
    sim, detectors, training_inputs, alpha_invA
):
    data, k_pixel, _ = detectors["crop_100x90"]
    got = inputs_of(sim, data, k_pixel)
    k = (np.arange(32) - 16 + 0.25) / 8  # training input pixel centres in alpha (zero at 15.75)
    radius = np.hypot(k[:, None], k[None, :])
    edge = torch.from_numpy(np.abs(radius - 1.0) < 2 / 8)  # within 2 input pixels of the disc edge
    error = got - training_inputs
    assert float(error[:, ~edge].norm() / training_inputs[:, ~edge].norm()) < 0.01  # measured 0.0027
    assert float(error[:, edge].norm() / training_inputs[:, edge].norm()) < 0.2  # measured 0.146
    # what differs from position to position (the object) is carried over: xc 0.98 measured
    centred, expected = got - got.mean(0), training_inputs - training_inputs.mean(0)
    assert xc(expected.numpy(), centred.numpy()) > 0.95


@pytest.mark.parametrize("name", ["empad_128", "binned_48", "merlin_256", "crop_100x90"])
def test_counts_inside_the_model_range_are_preserved(sim, detectors, name):
    """Before ``sqrt(counts / total)``: the resampled pattern holds the counts the detector has inside the
    +-2 alpha of the training patterns (the central 64 pixels of the 128-pixel simulation)."""
    data, k_pixel, zero = detectors[name]
    geometry = ScanGeometry.from_scan(as_scan(sim, data, k_pixel))
    k_det, _, _ = _chang_probe_and_mask(geometry, 32, 2, 2.0, 0.9)
    stream = _PatternStream(geometry, 64, k_det, np.asarray(zero), torch.device("cpu"))
    counts = _bin_patterns(stream.rows(0, N), 2)
    assert counts.shape == (N, N, 32, 32)
    inside = sim.data[:, :, 32:96, 32:96].sum((-2, -1))
    tolerance = 1e-5 if name != "crop_100x90" else 2e-3  # the crop's pixels straddle the range's edge
    np.testing.assert_allclose(counts.sum((-2, -1)).numpy(), inside, rtol=tolerance)


def test_the_same_object_from_every_detector(sim, detectors, training_inputs):
    """An ORACLE that only sees the inputs: it names the position whose training input is the nearest to
    the one received (both minus their mean over the scan, so the aperture-edge error common to all
    positions of a detector cancels) and returns that position's true phase patch (illuminated disc, mean
    removed, a random offset). Every detector must find every position, and the reconstructions agree."""
    geometry = ScanGeometry.from_scan(as_scan(sim, *detectors["empad_128"][:2]))
    _, pixel_A, mask = _chang_probe_and_mask(geometry, 32, 2, 2.0, 0.9)
    u = (np.arange(32) - 16) * pixel_A
    references = (training_inputs - training_inputs.mean(0)).reshape(N * N, -1)
    rng = np.random.default_rng(0)
    found: list[bool] = []

    def oracle(inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert len(inputs) == N * N  # one batch: the mean over the scan is known
        received = (inputs[:, 0] - inputs[:, 0].mean(0)).reshape(len(inputs), -1)
        named = torch.cdist(received, references).argmin(1).numpy()
        found.extend((named == _index(sim, positions)).tolist())
        patches = []
        for index in named:
            x, y = divmod(int(index), N)
            grid = np.meshgrid(x * sim.scan_step_A + u, y * sim.scan_step_A + u, indexing="ij")
            phase = map_coordinates(sim.phase, [g / sim.object_pixel_A for g in grid], order=1,
                                    mode="grid-wrap")  # fmt: skip
            patches.append(np.where(mask, phase - phase[mask].mean() + rng.uniform(-2, 2), 0.0))
        return torch.from_numpy(np.stack(patches).astype(np.float32))

    phases = {}
    for name, (data, k_pixel, _) in detectors.items():
        found.clear()
        recon = chang_reconstruct(as_scan(sim, data, k_pixel), oracle, progress=False, batch_size=N * N,
                                  block_rows=N)  # fmt: skip
        assert all(found) and len(found) == N * N, (name, np.mean(found))
        phases[name] = recon.phase
        x = np.arange(recon.phase.shape[0]) * recon.pixel_size_A[0] / sim.object_pixel_A
        truth = map_coordinates(sim.phase, np.meshgrid(x, x, indexing="ij"), order=1, mode="grid-wrap")
        assert xc(truth, recon.phase) > 0.999, name
    names = list(phases)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert xc(phases[a], phases[b]) > 0.99, (a, b)


def test_a_detector_short_of_the_model_range_is_refused_naming_both_reaches(sim, detectors, alpha_invA):
    """The 48-pixel detector cropped to its central 28 pixels ends at +-1.75 alpha; the model saw +-2."""
    data, k_pixel, _ = detectors["binned_48"]
    small = np.ascontiguousarray(data[:, :, 10:38, 10:38])
    with pytest.raises(DetectorReachError, match="Chang input needs the detector to reach") as caught:
        chang_reconstruct(as_scan(sim, small, k_pixel), recording_oracle(sim, {}), progress=False)
    message = str(caught.value)
    assert "\n" not in message
    needed, reached = (float(v) for v in re.findall(r"reach(?:es)? ([0-9.]+) 1/A", message))
    assert needed == pytest.approx(2 * alpha_invA, rel=1e-3)  # collection_ratio 2 x alpha
    assert 1.6 * alpha_invA < reached < 1.9 * alpha_invA  # 1.75 alpha plus the half-pixel overhang


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    module = ChangLightning(
        net={"channels": [4, 8], "encoder_blocks": 1, "decoder_blocks": 1, "bridge_blocks": 0}
    )
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)  # fmt: skip
    return path


def test_reconstruct_py_chang_unet_on_a_crop_and_a_too_small_detector(sim, detectors, tmp_path, capsys):
    """``reconstruct.py input=SCAN method=chang_unet`` on the 100 x 90 crop (unequal pixels) runs; the cut
    48-pixel detector is one ``deepstem: error:`` line and exit 2."""
    ckpt = _checkpoint(tmp_path / "chang.ckpt")
    data, k_pixel, _ = detectors["crop_100x90"]
    small = detectors["binned_48"]
    for name, array, pixel in (("crop", data, k_pixel), ("small", small[0][:, :, 10:38, 10:38], small[1])):
        save_4dstem(tmp_path / f"{name}.h5", np.ascontiguousarray(array), energy_eV=sim.energy_eV,
                    semiangle_mrad=sim.semiangle_mrad, scan_step_A=sim.scan_step_A, k_pixel_invA=pixel,
                    defocus_A=DEFOCUS_A)  # fmt: skip
    codes = {}
    for name in ("crop", "small"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="reconstruct", overrides=[
                f"input={tmp_path}/{name}.h5", "method=chang_unet", f"ckpt={ckpt}", "progress=false",
                f"output={tmp_path}/{name}_chang.h5", "device=cpu", "precision=32",
            ])  # fmt: skip
        codes[name] = reconstruct_main(cfg)
    captured = capsys.readouterr()
    assert codes == {"crop": 0, "small": 2}, captured.err
    assert (tmp_path / "crop_chang.h5").is_file() and not (tmp_path / "small_chang.h5").exists()
    errors = [line for line in captured.err.splitlines() if line.startswith("deepstem: error:")]
    assert len(errors) == 1 and "Chang input needs the detector to reach" in errors[0], captured.err
