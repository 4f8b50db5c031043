"""Layout of the reconstruction path (issue #17.5, ARCHITECTURE.md dependency direction).

The network input contract lives in ``models/inputs.py``, below training and evaluation; each network's
reconstruction is one module of ``evaluation/networks/`` behind the registry ``RECONSTRUCTORS``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_layout import _imported_modules

ROOT = Path(__file__).resolve().parents[1]


def _upward(package: str, forbidden: tuple[str, ...]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert len(files) > 3
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in _imported_modules(path)
        if name.split(".")[0] in forbidden
    ]


def test_models_import_neither_training_nor_evaluation() -> None:
    upward = _upward("models", ("training", "evaluation"))
    assert not upward, "; ".join(upward)


def test_evaluation_does_not_import_training() -> None:
    upward = _upward("evaluation", ("training",))
    assert not upward, "; ".join(upward)


def test_the_input_contract_needs_only_torch() -> None:
    names = {name.split(".")[0] for _, name in _imported_modules(ROOT / "models" / "inputs.py")}
    assert names <= {"__future__", "math", "collections", "torch"}, names


@pytest.mark.parametrize("name", ["preprocess", "probe_intensity", "rotate_patterns"])
def test_training_uses_the_one_input_contract(name: str) -> None:
    import models.inputs
    import training.augment

    assert getattr(training.augment, name) is getattr(models.inputs, name)


def test_each_network_reconstruction_is_a_module_of_its_own_behind_the_registry() -> None:
    from evaluation.networks import NETWORK_CLASSES, RECONSTRUCTORS

    assert set(RECONSTRUCTORS) == set(NETWORK_CLASSES) == {"airpi", "chang_unet", "ptychonn"}
    modules = {method: function.__module__ for method, function in RECONSTRUCTORS.items()}
    assert modules == {
        "airpi": "evaluation.networks.airpi",
        "chang_unet": "evaluation.networks.chang",
        "ptychonn": "evaluation.networks.ptychonn",
    }
    assert not (ROOT / "evaluation" / "stitching.py").exists()
