"""What every output records about how it was made: package version and the resolved config, secrets removed.

API keys (``MP_API_KEY``, ``WANDB_API_KEY``, anything whose key looks like a credential) never reach a file,
a log or W&B: every config that leaves the process goes through :func:`config_yaml`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from typing import Any

import yaml

__all__ = ["REDACTED", "SECRET_ENV_VARS", "config_yaml", "package_version", "redact_secrets"]

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


def _secret_values() -> list[str]:
    return [value for name in SECRET_ENV_VARS if len(value := os.environ.get(name, "")) >= 4]


def redact_secrets(value: Any) -> Any:
    """Copy of a nested config (mappings, lists, strings) with credentials replaced by ``<redacted>``.

    A value is a secret when its key looks like one (``api_key``, ``token``, ...) or when it contains
    the value of one of :data:`SECRET_ENV_VARS`.
    """
    secrets = _secret_values()

    def scrub(item: Any, key: str | None = None) -> Any:
        if key is not None and _SECRET_KEY.search(key) and item not in (None, "", REDACTED):
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
