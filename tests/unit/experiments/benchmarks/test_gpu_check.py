"""make gpu-check: without CUDA it says so and exits 0; its Glow section runs (tiny, CPU)."""

import json

import pytest
import torch

from experiments.benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_says_so_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == {"cuda": False}
    assert json.loads(out.read_text()) == {"cuda": False}
    assert "CUDA is not available" in capsys.readouterr().out


def test_glow_section_measures_a_training_step_next_to_its_estimate():
    torch.manual_seed(0)
    r = gpu_check.glow((1, 16, 16), levels=2, steps=2, width=8, batch=2, checkpointing=True,
                       iters=1, device="cpu")
    assert r["loss_finite"] and r["items_per_s"] > 0 and r["estimated_gib"] > 0
