"""Shared test settings."""

from __future__ import annotations

import os

import pytest
import torch

# W&B never goes online from the test suite, and never sees a real key
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small convolutions on a shared 2-core CPU run several times faster on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_dir(tmp_path):
    """Three small kernel shards (tests.test_datasets.write_shard: 20 samples each, 9 structures)."""
    from tests.test_datasets import write_shard

    for i in range(3):
        write_shard(tmp_path / f"shard-{i:05d}-of-00003.h5", 20 * i, 20, [f"mp-{i}{j}" for j in range(3)])
    return tmp_path


@pytest.fixture
def repository_pretrained(monkeypatch):
    """The repository's pretrained/ as the folder of shipped models (no DEEPSTEM_PRETRAINED_DIR)."""
    monkeypatch.delenv("DEEPSTEM_PRETRAINED_DIR", raising=False)
