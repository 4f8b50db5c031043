"""The ``simulation=haadf`` runner (``runner: datagen.haadf:run``): one image shard, in this process or in
spawned worker processes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from datagen.haadf.config import HaadfSpace
from datagen.haadf.layout import image_layout
from datagen.haadf.sample import HaadfSampleMaker

__all__ = [
    "run",
]


log = logging.getLogger("deepstem.datagen")


def run(cfg: Any, maker: HaadfSampleMaker | None = None) -> Any:
    """``python datagen.py simulation=haadf``: compute (or resume, or skip) one image shard.

    Same contract as the kernel pipeline (:func:`datagen.cli.run_shard`: sharding, checkpoints, resume,
    summary, one-line :class:`ConfigError`); returns its :class:`datagen.cli.RunSummary`.
    """
    from datagen.cli import plain_config, run_shard, structures_of, validate_root

    container = plain_config(cfg)
    seed, _, _, _ = validate_root(container)
    simulation = container.get("simulation") or {}
    # abTEM runs on the root's device and dask scheduler
    abtem_node = {
        **(simulation.get("abtem") or {}),
        "device": str(container.get("device", "cpu")),
        "scheduler": str(container.get("scheduler", "threads")),
    }
    simulation = {**simulation, "abtem": abtem_node}
    space = HaadfSpace(simulation)  # check everything before anything is written

    def prepare() -> Any:
        nonlocal maker
        if maker is None:
            maker = HaadfSampleMaker(simulation, structures_of(container), seed)
        workers = int(container.get("workers", 1))
        return lambda todo: _results(maker, todo, workers, container, simulation, seed)

    attrs = {
        "seed_rule": "image i: numpy.random.default_rng([global_seed, i]); `seed` = specimen and phonon seed",
        "intensity_unit": "fraction of incident electrons reaching the detector",
        "source_size": "FWHM of a Gaussian, Angstrom",
    }
    return run_shard(cfg, image_layout(space.pixels), prepare, attrs, noun="images")


_WORKER: HaadfSampleMaker | None = None


def _init_worker(container: dict, simulation: dict, seed: int) -> None:
    """Pool initializer: one warm :class:`HaadfSampleMaker` per worker process.

    The workers are spawned, so none of the parent's abTEM configuration reaches them: the root
    ``fftw_planning`` (see :data:`datagen.cli.DEFAULT_FFTW_PLANNING`) is set here, as the kernel workers
    set it, if the worker will run abTEM at all.
    """
    global _WORKER
    from datagen.cli import DEFAULT_FFTW_PLANNING, structures_of

    logging.basicConfig(level=logging.WARNING)
    abtem = {
        **(simulation.get("abtem") or {}),
        "scheduler": "synchronous",
    }  # the processes are the parallelism
    _WORKER = HaadfSampleMaker({**simulation, "abtem": abtem}, structures_of(container), seed)
    if _WORKER.space.abtem_fraction > 0:
        import abtem as abtem_module

        planning = str(container.get("fftw_planning", DEFAULT_FFTW_PLANNING))
        abtem_module.config.set({"fftw.planning_effort": planning})


def _work(index: int) -> tuple:
    from datagen.cli import attempt

    assert _WORKER is not None
    return attempt(_WORKER, index)


def _results(
    maker: HaadfSampleMaker, todo: Sequence[int], workers: int, container: dict, simulation: dict, seed: int
) -> Any:
    """``(index, record, rejected, error)`` per index, in this process or from warm worker processes."""
    from datagen.cli import attempt

    if workers <= 1 or len(todo) <= 1:
        for index in todo:
            yield attempt(maker, index)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    initargs = (container, simulation, seed)
    with context.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=initargs) as pool:
        yield from pool.imap_unordered(_work, todo)
