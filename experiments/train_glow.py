"""Train a 2D/3D Glow M0 (normal images) or M1 (unlabeled mixture) (Shibata et al.).

    python -m experiments.train_glow modality=cxr|bct glow.model=m0|m1 [data.root=DIR] ...

``modality`` picks ``configs/glow_<modality>.yaml`` (paper settings; ``profile=cpu`` gives a
model that trains in minutes on a CPU). Writes checkpoints (best/last) under
``<out_dir>/checkpoints``, ``<out_dir>/samples.png`` (fictional images at
``glow.sample_temperature``) and ``<out_dir>/metrics.json`` with ``val/bpd`` (on a held-out part of
the model's own training set, with glow.select=best).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from experiments.cli import entry
from experiments.common import (
    build_trainer,
    make_logger,
    resolve_ckpt_path,
    setup_logging,
    track,
)
from experiments.config import ConfigError, load_job, prepare_run_dir, resolve_job
from lightning_modules.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

TRAIN_GROUP = {"m0": "normal", "m1": "mixture"}  # S_normal / S_mixture


def input_shape(data_cfg) -> list[int]:
    """(1, H, W) for radiographs, (1, D, H, W) for CT volumes."""
    if data_cfg.modality == "bct":
        return [1, *(int(s) for s in data_cfg.volume_size)]
    return [1, int(data_cfg.image_size), int(data_cfg.image_size)]


def preprocessing(data_cfg) -> dict:
    """What the model's inputs depend on; stored in the checkpoint so M0 and M1 can be checked
    to match before they are combined into a posterior."""
    out = {"name": str(data_cfg.name), "modality": str(data_cfg.modality)}
    if data_cfg.modality == "bct":
        out["volume_size"] = [int(s) for s in data_cfg.volume_size]
    else:
        out["image_size"] = int(data_cfg.image_size)
    return out


def per_device_batch_size(cfg: DictConfig) -> int:
    """data.batch_size is the effective batch (the paper's): under DDP each device gets its
    share, split further into glow.accumulate_grad_batches micro-batches."""
    devices = cfg.trainer.devices
    n = devices if isinstance(devices, int) else len(devices) if not isinstance(devices, str) \
        else 1
    world = max(1, n * int(cfg.trainer.num_nodes)) * int(cfg.glow.accumulate_grad_batches)
    if world > 1 and cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by devices x "
            f"glow.accumulate_grad_batches = {world}")
    return max(1, cfg.data.batch_size // world)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): resuming from a checkpoint replays the
    same order as an uninterrupted run (Lightning calls ``set_epoch``; DDP replaces this by a
    ``DistributedSampler``, which is seeded the same way)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def holdout_split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) of one model's own training set: a fixed random ``fraction`` (by
    ``seed``) held out for val/bpd, at least one item each way when the fraction is > 0.
    A subset of train/<group>, so the val/test sets stay untouched (their disjointness from
    every training set is checked in datamodules/splits.py)."""
    n = len(items)
    n_val = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7)).tolist()
    held = set(order[:n_val])
    return ([it for i, it in enumerate(items) if i not in held],
            [it for i, it in enumerate(items) if i in held])


def rotate_in_plane(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """x (1, H, W) or (1, D, H, W) rotated by ``degrees`` about the image centre in the H-W
    (axial) plane; bilinear, zeros (air after the brain window) outside."""
    if degrees == 0:
        return x
    import torch.nn.functional as F

    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                         dtype=x.dtype)
    planes = x.reshape(-1, 1, *x.shape[-2:])  # (D or 1, 1, H, W)
    grid = F.affine_grid(theta.expand(len(planes), 2, 3), list(planes.shape), align_corners=False)
    return F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).reshape(x.shape)


class RotatedCopies(torch.utils.data.Dataset):
    """Each item of ``base`` ``copies`` times, rotated by angles evenly spaced in
    [-degrees, +degrees] (glow.rotation_copies / glow.rotation_deg)."""

    def __init__(self, base, copies: int, degrees: float):
        self.base, self.copies = base, int(copies)
        self.angles = np.linspace(-degrees, degrees, self.copies) if self.copies > 1 else [0.0]

    def __len__(self) -> int:
        return len(self.base) * self.copies

    def __getitem__(self, i: int) -> dict:
        out = dict(self.base[i // self.copies])
        out["image"] = rotate_in_plane(out["image"], float(self.angles[i % self.copies]))
        return out


def refuse_non_finite(images: torch.Tensor, items: list, start: int = 0) -> None:
    """ConfigError naming the first item of ``items[start:]`` whose image (a row of the batch
    ``images``) holds NaN or inf: glow.align cannot register it."""
    bad = (~torch.isfinite(images.flatten(1)).all(1)).nonzero().flatten().tolist()
    if bad:
        raise ConfigError(f"{items[start + bad[0]].path}: non-finite pixel values, so "
                          "glow.align cannot register it; fix or remove the file (or set "
                          "glow.align=none)")


class PoseAligned(torch.utils.data.Dataset):
    """Each item of ``base`` resampled onto the pose ``template`` (glow.align != none). The
    poses are estimated once, in batches, when the dataset is made (a few hundred gradient
    steps of registration per batch would otherwise be paid again every epoch)."""

    def __init__(self, base, template: torch.Tensor, batch_size: int = 64, what: str = "items",
                 mode: str = "similarity"):
        from lightning_modules.align import N_PARAMS, estimate_pose

        self.base = base
        loader = DataLoader(base, batch_size=batch_size, shuffle=False)
        items = getattr(base, "items", None)  # an ItemDataset names its files in errors
        poses = []
        for k, b in enumerate(track(loader, f"glow.align: registering {len(base)} {what}",
                                    total=len(loader))):
            if items is not None:
                refuse_non_finite(b["image"], items, k * batch_size)
            poses.append(estimate_pose(b["image"].float(), template, mode=mode))
        self.poses = torch.cat(poses) if poses else torch.zeros(0, N_PARAMS[mode])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        from lightning_modules.glow.lightning_model import warp_to_template

        out = dict(self.base[i])
        out["image"] = warp_to_template(out["image"][None], self.poses[i:i + 1])[0]
        return out


def fit_align_template(cfg: DictConfig, dm) -> torch.Tensor | None:
    """glow.align != none: the pose template (1, 1, H, W) of S_normal (every train/normal
    item: M0's own set, whichever model is trained, so M0 and M1 share it); None otherwise."""
    if str(cfg.glow.align) == "none":
        return None
    from datamodules.base import ItemDataset
    from lightning_modules.align import fit_template

    items = dm.items("train", "normal")
    if len(items) < 2:
        raise ConfigError(f"glow.align={cfg.glow.align} fits its pose template on S_normal "
                          f"(train/normal), which has {len(items)} item(s); it needs >= 2")
    loader = DataLoader(ItemDataset(dm, items), batch_size=64, shuffle=False)
    images = torch.cat([b["image"].float() for b in loader])
    refuse_non_finite(images, items)
    log.info("glow.align: pose template of %d S_normal images", len(images))
    return fit_template(images, mode=str(cfg.glow.align))


def build_loaders(cfg: DictConfig, dm, select: str = "best", group: str | None = None,
                  template: torch.Tensor | None = None
                  ) -> tuple[DataLoader, DataLoader | None]:
    """M0 trains on train/normal, M1 on train/mixture (``group``: another train group, or
    "all" = every training item: the matched schedule's shared start with
    glow.matched_start=all). Validation (only for select=best, to pick the best val/bpd): a
    held-out glow.val_fraction of the model's own training set, so M0 is validated on held-out
    normals and M1 on held-out mixture, never on the labelled val/test images. ``template``
    (glow.align): both sets aligned to it (:class:`PoseAligned`), before rotated copies."""
    group = group or TRAIN_GROUP[cfg.glow.model]
    train_items = dm.items("train", None if group == "all" else group)
    if not train_items:
        raise ConfigError(
            f"No training items in train/{group} (glow.model={cfg.glow.model}); check data.root "
            f"(expected DIR/train/{group}/ for data=folder)"
        )
    val_items = []
    if select == "best":
        train_items, val_items = holdout_split(train_items, float(cfg.glow.val_fraction),
                                               int(cfg.seed))
    from datamodules.base import ItemDataset

    bs, nw = per_device_batch_size(cfg), cfg.data.num_workers
    train_ds = ItemDataset(dm, train_items)
    if template is not None:
        train_ds = PoseAligned(train_ds, template, what="training items",
                               mode=str(cfg.glow.align))
    if int(cfg.glow.rotation_copies) > 1:
        train_ds = RotatedCopies(train_ds, int(cfg.glow.rotation_copies),
                                 float(cfg.glow.rotation_deg))
    train = DataLoader(train_ds, batch_size=bs,
                       sampler=EpochShuffleSampler(len(train_ds), int(cfg.seed)),
                       num_workers=nw, drop_last=False, persistent_workers=nw > 0)
    val = None
    if val_items:
        val_ds = ItemDataset(dm, val_items)
        if template is not None:
            val_ds = PoseAligned(val_ds, template, what="held-out items",
                                 mode=str(cfg.glow.align))
        val = DataLoader(val_ds, batch_size=bs, shuffle=False,
                         num_workers=nw, persistent_workers=nw > 0)
    log.info("Glow %s: %d training items (train/%s, x%d rotated copies), %d held out for "
             "val/bpd (select=%s)", cfg.glow.model, len(train_items), group,
             int(cfg.glow.rotation_copies), len(val_items), select)
    return train, val


def model_epochs(cfg: DictConfig) -> int:
    """Epochs of glow.model: glow.m0_epochs / glow.m1_epochs where set, else
    trainer.max_epochs."""
    own = cfg.glow.m0_epochs if cfg.glow.model == "m0" else cfg.glow.m1_epochs
    return int(own) if own is not None else int(cfg.trainer.max_epochs)


def init_weights(module, ckpt_path: str | Path) -> None:
    """Copy the Glow weights of checkpoint ``ckpt_path`` into ``module`` (same architecture)."""
    ckpt = read_checkpoint(ckpt_path, map_location="cpu")  # weights_only: never unpickles code
    theirs = list(ckpt.get("hyper_parameters", {}).get("input_shape", []))
    ours = list(module.hparams.input_shape)
    if theirs != ours:
        raise ConfigError(f"{ckpt_path}: trained on input shape {theirs}, but this Glow gets "
                          f"{ours}; cannot start from its weights.")
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{ckpt_path}: its weights do not fit this Glow (different glow.* "
                          f"architecture settings?): {e}") from None
    log.info("Glow: starting from the weights of %s", ckpt_path)


def save_samples_png(path: Path, samples: torch.Tensor, n_slices: int = 8) -> Path:
    """2D: a grid of samples; 3D: one row per sample, ``n_slices`` evenly spaced axial slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = samples.detach().cpu().float().numpy()[:, 0]  # (N, H, W) or (N, D, H, W)
    if s.ndim == 3:
        n = len(s)
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        tiles = [[s[r * cols + c] if r * cols + c < n else np.zeros_like(s[0])
                  for c in range(cols)] for r in range(rows)]
    else:
        idx = np.linspace(0, s.shape[1] - 1, min(n_slices, s.shape[1])).round().astype(int)
        tiles = [[v[i] for i in idx] for v in s]
    grid = np.block([[t for t in row] for row in tiles])
    fig, ax = plt.subplots(figsize=(min(16, 2 + grid.shape[1] / 64),
                                    min(16, 2 + grid.shape[0] / 64)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(cfg: DictConfig, datamodule=None, init_ckpt: str | Path | None = None,
          max_steps: int | None = None, select: str | None = None,
          group: str | None = None, template: torch.Tensor | None = None) -> Path:
    """Train Glow per ``cfg`` for trainer.max_epochs; returns the checkpoint ``select`` picks
    (default glow.select): "best" = the lowest val/bpd on the held-out part of the model's own
    training set (last if there is none), "last" = the last epoch (the papers' fixed training
    length; also for the flow posterior's matched schedule).

    ``init_ckpt``: start from the weights (incl. the initialised ActNorms) of this Glow
    checkpoint instead of a fresh initialisation; it must have the same architecture and input
    shape. Optimiser state and epoch count start afresh. A resumed run (``ckpt_path``) restores
    its own weights over these. ``max_steps``: stop after this many optimiser steps instead of
    ``trainer.max_epochs`` epochs. ``group``: the training items (see :func:`build_loaders`).
    ``template``: the pose template with glow.align != none (default: fitted on S_normal
    here, :func:`fit_align_template`)."""
    import pytorch_lightning as pl

    from lightning_modules.glow import GlowModule

    out = prepare_run_dir(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    if datamodule is None:
        from datamodules.factory import build_datamodule  # lazy: the data helper's module

        datamodule = build_datamodule(cfg.data)
    select = str(cfg.glow.select) if select is None else select
    if template is None:
        template = fit_align_template(cfg, datamodule)
    train_loader, val_loader = build_loaders(cfg, datamodule, select, group, template)
    module = GlowModule(
        glow=OmegaConf.to_container(cfg.glow, resolve=True),
        input_shape=input_shape(cfg.data),
        n_bits=int(cfg.glow.n_bits),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        data=preprocessing(cfg.data),
        seed=int(cfg.seed),
    )
    if init_ckpt is not None:
        init_weights(module, init_ckpt)
    if template is not None:
        module.set_template(template)
    monitor = "val/bpd" if val_loader is not None else "train/bpd"
    logger = make_logger(cfg, out, name=f"glow_{cfg.data.modality}_{cfg.glow.model}")
    trainer = build_trainer(
        cfg, out, monitor=monitor, mode="min", logger=logger,
        gradient_clip_val=cfg.optim.grad_clip, gradient_clip_algorithm="norm",
        accumulate_grad_batches=int(cfg.glow.accumulate_grad_batches),
        num_sanity_val_steps=0,  # ActNorm must be initialised from training data first
        **({"max_steps": int(max_steps)} if max_steps else {}),
    )
    trainer.fit(module, train_loader, val_loader, ckpt_path=resolve_ckpt_path(cfg, out),
                weights_only=True)

    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb.best_model_path and select == "best" \
        else out / "checkpoints" / "last.ckpt"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(("train/", "val/"))}
    if ckpt_cb.best_model_score is not None and select == "best":
        metrics[monitor] = float(ckpt_cb.best_model_score)  # the score of the best checkpoint
    metrics.update(best_ckpt=str(best), epochs=int(trainer.current_epoch),
                   global_step=int(trainer.global_step))
    if trainer.is_global_zero:
        module.eval()
        torch.manual_seed(cfg.seed)
        samples = module.sample(int(cfg.glow.n_samples), float(cfg.glow.sample_temperature))
        save_samples_png(out / "samples.png", samples)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("Glow %s: %s", cfg.glow.model, {k: v for k, v in metrics.items()
                                                  if k.startswith("val/")})
    return best


def load(argv: list[str] | None = None) -> DictConfig:
    """``modality=cxr|bct`` (or ``data.modality=``) selects ``configs/glow_<modality>.yaml``
    (``config.resolve_job``)."""
    cfg = load_job(resolve_job("train_glow", argv))
    cfg.trainer.max_epochs = model_epochs(cfg)  # glow.m0_epochs / glow.m1_epochs
    return cfg


def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    return train(load(argv))


if __name__ == "__main__":
    entry(main)
