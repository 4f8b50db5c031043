"""The shipped CGRDN (pretrained/cgrdn_cpu.ckpt, made by experiment=cgrdn_cpu; docs/results_cgrdn.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from evaluation.cli import choose_checkpoint, reconstruct_main
from evaluation.networks import identify_checkpoint
from evaluation.restore import load_cgrdn, restore_image
from models.losses import psnr
from tests.test_restore import _config
from training.distortions import StemDistortion

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "cgrdn_cpu.ckpt"


def test_shipped_cgrdn_is_small_safe_to_load_documented_and_the_default():
    assert SHIPPED.is_file() and SHIPPED.stat().st_size <= 20e6
    checkpoint = torch.load(SHIPPED, map_location="cpu", weights_only=True)  # no pickled objects
    assert identify_checkpoint(checkpoint) == "cgrdn" and "optimizer_states" not in checkpoint
    assert "task_name: cgrdn_cpu" in checkpoint["deepstem"]["config_yaml"]
    assert checkpoint["hyper_parameters"]["net"]["std_min"] is None  # the scale-free standardisation
    choice = choose_checkpoint("cgrdn")
    assert choice is not None and choice[0] == SHIPPED
    card = (ROOT / "pretrained" / "README.md").read_text()
    assert "cgrdn_cpu.ckpt" in card and "experiment=cgrdn_cpu" in card and "docs/results_cgrdn.md" in card


def _lattice(pixels: int = 64, spacing_px: float = 12.0, sigma_px: float = 1.6) -> np.ndarray:
    """Gaussian columns on a square lattice, in fractions of the beam (~0.01 peak, like the generator's)."""
    yy, xx = np.mgrid[0:pixels, 0:pixels].astype(np.float64)
    image = np.zeros((pixels, pixels))
    for cy in np.arange(spacing_px / 2, pixels, spacing_px):
        for cx in np.arange(spacing_px / 2, pixels, spacing_px):
            image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma_px**2))
    return 0.002 + 0.01 * image


def test_shipped_cgrdn_restores_a_distorted_image_in_any_unit_and_reconstruct_uses_it(tmp_path, capsys):
    torch.set_num_threads(1)
    clean = _lattice()
    distortion = StemDistortion(dose_e_per_A2_range=(5e4, 5e4), fast_scan_hwhm_px_range=(0.8, 0.8), seed=3)
    noisy = distortion(torch.from_numpy(clean)[None].float(), 0.15, indices=[0])[0].double().numpy()
    model = load_cgrdn(SHIPPED)
    restored = restore_image(model, noisy)
    gain = psnr(torch.from_numpy(restored)[None], torch.from_numpy(clean)[None]) - psnr(
        torch.from_numpy(noisy)[None], torch.from_numpy(clean)[None]
    )
    assert float(gain) > 1.0  # dB: noise and jitter reduced, not just passed through
    # detector units: 1e5 counts per unit of the beam fraction restore to 1e5 x the same image
    np.testing.assert_allclose(restore_image(model, 1e5 * noisy), 1e5 * restored, rtol=2e-3, atol=1e5 * 1e-6)
    np.save(tmp_path / "image.npy", noisy.astype(np.float32))
    (tmp_path / "image.yaml").write_text(yaml.safe_dump({"pixel_size_A": 0.15}))
    out = tmp_path / "restored.h5"
    assert reconstruct_main(_config("method=cgrdn", f"input={tmp_path}/image.npy", f"output={out}")) == 0
    assert "cgrdn_cpu.ckpt" in capsys.readouterr().err and out.is_file()
