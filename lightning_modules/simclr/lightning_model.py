"""Thin LightningModule around :class:`SimCLRModel` (Kim et al. 2023, SimCLR patch encoders).

Training: NT-Xent (eq. 1 of Kim et al.; Chen et al. 2020) with lightly's ``NTXentLoss``;
negatives are gathered from every DDP rank (``gather_distributed=True``), so a run on W devices
with per-device batch B/W optimises the same loss as one device with batch B.
Optimiser: LARS (lr 4.8, weight decay 1e-6, bias and normalisation parameters excluded from
weight decay and from LARS adaptation), linear warm-up then cosine decay per step.

Validation (to watch the encoder learn): NT-Xent on fixed val views (``val/loss``), alignment
and uniformity of the normalised features h (Wang & Isola, ICML 2020,
https://arxiv.org/abs/2005.10242) and a leave-one-image-out kNN classifier of patch labels
(``val/knn_acc``, balanced accuracy; a patch inherits its image's normal/abnormal label).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning.utilities import rank_zero_info

from lightning_modules.checkpoint import read_checkpoint
from lightning_modules.optim import (
    build_optimizer,
    build_scheduler,
    lightning_config,
    schedule_steps,
)
from lightning_modules.simclr.chunked import chunked_forward
from lightning_modules.simclr.torch_model import PatchEncoder, SimCLRModel, build_backbone

CKPT_KEY = "simclr_encoder"  # extra checkpoint entry: what the detector checks


def scale_lr(lr: float, batch_size: int, scaling: str = "none",
             reference_batch_size: int = 256) -> float:
    """Learning rate for global batch ``batch_size`` (``optim.lr_scaling``).

    none: lr; linear: lr*B/ref (Goyal et al. 2017; SimCLR's 0.3*B/256); sqrt: lr*sqrt(B/ref)
    (SimCLR's alternative for LARS, 0.075*sqrt(B)).
    """
    if scaling == "none":
        return float(lr)
    if batch_size <= 0 or reference_batch_size <= 0:
        raise ValueError("batch sizes must be positive to scale the learning rate")
    ratio = batch_size / reference_batch_size
    if scaling == "linear":
        return float(lr * ratio)
    if scaling == "sqrt":
        return float(lr * math.sqrt(ratio))
    raise ValueError(f"optim.lr_scaling={scaling!r} is not one of none|linear|sqrt")


def alignment(h0: torch.Tensor, h1: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """E ||f(x) - f(y)||^alpha over positive pairs of unit vectors (Wang & Isola 2020)."""
    return (F.normalize(h0, dim=1) - F.normalize(h1, dim=1)).norm(dim=1).pow(alpha).mean()


def uniformity(h: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E exp(-t ||f(x) - f(y)||^2) over distinct pairs of unit vectors (Wang & Isola 2020)."""
    return torch.pdist(F.normalize(h, dim=1), p=2).pow(2).mul(-t).exp().mean().log()


def knn_balanced_accuracy(h: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                          k: int = 5) -> float | None:
    """Leave-one-image-out k-NN (cosine) vote for each patch's label; balanced accuracy.

    Neighbours from the patch's own image (same ``groups`` value) are excluded, otherwise the
    neighbouring patches of the same radiograph would give the answer away. None when only one
    class is present.
    """
    classes = labels.unique()
    if len(classes) < 2:
        return None
    f = F.normalize(h.float(), dim=1)
    sim = f @ f.T  # (N, N)
    sim = sim.masked_fill(groups[:, None] == groups[None, :], float("-inf"))
    k = min(k, int((groups[None, :] != groups[:, None]).sum(1).min()))
    if k < 1:
        return None
    idx = sim.topk(k, dim=1).indices  # (N, k)
    votes = labels[idx].float().mean(1)
    pred = (votes > 0.5).long()
    recalls = [(pred[labels == c] == c).float().mean() for c in classes]
    return float(torch.stack(recalls).mean())


class SimCLRModule(pl.LightningModule):
    """SimCLR training of one patch-size encoder. Hyper-parameters are plain Python values so
    that checkpoints load with ``torch.load(..., weights_only=True)``."""

    def __init__(self, patch_size: int, backbone: str = "resnet50", proj_hidden_dim: int = 2048,
                 proj_out_dim: int = 128, temperature: float = 0.5, input_size: int | None = None,
                 optimizer: str = "lars", lr: float = 4.8, weight_decay: float = 1e-6,
                 momentum: float = 0.9, lr_scaling: str = "none",
                 reference_batch_size: int = 256, global_batch_size: int = 256,
                 warmup_epochs: float = 10.0, scheduler: str = "cosine", knn_k: int = 5,
                 channels_last: bool = False, chunk_size: int | None = None):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.model = SimCLRModel(backbone, proj_hidden_dim, proj_out_dim)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)
        self._t_last: float | None = None
        self._val_outputs: list[dict[str, torch.Tensor]] = []

    # --- training --------------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_views(self, x0: torch.Tensor, x1: torch.Tensor):
        """Both views in one forward pass (batch statistics over all 2B views, as in SimCLR).
        With ``chunk_size`` the 2B views are encoded ``chunk_size`` at a time with activation
        checkpointing: the same loss over every negative in bounded memory (:mod:`.chunked`).

        Returns h0, h1 (B, F), z0, z1 (B, D) and the NT-Xent loss.
        """
        x = self._inputs(torch.cat([x0, x1]))
        h, z = chunked_forward(self.model, x, self.hparams.chunk_size)  # (2B, F), (2B, D)
        h0, h1 = h.chunk(2)
        z0, z1 = z.float().chunk(2)
        return h0, h1, z0, z1, self.criterion(z0, z1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, x1 = batch["view0"], batch["view1"]  # (B, 1, S, S) each
        *_, loss = self.forward_views(x0, x1)
        # sync_dist: each rank's loss averages its own 2B rows; the mean over ranks is the
        # loss of the global batch (what a single device would report).
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False,
                 batch_size=x0.shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        self._t_last = None  # validation time between epochs does not count

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_last is not None:
            n = batch["view0"].shape[0] * self.trainer.world_size
            self.log("train/throughput", n / max(now - self._t_last, 1e-9),
                     batch_size=batch["view0"].shape[0])  # patches per second, all ranks
        self._t_last = now

    # --- validation ------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0, x1 = batch["view0"], batch["view1"]
        h0, h1, _, _, loss = self.forward_views(x0, x1)
        h = self.model.backbone(self._inputs(batch["patch"]))  # (B, F) un-augmented patches
        self.log("val/loss", loss, sync_dist=True, batch_size=x0.shape[0])
        self._val_outputs.append({
            "h": h.float(), "h0": h0.float(), "h1": h1.float(),
            "label": batch["label"].long(), "image": batch["image"].long(),
        })

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        out = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        self._val_outputs.clear()
        if self.trainer.world_size > 1:
            # Every rank gets every rank's features; the metrics are computed identically on all.
            out = {k: v.reshape(-1, *v.shape[2:]) for k, v in self.all_gather(out).items()}
        # Equal on every rank; sync_dist only averages identical values (and keeps DDP quiet).
        self.log("val/alignment", alignment(out["h0"], out["h1"]), sync_dist=True)
        if out["h"].shape[0] > 1:
            self.log("val/uniformity", uniformity(out["h"]), sync_dist=True)
        acc = knn_balanced_accuracy(out["h"], out["label"], out["image"], self.hparams.knn_k)
        if acc is not None:
            self.log("val/knn_acc", acc, sync_dist=True)

    # --- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        lr = scale_lr(hp.lr, hp.global_batch_size, hp.lr_scaling, hp.reference_batch_size)
        # Bias and BatchNorm parameters: no weight decay; LARS skips adaptation for groups
        # with weight_decay == 0 (SimCLR, Chen et al. 2020, appendix B.1).
        decay, no_decay = get_weight_decay_parameters([self.model])
        groups = [{"name": "weights", "params": decay, "weight_decay": hp.weight_decay},
                  {"name": "no_weight_decay", "params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer not in ("lars", "sgd", "adam", "adamw"):
            raise ValueError(f"optim.name={hp.optimizer!r} is not one of lars|sgd|adam|adamw")
        opt = build_optimizer(hp.optimizer, groups, lr, hp.weight_decay, hp.momentum)
        if hp.scheduler == "none":
            return opt
        warmup, total = self._schedule_steps()
        return lightning_config(opt, build_scheduler(opt, hp.scheduler, warmup, total))

    def _schedule_steps(self) -> tuple[int, int]:
        """(warm-up steps, total steps) of this run: warm-up epochs converted to steps."""
        return schedule_steps(self.trainer.estimated_stepping_batches, self.trainer.max_epochs,
                              self.hparams.warmup_epochs)

    def on_train_start(self) -> None:
        # Resuming restores the scheduler's step count *and* its horizon. An exact resume
        # keeps both; a resume with a longer trainer.max_epochs (extending a run) must
        # stretch the horizon, or the lr would stay at its final value.
        if self.hparams.scheduler == "none" or not self.trainer.lr_scheduler_configs:
            return
        sched = self.trainer.lr_scheduler_configs[0].scheduler
        warmup, total = self._schedule_steps()
        if isinstance(sched, CosineWarmupScheduler) and sched.max_epochs != total:
            rank_zero_info(f"lr schedule horizon {sched.max_epochs} -> {total} steps "
                           "(trainer.max_epochs changed since the checkpoint)")
            sched.max_epochs, sched.warmup_epochs = total, warmup

    # --- checkpoint ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = self.hparams
        checkpoint[CKPT_KEY] = {
            "patch_size": int(hp.patch_size),
            "input_size": int(hp.input_size or hp.patch_size),
            "backbone": str(hp.backbone),
            "feature_dim": int(self.model.feature_dim),
        }


def load_encoder(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> PatchEncoder:
    """The backbone of a SimCLR checkpoint, in eval mode: (B, 1, s, s) -> (B, feat_dim).

    Loaded with ``weights_only=True`` (no unpickling of arbitrary objects). The returned
    module carries ``patch_size``, ``input_size``, ``backbone_name`` and ``feature_dim``.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"SimCLR checkpoint {path} does not exist; train it with "
                                "`make train-simclr RES=<patch size>`")
    ckpt = read_checkpoint(path, map_location=map_location)  # weights_only; clear if truncated
    info = ckpt.get(CKPT_KEY)
    if info is None:
        raise ValueError(f"{path} is not a SimCLR encoder checkpoint (no {CKPT_KEY!r} entry)")
    backbone = build_backbone(info["backbone"])
    prefix = "model.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    backbone.load_state_dict(state, strict=True)
    enc = PatchEncoder(backbone, patch_size=info["patch_size"], backbone_name=info["backbone"],
                       input_size=info["input_size"])
    return enc.to(map_location).eval()
