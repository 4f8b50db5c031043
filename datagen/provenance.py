"""What every output records about how it was made: package version and the resolved config, secrets removed.

API keys (``MP_API_KEY``, ``WANDB_API_KEY``, anything whose key looks like a credential) never reach a file,
a log or W&B: every config that leaves the process goes through :func:`config_yaml`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from typing import Any

import yaml

__all__ = [
    "REDACTED",
    "SECRET_ENV_VARS",
    "config_yaml",
    "is_secret_key",
    "package_version",
    "redact_overrides",
    "redact_secrets",
    "redacted_argv",
    "secret_override_values",
]

REDACTED = "<redacted>"
SECRET_ENV_VARS = ("MP_API_KEY", "WANDB_API_KEY", "PMG_MAPI_KEY")
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


@lru_cache(maxsize=1)
def package_version() -> str:
    """Installed version of the ``deepstem`` distribution (``"unknown"`` when run from a bare checkout)."""
    try:
        return metadata.version("deepstem")
    except metadata.PackageNotFoundError:
        return "unknown"


_MIN_SECRET_CHARS = 4  # shorter values are not searched for inside other text (they would match anywhere)


def is_secret_key(key: str) -> bool:
    """Whether a config key (or any component of a dotted override key) names a credential."""
    return any(_SECRET_KEY.search(part) for part in re.split(r"[./@]", str(key)) if part)


def _secret_values(extra: Iterable[str] = ()) -> list[str]:
    values = [os.environ.get(name, "") for name in SECRET_ENV_VARS] + [str(v) for v in extra]
    return sorted({v for v in values if len(v) >= _MIN_SECRET_CHARS}, key=len, reverse=True)


def _split_override(item: str) -> tuple[str, str | None]:
    """``"+a.api_key=v"`` -> ``("+a.api_key", "v")``; ``"~a"`` -> ``("~a", None)``."""
    key, sep, value = str(item).partition("=")
    return (key, value) if sep else (key, None)


def secret_override_values(overrides: Iterable[str]) -> list[str]:
    """The values given to credential-looking keys in command-line overrides (``+x.api_key=VALUE``).

    They are searched for in all other text (Hydra's ``override_dirname``, a value that repeats one), so
    that a key typed on the command line is removed wherever it was copied to, not only under its key.
    """
    found = []
    for item in overrides:
        key, value = _split_override(item)
        if value is not None and is_secret_key(key.lstrip("+~")):
            found.append(value)
            found.append(value.strip("'\""))
    return [v for v in found if v and v != REDACTED and f"'{REDACTED}'" not in v]


def redact_overrides(overrides: Iterable[str], extra_secrets: Iterable[str] = ()) -> list[str]:
    """Hydra override strings with credentials replaced: ``+x.api_key=V`` -> ``+x.api_key='<redacted>'``.

    An override is redacted when its key looks like a credential or its value contains a secret (an
    environment credential of :data:`SECRET_ENV_VARS` or one of ``extra_secrets``). The result is still
    a valid override (quoted), so that a Hydra sweep can launch its jobs from the redacted list.
    """
    secrets = _secret_values(extra_secrets)
    redacted = []
    for item in overrides:
        key, value = _split_override(item)
        leaks = any(secret in str(item) for secret in secrets)
        if (
            value is not None
            and value not in ("", f"'{REDACTED}'")
            and (is_secret_key(key.lstrip("+~")) or leaks)
        ):
            redacted.append(f"{key}='{REDACTED}'")
        elif leaks:  # a secret in the key part itself: nothing of it can stay
            redacted.append(REDACTED)
        else:
            redacted.append(str(item))
    return redacted


@contextmanager
def redacted_argv() -> Iterator[list[str]]:
    """``sys.argv`` with credentials redacted (:func:`redact_overrides`) while the block runs.

    For libraries that record the command line (``wandb.init`` stores ``sys.argv`` as the run metadata's
    "args", in the run file and ``wandb-metadata.json``); the original list is restored afterwards.
    """
    original = list(sys.argv)
    sys.argv[1:] = redact_overrides(original[1:], secret_override_values(original[1:]))
    try:
        yield sys.argv
    finally:
        sys.argv[:] = original


def redact_secrets(value: Any, extra_secrets: Iterable[str] = ()) -> Any:
    """Copy of a nested config (mappings, lists, strings) with credentials replaced by ``<redacted>``.

    A value is a secret when its key looks like one (``api_key``, ``token``, ...) or when it contains
    the value of one of :data:`SECRET_ENV_VARS` or one of ``extra_secrets`` (e.g. the values of
    :func:`secret_override_values`).
    """
    secrets = _secret_values(extra_secrets)

    def scrub(item: Any, key: str | None = None) -> Any:
        if key is not None and is_secret_key(key) and item not in (None, "", REDACTED):
            return REDACTED
        if isinstance(item, Mapping):
            return {k: scrub(v, str(k)) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [scrub(v) for v in item]
        if isinstance(item, str):
            for secret in secrets:
                item = item.replace(secret, REDACTED)
        return item

    return scrub(value)


def _to_container(config: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, DictConfig | ListConfig):
            return OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        pass
    if isinstance(config, str):
        return yaml.safe_load(config) if config.strip() else {}
    return config


def config_yaml(config: Any) -> str:
    """The resolved config as YAML text with secrets redacted (empty mapping for ``None``)."""
    container = _to_container(config) if config is not None else {}
    return yaml.safe_dump(redact_secrets(container), sort_keys=False, default_flow_style=False)
