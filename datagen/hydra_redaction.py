"""Hydra callback that removes credentials from a run's config before Hydra writes or logs any of it.

Hydra records every run in ``.hydra/config.yaml``, ``.hydra/hydra.yaml`` and ``.hydra/overrides.yaml``
(and, for ``-m``, ``multirun.yaml`` in the sweep folder), copied verbatim from the command line. A key
typed there (``+source.api_key=...``, a token override) would be stored in plain text next to every output,
although deepstem reads credentials from the environment only. This callback is configured in every root
config (``hydra.callbacks.redaction``) and redacts the composed config in place with
:func:`datagen.provenance.redact_secrets` / :func:`~datagen.provenance.redact_overrides` (the one
redaction of the project):

* ``on_run_start`` runs before ``run_job`` copies the config into the task and writes ``.hydra/``, so no
  file ever holds the secret (rewriting the files afterwards would leave it on disk for a moment);
* ``on_multirun_start`` runs before the sweeper writes ``multirun.yaml`` and launches the jobs from
  ``hydra.overrides.task``: the jobs are composed from the redacted overrides, so their ``.hydra/``
  files, Hydra's job log lines and their ``override_dirname`` are clean too.

The task therefore sees ``<redacted>`` for a credential-looking key: no deepstem code reads a secret from
a config (the sources reject one), so nothing is lost. The one exception is ``hydra.job.env_set``, where a
key is meant to reach the job's environment: such a value is put into ``os.environ`` before it is
redacted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from datagen.provenance import is_secret_key, redact_overrides, redact_secrets, secret_override_values

__all__ = ["RedactSecrets", "redact_hydra_config"]


def _apply(node: DictConfig | ListConfig, old: Any, new: Any) -> None:
    """Write into ``node`` only the leaves where ``new`` differs from ``old`` (interpolations stay)."""
    keys = range(len(old)) if isinstance(old, list) else list(old)
    for key in keys:
        before, after = old[key], new[key]
        if before == after:
            continue
        same_shape = (isinstance(before, Mapping) and isinstance(after, Mapping)) or (
            isinstance(before, list) and isinstance(after, list) and len(before) == len(after)
        )
        child = node._get_node(key) if same_shape else None
        if isinstance(child, DictConfig | ListConfig) and not child._is_interpolation():
            _apply(child, before, after)
        else:
            with read_write(node), open_dict(node):  # Hydra's own section is read-only
                node[key] = after


_ENV_SET = "hydra.job.env_set."


def _move_env_set_secrets(cfg: DictConfig) -> None:
    """Credential-looking ``hydra.job.env_set`` entries go to ``os.environ`` and out of the config.

    Redacting them instead would make Hydra set the variable to ``<redacted>`` in the job; the jobs of
    a sweep inherit this process's environment.
    """
    env_set = OmegaConf.select(cfg, "hydra.job.env_set")
    if isinstance(env_set, DictConfig):
        for name in [str(n) for n in env_set if is_secret_key(str(n))]:
            value = env_set[name]
            if value not in (None, ""):
                os.environ[name] = str(value)
            with read_write(env_set), open_dict(env_set):
                del env_set[name]
    listed = OmegaConf.select(cfg, "hydra.overrides.hydra")
    if isinstance(listed, ListConfig):
        kept = [
            str(item)
            for item in listed
            if not (str(item).lstrip("+~").startswith(_ENV_SET) and is_secret_key(str(item).split("=", 1)[0]))
        ]
        if len(kept) != len(listed):
            overrides = cfg.hydra.overrides
            with read_write(overrides), open_dict(overrides):
                overrides.hydra = kept


def redact_hydra_config(cfg: DictConfig) -> bool:
    """Redact credentials in a composed Hydra config in place (task part, ``hydra.overrides``, derived
    strings such as ``hydra.job.override_dirname``); returns whether anything changed."""
    overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    typed = [str(item) for item in overrides] if overrides is not None else []
    extra = secret_override_values(typed)
    _move_env_set_secrets(cfg)
    old = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(old, dict)
    new = redact_secrets(old, extra)
    for group in ("task", "hydra"):  # from the typed lists: a redacted override stays a valid (quoted) one
        listed = (old.get("hydra") or {}).get("overrides", {}).get(group)
        if isinstance(listed, list):
            new["hydra"]["overrides"][group] = redact_overrides(listed, extra)
    if new == old:
        return False
    _apply(cfg, old, new)
    return True


def redact_command_line(overrides: list[str]) -> None:
    """Redact ``sys.argv`` in place, after Hydra has parsed it.

    What records the command line later (W&B's run metadata "args", Lightning's DDP launcher, which
    starts the other ranks with ``sys.argv``) then sees the same ``'<redacted>'`` as the config; the
    quoted form stays a valid override.
    """
    extra = secret_override_values([*overrides, *sys.argv[1:]])
    sys.argv[1:] = redact_overrides(sys.argv[1:], extra)


class RedactSecrets(Callback):
    """``hydra.callbacks.redaction: {_target_: datagen.hydra_redaction.RedactSecrets}``.

    (The key is ``redaction``: a name containing "secret" would itself look like a credential.)
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        typed = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=None) or []]
        redact_hydra_config(config)
        redact_command_line(typed)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        typed = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=None) or []]
        redact_hydra_config(config)
        redact_command_line(typed)
