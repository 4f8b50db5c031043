"""`python datagen.py`: compute one shard of a dataset (resumable), then update the dataset index.

``run(cfg)`` is the whole command; ``datagen.py`` hands Hydra's config to :func:`command`, which turns
every error deepstem reports itself (:class:`~datagen.parameters.ConfigError`,
:class:`~datagen.store.StoreError`, :class:`~datagen.shards.ShardLockError`, ``OSError`` with its path)
into one ``deepstem: error:`` line on stderr and exit status 2. The simulation
config's ``runner`` picks the work: ``kernel`` (:func:`run_kernel`, here), ``datagen.haadf:run``,
``datagen.stock_images:run``, ``datagen.scan4d:run``. Sharded runners share :func:`run_shard` (skip,
resume from checkpoints, progress bar, closing :class:`RunSummary`, index) with a
:class:`datagen.shards.ShardLayout` for their schema, and the public helpers below (config validation,
fingerprint, structure source, progress bar, summary).

A finished output is reused only when the fingerprint of what made it (seed, simulation, source, sample
count) matches the current config; a mismatch stops with one line naming the differing keys. One job owns
a shard at a time (:class:`datagen.shards.ShardLock`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datagen import store
from datagen.parameters import STEP_KEYS, ConfigError, DrawnSample, ParameterSpace, sample_rng
from datagen.provenance import config_yaml
from datagen.shards import (
    KERNEL_LAYOUT,
    PartialShard,
    ShardLayout,
    ShardLock,
    ShardLockError,
    assemble_shard,
    fingerprint_differences,
    inspect_shard,
    remove_stale_temporaries,
    shard_name,
    shard_range,
    write_index,
)
from physics.runtime import configure_threads, report_error

__all__ = [
    "KernelSampleMaker",
    "Result",
    "RunSummary",
    "SampleFailed",
    "as_config_error",
    "attempt",
    "check_reuse",
    "command",
    "config_fingerprint",
    "log_summary",
    "output_folder",
    "plain_config",
    "progress_bar",
    "rejection_reason",
    "run",
    "run_kernel",
    "run_shard",
    "structures_of",
    "validate_root",
]

log = logging.getLogger("deepstem.datagen")

FFTW_PLANNING = ("FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT", "FFTW_EXHAUSTIVE")
DEFAULT_FFTW_PLANNING = "FFTW_ESTIMATE"
"""abTEM's FFTW planner effort. FFTW_MEASURE (abTEM's default) picks plans by timing them, so two
processes may round differently (2.3e-6 relative was seen between two runs); FFTW_ESTIMATE plans
deterministically, which makes every sample bit-identical from ``(seed, index)`` on one machine and
build. abTEM modules that set their own config (datagen.haadf, datagen.scan4d) get it process-wide, and
datagen.haadf's (spawned) worker processes when they start."""
ABTEM_RUNNERS = ("datagen.haadf", "datagen.scan4d")


class SampleFailed(RuntimeError):
    """No sample could be made for an index (every draw rejected, or the simulation failed)."""


@dataclass
class RunSummary:
    """What one `python datagen.py` run did (also logged as its closing summary)."""

    shard: str
    noun: str = "samples"
    resumed_label: str = "resumed from checkpoints"
    written: int = 0
    resumed: int = 0
    skipped_existing: bool = False
    failed: dict[int, str] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    wall_s: float = 0.0

    def lines(self) -> list[str]:
        rate = self.written / self.wall_s if self.wall_s > 0 else 0.0
        if self.skipped_existing:
            out = [f"{self.shard}: already complete, skipped (overwrite=true recomputes it)"]
        else:
            out = [
                f"{self.shard}: {self.written} {self.noun} computed, "
                f"{self.resumed} {self.resumed_label}, "
                f"{len(self.failed)} failed, wall time {self.wall_s:.1f} s ({rate:.3g} {self.noun}/s)"
            ]
        if self.rejected:
            reasons = "; ".join(f"{n} x {reason}" for reason, n in self.rejected.most_common())
            out.append(f"rejected draws (redrawn): {reasons}")
        for index, reason in sorted(self.failed.items()):
            out.append(f"failed {self.noun.rstrip('s')} {index}: {reason}")
        return out


def structures_of(cfg: Mapping[str, Any]) -> list:
    """The structure records of the config's ``source`` group (:func:`datagen.sources.load_structures`).

    Every failure is a one-line :class:`ConfigError` naming ``source`` (or ``source.<key>``).
    """
    source_cfg = cfg.get("source")
    if source_cfg is None:
        raise ConfigError(
            "source", "no structure source configured (use the `source` group, e.g. source=bundled)"
        )
    from datagen.sources import StructureSourceError, load_structures

    try:
        records = load_structures(source_cfg)
    except ConfigError:
        raise
    except (ValueError, KeyError, FileNotFoundError, StructureSourceError) as err:
        raise as_config_error(err, "source") from None
    if not records:
        raise ConfigError("source", "the structure source yielded no structures (check its filters)")
    return list(records)


def as_config_error(err: BaseException, default_parameter: str) -> ConfigError:
    """One-line :class:`ConfigError` from another error (``"source.elements: ..."`` keeps its name)."""
    text = " ".join(str(err).split()) or type(err).__name__
    head, sep, rest = text.partition(": ")
    if sep and head.replace(".", "").replace("_", "").isalnum() and head.startswith(default_parameter):
        return ConfigError(head, rest)
    return ConfigError(default_parameter, text)


class KernelSampleMaker:
    """Makes the sample of a global index: draws, builds the specimen, simulates. One per process."""

    def __init__(
        self,
        simulation_cfg: Mapping[str, Any],
        structures: Sequence[Any],
        seed: int,
        device: str = "cpu",
        scheduler: str = "threads",
        build_specimen: Callable[..., Any] | None = None,
        fftw_planning: str = DEFAULT_FFTW_PLANNING,
    ) -> None:
        from datagen.kernel import KernelSimulator

        self.space = ParameterSpace(simulation_cfg)
        specimen = dict(simulation_cfg.get("specimen") or {})
        self.position_jitter_A = float(specimen.get("position_jitter_A", 6.0))
        self.max_strain = float(specimen.get("max_strain", 0.02))
        self.vacuum_A = float(specimen.get("vacuum_A", 2.0))
        self.max_attempts = int(simulation_cfg.get("max_attempts", 20))
        if self.max_attempts < 1:
            raise ConfigError("simulation.max_attempts", f"must be >= 1, got {self.max_attempts}")
        if self.position_jitter_A < 0:
            raise ConfigError(
                "simulation.specimen.position_jitter_A", f"must be >= 0, got {self.position_jitter_A}"
            )
        if self.max_strain < 0:
            raise ConfigError("simulation.specimen.max_strain", f"must be >= 0, got {self.max_strain}")
        self.structures = list(structures)
        self.seed = int(seed)
        self.simulator = KernelSimulator(
            self.space.settings, device=device, scheduler=scheduler, fftw_planning=fftw_planning
        )
        if build_specimen is None:
            from datagen.specimen import build_specimen
        self._build_specimen = build_specimen

    def _specimen(self, drawn: DrawnSample) -> Any:
        """The slab: the atom window of the simulation box plus the position jitter, so no seam is inside."""
        from datagen.kernel import plan_grid

        grid = plan_grid(drawn.kernel, self.space.settings)
        record = self.structures[drawn.structure_index]
        return self._build_specimen(
            record.atoms,
            zone_axis=drawn.zone_axis,
            rotation_deg=drawn.rotation_deg,
            thickness_A=drawn.thickness_A,
            lateral_size_A=grid.atom_window_A + self.position_jitter_A + 0.5,
            max_strain=self.max_strain,
            vacuum_A=self.vacuum_A,
        )

    def __call__(self, index: int, rejected: Counter | None = None) -> dict[str, Any]:
        """The record of sample ``index`` (raises :class:`SampleFailed`); rejected draws are redrawn."""
        from datagen.specimen import SpecimenRejected

        rng = sample_rng(self.seed, index)
        last_reason = "no attempt"
        for _ in range(self.max_attempts):
            drawn = self.space.draw(rng, len(self.structures))
            try:
                specimen = self._specimen(drawn)
            except SpecimenRejected as err:
                last_reason = str(getattr(err, "reason", "") or rejection_reason(err))
                if rejected is not None:
                    rejected[last_reason] += 1
                continue
            return self.simulate(index, drawn, specimen)
        raise SampleFailed(f"all {self.max_attempts} draws rejected (last: {last_reason})")

    def simulate(self, index: int, drawn: DrawnSample, specimen: Any) -> dict[str, Any]:
        """Simulate a drawn sample; the centre probe sits within the jitter of the slab centre."""
        cell = np.asarray(specimen.atoms.cell.array)
        jitter = self.position_jitter_A
        centre = tuple(
            0.5 * cell[axis, axis] + (drawn.position_fraction[axis] - 0.5) * jitter for axis in (0, 1)
        )
        result = self.simulator.simulate(specimen.atoms, drawn.kernel, centre)
        record = self.structures[drawn.structure_index]
        k = drawn.kernel
        return {
            "cbed": result.cbed,
            "wave": result.wave,
            "probe": result.probe,
            "energy_eV": k.energy_eV,
            "semiangle_mrad": k.semiangle_mrad,
            "gmax_invA": k.gmax_invA,
            "step_A": k.step_A,
            "Cs_A": k.Cs_A,
            "defocus_A": k.defocus_A,
            "thickness_A": float(specimen.thickness_A),
            "rotation_deg": drawn.rotation_deg,
            "zone_axis": np.asarray(drawn.zone_axis, dtype=np.int32),
            "num_phonons": k.num_phonons,
            "seed": k.phonon_seed,
            "sample_index": int(index),
            "source_id": record.source_id,
            "formula": record.formula,
        }


def rejection_reason(err: BaseException) -> str:
    """First line of an error with digits replaced by ``#`` (groups rejections by kind), <= 120 chars."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # group by the kind of rejection, not by the exact numbers
    return "".join(c if not c.isdigit() else "#" for c in text)[:120]


def config_fingerprint(cfg: Mapping[str, Any]) -> str:
    """YAML of what determines the samples (seed, simulation, source, num_samples): a partial shard
    written under another fingerprint is not resumed."""
    relevant = {key: cfg.get(key) for key in ("seed", "simulation", "source")}
    simulation = relevant["simulation"]
    if isinstance(simulation, Mapping):
        # the unused one of step_A / step_rayleigh is null and changes no sample: leaving it out keeps a
        # dataset written before step_A existed (no such key) reusable under its unchanged settings
        relevant["simulation"] = {
            key: value for key, value in simulation.items() if not (key in STEP_KEYS and value is None)
        }
    relevant["num_samples"] = cfg.get("simulation", {}).get("num_samples")
    return config_yaml(relevant)


def validate_root(cfg: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """Check the root keys of ``conf/datagen.yaml``; returns ``(seed, num_shards, shard_index, num_samples)``.

    ``num_samples`` is ``simulation.num_samples``. Errors are one-line :class:`ConfigError` s.
    """

    def integer(name: str, value: Any) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be an integer, got {value!r}") from None
        if number != value and str(number) != str(value):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        return number

    seed = integer("seed", cfg.get("seed"))
    num_shards = integer("num_shards", cfg.get("num_shards"))
    shard_index = integer("shard_index", cfg.get("shard_index"))
    num_samples = integer("simulation.num_samples", (cfg.get("simulation") or {}).get("num_samples"))
    if num_shards < 1:
        raise ConfigError("num_shards", f"must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(
            "shard_index", f"must be in 0..{num_shards - 1} (num_shards={num_shards}), got {shard_index}"
        )
    if num_samples < 1:
        raise ConfigError("simulation.num_samples", f"must be >= 1, got {num_samples}")
    if seed < 0:
        raise ConfigError("seed", f"must be >= 0, got {seed}")
    if cfg.get("device", "cpu") not in ("cpu", "gpu"):
        raise ConfigError("device", f"must be 'cpu' or 'gpu', got {cfg.get('device')!r}")
    workers = integer("workers", cfg.get("workers", 1))
    if workers < 1:
        raise ConfigError("workers", f"must be >= 1, got {workers}")
    checkpoint = integer("checkpoint_every", cfg.get("checkpoint_every", 8))
    if checkpoint < 1:
        raise ConfigError("checkpoint_every", f"must be >= 1, got {checkpoint}")
    from physics.runtime import resolve_threads

    try:
        resolve_threads(cfg.get("threads", "auto"), 0)
    except ValueError as err:
        raise ConfigError("threads", str(err).removeprefix("threads ")) from None
    planning = cfg.get("fftw_planning", DEFAULT_FFTW_PLANNING)
    if planning not in FFTW_PLANNING:
        raise ConfigError("fftw_planning", f"must be one of {', '.join(FFTW_PLANNING)}, got {planning!r}")
    try:
        stale = float(cfg.get("lock_stale_s", 900))
    except (TypeError, ValueError):
        stale = float("nan")
    if not stale > 0:
        raise ConfigError(
            "lock_stale_s", f"must be a positive number of seconds, got {cfg.get('lock_stale_s')!r}"
        )
    return seed, num_shards, shard_index, num_samples


def plain_config(cfg: Any) -> dict:
    """The config as plain resolved dicts and lists (an OmegaConf ``DictConfig`` or a mapping)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def run(cfg: Any, maker: KernelSampleMaker | None = None) -> Any:
    """`python datagen.py`: the simulation config's ``runner`` does the work (default: :func:`run_kernel`).

    Other simulations plug in without touching this file: their ``conf/simulation/<name>.yaml`` sets
    ``runner: package.module:function`` (called with the whole config).
    """
    container = plain_config(cfg)
    runner = str((container.get("simulation") or {}).get("runner", "kernel"))
    if runner != "kernel":
        import importlib

        module_name, _, function_name = runner.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name or "run")
        except (ImportError, AttributeError) as err:
            raise ConfigError("simulation.runner", f"cannot load {runner!r}: {err}") from None
    if runner == "kernel":
        return run_kernel(cfg, maker)
    if module_name in ABTEM_RUNNERS:
        import abtem

        abtem.config.set({"fftw.planning_effort": container.get("fftw_planning", DEFAULT_FFTW_PLANNING)})
    return function(cfg)


def _configure_threads(container: Mapping[str, Any]) -> int:
    """The root ``threads`` (default auto: the cores left after one per worker process), applied with
    :func:`physics.runtime.configure_threads` before any work."""
    try:
        workers = int(container.get("workers", 1))
    except (TypeError, ValueError):
        raise ConfigError("workers", f"must be an integer, got {container.get('workers')!r}") from None
    try:
        return configure_threads(container.get("threads", "auto"), workers if workers > 1 else 0)
    except ValueError as err:
        raise ConfigError("threads", str(err).removeprefix("threads ")) from None


def command(cfg: Any, maker: KernelSampleMaker | None = None) -> int:
    """`python datagen.py`: :func:`run`, with every error deepstem reports itself as one line on stderr.

    Returns the exit status: 0, or ``physics.runtime.EXIT_ERROR`` after printing
    ``deepstem: error: <message>`` (bad config, unreadable or foreign files, a shard owned by another job,
    an out_dir that cannot be written). Anything else is a bug and keeps its traceback.
    """
    try:
        _configure_threads(plain_config(cfg))  # the command's own thread budget (library calls keep theirs)
        run(cfg, maker)
    except (ConfigError, store.StoreError, ShardLockError) as err:
        return report_error(err)
    except OSError as err:
        where = err.filename if err.filename is not None else ""
        reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
        hint = "; choose a writable out_dir" if isinstance(err, PermissionError | NotADirectoryError) else ""
        return report_error(f"{where}: {reason}{hint}" if where else f"{reason}{hint}")
    return 0


def output_folder(container: Mapping[str, Any]) -> Path:
    """The root ``out_dir`` (default in conf/datagen.yaml: ``data/<simulation.name>``)."""
    name = str((container.get("simulation") or {}).get("name", "kernel"))
    value = container.get("out_dir")
    if value is None or str(value).strip() == "":
        value = f"data/{name}"
    return Path(str(value)).expanduser()


def run_kernel(cfg: Any, maker: KernelSampleMaker | None = None) -> RunSummary:
    """Compute (or resume, or skip) shard ``shard_index`` of ``num_shards``; returns the summary.

    ``maker`` may be given to reuse a warm simulator (tests, benchmarks); by default one is built from
    ``cfg``. Configuration errors raise :class:`ConfigError` before anything is written.
    """
    container = plain_config(cfg)
    seed, _, _, _ = validate_root(container)
    simulation = container.get("simulation") or {}
    ParameterSpace(simulation)  # check the distributions before anything else happens

    def prepare() -> Callable[[Sequence[int]], Iterator[Result]]:
        nonlocal maker
        if maker is None:
            try:
                maker = KernelSampleMaker(
                    simulation,
                    structures_of(container),
                    seed,
                    device=str(container.get("device", "cpu")),
                    scheduler=str(container.get("scheduler", "threads")),
                    fftw_planning=str(container.get("fftw_planning", DEFAULT_FFTW_PLANNING)),
                )
            except ConfigError:
                raise
            except (ValueError, ImportError) as err:  # device=gpu without CuPy, bad abTEM option
                raise as_config_error(err, "device") from None
        workers = int(container.get("workers", 1))
        return lambda todo: _results(maker, todo, workers, container, seed)

    attrs = {"seed_rule": "sample i: numpy.random.default_rng([global_seed, i]); `seed` = abTEM phonon seed"}
    return run_shard(cfg, KERNEL_LAYOUT, prepare, attrs)


def run_shard(
    cfg: Any,
    layout: ShardLayout,
    prepare: Callable[[], Callable[[Sequence[int]], Iterator[Result]]],
    attrs: Mapping[str, Any] | None = None,
    noun: str = "samples",
) -> RunSummary:
    """The shard loop every sharded simulation shares: skip, resume, compute, checkpoint, assemble, index.

    Shard ``shard_index`` of ``num_shards`` holds :func:`~datagen.shards.shard_range` of
    ``simulation.num_samples`` in the root ``out_dir`` (:func:`output_folder`), as ``layout.schema``. A
    finished shard is skipped (``overwrite=true`` recomputes it); otherwise ``prepare()`` is called once
    (build the warm simulator; may raise :class:`ConfigError` before anything is written) and returns a
    function that yields one :data:`Result` per index still to compute, in any order. Finished records
    are checkpointed every ``checkpoint_every``; failures are reported per sample and the shard goes on.
    ``attrs`` are added to the shard's attributes. Returns the closing :class:`RunSummary` (also logged).
    """
    started = time.perf_counter()
    container = plain_config(cfg)
    seed, num_shards, shard_index, num_samples = validate_root(container)
    out_dir = output_folder(container)
    foreign = _foreign_shards(out_dir, layout)
    if foreign:
        raise ConfigError(
            "out_dir", f"{out_dir} holds {foreign} shards; write {layout.schema.id} shards to another folder"
        )
    indices = shard_range(num_samples, shard_index, num_shards)
    name = shard_name(shard_index, num_shards)
    summary = RunSummary(shard=name, noun=noun)
    final = out_dir / name
    overwrite = bool(container.get("overwrite", False))
    fingerprint = config_fingerprint(container)
    partial = PartialShard(out_dir, shard_index, num_shards, fingerprint, layout)
    stale_s = float(container.get("lock_stale_s", 900))
    lock = ShardLock(out_dir, shard_index, num_shards, stale_s=stale_s)

    def skip() -> RunSummary:
        summary.skipped_existing = True
        summary.wall_s = time.perf_counter() - started
        log_summary(summary)
        write_index(out_dir, layout)
        return summary

    if final.exists() and not overwrite and _reusable(final, layout, fingerprint, indices):
        return skip()
    lock.check()  # another live job computes this shard: stop before building anything
    results = prepare()
    with lock:
        if final.exists() and not overwrite and _reusable(final, layout, fingerprint, indices, lock):
            partial.remove()  # finished by another job meanwhile; its checkpoints are stale
            return skip()
        remove_stale_temporaries(out_dir, name, stale_s)
        if overwrite:
            partial.remove()
        try:
            partial.open()
        except ValueError as err:
            raise ConfigError("out_dir", str(err)) from None
        summary.written, summary.resumed = 0, 0
        _compute(container, partial, lock, results, indices, summary, noun, seed)
        shard_attrs = {
            "global_seed": seed,
            "shard_index": shard_index,
            "num_shards": num_shards,
            "first_index": indices.start,
            "stop_index": indices.stop,
            "failed_indices": json_dumps(sorted(summary.failed)),
            "rejected": json_dumps(dict(summary.rejected)),
            **(attrs or {}),
        }
        lock.verify()
        assemble_shard(partial, cfg, shard_attrs, indices, overwrite=True)
    write_index(out_dir, layout)
    summary.wall_s = time.perf_counter() - started
    log_summary(summary)
    return summary


def _reusable(
    final: Path, layout: ShardLayout, fingerprint: str, indices: range, lock: ShardLock | None = None
) -> bool:
    """True for a whole shard of this configuration; a mismatch is a :class:`ConfigError` naming the keys.

    A shard that is not whole (truncated, unreadable) is moved aside to a hidden ``.<name>.broken`` when
    ``lock`` is held, so that it is recomputed; without the lock it is left for the lock holder.
    """
    found = inspect_shard(final, layout, fingerprint, indices, fingerprint_of_config=config_fingerprint)
    if found.differences:
        raise _mismatch(final, found.differences)
    if found.whole:
        return True
    if lock is not None:
        aside = final.with_name(f".{final.name}.broken")
        os.replace(final, aside)
        log.warning(
            "%s is not a whole shard (%s): moved to %s, recomputing it", final, found.reason, aside.name
        )
    return False


def check_reuse(path: str | os.PathLike, stored: Any, current: Any) -> None:
    """Refuse to reuse the existing output ``path`` when the fingerprint it was made with (``stored``:
    YAML text or a mapping) differs from ``current``: a one-line :class:`ConfigError` naming the keys."""
    differences = fingerprint_differences(stored, current)
    if differences:
        raise _mismatch(Path(path), differences)


def _mismatch(path: Path, differences: str) -> ConfigError:
    return ConfigError(
        "out_dir",
        f"{path} was made with another configuration ({differences}); "
        "recompute it with overwrite=true, or write to another out_dir",
    )


def _compute(
    container: Mapping[str, Any],
    partial: PartialShard,
    lock: ShardLock,
    results: Callable[[Sequence[int]], Iterator[Result]],
    indices: range,
    summary: RunSummary,
    noun: str,
    seed: int,
) -> None:
    """Compute the samples of ``indices`` not yet checkpointed, checkpointing every ``checkpoint_every``."""
    name = summary.shard
    done = partial.done() & set(indices)
    summary.resumed = len(done)
    todo = [i for i in indices if i not in done]
    log.info(
        "%s: %s %d..%d of %d (%d to compute, %d checkpointed) -> %s",
        name,
        noun,
        indices.start,
        indices.stop - 1,
        int((container.get("simulation") or {}).get("num_samples", 0)),
        len(todo),
        len(done),
        partial.out_dir,
    )
    checkpoint_every = int(container.get("checkpoint_every", 8))
    pending: list[dict[str, Any]] = []
    progress = progress_bar(
        total=len(indices),
        initial=len(done),
        description=name,
        enabled=container.get("progress", True),
        unit=noun.rstrip("s"),
    )
    try:
        for index, record, rejected, error in results(todo):
            summary.rejected.update(rejected)
            if error is None:
                pending.append(record)
                summary.written += 1
            else:  # a failing sample must not lose the shard's finished samples
                summary.failed[index] = error
                log.error("%s %d (seed %d, index %d) failed: %s", noun.rstrip("s"), index, seed, index, error)
            progress.update(1)
            if len(pending) >= checkpoint_every:
                lock.verify()  # a job that lost the shard to another one writes nothing more
                partial.save(pending)
                pending = []
    finally:
        if pending and lock.owned():
            partial.save(pending)
        progress.close()


def _foreign_shards(out_dir: Path, layout: ShardLayout) -> str | None:
    """The schema of a finished shard in ``out_dir`` that is not ``layout``'s (None if there is none)."""
    import h5py

    for path in sorted(out_dir.glob("shard-*-of-*.h5")):
        try:
            with h5py.File(path, "r") as handle:
                value = handle.attrs.get("schema", "")
        except OSError:
            continue  # unreadable files are reported when the index is written
        value = value.decode() if isinstance(value, bytes) else str(value)
        if value and value != layout.schema.id:
            return value
    return None


Result = tuple[int, "dict[str, Any] | None", Counter, "str | None"]
_WORKER: KernelSampleMaker | None = None


def attempt(maker: Callable[..., dict[str, Any]], index: int) -> Result:
    """``maker(index, rejected)`` as a :data:`Result`; an exception becomes the sample's error string."""
    rejected: Counter = Counter()
    try:
        return index, maker(index, rejected), rejected, None
    except Exception as err:  # reported per sample, the shard goes on
        return index, None, rejected, f"{type(err).__name__}: {rejection_reason(err)}"


def _init_worker(container: dict, seed: int) -> None:
    """Pool initializer: one warm KernelSampleMaker per worker process (abTEM imported, numba compiled)."""
    global _WORKER
    logging.basicConfig(level=logging.WARNING)
    _WORKER = KernelSampleMaker(
        container.get("simulation") or {},
        structures_of(container),
        seed,
        device=str(container.get("device", "cpu")),
        scheduler="synchronous",  # the processes are the parallelism
        fftw_planning=str(container.get("fftw_planning", DEFAULT_FFTW_PLANNING)),
    )


def _work(index: int) -> Result:
    assert _WORKER is not None
    return attempt(_WORKER, index)


def _results(
    maker: Callable[..., dict[str, Any]], todo: Sequence[int], workers: int, container: dict, seed: int
) -> Iterator[Result]:
    """``(index, record, rejected, error)`` per index: in this process, or from warm worker processes."""
    if workers <= 1 or len(todo) <= 1:
        for index in todo:
            yield attempt(maker, index)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of dask/FFTW threads
    with context.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(container, seed)) as pool:
        yield from pool.imap_unordered(_work, todo)


def json_dumps(value: Any) -> str:
    import json

    return json.dumps(value)


def progress_bar(total: int, initial: int, description: str, enabled: bool, unit: str = "sample") -> Any:
    """A tqdm bar (rate and ETA) over ``total`` items of which ``initial`` are already done."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit=unit,
        disable=not enabled,
        smoothing=0.1,
        dynamic_ncols=True,
    )


def log_summary(summary: RunSummary) -> None:
    """Log the closing summary of a run (one line per :meth:`RunSummary.lines` entry)."""
    for line in summary.lines():
        log.info(line)
