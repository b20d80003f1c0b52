"""Pieces every entry point shares: logging set-up, the W&B logger, the Trainer (with atomic
checkpoint writes and a divergence guard), progress bars."""

from __future__ import annotations

import errno
import logging
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins import TorchCheckpointIO
from rich.logging import RichHandler

from datamodules.progress import track  # noqa: F401  (re-exported for the entry points)
from lightning_modules.checkpoint import CheckpointError, check_checkpoint_file, read_checkpoint

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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file of that name is unchanged."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exception_chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, fsync'ed, then renamed over
    the target (``os.replace`` is atomic): a kill or a full disk during a write leaves the
    previous file of that name whole. Loading checks the file first
    (:func:`lightning_modules.checkpoint.read_checkpoint`): an empty or truncated checkpoint is
    one clear error naming it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote (fsspec): Lightning's
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        for stale in path.parent.glob(".*.ckpt.*.tmp"):  # left by a killed writer
            if not stale.name.endswith(f".{os.getpid()}.tmp"):
                stale.unlink(missing_ok=True)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            # torch.save's zip writer finishes the archive on the way out, so a failed write
            # surfaces as its RuntimeError with the real cause (OSError, a signal) as context
            chain = _exception_chain(e)
            interrupt = next((c for c in chain if not isinstance(c, Exception)), None)
            if interrupt is not None:
                raise interrupt from None
            cause = next((c for c in chain if isinstance(c, OSError)), None)
            if cause is None and "PytorchStreamWriter" not in str(e):
                raise
            reason = (cause.strerror or str(cause)) if cause else str(e).split(". ")[0]
            full = cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)
            advice = "free disk space or point out_dir at a larger disk" if full \
                else "check that the folder is writable and has space"
            kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing written"
            err = CheckpointWriteError(
                f"Could not write checkpoint {path} ({reason}); {kept}. "
                f"{advice.capitalize()}, then resume with ckpt_path=last.")
            err.errno = cause.errno if cause else None
            raise err from None
        _fsync_dir(path.parent)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location,
                                           weights_only=weights_only)
        return read_checkpoint(path, map_location=map_location,
                               weights_only=True if weights_only is None else weights_only)


class TrainingDiverged(FloatingPointError):
    """The loss, the monitored metric or a parameter became NaN/inf; training stopped and that
    state was not saved."""


class DivergenceGuard(Callback):
    """Never save a non-finite state: after every optimiser step the loss and the parameters are
    checked, before every checkpoint the monitored metric and the parameters; a NaN/inf stops
    training with :class:`TrainingDiverged` (step, what, and the fix). The decision is reduced
    over DDP ranks so that all of them stop together.

    Also makes ``optim.lr`` count on resume: Lightning restores the learning rate stored in the
    checkpoint's optimiser state, so a lower ``optim.lr`` given with ``ckpt_path=last`` would
    silently be ignored; here the restored rates (and the schedulers' base rates) are scaled by
    new lr / checkpointed lr."""

    def __init__(self, monitor: str | None, ckpt_dir: Path, lr: float | None = None):
        self.monitor, self.ckpt_dir, self.lr = monitor, Path(ckpt_dir), lr

    def _stop(self, trainer, what: str) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        last = self.ckpt_dir / "last.ckpt"
        lower = f" optim.lr={self.lr / 10:g}" if self.lr else ""
        if last.is_file():
            fix = (f"{last} is the last good checkpoint: resume from it with gradient clipping "
                   f"or a lower learning rate, e.g. ckpt_path=last optim.grad_clip=1.0{lower}")
        else:
            fix = ("No checkpoint was written yet: rerun with gradient clipping or a lower "
                   f"learning rate, e.g. optim.grad_clip=1.0{lower}")
        raise TrainingDiverged(
            f"Training diverged at global step {step} (epoch {epoch}): {what} is not finite; "
            f"stopped, and this state was not saved. {fix} (or trainer.precision=32-true).")

    @staticmethod
    def _non_finite_param(pl_module) -> str | None:
        params = [p for p in pl_module.parameters() if p.is_floating_point()]
        if not params:
            return None
        norm = torch.nn.utils.get_total_norm(params)  # one reduction, non-finite iff any is
        if torch.isfinite(norm):
            return None
        for name, p in pl_module.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                return f"parameter {name}"
        return "the parameter norm"

    def _check(self, trainer, pl_module, value=None, value_name: str = "") -> None:
        bad = None
        if value is not None and not math.isfinite(float(value)):
            bad = f"{value_name} ({float(value)})"
        bad = bad or self._non_finite_param(pl_module)
        if not trainer.strategy.reduce_boolean_decision(bad is None, all=True):
            self._stop(trainer, bad or "a value on another rank")

    def _monitored(self, trainer):
        if self.monitor is None:
            return None
        return trainer.callback_metrics.get(self.monitor)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._check(trainer, pl_module, loss.detach() if torch.is_tensor(loss) else None,
                    "the training loss")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module, self._monitored(trainer), self.monitor)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._check(trainer, pl_module, self._monitored(trainer), self.monitor)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        old, new = _hparam_lr(checkpoint.get("hyper_parameters")), _hparam_lr(pl_module.hparams)
        if not old or new is None or math.isclose(old, new):
            return
        f = new / old
        for opt in checkpoint.get("optimizer_states", []):
            for g in opt.get("param_groups", []):
                for k in ("lr", "initial_lr"):
                    if k in g:
                        g[k] = g[k] * f
        for sched in checkpoint.get("lr_schedulers", []):
            for k in ("base_lrs", "_last_lr"):
                if k in sched:
                    sched[k] = [v * f for v in sched[k]]
        log.info("Resuming with learning rate %g instead of the checkpoint's %g", new, old)


def _hparam_lr(hp) -> float | None:
    """The configured learning rate in a module's hyper-parameters: ``optim.lr`` (Glow) or
    ``lr`` (SimCLR)."""
    if not hp:
        return None
    optim = hp.get("optim")
    lr = optim.get("lr") if isinstance(optim, dict) else hp.get("lr")
    return None if lr is None else float(lr)


def build_trainer(cfg: DictConfig, out_dir: str | Path, *, monitor: str | None = None,
                  mode: str = "min", filename: str = "best", callbacks: list | None = None,
                  logger=None, **kwargs):
    """A Lightning Trainer from ``cfg.trainer`` with best/last checkpoints and a progress bar.

    Checkpoints keep stable names (a rerun into the same out_dir overwrites ``best.ckpt`` /
    ``last.ckpt`` instead of adding ``-v1`` files, so ``last.ckpt`` is always the newest), are
    written atomically (:class:`AtomicCheckpointIO`) and never hold a non-finite state
    (:class:`DivergenceGuard`)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    t = cfg.trainer
    out = Path(out_dir)
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints", filename=filename, monitor=monitor, mode=mode,
        save_last=True, save_top_k=1, enable_version_counter=False,
    )
    lr = OmegaConf.select(cfg, "optim.lr", default=None)
    guard = DivergenceGuard(monitor, out / "checkpoints", float(lr) if lr is not None else None)
    cbs = [guard, ckpt, *(callbacks or [])]
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
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


def resolve_ckpt_path(cfg: DictConfig, out_dir: str | Path) -> str | None:
    """``ckpt_path=last`` -> ``<out_dir>/checkpoints/last.ckpt``; an absent, empty or truncated
    file is an error before any training starts."""
    if not cfg.ckpt_path:
        return None
    if cfg.ckpt_path == "last":
        p = Path(out_dir) / "checkpoints" / "last.ckpt"
        if not p.is_file():
            raise FileNotFoundError(f"ckpt_path=last but {p} does not exist: nothing to resume.")
    else:
        p = Path(cfg.ckpt_path)
        if not p.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist.")
    try:
        check_checkpoint_file(p)
    except CheckpointError as e:
        raise CheckpointError(f"ckpt_path={cfg.ckpt_path}: {e}") from None
    return str(p)


def scoring_trainer(device, progress: bool = False, max_epochs: int = 1):
    """A Trainer that only runs a fitted detector's stages (fit without an optimiser for the
    patch databases, validate, test, predict): one device, no logger, no checkpoint callback,
    no sanity check; ``save_checkpoint`` writes atomically."""
    import warnings

    import pytorch_lightning as pl
    import torch

    # both are intended here: nothing is optimised, and the fixed models stay in eval mode
    warnings.filterwarnings("ignore", message=r".*configure_optimizers. returned .None.")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    return pl.Trainer(accelerator="gpu" if torch.device(device).type == "cuda" else "cpu",
                      devices=1, max_epochs=max_epochs, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=progress, plugins=[AtomicCheckpointIO()])


def finish_wandb() -> None:
    """Close the open W&B run (if any), so the next model or evaluation gets its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def log_test_metrics(cfg: DictConfig, out_dir: str | Path, metrics: dict, name: str) -> None:
    """A pipeline's scalar test / val metrics as their own W&B run ``name`` (offline by
    default; nothing for logger=none); intervals as ``<key>_low`` / ``<key>_high``."""
    from experiments.evaluation import flatten_metrics

    logger = make_logger(cfg, out_dir, name=name)
    if logger is None:
        return
    scalars = {(k if "/" in k else f"test/{k}"): float(v)
               for k, v in flatten_metrics(metrics).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    logger.log_metrics(scalars)
    logger.finalize("success")
    logger.experiment.finish()
