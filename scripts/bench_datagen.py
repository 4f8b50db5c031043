"""Benchmark of kernel data generation: deepstem's pipeline against a straightforward abTEM call chain.

For each simulation config (default ``kernel`` and ``kernel_paper``) the same samples (same global seed
and sample indices, so the same drawn parameters and crystal) are computed twice, each in its own
process so that peak memory (max RSS) is measured separately:

* ``ours``: :class:`datagen.cli.KernelSampleMaker` (box cropped to what the nine probes need,
  FFT-friendly grid, float32, one abTEM graph for all outputs, warm process);
* ``baseline``: the whole ``--extent`` (70 A) slab from ``datagen.specimen.build_specimen``, a potential
  on it at the same pixel size, and one abTEM call per output: the nine CBEDs, then the centre exit
  wave (same multislice again), then the probe; CBEDs binned to K x K like ours.

Both processes first run one small warm-up simulation (imports, numba JIT); FFTW plans are made per grid
size in both. Timed per sample: building the slab and everything after it. Printed: one JSON line with
samples/s, seconds per sample, peak RSS (MB) and the speed-up ``ours / baseline`` measured in this run, plus
an untimed accuracy check (``centre_cbed_L1_ours_on_same_slab``: L1 distance of the centre CBED when
deepstem's simulator runs on the baseline's very slab; phonon draws differ; ``--no-check`` skips it).
Each child's result also goes to stderr as soon as it is measured. ``--gpu`` adds ``ours_gpu``: the same
samples through deepstem's pipeline with abTEM on CuPy (``python datagen.py device=gpu``), with
``gpu_over_cpu`` (samples/s ratio in this run) and ``gpu_vs_cpu_centre_cbed_sum_rel_diff`` (same seeds, so
the same crystal, parameters and phonon draws: the centre CBED's total intensity must agree to float32
rounding). Usage::

    python scripts/bench_datagen.py                       # both configs, default indices
    python scripts/bench_datagen.py --configs kernel --samples 4
    python scripts/bench_datagen.py --configs kernel_generalist --samples 4 --gpu   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cfg(config: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="datagen", overrides=[f"simulation={config}"])


def _warm_up(device: str = "cpu") -> None:
    """A small simulation: imports, numba JIT, dask start-up (and CuPy's kernels), outside the timed part."""
    from ase.build import bulk

    from datagen.kernel import KernelParameters, KernelSimulator, SimulationSettings

    simulator = KernelSimulator(SimulationSettings(pixels=16, max_sampling_A=0.3, max_gpts=64), device=device)
    params = KernelParameters(200e3, 25.0, 2.5, 0.2, 1e4, 19.4, 2, 0.08, 1)
    simulator.simulate(bulk("Si", "diamond", a=5.431, cubic=True), params, (1.0, 1.0))


def _draw(maker, seed: int, index: int):
    """The accepted draw of a sample, exactly as KernelSampleMaker makes it."""
    from datagen.parameters import sample_rng
    from datagen.specimen import SpecimenRejected

    rng = sample_rng(seed, index)
    for _ in range(maker.max_attempts):
        drawn = maker.space.draw(rng, len(maker.structures))
        try:
            maker._specimen(drawn)
            return drawn
        except SpecimenRejected:
            continue
    raise RuntimeError(f"sample {index}: every draw rejected")


def _baseline_sample(maker, drawn, extent_A: float, check: bool = True) -> dict:
    """One call per output on the whole slab (what one writes without thinking about cost)."""
    import abtem
    import numpy as np

    from datagen.kernel import kernel_positions_A, plan_grid, rebin_matrix
    from datagen.specimen import build_specimen

    k = drawn.kernel
    settings = maker.space.settings
    record = maker.structures[drawn.structure_index]
    start = time.perf_counter()
    specimen = build_specimen(
        record.atoms,
        zone_axis=drawn.zone_axis,
        rotation_deg=drawn.rotation_deg,
        thickness_A=drawn.thickness_A,
        lateral_size_A=extent_A,
        max_strain=maker.max_strain,
        vacuum_A=maker.vacuum_A,
    )
    atoms = specimen.atoms
    jitter = maker.position_jitter_A
    centre = [0.5 * atoms.cell[a, a] + (drawn.position_fraction[a] - 0.5) * jitter for a in (0, 1)]
    sampling = plan_grid(k, settings).sampling_A
    phonons = abtem.FrozenPhonons(
        atoms, num_configs=k.num_phonons, sigmas=k.rms_displacement_A / math.sqrt(3), seed=k.phonon_seed
    )
    potential = abtem.Potential(
        phonons,
        sampling=sampling,
        slice_thickness=settings.slice_thickness_A,
        parametrization=settings.parametrization,
        projection=settings.projection,
    )
    beam = abtem.Probe(
        energy=k.energy_eV, semiangle_cutoff=k.semiangle_mrad, Cs=k.Cs_A, defocus=k.defocus_A, soft=False
    )
    positions = kernel_positions_A(centre, k.step_A)
    patterns = beam.multislice(
        potential, scan=abtem.CustomScan(positions), detectors=abtem.PixelatedDetector(max_angle=None)
    ).compute()
    waves = beam.multislice(
        potential, scan=abtem.CustomScan(positions[4:5]), detectors=abtem.WavesDetector()
    ).compute()
    wave = np.asarray(waves.array).mean(0)
    K = settings.pixels
    probe = (
        abtem.Probe(
            energy=k.energy_eV,
            semiangle_cutoff=k.semiangle_mrad,
            Cs=k.Cs_A,
            defocus=k.defocus_A,
            gpts=K,
            sampling=1 / (2 * k.gmax_invA),
            soft=False,
        )
        .build()
        .compute()
    )
    array = np.asarray(patterns.array)
    dk = patterns.sampling
    rx = rebin_matrix(array.shape[-2], dk[0], K, 2 * k.gmax_invA / K)
    ry = rebin_matrix(array.shape[-1], dk[1], K, 2 * k.gmax_invA / K)
    cbed = np.einsum("ij,njk,lk->nil", rx, array, ry)
    seconds = time.perf_counter() - start
    # accuracy check, not timed: deepstem's simulator on this very slab and centre (phonon draws differ)
    same = maker.simulator.simulate(atoms, k, centre) if check else None
    return {
        "seconds": seconds,
        "cbed": cbed,
        "wave": wave,
        "probe": np.asarray(probe.array),
        "gpts": list(potential.gpts),
        "ours_same_slab_cbed": None if same is None else same.cbed,
    }


def child(
    mode: str, config: str, indices: list[int], seed: int, extent_A: float, check: bool, device: str = "cpu"
) -> dict:
    import numpy as np

    from datagen.cli import KernelSampleMaker, structures_of
    from datagen.kernel import plan_grid

    cfg = _cfg(config)
    maker = KernelSampleMaker(cfg.simulation, structures_of(cfg), seed, device=device, scheduler="threads")
    start = time.perf_counter()
    _warm_up(device)
    warm_up_s = time.perf_counter() - start
    seconds, totals, grids = [], [], []
    differences = []
    for index in indices:
        drawn = _draw(maker, seed, index)
        if mode == "ours":
            start = time.perf_counter()
            specimen = maker._specimen(drawn)  # the slab sized to the box, as in `python datagen.py`
            out = maker.simulate(index, drawn, specimen)
            seconds.append(time.perf_counter() - start)
            grid = plan_grid(drawn.kernel, maker.space.settings)
            grids.append([grid.gpts, grid.gpts])
        else:
            out = _baseline_sample(maker, drawn, extent_A, check)
            seconds.append(out["seconds"])
            grids.append(out["gpts"])
            if out["ours_same_slab_cbed"] is not None:
                a, b = out["ours_same_slab_cbed"][4], out["cbed"][4]
                differences.append(float(np.abs(a - b).sum()))
        totals.append(float(np.asarray(out["cbed"])[4].sum()))
    return {
        "seconds_per_sample": seconds,
        "samples_per_s": len(seconds) / sum(seconds),
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "warm_up_s": warm_up_s,
        "centre_cbed_sum": totals,
        "gpts": grids,
        "num_phonons": int(cfg.simulation.phonons.num_configs),
        **({"centre_cbed_L1_ours_on_same_slab": differences} if differences else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["kernel", "kernel_paper"])
    parser.add_argument("--samples", type=int, default=None, help="samples per config (default 3 / 1)")
    parser.add_argument("--first-index", type=int, default=2, help="first sample index of the global seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extent", type=float, default=70.0, help="baseline slab side in Angstrom")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the untimed accuracy check (deepstem's simulator on the baseline's slab)",
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="also deepstem's pipeline with abTEM on CuPy (datagen device=gpu), same samples",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="deepstem's pipeline only (no straightforward abTEM chain)"
    )
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--indices", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        indices = [int(i) for i in args.indices.split(",")]
        result = child(
            args.child, args.configs[0], indices, args.seed, args.extent, not args.no_check, args.device
        )
        print("RESULT " + json.dumps(result), flush=True)
        return
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "seed": args.seed,
        "baseline_extent_A": args.extent,
    }
    for config in args.configs:
        count = args.samples or (3 if config == "kernel" else 1)
        indices = list(range(args.first_index, args.first_index + count))
        entry: dict = {"sample_indices": indices}
        runs = [("ours", "cpu")]
        runs += [] if args.no_baseline else [("baseline", "cpu")]
        runs += [("ours", "gpu")] if args.gpu else []
        for mode, device in runs:
            key = mode if device == "cpu" else f"{mode}_{device}"
            command = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--configs",
                config,
                "--indices",
                ",".join(map(str, indices)),
                "--seed",
                str(args.seed),
                "--extent",
                str(args.extent),
                "--device",
                device,
                *(["--no-check"] if args.no_check else []),
            ]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"bench_datagen: {key} {config} failed:\n{done.stderr[-3000:]}")
            entry[key] = json.loads(lines[-1][len("RESULT ") :])
            print(
                f"bench_datagen: {config} {key}: {lines[-1][len('RESULT ') :]}", file=sys.stderr, flush=True
            )
        if not args.no_baseline:
            entry["speedup"] = entry["ours"]["samples_per_s"] / entry["baseline"]["samples_per_s"]
            entry["memory_ratio"] = entry["baseline"]["peak_rss_MB"] / entry["ours"]["peak_rss_MB"]
        if args.gpu:
            # same seeds, so the same crystals, parameters and phonon draws: the CBEDs agree to float32
            # rounding of the two FFT libraries (a physics check of the GPU path, not only a timing)
            entry["gpu_over_cpu"] = entry["ours_gpu"]["samples_per_s"] / entry["ours"]["samples_per_s"]
            entry["gpu_vs_cpu_centre_cbed_sum_rel_diff"] = max(
                abs(g - c) / abs(c)
                for g, c in zip(
                    entry["ours_gpu"]["centre_cbed_sum"], entry["ours"]["centre_cbed_sum"], strict=True
                )
            )
        report[config] = entry
    print(json.dumps(report))


if __name__ == "__main__":
    main()
