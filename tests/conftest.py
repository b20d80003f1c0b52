"""Test set-up: CPU only, offline W&B, temporary output folders, small thread counts."""

from __future__ import annotations

import os

# Before torch / wandb are imported anywhere.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """A temporary output folder; W&B files go there too."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is as fast, and immune to oversubscribed CI cores (2
    spinning OpenMP threads on a loaded 2-core box were measured 50x slower). Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")`` or take it as an argument."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
