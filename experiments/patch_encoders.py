"""The SimCLR encoders of the patch detector (Kim et al., Sci Rep 2023): one per patch size,
reused from ``OUT/encoders/res<s>`` only when its ``fingerprint.json`` proves it was trained on
the same images with the same settings and code, else trained by ``experiments.train_simclr``.
Encoders in ``patch.encoder_dir`` are the user's choice and are used as given."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.config import check_fingerprint, git_commit, json_digest

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"  # in each encoder folder, written after a finished training


def find_encoder_checkpoint(folder: Path) -> Path | None:
    """The best (else last) SimCLR checkpoint written by ``train_simclr.train`` in ``folder``."""
    metrics = folder / "metrics.json"
    if metrics.is_file():
        best = json.loads(metrics.read_text()).get("best_checkpoint")
        if best and Path(best).is_file():
            return Path(best)
    ckpts = folder / "checkpoints"
    for pattern in ("*best*.ckpt", "last.ckpt"):
        found = sorted(ckpts.glob(pattern))
        if found:
            return found[-1]
    return None


def encoder_folder(cfg: DictConfig, out: Path, size: int) -> Path:
    base = Path(cfg.patch.encoder_dir) if cfg.patch.encoder_dir else out / "encoders"
    return base / f"res{size}"


def encoder_cfg(cfg: DictConfig, size: int, i: int, folder: Path) -> DictConfig:
    """The configuration the encoder of patch size ``size`` (``i``-th) is trained with."""
    p, c = cfg.patch, copy.deepcopy(cfg)
    c.simclr.patch_size = size
    c.out_dir = str(folder)
    c.simclr.intensity_norm = str(p.intensity_norm)  # train on what the detector sees
    if p.encoder_input_sizes is not None:
        c.simclr.input_size = int(p.encoder_input_sizes[i])
    if p.encoder_epochs is not None:
        c.trainer.max_epochs = int(p.encoder_epochs[i])
    return c


def encoder_fingerprint(c: DictConfig, dm) -> dict:
    """What an encoder depends on: its training / validation images, the resolved settings of
    its training and the code version (``git_commit``)."""
    data = {k: v for k, v in OmegaConf.to_container(c.data, resolve=True).items()
            if k not in ("num_workers", "root")}  # the item list below stands for the root
    return {"items": json_digest([[it.path, it.label] for s in ("train", "val")
                             for it in dm.items(s)]),
            "settings": json_digest({k: OmegaConf.to_container(c[k], resolve=True)
                                for k in ("simclr", "optim", "trainer")} | {"data": data,
                                                                             "seed": c.seed}),
            "code": git_commit()}


def reusable_encoder(cfg: DictConfig, folder: Path, fingerprint: dict) -> Path | None:
    """The finished encoder in ``folder`` if its fingerprint matches; None when there is
    none (or an unfinished one: training resumes or restarts); refuse on a mismatch."""
    ckpt = find_encoder_checkpoint(folder)
    if cfg.patch.encoder_dir:  # encoders the user chose explicitly: used as given
        return ckpt
    mode, fp = str(cfg.patch.reuse_encoders), folder / FINGERPRINT
    if ckpt is None or mode == "retrain" or not fp.is_file():
        return None
    old = json.loads(fp.read_text())
    check_fingerprint(folder, old, fingerprint, mode, "patch.reuse_encoders", "an encoder")
    return ckpt


def ensure_encoders(cfg: DictConfig, dm, out: Path) -> dict[int, Path]:
    """Checkpoint per patch size: reuse what the fingerprint proves is the same, or train."""
    paths = {}
    p = cfg.patch
    for i, size in enumerate(int(s) for s in p.patch_sizes):
        folder = encoder_folder(cfg, out, size)
        c = encoder_cfg(cfg, size, i, folder)
        fingerprint = encoder_fingerprint(c, dm)
        ckpt = reusable_encoder(cfg, folder, fingerprint)
        if ckpt is not None:
            log.info("Encoder res %d: reusing %s", size, ckpt)
            paths[size] = ckpt
            continue
        if not p.train_encoders:
            raise FileNotFoundError(f"No encoder checkpoint for patch size {size} in {folder} "
                                    "and patch.train_encoders=false; train it with "
                                    f"`make train-simclr RES={size}` or allow training.")
        from experiments.train_simclr import train

        log.info("Encoder res %d: training SimCLR into %s", size, folder)
        result = Path(train(c, datamodule=dm))
        from experiments.common import finish_wandb

        finish_wandb()  # one W&B run per encoder: train() leaves its run open
        ckpt = result if result.is_file() else find_encoder_checkpoint(folder)
        if ckpt is None:
            raise RuntimeError(f"SimCLR training for size {size} wrote no checkpoint in "
                               f"{folder} (trainer.fast_dev_run saves none)")
        (folder / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2))
        paths[size] = ckpt
    return paths
