"""Pieces every entry point shares: logging set-up, the W&B logger, the Trainer, progress bars."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.logging import RichHandler

from datamodules.progress import track  # noqa: F401  (re-exported for the entry points)

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(show_path=False, rich_tracebacks=False))
    root.setLevel(level)


def wandb_mode(cfg: DictConfig) -> str:
    """Offline unless the user opted in with ``logger.mode=online`` or ``WANDB_MODE=online``."""
    env = os.environ.get("WANDB_MODE", "").lower()
    if cfg.logger.mode == "disabled" or env == "disabled":
        return "disabled"
    if cfg.logger.mode == "online" or env == "online":
        return "online"
    return "offline"


def make_logger(cfg: DictConfig, out_dir: str | Path, name: str | None = None):
    """The one place a W&B logger is made. Returns None for ``logger=none``.

    Offline runs land in ``<out_dir>/wandb/`` and can be uploaded later with
    ``wandb sync <out_dir>/wandb/offline-run-*``. Only the resolved config (no file lists,
    no DICOM header values) and scalar metrics are logged; images only with
    ``logger.log_images=true``.
    """
    if cfg.logger.name == "none":
        return None
    from pytorch_lightning.loggers import WandbLogger

    mode = wandb_mode(cfg)
    os.environ["WANDB_MODE"] = mode  # child processes (DDP ranks, wandb service) agree
    os.environ.setdefault("WANDB_SILENT", "true")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("W&B logging is %s; run files under %s", mode, out / "wandb")
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        name=name,
        save_dir=str(out),
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def build_trainer(cfg: DictConfig, out_dir: str | Path, *, monitor: str | None = None,
                  mode: str = "min", filename: str = "best", callbacks: list | None = None,
                  logger=None, **kwargs):
    """A Lightning Trainer from ``cfg.trainer`` with best/last checkpoints and a progress bar."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    t = cfg.trainer
    out = Path(out_dir)
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints", filename=filename, monitor=monitor, mode=mode,
        save_last=True, save_top_k=1,
    )
    cbs = [ckpt, *(callbacks or [])]
    if t.progress_bar:
        cbs.append(RichProgressBar())
    if logger is not None:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    devices = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    return pl.Trainer(
        default_root_dir=str(out),
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=OmegaConf.to_object(devices) if isinstance(devices, DictConfig) else devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        sync_batchnorm=t.sync_batchnorm,
        fast_dev_run=t.fast_dev_run,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar,
        logger=logger if logger is not None else False,
        callbacks=cbs,
        **kwargs,
    )


def resolve_ckpt_path(cfg: DictConfig, out_dir: str | Path) -> str | None:
    """``ckpt_path=last`` -> ``<out_dir>/checkpoints/last.ckpt`` (error if absent)."""
    if not cfg.ckpt_path:
        return None
    if cfg.ckpt_path == "last":
        p = Path(out_dir) / "checkpoints" / "last.ckpt"
        if not p.is_file():
            raise FileNotFoundError(f"ckpt_path=last but {p} does not exist: nothing to resume.")
        return str(p)
    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist.")
    return cfg.ckpt_path
