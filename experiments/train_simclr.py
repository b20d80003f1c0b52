"""Train the SimCLR encoder of one patch size (Kim et al., Sci Rep 2023).

    python -m experiments.train_simclr simclr.patch_size=256 [data.root=DIR] [key=value ...]
    make train-simclr RES=256 [DATA=DIR] [ARGS="key=value ..."]

``data.batch_size`` is the GLOBAL batch (256 in the paper); each of the
``trainer.devices * trainer.num_nodes`` processes gets ``batch_size / world_size`` patches and
the NT-Xent negatives are gathered across processes. Multi-node: Lightning reads the
torchrun (``MASTER_ADDR``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``NODE_RANK``) or SLURM
(``srun``) environment; set ``trainer.num_nodes`` and ``trainer.devices`` to match.

Writes ``<out_dir>/checkpoints/simclr-res<RES>-best.ckpt`` (lowest ``val/loss``),
``<out_dir>/checkpoints/last.ckpt`` (resume with ``ckpt_path=last``: optimiser, scheduler and
epoch are restored) and ``<out_dir>/metrics.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from experiments.cli import entry
from experiments.common import build_trainer, make_logger, resolve_ckpt_path, setup_logging
from experiments.config import ConfigError, load_job, prepare_run_dir, resolve_job

log = logging.getLogger(__name__)


def per_device_batch_size(global_batch_size: int, world_size: int) -> int:
    """``data.batch_size`` is global; every DDP process takes an equal share."""
    if global_batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={global_batch_size} (global) is not divisible by the "
            f"{world_size} processes (trainer.devices x trainer.num_nodes); choose a multiple"
        )
    return global_batch_size // world_size


def build_module(cfg: DictConfig):
    from lightning_modules.simclr import SimCLRModule
    from lightning_modules.simclr.config import resolved_chunk_size

    s, o = cfg.simclr, cfg.optim
    return SimCLRModule(
        patch_size=int(s.patch_size), backbone=str(s.backbone),
        proj_hidden_dim=int(s.proj_hidden_dim), proj_out_dim=int(s.proj_out_dim),
        temperature=float(s.temperature),
        input_size=None if s.input_size is None else int(s.input_size),
        optimizer=str(o.name), lr=float(o.lr), weight_decay=float(o.weight_decay),
        momentum=float(o.momentum), lr_scaling=str(o.lr_scaling),
        reference_batch_size=int(o.reference_batch_size),
        global_batch_size=int(cfg.data.batch_size), warmup_epochs=float(o.warmup_epochs),
        scheduler=str(o.scheduler), knn_k=int(s.knn_k), channels_last=bool(s.channels_last),
        chunk_size=resolved_chunk_size(s),  # simclr.chunk_size[_per_patch]
    )


def build_loaders(cfg: DictConfig, dm, world_size: int) -> tuple[DataLoader, DataLoader | None]:
    """Train loader (two fresh views per normal training patch) and val loader (fixed views
    of val normal + abnormal patches), each with the per-device batch size."""
    from datamodules.patches import train_patch_dataset, val_patch_dataset
    from lightning_modules.simclr.transforms import resize_transform, view_transform

    s = cfg.simclr
    size = int(s.input_size or s.patch_size)
    views = view_transform(size, s.crop_scale, s.crop_scale_max, s.rotation_deg,
                           float(s.brightness), float(s.contrast), float(s.gamma))
    if s.intensity_norm != "none":
        dm = IntensityNormalized(dm, str(s.intensity_norm))
    train_ds = train_patch_dataset(dm, int(s.patch_size), views, stride=s.stride,
                                   cache_max_gb=float(s.cache_max_gb))
    val_ds = val_patch_dataset(dm, int(s.patch_size), views, resize_transform(size),
                               stride=s.stride, cache_max_gb=float(s.cache_max_gb),
                               max_patches=int(s.val_max_patches), seed=int(s.val_seed))
    batch = per_device_batch_size(int(cfg.data.batch_size), world_size)
    n_train = len(train_ds)
    # Full batches only (BatchNorm and the number of negatives stay constant), unless the
    # data set is smaller than one global batch.
    drop_last = n_train >= batch * world_size
    if not drop_last:
        log.warning("Only %d training patches for a global batch of %d: keeping the partial batch",
                    n_train, batch * world_size)
    log.info("SimCLR res %d: %d training patches from %d images (%d per image), %s val patches, "
             "%d per device x %d processes", s.patch_size, n_train, len(train_ds.items),
             len(train_ds.cells), len(val_ds) if val_ds is not None else 0, batch, world_size)
    nw = int(cfg.data.num_workers)
    common = {"num_workers": nw, "persistent_workers": nw > 0,
              "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(train_ds, batch_size=batch, shuffle=True, drop_last=drop_last,
                              **common)
    val_loader = None
    if val_ds is not None and len(val_ds) > 0:
        val_loader = DataLoader(val_ds, batch_size=batch, shuffle=False, **common)
    return train_loader, val_loader


class IntensityNormalized:
    """A data module whose ``load`` returns each image with its per-image intensity
    normalisation (``simclr.intensity_norm``, = the detector's ``patch.intensity_norm``)."""

    def __init__(self, dm, mode: str):
        self._dm, self._mode = dm, mode

    def load(self, item):
        from lightning_modules.patch_detector.intensity import intensity_normalize

        img = torch.as_tensor(np.asarray(self._dm.load(item), dtype=np.float32))
        return intensity_normalize(img[None, None], self._mode)[0, 0].numpy()

    def __getattr__(self, name):
        return getattr(self._dm, name)


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _float_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = float(v.item() if isinstance(v, torch.Tensor) else v)
        if math.isfinite(v):
            out[k] = v
    return out


def train(cfg: DictConfig, datamodule=None) -> Path:
    """Train one encoder; returns the best checkpoint (``last.ckpt`` when there was no
    validation, or the checkpoint folder after a ``fast_dev_run``, which saves nothing)."""
    import pytorch_lightning as pl

    s = cfg.simclr
    if int(s.patch_size) > int(cfg.data.image_size):
        raise ConfigError(f"simclr.patch_size={s.patch_size} is larger than "
                          f"data.image_size={cfg.data.image_size}")
    out = Path(cfg.out_dir)
    if _is_rank_zero():
        prepare_run_dir(cfg, out)
    pl.seed_everything(int(cfg.seed), workers=True)
    if datamodule is None:
        from datamodules.factory import build_datamodule  # lazy: heavy, and data-set specific

        datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")

    res = int(s.patch_size)
    has_val = bool(datamodule.items("val"))
    monitor = "val/loss" if has_val else "train/loss"
    logger = make_logger(cfg, out, name=f"simclr-res{res}")
    trainer = build_trainer(cfg, out, monitor=monitor, mode="min", filename=f"simclr-res{res}-best",
                            logger=logger, gradient_clip_val=cfg.optim.grad_clip)
    train_loader, val_loader = build_loaders(cfg, datamodule, trainer.world_size)
    module = build_module(cfg)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                ckpt_path=resolve_ckpt_path(cfg, out), weights_only=True)

    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb and ckpt_cb.best_model_path else None
    last = out / "checkpoints" / "last.ckpt"
    result = best or (last if last.is_file() else out / "checkpoints")
    if trainer.is_global_zero:
        metrics = _float_metrics(trainer.callback_metrics)
        metrics.update({"epoch": int(trainer.current_epoch),
                        "global_step": int(trainer.global_step),
                        "patch_size": res, "backbone": str(s.backbone),
                        "best_checkpoint": str(best) if best else None,
                        "last_checkpoint": str(last) if last.is_file() else None})
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("SimCLR res %d done: %s", res, json.dumps(metrics))
    return result


def train_all(cfg: DictConfig, datamodule=None) -> dict[int, Path]:
    """One encoder per size in ``patch.patch_sizes``, one after the other, in this process.

    Each size gets its own ``out_dir`` (``.../res<RES>``). Under multi-GPU DDP prefer one
    process per size (``make train-simclr-all`` loops over sizes in the shell).
    """
    sizes = [int(x) for x in cfg.patch.patch_sizes]
    cfgs = []
    for size in sizes:
        c = copy.deepcopy(cfg)
        c.simclr.patch_size = size
        cfgs.append(c)
    if len({str(c.out_dir) for c in cfgs}) < len(cfgs):  # out_dir does not depend on the size
        for c, size in zip(cfgs, sizes):
            c.out_dir = str(Path(str(cfg.out_dir)) / f"res{size}")
    return {size: train(c, datamodule) for size, c in zip(sizes, cfgs)}


def main(argv: list[str] | None = None) -> Path | None:
    """Train one size. ``--list-sizes [overrides]`` prints the profile's ``patch.patch_sizes``
    instead (``make train-simclr-all`` loops over them, one process per size)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--list-sizes" in argv:
        argv.remove("--list-sizes")
        cfg = load_job(resolve_job("train_simclr", argv))
        print(" ".join(str(int(x)) for x in cfg.patch.patch_sizes))
        return None
    setup_logging()
    cfg = load_job(resolve_job("train_simclr", argv))
    log.info("SimCLR config:\n%s", OmegaConf.to_yaml(cfg.simclr))
    return train(cfg)


if __name__ == "__main__":
    entry(main)
