"""Knowledge distillation of AIRPI (models/lightning.py: ``teacher_ckpt``, ``distill_fraction``).

A slim student learns from a frozen teacher checkpoint on the same inputs; the teacher is loaded when
fitting starts, never at inference, and is not part of the student's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from models.airpi import output_to_wave
from models.lightning import AIRPILightning, load_teacher
from tests.test_lit_modules import (  # noqa: F401  (_one_thread: the autouse one-thread fixture, reused)
    CONF,
    DictDataset,
    LossRecorder,
    _one_thread,
    _trainer,
    airpi_samples,
    small,
)


def _save(module: AIRPILightning, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def _teacher_file(tmp_path: Path) -> tuple[AIRPILightning, Path]:
    torch.manual_seed(1)
    teacher = small("airpi", net={"dropout": 0.0}).eval()
    return teacher, _save(teacher, tmp_path / "teacher.ckpt")


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return airpi_samples(n=2, seed=seed)


def test_loss_mixes_label_and_teacher_terms_by_the_fraction(tmp_path: Path) -> None:
    teacher, path = _teacher_file(tmp_path)
    batch = _batch()
    with torch.no_grad():
        wave_teacher = teacher.predict_wave(batch["inputs"])
    totals = {}
    for fraction in (0.0, 0.25, 1.0):
        torch.manual_seed(0)
        student = small(
            "airpi", net={"filters": 4, "dropout": 0.0}, teacher_ckpt=str(path), distill_fraction=fraction
        )
        student.on_fit_start()
        student.eval()  # dropout off: the same prediction in every evaluation of the loss
        with torch.no_grad():
            totals[fraction] = float(student._step(batch, "train"))
            out = student(batch["inputs"])
            pred = output_to_wave(out, student.net.amplitude_exponent)
            probe = student._probe(batch)
            label_loss, _ = student.loss(pred, batch["wave"], probe, out[:, 1].float())
            teacher_loss, _ = student.loss(pred, wave_teacher, probe, out[:, 1].float())
    assert totals[0.0] == pytest.approx(float(label_loss), rel=1e-5)
    assert totals[1.0] == pytest.approx(float(teacher_loss), rel=1e-5)
    assert totals[0.25] == pytest.approx(0.75 * float(label_loss) + 0.25 * float(teacher_loss), rel=1e-5)
    assert abs(float(label_loss) - float(teacher_loss)) > 1e-3 * float(label_loss)  # the terms differ


def test_student_learns_the_teacher_not_the_labels_at_fraction_one(tmp_path: Path) -> None:
    """With f = 1 the labels do not enter: training on scrambled labels still moves the student's
    prediction toward the teacher's, and the teacher's weights stay as they were (frozen, eval mode)."""
    teacher, path = _teacher_file(tmp_path)
    data = airpi_samples(n=4, seed=0)
    data["wave"] = torch.roll(data["wave"], shifts=7, dims=-1).flip(0)  # wrong labels
    torch.manual_seed(0)
    student = small(
        "airpi",
        net={"filters": 8, "dropout": 0.0},
        teacher_ckpt=str(path),
        distill_fraction=1.0,
        lr=2e-3,
        monitor="train/loss",
        plateau_patience=10_000,
    )
    inputs = data["inputs"]

    def distance() -> float:
        with torch.no_grad():
            return float((student.predict_wave(inputs) - teacher.predict_wave(inputs)).abs().pow(2).mean())

    before = distance()
    trainer = _trainer(max_steps=150, limit_val_batches=0, callbacks=[LossRecorder()])
    trainer.fit(student, train_dataloaders=DataLoader(DictDataset(data), batch_size=4))
    student.eval()
    assert distance() < 0.3 * before
    assert not student.teacher.training
    for name, value in student.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher.state_dict()[name], msg=name)
    # the student's checkpoint holds the student only
    assert not any("teacher" in k for k in student.state_dict())


def test_student_checkpoint_loads_without_the_teacher_file(tmp_path: Path) -> None:
    from evaluation.networks.checkpoints import load_network

    _, path = _teacher_file(tmp_path)
    student = small("airpi", teacher_ckpt=str(path))
    saved = _save(student, tmp_path / "student.ckpt")
    path.unlink()  # inference never reads the teacher
    loaded = load_network(saved, "airpi")
    assert loaded.teacher is None
    batch = _batch()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["inputs"]), student(batch["inputs"]))


def test_bad_teacher_gives_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"teacher_ckpt=.*missing\.ckpt"):
        load_teacher(str(tmp_path / "missing.ckpt"))
    chang = small("chang")
    torch.save({"state_dict": chang.state_dict(), "hyper_parameters": dict(chang.hparams)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="not an AIRPI checkpoint"):
        load_teacher(str(tmp_path / "c.pt"))
    with pytest.raises(ValueError, match="distill_fraction"):
        small("airpi", distill_fraction=1.5)


def test_distill_experiment_composes_a_slim_student_of_the_shipped_generalist() -> None:
    """The experiment's student is the half-width network, trained from scratch, its teacher the shipped
    full-width generalist (a missing teacher file is refused before anything is built:
    tests/test_entrypoints.py)."""
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("train", overrides=["experiment=airpi_slim_distill"])
    assert cfg.model.net.filters == 16 and cfg.init_from is None
    assert 0.0 < cfg.model.distill_fraction < 1.0
    teacher = load_teacher(cfg.model.teacher_ckpt)
    assert teacher.hparams["net"]["filters"] == 32 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
