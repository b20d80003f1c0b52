"""Fictional images from a Glow (Shibata et al., https://arxiv.org/abs/2001.07847, section 4.1,
Fig. 15): train the preset's Glow, or load a trained one, then write a grid of samples.

    python -m experiments.sample_glow modality=bct|cxr [checkpoint=PATH] [key=value ...]
    make sample-glow MODALITY=bct|cxr [DATA=dir] [ARGS="checkpoint=PATH ..."]

``modality`` picks ``configs/glow_<modality>.yaml`` with ``configs/glow_sample_<modality>.yaml``
on top (head CT: 1,355 normal volumes, each in seven rotations of +-2 degrees, 32x64x64).
Without ``checkpoint=`` the Glow is trained with ``experiments.train_glow.train`` into
``<out_dir>`` (resumable like any training); with it, that checkpoint is loaded
(``weights_only=True``) and nothing is trained. Writes ``<out_dir>/sample_grid.png``
(2D: a grid; 3D: one row of evenly spaced axial slices per sample) and
``<out_dir>/sample_grid.json``. The temperature ``glow.sample_temperature`` is ours: the paper
states none.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from experiments.cli import entry
from experiments.common import setup_logging
from experiments.config import ConfigError, load_job, parse_overrides, prepare_run_dir, resolve_job
from experiments.train_glow import model_epochs, save_samples_png

log = logging.getLogger(__name__)


def split_checkpoint(argv: list[str]) -> tuple[str | None, list[str]]:
    """``checkpoint=PATH`` (not a config key) is taken out of argv."""
    ckpt, rest = None, []
    for arg, item in zip(argv, parse_overrides(argv), strict=True):
        key, value = item.split("=", 1)
        if key == "checkpoint":
            ckpt = value
        else:
            rest.append(arg)
    return ckpt, rest


def load(argv: list[str] | None = None) -> tuple[DictConfig, str | None]:
    argv = sys.argv[1:] if argv is None else list(argv)
    ckpt, rest = split_checkpoint(argv)
    cfg = load_job(resolve_job("sample_glow", rest))
    cfg.trainer.max_epochs = model_epochs(cfg)
    return cfg, ckpt


def run(cfg: DictConfig, checkpoint: str | Path | None = None, datamodule=None) -> Path:
    import torch

    from lightning_modules.glow import load_glow

    if checkpoint is None:
        from experiments.train_glow import train

        checkpoint = train(cfg, datamodule=datamodule)
    elif not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint={checkpoint} does not exist")
    out = prepare_run_dir(cfg)
    module = load_glow(checkpoint)  # weights_only=True
    torch.manual_seed(int(cfg.seed))
    n, temperature = max(1, int(cfg.glow.n_samples)), float(cfg.glow.sample_temperature)
    samples = module.sample(n, temperature)  # (n, 1, H, W) | (n, 1, D, H, W) in [0, 1]
    path = save_samples_png(out / "sample_grid.png", samples)
    (out / "sample_grid.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "n_samples": n, "temperature": temperature,
        "temperature_source": "ours (glow.sample_temperature; the paper states none)",
        "shape": list(samples.shape[1:])}, indent=2))
    log.info("%d samples at temperature %g: %s", n, temperature, path)
    return path


def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    cfg, ckpt = load(argv)
    return run(cfg, ckpt)


if __name__ == "__main__":
    entry(main)
