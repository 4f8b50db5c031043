"""Score PtychoNN (trained on a scan's own ePIE labels) and ePIE on the scan's held-out lines (issue #15).

    python scripts/ptychonn_epie_study.py --scan SCAN.h5 --epie SCAN_epie.h5 --ptychonn SCAN_ptychonn.h5 \
        [--train-fraction 0.621] [--epie-wall-s S] [--ptychonn-wall-s S] [--label-half-width-A W]

The held-out lines are those :class:`training.datamodules.EpieLabelsDataModule` tests on: scan lines
``round(train_fraction * Rx) .. Rx - 1`` (the first index of ``data[Rx, Ry]``). Both reconstructions and the
truth are cut to that part of the field (scan x >= first held-out line x step) and scored there with
:func:`evaluation.suite.score` on the common grid of :func:`evaluation.suite.scoring_grid` of the cut scan
(xc and FRC 0.5 against the truth, registration <= 0.5 A). With ``--label-half-width-A W`` a second, stricter
region is scored too: x >= last training line + W, beyond every training label window (PtychoNN's labels
are ePIE patches of half-width W around the training positions). Speeds: patterns/s of the network from
the PtychoNN file (``info_patterns_per_s``: inference and stitching) and, when the wall times of the two
``reconstruct.py`` runs are given, of both whole runs and of one ePIE iteration (positions x iterations /
wall time). Prints one JSON line, then a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from datagen import store
from evaluation.io import Scan4D, load_4dstem
from evaluation.references import Reconstruction
from evaluation.suite import score, scoring_grid


def read_reconstruction(path: Path) -> tuple[Reconstruction, dict[str, Any]]:
    """A ``deepstem.recon/1`` file as a :class:`Reconstruction` plus its attributes."""
    with store.open_checked(path, store.RECON) as handle:
        attrs = {key: handle.attrs[key] for key in handle.attrs}
        result = Reconstruction(
            phase=handle["phase"][()].astype(np.float64),
            pixel_size_A=tuple(np.broadcast_to(np.asarray(attrs["pixel_size_A"], float), (2,))),
            origin_A=tuple(np.broadcast_to(np.asarray(attrs["origin_A"], float), (2,))),
            method=str(attrs.get("method", path.stem)),
        )
    return result, attrs


def cut_scan(scan: Scan4D, first_line: int) -> Scan4D:
    """The scan from line ``first_line`` on, its position (0, 0) at the old ``(first_line, 0)``."""
    shift_A = first_line * float(np.broadcast_to(np.asarray(scan.scan_step_A, float), (2,))[0])
    origin = np.asarray(scan.truth_origin_A, float) - np.array([shift_A, 0.0])
    return dataclasses.replace(scan, data=scan.data[first_line:], truth_origin_A=tuple(origin), _handle=None)


def cut_reconstruction(result: Reconstruction, x0_A: float) -> Reconstruction:
    """The rows of ``result`` at scan x >= ``x0_A``, re-origined so that ``x0_A`` is 0."""
    x_A = result.origin_A[0] + np.arange(result.phase.shape[0]) * result.pixel_size_A[0]
    first = int(np.flatnonzero(x_A >= x0_A - 1e-9)[0])
    origin = (float(x_A[first] - x0_A), float(result.origin_A[1]))
    return dataclasses.replace(result, phase=result.phase[first:], origin_A=origin)


def score_region(scan: Scan4D, results: dict[str, Reconstruction], first_line: int) -> dict[str, Any]:
    """xc and FRC 0.5 of each result against the truth on lines ``first_line ..`` of the scan."""
    step_A = float(np.broadcast_to(np.asarray(scan.scan_step_A, float), (2,))[0])
    part = cut_scan(scan, first_line)
    grid = scoring_grid(part)
    out: dict[str, Any] = {
        "first_line": first_line,
        "lines": scan.shape[0] - first_line,
        "grid": list(grid.shape),
    }
    for name, result in results.items():
        metrics = score(part, cut_reconstruction(result, first_line * step_A), grid=grid)
        out[name] = {key: metrics[key] for key in ("xc", "frc_0.5_A", "shift_norm_A", "shift_at_bound")}
    return out


def make_sparse(scan_path: Path, factor: int, out: Path) -> Path:
    """Write the scan subsampled to every ``factor``-th position in both directions (step x ``factor``)."""
    from evaluation.io import save_4dstem, sparser_scan

    scan = sparser_scan(load_4dstem(scan_path), factor)
    return save_4dstem(
        out, np.asarray(scan.data), energy_eV=scan.energy_eV, semiangle_mrad=scan.semiangle_mrad,
        scan_step_A=scan.scan_step_A, k_pixel_invA=scan.k_pixel_invA,
        Cs_A=scan.Cs_A, defocus_A=scan.defocus_A, truth_phase=scan.truth_phase,
        truth_pixel_size_A=scan.truth_pixel_size_A, truth_origin_A=scan.truth_origin_A, overwrite=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, required=True)
    parser.add_argument("--epie", type=Path, required=True)
    parser.add_argument("--ptychonn", type=Path, required=True)
    parser.add_argument("--train-fraction", type=float, default=0.621)
    parser.add_argument("--epie-wall-s", type=float, default=None, help="wall time of reconstruct.py epie")
    parser.add_argument("--ptychonn-wall-s", type=float, default=None, help="... of reconstruct.py ptychonn")
    parser.add_argument("--label-half-width-A", type=float, default=None)
    parser.add_argument("--held-out-from-A", type=float, default=None,
                        help="score scan x >= this (A), not the lines after train_fraction")  # fmt: skip
    parser.add_argument("--make-sparse", type=int, default=None, metavar="FACTOR",
                        help="only write SCAN subsampled by FACTOR to --out and exit")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.make_sparse:
        print(make_sparse(args.scan, args.make_sparse, args.out))
        return {}

    scan = load_4dstem(args.scan)
    rx, ry = scan.shape[:2]
    epie_result, _ = read_reconstruction(args.epie)
    nn_result, nn_attrs = read_reconstruction(args.ptychonn)
    results = {"ptychonn": nn_result, "epie": epie_result}
    train_lines = round(args.train_fraction * rx)
    if args.held_out_from_A is not None:
        step_x_A = float(np.broadcast_to(np.asarray(scan.scan_step_A, float), (2,))[0])
        train_lines = int(np.ceil(args.held_out_from_A / step_x_A - 1e-9))
    report: dict[str, Any] = {
        "scan": str(args.scan),
        "scan_shape": list(scan.shape),
        "train_lines": train_lines,
    }
    report["held_out"] = score_region(scan, results, train_lines)
    if args.label_half_width_A is not None:
        step_A = float(np.broadcast_to(np.asarray(scan.scan_step_A, float), (2,))[0])
        first = int(np.ceil((train_lines - 1) + args.label_half_width_A / step_A))
        if rx - first >= 8:
            report["beyond_labels"] = score_region(scan, results, first)
    held = report["held_out"]
    report["xc_ratio"] = held["ptychonn"]["xc"] / held["epie"]["xc"]
    positions = rx * ry
    speed: dict[str, Any] = {
        "ptychonn_inference_patterns_per_s": float(nn_attrs.get("info_patterns_per_s", np.nan))
    }
    config = yaml.safe_load(store.read_config(args.epie) or "{}") or {}
    iterations = (config.get("epie") or {}).get("iterations") if isinstance(config, dict) else None
    if args.epie_wall_s:
        speed["epie_run_patterns_per_s"] = positions / args.epie_wall_s
        if iterations:
            speed["epie_iterations"] = int(iterations)
            speed["epie_iteration_patterns_per_s"] = positions * int(iterations) / args.epie_wall_s
    if args.ptychonn_wall_s:
        speed["ptychonn_run_patterns_per_s"] = positions / args.ptychonn_wall_s
    if args.epie_wall_s and args.ptychonn_wall_s:
        speed["run_speedup"] = args.epie_wall_s / args.ptychonn_wall_s
    if args.epie_wall_s:
        speed["inference_speedup_vs_epie_run"] = speed["ptychonn_inference_patterns_per_s"] / (
            positions / args.epie_wall_s
        )
        if iterations:
            speed["inference_speedup_vs_epie_iteration"] = speed["ptychonn_inference_patterns_per_s"] / (
                positions * int(iterations) / args.epie_wall_s
            )
    report["speed"] = speed
    print(json.dumps(report))
    print()
    print("| region | lines | PtychoNN xc | ePIE xc | xc ratio | PtychoNN FRC 0.5 (A) | ePIE FRC 0.5 (A) |")
    print("|---|---|---|---|---|---|---|")
    for key in ("held_out", "beyond_labels"):
        if key in report:
            r = report[key]
            p, e = r["ptychonn"], r["epie"]
            print(f"| {key} | {r['first_line']}-{rx - 1} | {p['xc']:.3f} | {e['xc']:.3f} "
                  f"| {p['xc'] / e['xc']:.2f} | {p['frc_0.5_A']:.2f} | {e['frc_0.5_A']:.2f} |")  # fmt: skip
    print()
    print("| speed | patterns/s |")
    print("|---|---|")
    for key, value in speed.items():
        print(f"| {key} | {value:.4g} |")
    return report


if __name__ == "__main__":
    main()
