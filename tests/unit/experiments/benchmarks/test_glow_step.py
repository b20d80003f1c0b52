"""The Glow step benchmark runs and reports its two ratios on the last two lines."""

import torch

from experiments.benchmarks import glow_step


def test_glow_step_benchmark_smoke(capsys):
    n = torch.get_num_threads()
    try:
        r = glow_step.main(["--size", "16", "--levels", "2", "--steps", "1", "--width", "16",
                            "--batch", "2", "--iters", "1", "--threads", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(n)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("throughput_vs_normflows=")
    assert lines[-1].startswith("memory_checkpointed_ratio=")
    assert float(lines[-1].split("=")[1]) < 1.0
    # fused ActNorm + 1x1 conv and in-place ReLUs save activations against normflows' GlowBlock
    assert r["memory"]["project"] < r["memory"]["normflows"]


def test_reference_is_normflows_glow_of_the_same_size():
    ref = glow_step.normflows_glow(2, 1, 8, (1, 16, 16))
    from lightning_modules.glow import build_glow

    ours = build_glow(dict(levels=2, steps=1, hidden_channels=8), (1, 16, 16))
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ref == n_ours
