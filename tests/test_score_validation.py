"""`scripts/score_validation.py`: validation xc of an AIRPI checkpoint by fixed dose and by optics.

On the small synthetic shards of ``tests.test_datasets`` with a tiny untrained AIRPI: the fixed doses are the
ones applied, the draw stays inside its range, the validation noise is the seeded one of training (the same
numbers twice, and different ones at another dose), the optics bins partition the samples, and the CLI
writes its JSON.
"""

from __future__ import annotations

import json
import math
from types import ModuleType

import numpy as np
import pytest
import torch

from tests.script_modules import load_script
from tests.test_reconstruct_networks import save_checkpoint
from training.datamodules import kernel_sample_optics


def _script() -> ModuleType:
    return load_script("score_validation")


@pytest.fixture
def scored_setup(kernel_dir, tmp_path):
    from evaluation.networks.checkpoints import load_network

    script = _script()
    model = load_network(save_checkpoint("airpi", tmp_path / "airpi.ckpt"), "airpi")
    module = script.build_module(str(kernel_dir), 8, 0, (0.6, 0.2, 0.2), (10.0, 1e6))
    return script, model, module


def record_inputs(model) -> list:
    """Every input batch the model is called with from now on (copies)."""
    seen: list = []
    forward = model.forward
    model.forward = lambda inputs: (seen.append(inputs.clone()), forward(inputs))[1]
    return seen


def test_fixed_dose_is_applied_and_noise_is_the_seeded_one(scored_setup):
    script, model, module = scored_setup
    seen = record_inputs(model)
    low = script.score_split(model, module, (50.0, 50.0))
    again = script.score_split(model, module, (50.0, 50.0))
    clean = script.score_split(model, module, None)
    n = len(module.datasets["val"])
    assert len(low["xc"]) == n and n > 0
    np.testing.assert_allclose(low["dose_e"], 50.0, rtol=1e-6)
    assert np.all(np.isinf(clean["dose_e"]))
    assert len(seen) == 3  # the 7 validation samples are one batch of 8 per call
    low_inputs, again_inputs, clean_inputs = seen
    torch.testing.assert_close(low_inputs, again_inputs, rtol=0, atol=0)  # noise seeded per sample
    np.testing.assert_array_equal(low["xc"], again["xc"])
    assert (low_inputs - clean_inputs).abs().max() > 1e-2  # 50 electrons are noisy, inf is not
    assert module.augmentation.dose_e_range == (10.0, 1e6)  # the module's own draw is restored
    np.testing.assert_array_equal(np.sort(low["index"]), np.sort(module.datasets["val"].indices))


def test_draw_stays_in_range_and_optics_bins_partition(scored_setup):
    script, model, module = scored_setup
    scored = script.score_split(model, module, (10.0, 1e6), split="test", max_samples=7)
    assert len(scored["xc"]) == 7
    assert np.all((scored["dose_e"] >= 10.0 * (1 - 1e-6)) & (scored["dose_e"] <= 1e6 * (1 + 1e-6)))
    optics = kernel_sample_optics(module.index, scored["index"])
    # the synthetic shards: 200 kV, 20 mrad, gmax 2 / A, step 0.1 + index / 1000 A
    np.testing.assert_allclose(optics["step_A"], 0.1 + scored["index"] / 1000)
    from physics.optics import wavelength

    np.testing.assert_allclose(optics["alpha_over_gmax"], 20e-3 / wavelength(200e3) / 2.0)
    table = script.by_optics(scored["xc"], optics, bins=3)
    finite = int(np.isfinite(scored["xc"]).sum())
    for name, rows in table.items():
        assert sum(row["n"] for row in rows) == finite, name
    assert len(table["energy_eV"]) == 1 and table["energy_eV"][0]["low"] == 200e3  # one value, one bin
    assert len(table["step_A"]) == 3
    assert "thickness_A" not in table  # read only when asked for (extra_columns)
    specimen = kernel_sample_optics(module.index, scored["index"], extra_columns=("thickness_A",))
    np.testing.assert_array_equal(specimen["thickness_A"], 10.0)  # the synthetic shards: 10 A
    np.testing.assert_array_equal(specimen["step_A"], optics["step_A"])


def test_structure_table_is_worst_first():
    script = _script()
    xc = np.array([0.9, 0.8, 0.1, 0.3, np.nan])
    ids = np.array(["Si", "Si", "Na", "Na", "Na"], dtype=object)
    table = script.by_structure(xc, ids)
    assert list(table) == ["Na", "Si"]
    assert table["Na"]["n"] == 2 and table["Na"]["mean"] == pytest.approx(0.2)


def test_summarise_and_dose_parsing():
    script = _script()
    row = script.summarise(np.array([0.2, 0.4, np.nan, 0.6]))
    assert (
        row["n"] == 3
        and row["mean"] == pytest.approx(0.4)
        and row["sem"] == pytest.approx(0.2 / math.sqrt(3))
    )
    assert script.parse_dose("inf") == math.inf and script.parse_dose("1e3") == 1e3
    with pytest.raises(Exception, match="must be > 0"):
        script.parse_dose("0")


def test_cli_writes_json(kernel_dir, tmp_path, capsys):
    script = _script()
    ckpt = save_checkpoint("airpi", tmp_path / "airpi.ckpt")
    out = tmp_path / "val.json"
    script.main(["--ckpt", str(ckpt), "--data-dir", str(kernel_dir), "--doses", "1e3", "inf",
                 "--split-fractions", "0.6", "0.2", "0.2", "--seed", "0", "--batch-size", "8",
                 "--precision", "32", "--threads", "1", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["by_dose_e_per_cbed"]) == {"1000", "inf"}
    assert report["draw"]["dose_e_range"] == [10.0, 1e9]
    assert set(report["draw"]["by_optics"]) == set(script.OPTICS_COLUMNS)  # thickness, phase spread too
    thickness = report["draw"]["by_optics"]["thickness_A"]
    assert len(thickness) == 1 and thickness[0]["low"] == 10.0
    assert sum(r["n"] for r in report["draw"]["by_structure"].values()) == report["draw"]["n"]
    assert "mean xc" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


def test_paired_difference_matches_samples_by_index():
    script = _script()
    scored = {"index": np.array([5, 1, 9, 3]), "xc": np.array([0.5, 0.1, 0.9, 0.3])}
    reference = {"index": np.array([1, 3, 5, 7]), "xc": np.array([0.0, 0.1, 0.2, 0.7])}
    diff = script.paired_difference(scored, reference)  # common samples 1, 3, 5: 0.1, 0.2, 0.3
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.2)
    assert diff["sem"] == pytest.approx(0.1 / math.sqrt(3))
    with pytest.raises(ValueError, match="share no sample"):
        script.paired_difference(scored, {"index": np.array([0]), "xc": np.array([0.0])})


def test_cli_baseline_of_itself_differs_by_zero(kernel_dir, tmp_path):
    script = _script()
    ckpt = save_checkpoint("airpi", tmp_path / "airpi.ckpt")
    out = tmp_path / "val.json"
    script.main(["--ckpt", str(ckpt), "--baseline", str(ckpt), "--data-dir", str(kernel_dir),
                 "--doses", "1e3", "--split-fractions", "0.6", "0.2", "0.2", "--seed", "0",
                 "--batch-size", "8", "--precision", "32", "--threads", "1", "--json", str(out)])  # fmt: skip
    diff = json.loads(out.read_text())["paired_difference_by_dose_e_per_cbed"]["1000"]
    assert diff["mean"] == 0.0 and diff["n"] > 0  # same weights, same seeded noise: identical per sample


def test_undo_dihedral_inverts_every_operation():
    from training.augment import DIHEDRAL_OPERATIONS, dihedral_transform, undo_dihedral

    gen = torch.Generator().manual_seed(3)
    wave = torch.randn(8, 6, 6, dtype=torch.complex64, generator=gen)
    cbed = torch.rand(8, 9, 6, 6, generator=gen)
    assert len(set(DIHEDRAL_OPERATIONS)) == 8 and DIHEDRAL_OPERATIONS[0] == (False, False, False)
    ops = [torch.tensor([op[i] for op in DIHEDRAL_OPERATIONS]) for i in range(3)]  # one op per sample
    _, moved, _ = dihedral_transform(cbed, wave, wave, *ops)
    assert (moved[1:] - wave[1:]).abs().amax(dim=(1, 2)).min() > 0  # every non-identity op moves pixels
    torch.testing.assert_close(undo_dihedral(moved, *ops), wave, rtol=0, atol=0)


def test_dihedral_average_runs_eight_passes_identity_first(scored_setup):
    script, model, module = scored_setup
    seen = record_inputs(model)
    plain = script.score_split(model, module, (1e4, 1e4))
    averaged = script.score_split(model, module, (1e4, 1e4), dihedral_average=True)
    assert len(seen) == 1 + 8
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)  # identity: the plain inputs exactly
    assert all((seen[i] - seen[0]).abs().max() > 1e-3 for i in range(2, 9))
    np.testing.assert_array_equal(averaged["index"], plain["index"])
    assert np.all(np.isfinite(averaged["xc"])) and not np.array_equal(averaged["xc"], plain["xc"])
