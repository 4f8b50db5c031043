"""Running the root entry points in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_entry_point(
    script: str, tmp_path: Path, *overrides: str, progress: bool | None = False
) -> subprocess.CompletedProcess:
    """``python <script> overrides...`` from ``tmp_path`` with its Hydra run folder in ``tmp_path/run``.

    ``progress`` is passed as ``progress=...`` unless None (train.py has no such key).
    """
    extra = [] if progress is None else [f"progress={str(progress).lower()}"]
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides, f"hydra.run.dir={tmp_path}/run", *extra],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
