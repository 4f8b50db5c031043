"""The steps around training that make `python train.py experiment=quickstart` one whole run.

Both steps are off unless the config asks for them (``datagen: null`` and ``evaluate: null`` in
conf/train.yaml):

* :func:`prepare_data` (before training): when ``cfg.datagen`` is set and the training data folder
  (``data.data_dir``) holds no finished shard, compose the `python datagen.py` root config
  (conf/datagen.yaml) with ``cfg.datagen.overrides`` and ``out_dir=<data.data_dir>``, and run it
  (:func:`datagen.cli.run`: resumable, so a killed quickstart continues where it stopped);
* :func:`evaluate_checkpoint` (after training and test): when ``cfg.evaluate`` is set, run the benchmark
  suite ``cfg.evaluate.suite`` (a name in conf/suite/ or the suite itself) with this run's checkpoint as
  the ``ckpt`` of every entry of the trained network's method whose ``ckpt`` is null, write metrics.json,
  results.md and figures/ into ``<output_dir>/<cfg.evaluate.dir>`` (default ``evaluate``) and print the
  Markdown table to stdout (:func:`evaluation.suite.run_suite`).

``cfg.datagen`` keys: ``overrides`` (list of `python datagen.py` overrides, e.g. ``simulation=kernel``,
``simulation.num_samples=96``). ``cfg.evaluate`` keys: ``suite`` (name or mapping), ``suite_overrides``
(dotlist applied to the suite), ``checkpoint`` (``best`` by the monitored validation loss, ``last``, or a
path), ``dir``, ``seed``, ``device``, ``progress``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from physics.runtime import configure_threads

if TYPE_CHECKING:
    from training.run_report import TrainingSummary

__all__ = [
    "CONF_DIR",
    "MODEL_METHODS",
    "absolute_path",
    "compose_datagen",
    "evaluate_checkpoint",
    "finished_shards",
    "load_suite",
    "prepare_data",
    "trained_checkpoint",
    "training_note",
]

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# LightningModule class -> the reconstruct.py / suite method that runs its checkpoints
MODEL_METHODS = {"AIRPILightning": "airpi", "PtychoNNLightning": "ptychonn", "ChangLightning": "chang_unet"}


def _error(message: str) -> Exception:
    from training.cli import ConfigError

    return ConfigError(message)


def absolute_path(path: str | Path) -> Path:
    """``path`` from the directory the command was started in (Hydra's original cwd when running)."""
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(path)))
    except Exception:  # outside a Hydra run
        return Path(path).expanduser().resolve()


def finished_shards(folder: str | Path) -> list[Path]:
    """The finished shards (``shard-*-of-*.h5``) in ``folder``; unfinished ones live in hidden folders."""
    folder = Path(folder)
    return sorted(folder.glob("shard-*-of-*.h5")) if folder.is_dir() else []


def compose_datagen(overrides: Sequence[str]) -> DictConfig:
    """The root config of `python datagen.py OVERRIDES...` (conf/datagen.yaml with its groups).

    Inside a running Hydra app (``python train.py``) the global Hydra instance is initialised on the same
    conf/ folder, so ``hydra.compose`` is used directly; otherwise (tests, plain Python) a temporary one is
    initialised on :data:`CONF_DIR`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [str(o) for o in overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="datagen", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="datagen", overrides=overrides)


def prepare_data(cfg: DictConfig) -> Path | None:
    """Generate the training data named by ``cfg.datagen`` unless ``data.data_dir`` already holds shards.

    Returns the data folder when data were generated, None when nothing was to be done.
    """
    section = cfg.get("datagen")
    if not section:
        return None
    data_dir = cfg.data.get("data_dir")
    if not isinstance(data_dir, str) or any(c in data_dir for c in "*?["):
        raise _error(f"datagen needs data.data_dir to be one folder, got {data_dir!r}")
    folder = absolute_path(data_dir)
    if finished_shards(folder):
        log.info("datagen: %s already holds shards; not generating", folder)
        return None
    overrides = OmegaConf.to_container(section.get("overrides") or [], resolve=True)
    if not isinstance(overrides, list):
        raise _error("datagen.overrides must be a list of `python datagen.py` overrides")
    if any(str(o).split("=", 1)[0].lstrip("+~") == "out_dir" for o in overrides):
        raise _error("datagen.overrides must not set out_dir; it is data.data_dir")
    from datagen.cli import run as datagen_run
    from datagen.parameters import ConfigError as DatagenConfigError

    datagen_cfg = compose_datagen([*overrides, f"out_dir={folder}"])
    print(f"pipeline: generating training data into {folder}", file=sys.stderr)
    start = time.perf_counter()
    try:
        datagen_run(datagen_cfg)
    except DatagenConfigError as err:
        raise _error(f"datagen: {err}") from None
    if not finished_shards(folder):
        raise _error(f"datagen wrote no finished shard into {folder}")
    print(f"pipeline: datagen took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return folder


def _best_of_last(last: Path) -> Path | None:
    """The ``best_model_path`` that ModelCheckpoint recorded in ``last`` (None if none is there)."""
    from models.checkpoints import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(last)  # weights only, like every checkpoint deepstem reads
    except CheckpointError:  # not a readable (or not a safe) checkpoint: fall back to the files
        return None
    states = checkpoint.get("callbacks")
    for key, state in (states or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, Mapping):
            best = state.get("best_model_path")
            if best and Path(best).is_file():
                return Path(best)
    return None


def trained_checkpoint(cfg: DictConfig, which: str = "best") -> Path:
    """The checkpoint this run trained, from ``callbacks.model_checkpoint``'s folder.

    ``which="best"``: the best one as recorded in ``last.ckpt``; else the newest other checkpoint (with
    ``save_top_k: 1`` the best); else ``last.ckpt``. ``which="last"``: ``last.ckpt`` (else the newest).
    """
    if which not in ("best", "last"):
        raise _error(f"evaluate.checkpoint must be best, last or a path, got {which!r}")
    callback = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    dirpath = callback.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints"
    folder = absolute_path(dirpath)
    ckpts = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    last = [p for p in ckpts if p.name.startswith("last")]
    others = [p for p in ckpts if not p.name.startswith("last")]
    if which == "last" and ckpts:
        return last[-1] if last else ckpts[-1]
    best = _best_of_last(last[-1]) if last else None
    if best is not None:
        return best
    if others:
        return others[-1]
    if last:
        return last[-1]
    raise _error(f"evaluate: no checkpoint in {folder} (callbacks.model_checkpoint saves them)")


def load_suite(suite: str | Mapping[str, Any], overrides: Sequence[str] = ()) -> DictConfig:
    """A suite: conf/suite/<name>.yaml, or the mapping itself; ``overrides`` is an OmegaConf dotlist."""
    if isinstance(suite, str):
        path = CONF_DIR / "suite" / f"{suite}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in (CONF_DIR / "suite").glob("*.yaml")))
            raise _error(f"evaluate.suite={suite}: no conf/suite/{suite}.yaml (have: {names})")
        node = OmegaConf.load(path)
    else:
        node = OmegaConf.create(dict(suite))
    if overrides:
        node = OmegaConf.merge(node, OmegaConf.from_dotlist([str(o) for o in overrides]))
    assert isinstance(node, DictConfig)
    return node


def training_note(label: str, training: TrainingSummary) -> str:
    """The line under the table that says what row ``label`` is: where its weights started, how long it
    trained, and the cap that cut it short if one did (``stopped by the 5 min cap ... after 4.9 of 40``)."""
    origin = f"{training.init_from} fine-tuned" if training.init_from else "trained"
    return f"{label}: {origin} in this run {training.trained_text()}"


def evaluate_checkpoint(
    cfg: DictConfig, ckpt: str | Path | None = None, training: TrainingSummary | None = None
) -> dict[str, Any] | None:
    """Run ``cfg.evaluate``'s suite with this run's checkpoint; returns the suite's JSON content.

    ``ckpt`` defaults to :func:`trained_checkpoint`. Entries of the trained model's method with ``ckpt:
    null`` get it; entries of other networks must name their own. Outputs go to
    ``<paths.output_dir>/<evaluate.dir>``; the Markdown table is printed to stdout. With ``training`` (the
    run's :class:`training.run_report.TrainingSummary`) the table is followed by one note per filled entry
    (:func:`training_note`), also in results.md, and metrics.json gets a ``training`` record.
    """
    section = cfg.get("evaluate")
    if not section:
        return None
    from evaluation.io import ScanError
    from evaluation.suite import SuiteError, markdown_table, run_suite
    from training.cli import _class_name

    suite_spec = section.get("suite")
    if suite_spec is None:
        raise _error("evaluate.suite: name a suite (conf/suite/<name>.yaml)")
    if isinstance(suite_spec, DictConfig):
        suite_spec = OmegaConf.to_container(suite_spec, resolve=True)
    suite = load_suite(suite_spec, list(section.get("suite_overrides") or []))
    method = MODEL_METHODS.get(_class_name(cfg.model, "model"))
    if ckpt is None:
        choice = str(section.get("checkpoint") or "best")
        ckpt = trained_checkpoint(cfg, choice) if choice in ("best", "last") else absolute_path(choice)
    ckpt = Path(ckpt)
    filled: list[str] = []
    for label, entry in (suite.get("methods") or {}).items():
        if entry is not None and entry.get("method", label) == method and not entry.get("ckpt"):
            entry.ckpt = str(ckpt)
            filled.append(str(label))
    if method is not None and not filled:
        log.warning(
            "evaluate: the suite has no %s entry with ckpt: null; the trained model is not scored", method
        )
    run_dir = Path(cfg.paths.output_dir) / str(section.get("dir") or "evaluate")
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_cfg = OmegaConf.create(
        {
            "suite": suite,
            "seed": int(section.get("seed", 0)),
            "device": str(section.get("device", "auto")),
            "progress": bool(section.get("progress", True)),
        }
    )
    (run_dir / "suite.yaml").write_text(OmegaConf.to_yaml(eval_cfg))
    name = suite_spec if isinstance(suite_spec, str) else "(inline)"
    sizes = [len(suite.get(key) or {}) for key in ("scans", "methods")]
    runs = sizes[0] * len(suite.get("doses_e_per_A2") or [0]) * sizes[1]
    print(f"pipeline: evaluating {ckpt} with suite {name} ({runs} reconstructions)", file=sys.stderr)
    configure_threads(cfg.get("threads", "auto"), 0)  # no loader workers any more
    start = time.perf_counter()
    try:
        content = run_suite(eval_cfg, run_dir)
    except (SuiteError, ScanError) as err:
        raise _error(f"evaluate: {str(err).strip().splitlines()[0]}") from None
    print(f"pipeline: evaluation took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = markdown_table(content["rows"])
    if training is not None:
        notes = [training_note(label, training) for label in filled]
        if notes:
            table += "\n" + "\n".join(f"{note}  " for note in notes) + "\n"
            (run_dir / "results.md").write_text(table)
        content["training"] = training.as_dict()
        metrics_path = run_dir / "metrics.json"
        record = json.loads(metrics_path.read_text())
        record["training"] = content["training"]
        metrics_path.write_text(json.dumps(record, indent=1))
    print(table, end="")
    print(f"pipeline: wrote {run_dir / 'metrics.json'}, {run_dir / 'results.md'} and {run_dir / 'figures'}")
    return content
