"""Benchmark of clean HAADF image generation (``simulation=haadf``): images/s of both imaging models.

* ``incoherent``: :class:`datagen.haadf.HaadfSampleMaker` with conf/simulation/haadf.yaml as it is
  (256 x 256 by default): specimen build (crystals, grain boundaries, nanoparticles on amorphous
  supports) plus rendering, per image; the rendering alone is timed as well.
* ``abtem``: the same config with ``abtem_fraction=1`` (PRISM, frozen phonons) at ``--abtem-pixels``
  (default 64: a 256 x 256 abTEM image takes tens of minutes on a 2-core CPU).

Both run in this process after a warm-up image (imports, numba JIT, FFTW plans). Printed: one JSON line.
Usage::

    python scripts/bench_haadf.py
    python scripts/bench_haadf.py --images 64 --abtem-images 2 --abtem-pixels 64 --abtem-phonons 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(overrides: list[str]) -> tuple[dict, list]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from datagen.sources import load_structures

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="datagen", overrides=["simulation=haadf", *overrides])
    return OmegaConf.to_container(cfg.simulation, resolve=True), load_structures(cfg.source)


def _warm_up_abtem() -> None:
    """A tiny abTEM image: imports, numba JIT and dask start-up, outside the timed part."""
    import ase

    from datagen.haadf import AbtemSettings, HaadfOptics, plan_geometry, simulate_abtem

    geometry = plan_geometry(16, 0.2, 1.0)
    atoms = ase.Atoms("Au", positions=[[2.0, 2.0, 2.0]], cell=[geometry.box_A, geometry.box_A, 4.0], pbc=True)
    simulate_abtem(atoms, HaadfOptics(detector_outer_mrad=100.0), geometry, AbtemSettings(num_phonons=1), 0)


def _time_maker(simulation: dict, structures: list, indices: range, render_only: bool = True) -> dict:
    from datagen.haadf import HaadfSampleMaker
    from datagen.parameters import sample_rng

    maker = HaadfSampleMaker(simulation, structures, seed=0)
    if maker.space.abtem_fraction > 0:
        _warm_up_abtem()
    else:
        maker(indices.start - 1)  # warm-up: imports, FFT plans
    render_s = 0.0
    kinds: dict[str, int] = {}
    atoms_total = 0
    start = time.perf_counter()
    for index in indices:
        record = maker(index)
        kinds[record["specimen_kind"]] = kinds.get(record["specimen_kind"], 0) + 1
        atoms_total += int(record["num_atoms"])
    total_s = time.perf_counter() - start
    # rendering alone, on the specimens of the same draws
    for index in indices if render_only else ():
        rng = sample_rng(0, index)
        draw = maker.space.draw(rng, len(maker.structures))
        geometry = maker.geometry(draw)
        try:
            atoms, _ = maker.specimen(draw, geometry)
        except ValueError:  # a rejected draw (the maker redraws; skipped here)
            continue
        begin = time.perf_counter()
        maker.render(draw, atoms, geometry)
        render_s += time.perf_counter() - begin
    n = len(indices)
    return {
        "images": n,
        "pixels": maker.space.pixels,
        "images_per_s": round(n / total_s, 4),
        "s_per_image": round(total_s / n, 3),
        "render_only_images_per_s": round(n / render_s, 3) if render_s else None,
        "mean_atoms": round(atoms_total / n),
        "kinds": kinds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="incoherent-model images timed")
    parser.add_argument("--abtem-images", type=int, default=2)
    parser.add_argument("--abtem-pixels", type=int, default=64)
    parser.add_argument("--abtem-phonons", type=int, default=4)
    parser.add_argument("--skip-abtem", action="store_true")
    args = parser.parse_args()

    simulation, structures = _config([])
    result = {
        "benchmark": "haadf",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "incoherent": _time_maker(simulation, structures, range(1, 1 + args.images)),
    }
    if not args.skip_abtem:
        simulation, structures = _config(
            [
                "simulation.abtem_fraction=1",
                f"simulation.pixels={args.abtem_pixels}",
                f"simulation.abtem.num_phonons={args.abtem_phonons}",
            ]
        )
        abtem = _time_maker(simulation, structures, range(1001, 1001 + args.abtem_images), render_only=False)
        abtem.update({"method": simulation["abtem"]["method"], "num_phonons": args.abtem_phonons})
        result["abtem"] = abtem
    print(json.dumps(result))


if __name__ == "__main__":
    main()
