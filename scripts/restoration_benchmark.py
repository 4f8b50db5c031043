"""HAADF restoration benchmark (issue #16): PSNR, SSIM and atomic-column position error per dose and method.

Clean images come from the project's HAADF generator (:class:`datagen.haadf.HaadfSampleMaker`, the
configuration of conf/simulation/haadf.yaml with ``--pixels`` and the bundled structures) with the global
seed ``--seed`` (default 16016; training data use the datagen seed, 0 by default, so these specimens are
not the ones anything was trained or tuned on). Each image is distorted at every dose of ``--doses``
(e/A^2; default the thesis doses 5e2, 5e3, 5e4, 5e5) with :class:`training.distortions.StemDistortion`
configured as conf/data/haadf.yaml (PMT detector, scan-line jitter, fast-scan blur) with the dose range
fixed at that dose; the noise generator of image ``i`` is seeded by ``sample_seed(seed, i)`` and the same
for every dose, so the jitter and blur of an image are the same at every dose and only the noise level
changes.

Methods (see :mod:`evaluation.denoise_baselines`):

* ``noisy``: the distorted image itself;
* ``gaussian_oracle``: a Gaussian filter whose width is chosen per image by the best PSNR against the
  clean image (an oracle: it sees the clean image);
* ``bm3d``: BM3D on the generalised-Anscombe stabilised image, told the true dose, pixel size, PMT gain
  ``1 + s^2`` and the white-noise level ``sqrt(sum h^2)`` of the image's fast-scan response ``h``; exact
  unbiased inverse;
* ``cgrdn``: :func:`evaluation.restore.restore_image` with the checkpoint of ``--ckpt`` (only with one).

Scores (:mod:`evaluation.restoration_metrics`): PSNR and SSIM against the clean image with the data range
``max - min`` of the clean image; column position error: columns found in the clean image, 2D Gaussian fits
in both images, mean and rms distance (A) over the columns fitted in both, and the fraction of columns whose
fit failed in the restored image. Table entries are means over images (PSNR, SSIM) and pooled over columns
(position errors).

Writes ``restoration_benchmark.json`` (every image's scores), ``restoration_benchmark.md`` (the table) and
``restoration_benchmark.png`` (scores against dose, and one example image per dose) to ``--out``; prints
the table. Usage::

    python scripts/restoration_benchmark.py                        # 6 images of 128 x 128, ~10 min, 1 core
    python scripts/restoration_benchmark.py --images 24 --pixels 256 --ckpt cgrdn.ckpt --out runs/restore
    python scripts/restoration_benchmark.py --ckpt cgrdn.ckpt --reuse-bm3d docs/results_cgrdn_baselines.json

``--reuse-bm3d JSON`` (implies ``--skip-bm3d``) takes the BM3D rows from an earlier run's
``restoration_benchmark.json`` instead of recomputing them (BM3D dominates the run time). The earlier run
must have the same ``--images``, ``--pixels``, ``--seed`` and ``--doses``, and its noisy-input scores must
equal this run's for every image and dose (same clean images, same noise), else one clear error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THESIS_DOSES_E_PER_A2 = (5.0e2, 5.0e3, 5.0e4, 5.0e5)
METHODS = ("noisy", "gaussian_oracle", "bm3d", "cgrdn")


def _configs(pixels: int) -> tuple[dict, list, dict]:
    """The HAADF simulation config (``pixels`` x ``pixels``), its structures and the data config's
    distortion options."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from datagen.sources import load_structures

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        datagen_cfg = compose(
            config_name="datagen", overrides=["simulation=haadf", f"simulation.pixels={pixels}"]
        )
        train_cfg = compose(config_name="train", overrides=["data=haadf", "model=cgrdn"])
    simulation = OmegaConf.to_container(datagen_cfg.simulation, resolve=True)
    distortion = OmegaConf.to_container(train_cfg.data.distortion, resolve=True)
    return simulation, load_structures(datagen_cfg.source), distortion


def _distort(clean: np.ndarray, pixel_size_A: float, dose: float, options: dict, seed: int) -> tuple:
    """One distorted image (float64, clean units) and the BM3D noise level of its fast-scan blur."""
    import torch

    from evaluation.denoise_baselines import blurred_noise_std
    from training.distortions import StemDistortion, fast_scan_kernel, make_generator

    kwargs = {k: (tuple(v) if k.endswith("_range") and v is not None else v) for k, v in options.items()}
    kwargs["dose_e_per_A2_range"] = (dose, dose)
    distortion = StemDistortion(**kwargs)
    image = torch.from_numpy(clean.astype(np.float64))[None]
    noisy, params = distortion(image, pixel_size_A, generator=make_generator(seed), return_parameters=True)
    hwhm = float(params["fast_scan_hwhm_px"][0])
    kernel = fast_scan_kernel(clean.shape[1], hwhm, distortion.fast_scan_model).numpy()[0]
    return noisy[0].numpy().astype(np.float64), blurred_noise_std(kernel), distortion.pmt, hwhm


def _score(clean: np.ndarray, test: np.ndarray, pixel_size_A: float, fits: list) -> dict[str, Any]:
    from evaluation.restoration_metrics import column_position_error, psnr_db, ssim_index

    error = column_position_error(clean, test, pixel_size_A, reference_fits=fits)
    return {
        "psnr_db": psnr_db(clean, test),
        "ssim": ssim_index(clean, test),
        "column_mean_A": error.mean_A,
        "column_rms_A": error.rms_A,
        "columns_fitted": error.fitted,
        "columns_failed": error.failed,
    }


def _summarise(rows: list[dict], doses: list[float], methods: list[str]) -> list[dict]:
    table = []
    for dose in doses:
        for method in methods:
            sel = [r for r in rows if r["dose_e_per_A2"] == dose and r["method"] == method]
            if not sel:
                continue
            fitted = sum(r["columns_fitted"] for r in sel)
            failed = sum(r["columns_failed"] for r in sel)
            with_columns = [r for r in sel if r["columns_fitted"] > 0]
            mean_A = (
                sum(r["column_mean_A"] * r["columns_fitted"] for r in with_columns) / fitted
                if fitted
                else math.nan
            )
            rms_A = (
                math.sqrt(sum(r["column_rms_A"] ** 2 * r["columns_fitted"] for r in with_columns) / fitted)
                if fitted
                else math.nan
            )
            psnr = np.array([r["psnr_db"] for r in sel])
            table.append(
                {
                    "dose_e_per_A2": dose,
                    "method": method,
                    "images": len(sel),
                    "psnr_db": float(psnr.mean()),
                    "psnr_db_std": float(psnr.std()),
                    "ssim": float(np.mean([r["ssim"] for r in sel])),
                    "column_mean_A": mean_A,
                    "column_rms_A": rms_A,
                    "columns": fitted + failed,
                    "columns_failed_fraction": failed / (fitted + failed) if fitted + failed else math.nan,
                }
            )
    return table


def _markdown(table: list[dict]) -> str:
    lines = [
        "| dose (e/A^2) | method | PSNR (dB) | SSIM | column error mean / rms (A) | columns failed |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['dose_e_per_A2']:.0e} | {row['method']} "
            f"| {row['psnr_db']:.2f} +- {row['psnr_db_std']:.2f} "
            f"| {row['ssim']:.3f} | {row['column_mean_A']:.3f} / {row['column_rms_A']:.3f} "
            f"| {row['columns_failed_fraction'] * 100:.1f} % of {row['columns']} |"
        )
    return "\n".join(lines)


def _figure(path: Path, table: list[dict], examples: dict, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doses = sorted({row["dose_e_per_A2"] for row in table})
    shown = [m for m in methods if any(r["method"] == m for r in table)]
    fig = plt.figure(figsize=(3.0 * max(4, len(shown) + 1), 3.0 * (1 + len(doses))), layout="constrained")
    grid = fig.add_gridspec(1 + len(doses), max(4, len(shown) + 1))
    for k, (key, label) in enumerate(
        [("psnr_db", "PSNR (dB)"), ("ssim", "SSIM"), ("column_rms_A", "column rms error (A)")]
    ):
        ax = fig.add_subplot(grid[0, k])
        for method in shown:
            values = [
                next(r[key] for r in table if r["method"] == method and r["dose_e_per_A2"] == d)
                for d in doses
            ]
            ax.plot(doses, values, "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("dose (e/A^2)")
        ax.set_ylabel(label)
        if k == 0:
            ax.legend(fontsize=7)
    for i, dose in enumerate(doses):
        clean, images = examples[dose]
        low, high = (float(v) for v in np.percentile(clean, [0.5, 99.5]))
        for j, (name, image) in enumerate(
            [("clean", clean), *[(m, images[m]) for m in shown if m != "noisy" and m in images]]
        ):
            if name == "clean":
                image, name = images["noisy"], f"noisy {dose:.0e}"
            ax = fig.add_subplot(grid[1 + i, j])
            ax.imshow(image, cmap="gray", vmin=low, vmax=high)
            ax.set_title(name, fontsize=8)
            ax.set_axis_off()
        ax = fig.add_subplot(grid[1 + i, len(shown)])
        ax.imshow(clean, cmap="gray", vmin=low, vmax=high)
        ax.set_title("clean", fontsize=8)
        ax.set_axis_off()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="clean images (each scored at every dose)")
    parser.add_argument("--pixels", type=int, default=128, help="image side in pixels")
    parser.add_argument("--doses", type=float, nargs="+", default=list(THESIS_DOSES_E_PER_A2), help="e/A^2")
    parser.add_argument(
        "--seed", type=int, default=16016, help="global seed of the clean images and the noise"
    )
    parser.add_argument("--ckpt", type=Path, default=None, help="a CGRDN checkpoint (adds the cgrdn method)")
    parser.add_argument(
        "--skip-bm3d", action="store_true", help="leave BM3D out (it takes seconds per image)"
    )
    parser.add_argument(
        "--reuse-bm3d",
        type=Path,
        default=None,
        help="take the BM3D rows from this earlier restoration_benchmark.json (same images and noise)",
    )
    parser.add_argument("--out", type=Path, default=Path("restoration_benchmark"), help="output folder")
    args = parser.parse_args(argv)
    reused: list[dict] = []
    if args.reuse_bm3d is not None:
        args.skip_bm3d = True
        try:
            earlier = json.loads(args.reuse_bm3d.read_text())
        except (OSError, ValueError) as err:
            parser.error(f"--reuse-bm3d {args.reuse_bm3d}: cannot read it ({err})")
        for key, ours in (("images", args.images), ("pixels", args.pixels), ("seed", args.seed),
                          ("doses_e_per_A2", list(args.doses))):  # fmt: skip
            if earlier.get(key) != ours:
                parser.error(
                    f"--reuse-bm3d {args.reuse_bm3d}: {key} is {earlier.get(key)!r}, this run {ours!r}"
                )
        reused = [row for row in earlier["rows"] if row["method"] == "bm3d"]
        if len(reused) != args.images * len(args.doses):
            parser.error(f"--reuse-bm3d {args.reuse_bm3d}: {len(reused)} BM3D rows, expected "
                         f"{args.images * len(args.doses)}")  # fmt: skip

    from datagen.haadf import HaadfSampleMaker
    from evaluation.denoise_baselines import bm3d_anscombe, oracle_gaussian, pmt_gain
    from evaluation.restoration_metrics import find_columns, fit_columns
    from training.distortions import sample_seed

    methods = [
        m
        for m in METHODS
        if not (m == "bm3d" and args.skip_bm3d) and not (m == "cgrdn" and args.ckpt is None)
    ]
    model = None
    if args.ckpt is not None:
        from evaluation.restore import load_cgrdn, restore_image

        model = load_cgrdn(args.ckpt)
    simulation, structures, distortion_options = _configs(args.pixels)
    maker = HaadfSampleMaker(simulation, structures, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    examples: dict = {}
    timing = {m: 0.0 for m in methods}
    start = time.perf_counter()
    for index in range(args.images):
        record = maker(index)
        clean = record["image"].astype(np.float64)
        pixel_size_A = float(record["pixel_size_A"])
        columns = find_columns(clean, pixel_size_A)
        fits = fit_columns(clean, columns, pixel_size_A)
        noise_seed = sample_seed(args.seed, index)
        for dose in args.doses:
            noisy, noise_std, pmt, hwhm = _distort(clean, pixel_size_A, dose, distortion_options, noise_seed)
            restored: dict[str, np.ndarray] = {}
            for method in methods:
                begin = time.perf_counter()
                if method == "noisy":
                    restored[method] = noisy
                elif method == "gaussian_oracle":
                    oracle = oracle_gaussian(noisy, clean)
                    restored[method] = oracle.image
                elif method == "bm3d":
                    restored[method] = bm3d_anscombe(
                        noisy, dose * pixel_size_A**2, gain=pmt_gain(pmt.single_electron_std),
                        read_noise_e=pmt.dark_noise_e, noise_std=noise_std,
                    )  # fmt: skip
                else:
                    restored[method] = restore_image(model, noisy).astype(np.float64)
                timing[method] += time.perf_counter() - begin
                row = {
                    "image": index,
                    "dose_e_per_A2": dose,
                    "method": method,
                    "pixel_size_A": pixel_size_A,
                    "specimen": record["description"],
                    "fast_scan_hwhm_px": hwhm,
                    **_score(clean, restored[method], pixel_size_A, fits),
                }
                if method == "gaussian_oracle":
                    row["oracle_sigma_px"] = oracle.sigma_px
                rows.append(row)
            if index == 0:
                examples[dose] = (clean, restored)
        print(f"image {index + 1}/{args.images} ({record['description']}, {len(columns)} columns): "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    if reused:
        noisy_now = {(r["image"], r["dose_e_per_A2"]): r["psnr_db"] for r in rows if r["method"] == "noisy"}
        noisy_then = {(r["image"], r["dose_e_per_A2"]): r["psnr_db"] for r in earlier["rows"]
                      if r["method"] == "noisy"}  # fmt: skip
        if noisy_now.keys() != noisy_then.keys() or any(
            abs(noisy_now[k] - noisy_then[k]) > 1e-6 for k in noisy_now
        ):
            print(f"restoration_benchmark: error: --reuse-bm3d {args.reuse_bm3d}: its noisy-input scores "
                  "differ from this run's (other images or noise); rerun BM3D", file=sys.stderr)  # fmt: skip
            return 2
        rows.extend(reused)
        methods = [m for m in METHODS if m in methods or m == "bm3d"]
    table = _summarise(rows, list(args.doses), methods)
    markdown = _markdown(table)
    result = {
        "images": args.images,
        "pixels": args.pixels,
        "seed": args.seed,
        "doses_e_per_A2": list(args.doses),
        "checkpoint": str(args.ckpt) if args.ckpt else None,
        "bm3d_reused_from": str(args.reuse_bm3d) if args.reuse_bm3d else None,
        "seconds_per_method": {m: round(t, 1) for m, t in timing.items()},
        "wall_s": round(time.perf_counter() - start, 1),
        "table": table,
        "rows": rows,
    }
    (args.out / "restoration_benchmark.json").write_text(json.dumps(result, indent=1))
    (args.out / "restoration_benchmark.md").write_text(markdown + "\n")
    _figure(args.out / "restoration_benchmark.png", table, examples, methods)
    print(markdown)
    print(f"wall {result['wall_s']} s; per method {result['seconds_per_method']}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
