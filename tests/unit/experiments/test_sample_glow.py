"""Fictional-image preset (Shibata et al. section 4.1): trains on tiny phantoms, writes its grid."""

from __future__ import annotations

import json

import pytest

from experiments import sample_glow
from tests.support import write_folder_phantoms


def test_bct_preset_is_the_papers_fictional_image_training():
    cfg, ckpt = sample_glow.load(["modality=bct", "profile=paper"])
    assert ckpt is None and cfg.job == "sample_glow"
    assert list(cfg.data.volume_size) == [32, 64, 64]  # section 4.1: D32 x H64 x W64
    assert cfg.data.n_normal == 1355  # 1,355 normal volumes
    assert (cfg.glow.rotation_copies, cfg.glow.rotation_deg) == (7, 2.0)  # 7 rotations, +-2 deg
    assert (cfg.glow.levels, cfg.glow.steps, cfg.glow.hidden_channels) == (4, 32, 512)
    assert cfg.glow.model == "m0" and cfg.optim.name == "adamax"
    assert cfg.out_dir == "outputs/glow_sample/bct"
    cfg, ckpt = sample_glow.load(["modality=cxr", "profile=paper", "checkpoint=x.ckpt"])
    assert ckpt == "x.ckpt" and cfg.data.image_size == 512 and cfg.glow.rotation_copies == 1


def test_sample_glow_trains_on_tiny_phantoms_and_writes_the_grid(out_dir, monkeypatch, one_thread):

    root, out = out_dir / "data", out_dir / "sample"
    write_folder_phantoms(root, "bct", n_train=4, n_eval=2)
    argv = ["modality=bct", "data=folder", f"data.root={root}", "profile=cpu", f"out_dir={out}",
            "logger=none", "trainer.progress_bar=false", "data.volume_size=[8,16,16]",
            "glow.levels=2", "glow.steps=2", "glow.hidden_channels=8", "trainer.max_epochs=1",
            "glow.n_samples=2"]
    grid = sample_glow.main(argv)
    assert grid == out / "sample_grid.png" and grid.stat().st_size > 0
    info = json.loads((out / "sample_grid.json").read_text())
    assert info["shape"] == [1, 8, 16, 16] and info["temperature"] == 0.7
    metrics = json.loads((out / "metrics.json").read_text())
    # 4 volumes x 7 rotations (none held out: glow.select=last), batch 4: 7 steps in 1 epoch
    assert metrics["global_step"] == 7
    # From a trained checkpoint: nothing is trained again
    monkeypatch.setattr("experiments.train_glow.train", lambda *a, **k: pytest.fail("trained"))
    grid.unlink()
    ckpt = out / "checkpoints" / "last.ckpt"
    assert sample_glow.main([*argv, f"checkpoint={ckpt}"]).is_file()
    with pytest.raises(Exception, match="does not exist"):
        sample_glow.main([*argv, f"checkpoint={out / 'nope.ckpt'}"])
