"""Dependency direction (ARCHITECTURE.md): no module of datagen imports evaluation (or training, models)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPWARD = ("evaluation", "training", "models")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):  # also imports inside functions
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_datagen_module_imports_upward() -> None:
    files = sorted((ROOT / "datagen").rglob("*.py"))
    assert len(files) > 5
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in _imported_modules(path)
        if name.split(".")[0] in UPWARD
    ]
    assert not upward, "; ".join(upward)


def test_the_4dstem_writer_is_shared_not_copied() -> None:
    import datagen.scan_store
    import evaluation.io

    assert evaluation.io.save_4dstem is datagen.scan_store.save_4dstem
    assert evaluation.io.ScanError is datagen.scan_store.ScanError
