"""One optimiser / learning-rate-schedule factory for SimCLR (Kim et al.) and Glow (Shibata et al.).

Optimisers (``optim.name``): lars (lightly's LARS: SimCLR), sgd, adam, adamw, adamax (the
default of openai/glow, https://github.com/openai/glow, ``--optimizer adamax``).

Schedules (``optim.scheduler``), stepped once per optimiser step:

* ``none``: constant lr.
* ``cosine``: linear warm-up over ``warmup_steps`` then cosine decay to the end of training
  (lightly's ``CosineWarmupScheduler``; SimCLR, Chen et al. 2020).
* ``warmup``: openai/glow's schedule, lr_k = lr * min(1, k / warmup_steps) for the k-th step
  (k = 0, 1, ...), then constant ("learning rate in steady state", Shibata et al.);
  openai/glow sets ``lr * min(1, n_processed / (n_train * epochs_warmup))`` with n_processed the
  images seen before the step.

Pure PyTorch (+ lightly); no Lightning: the modules' ``configure_optimizers`` pass the step
counts in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler

OPTIMIZERS = ("lars", "sgd", "adam", "adamw", "adamax")
SCHEDULERS = ("cosine", "warmup", "none")


def build_optimizer(name: str, params: Iterable, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """``params``: parameters or parameter groups (a group's own ``weight_decay`` wins)."""
    lr, wd = float(lr), float(weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=float(momentum), weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(momentum), weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "adamax":
        # betas (0.9, 0.999): openai/glow's beta1; its beta2 = 1 - 1/(iterations per epoch)
        # and its Polyak averaging of the weights are not reproduced.
        return torch.optim.Adamax(params, lr=lr, weight_decay=wd)
    raise ValueError(f"optim.name={name!r} is not one of {'|'.join(OPTIMIZERS)}")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """openai/glow's linear warm-up: min(1, step / warmup_steps); 1 without warm-up."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def schedule_steps(total_steps: int, max_epochs: int | None, warmup_epochs: float) -> tuple[int, int]:
    """(warm-up steps, total steps): ``warmup_epochs`` converted with this run's steps per epoch.

    A run bounded by steps (``max_epochs`` None or -1) has no epoch length: no warm-up."""
    total = max(int(total_steps), 1)
    if max_epochs and max_epochs > 0:
        warmup = int(round(float(warmup_epochs) * total / max_epochs))
    else:
        warmup = 0
    return min(warmup, total), total


def build_scheduler(opt: torch.optim.Optimizer, name: str, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step schedule ``name`` (None for ``none``)."""
    if name == "none":
        return None
    if name == "cosine":
        return CosineWarmupScheduler(opt, warmup_epochs=warmup_steps, max_epochs=total_steps)
    if name == "warmup":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: warmup_factor(k, int(warmup_steps)))
    raise ValueError(f"optim.scheduler={name!r} is not one of {'|'.join(SCHEDULERS)}")


def lightning_config(opt: torch.optim.Optimizer, sched) -> dict | torch.optim.Optimizer:
    """What ``configure_optimizers`` returns: the optimiser alone, or it with a per-step
    schedule."""
    if sched is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
