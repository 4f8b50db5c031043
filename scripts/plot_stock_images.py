"""Figure of the Chang U-Net training data: object, probe window, mask, label and diffraction pattern.

``python scripts/plot_stock_images.py [--out docs/figures/stock_images.png] [--seed 0]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from datagen.stock_images import ChangForwardModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures/stock_images.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = ChangForwardModel()
    generator = torch.Generator().manual_seed(args.seed)
    aberrations = model.draw_aberrations(3, generator)
    probes = model.probes(aberrations)
    phase = model.phase_objects(3, generator, "cpu")
    diffraction = model.diffraction(probes, phase)
    n, sim, dx = model.diffraction_px, model.sim_px, model.pixel_size_A
    start = sim // 2 - n // 2
    extent_full = [0, sim * dx, sim * dx, 0]
    fig, axes = plt.subplots(3, 4, figsize=(13, 9.5))
    for row in range(3):
        intensity = model.label_window(probes[row].abs() ** 2)
        mask = model.illuminated_mask(probes[row : row + 1])[0]
        patch = model.label_window(phase[row])
        label = torch.where(mask, patch - patch[mask].mean(), torch.zeros_like(patch))
        ax = axes[row, 0]
        ax.imshow(phase[row].numpy().T, cmap="gray", extent=extent_full)
        ax.add_patch(plt.Rectangle((start * dx, start * dx), n * dx, n * dx, fill=False, ec="y", lw=1.5))
        ax.contour(
            (start + np.arange(n)) * dx, (start + np.arange(n)) * dx, mask.numpy().T.astype(float),
            levels=[0.5], colors="r",
        )  # fmt: skip
        ax.set_title("object phase; label window; mask", fontsize=9)
        axes[row, 1].imshow(intensity.numpy().T, cmap="magma")
        axes[row, 1].set_title(
            f"probe |P|^2  C10={aberrations['C10'][row]:.0f} A, C21={aberrations['C21'][row]:.0f} A",
            fontsize=9,
        )
        axes[row, 2].imshow(label.numpy().T, cmap="viridis")
        axes[row, 2].set_title("label: phase in mask, mean removed")
        axes[row, 3].imshow(np.sqrt(diffraction[row].numpy()).T, cmap="gray")
        axes[row, 3].set_title(f"sqrt intensity, {n}x{n} over +-{model.k_detector_invA:.2f} 1/A", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"Chang U-Net data: {model.energy_eV / 1e3:.0f} kV, {model.semiangle_mrad} mrad, pixel {dx:.3f} A, "
        f"sim grid {sim}^2 binned x{model.bin_factor}"
    )
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
