"""Lightning wrapper of the 2D/3D Glow (Shibata et al., https://arxiv.org/abs/2001.07847).

Thin: dequantisation, NLL in bits/dim, optimiser, ActNorm initialisation under DDP, a clear
stop on a non-finite loss, and with ``glow.align=similarity`` (ours) the pose template its
inputs are aligned to. The dequantisation noise is drawn from a generator seeded by
(seed, global step, rank), so a run resumed from a checkpoint replays exactly.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_modules.align import estimate_pose, unwarp, warp
from lightning_modules.checkpoint import read_checkpoint
from lightning_modules.optim import (
    build_optimizer,
    build_scheduler,
    lightning_config,
    schedule_steps,
)

from .torch_model import (
    Glow,
    bits_per_dim,
    build_glow,
    dequantize,
    discrete_log_likelihood,
    intensity_normalize,
    samples_to_unit,
)

log = logging.getLogger(__name__)

# glow.align: how an image is resampled onto the template. Our choice: bicubic. Bilinear
# resampling of a 32² image blurs it by an amount that depends on its sub-pixel shift, a new
# nuisance the flow then models: on the dev chest sets (64² phantoms, 32² flow) bilinear gave
# test AUROC 0.794 / 0.703 (seeds 100 / 101; unaligned 0.769 / 0.738), bicubic 0.830 / 0.772.
ALIGN_INTERPOLATION = "bicubic"


def warp_to_template(x: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] resampled onto the template by ``poses`` (B, 4 or 6), clamped back
    into [0, 1] (bicubic overshoots a little at edges)."""
    return warp(x.float(), poses, ALIGN_INTERPOLATION).clamp(0.0, 1.0).to(x.dtype)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; raised instead of writing a broken checkpoint."""


class GlowModule(pl.LightningModule):
    """Glow trained by maximum likelihood on dequantised ``n_bits`` data.

    Args:
        glow: the ``glow`` config section as a plain dict (levels, steps, hidden_channels, ...).
        input_shape: (C, H, W) or (C, D, H, W).
        n_bits: bit depth of the data (8: RSNA radiographs, 7: brain-window CT).
        optim: the ``optim`` section as a plain dict (name, lr, weight_decay, scheduler, ...).
        data: preprocessing the model was trained with (modality, image_size / volume_size,
            name); stored so that the posterior scorer can check that M0 and M1 match.

    With ``glow.align`` != none (volumes: one in-plane pose each) the module holds the pose
    template of S_normal (``align_template``, a buffer, so it travels in every checkpoint;
    :meth:`set_template`).
    :meth:`log_likelihood` and :meth:`log_likelihood_map` align their input to it themselves;
    training batches arrive aligned already (``experiments.train_glow.PoseAligned`` estimates
    each item's pose once instead of once per epoch).
    """

    def __init__(self, glow: dict, input_shape: list[int], n_bits: int = 8,
                 optim: dict | None = None, data: dict | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.model: Glow = build_glow(glow, input_shape)
        self.n_bits = int(n_bits)
        self.n_dims = math.prod(input_shape)
        self.optim_cfg = dict(optim or {"name": "adam", "lr": 1e-3, "weight_decay": 0.0})
        self.align = str(glow.get("align", "none"))
        if self.align != "none":
            if len(input_shape) not in (3, 4):
                raise ValueError(f"glow.align={self.align} registers (C, H, W) images or "
                                 f"(C, D, H, W) volumes; got input shape {tuple(input_shape)}")
            self.register_buffer("align_template", torch.zeros(1, *input_shape))

    # --- pose alignment (glow.align) -------------------------------------------------------
    @property
    def has_template(self) -> bool:
        return self.align != "none" and bool(self.align_template.abs().sum() > 0)

    def set_template(self, template: torch.Tensor) -> None:
        """The pose template (1, 1, H, W) of S_normal (``lightning_modules.align.fit_template``)
        that every input is aligned to; M0 and M1 must get the same one."""
        if self.align == "none":
            raise ValueError("set_template needs glow.align=similarity or affine")
        shape = tuple(self.align_template.shape)
        if tuple(template.shape) != shape:
            raise ValueError(f"pose template of shape {tuple(template.shape)}, expected {shape}")
        self.align_template.copy_(template.to(self.align_template))

    def align_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, H, W) or (B, 1, D, H, W) -> (x resampled onto the template, the poses (B, 4 or
        6)); unchanged and None with glow.align=none."""
        if self.align == "none":
            return x, None
        if not self.has_template:
            raise RuntimeError(f"glow.align={self.align}: this Glow has no pose template; "
                               "experiments.train_glow fits one on S_normal before training")
        poses = estimate_pose(x, self.align_template.to(x), mode=self.align)
        return warp_to_template(x, poses), poses

    # --- likelihood ------------------------------------------------------------------------
    def _noise_generator(self, device: torch.device) -> torch.Generator:
        seed = (int(self.hparams.seed) * 1_000_003 + self.global_step) * 1024 + self.global_rank
        return torch.Generator(device=device).manual_seed(seed)

    @property
    def intensity_norm(self) -> str:
        return str(self.hparams.glow.get("intensity_norm", "none"))

    def _flow_input(self, x: torch.Tensor, noise: bool) -> torch.Tensor:
        x = intensity_normalize(x, self.intensity_norm)
        g = self._noise_generator(x.device) if noise else None
        return dequantize(x, self.n_bits, noise, g)  # (B, C, ...) in [-1/2, 1/2)

    def _log_p_discrete(self, x: torch.Tensor, noise: bool) -> torch.Tensor:
        y = self._flow_input(x, noise)
        return discrete_log_likelihood(self.model.log_prob(y), self.n_dims, self.n_bits)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, aligned: bool = False) -> torch.Tensor:
        """log p(x) in nats of the discretised data, (B,) float32; deterministic (bin centres).

        x: (B, C, ...) or (B, ...) (channel added) in [0, 1] as ``MedicalDataModule.load``.
        ``aligned``: x is in the template's frame already (:meth:`align_input`), so it is not
        registered again.
        """
        return self._evaluate(x, per_position=False, aligned=aligned)[0]

    @torch.no_grad()
    def log_likelihood_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel (per-voxel) contributions to :meth:`log_likelihood`, (B, *spatial) float32,
        summing to it (``Glow.log_prob_map`` minus n_bits log 2 per pixel for the bins). With
        ``glow.align`` the map is computed in the template's frame and resampled back onto each
        image (0 where the template does not reach), so it no longer sums to log p(x): use
        :meth:`log_likelihood_and_map` for both."""
        return self._evaluate(x, per_position=True)[1]

    @torch.no_grad()
    def log_likelihood_and_map(self, x: torch.Tensor, aligned: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`log_likelihood`, :meth:`log_likelihood_map`) from one pass through the flow:
        log p(x) is the map's sum taken in the frame the flow saw, before any resampling.
        ``aligned``: x is in the template's frame already (:meth:`align_input`); the map then
        stays in that frame (it is not resampled back)."""
        return self._evaluate(x, per_position=True, aligned=aligned)

    def _evaluate(self, x: torch.Tensor, per_position: bool, aligned: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log p(x) (B,), the per-position map or None) in float32."""
        if x.dim() == len(self.hparams.input_shape):
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != tuple(self.hparams.input_shape):
            raise ValueError(
                f"Glow was trained on inputs of shape {tuple(self.hparams.input_shape)}, got "
                f"{tuple(x.shape[1:])}; use the same data.image_size / data.volume_size"
            )
        was_training = self.training
        self.eval()
        p = next(self.model.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        x, poses = (x, None) if aligned else self.align_input(x)
        lp_map = None
        if per_position:
            lp_map = self.model.log_prob_map(self._flow_input(x, noise=False))
            lp_map = lp_map - self.n_bits * math.log(2.0)  # (B, *spatial)
            lp = lp_map.double().flatten(1).sum(1)
            if poses is not None:
                lp_map = unwarp(lp_map.unsqueeze(1), poses).squeeze(1)
            lp_map = lp_map.float()
        else:
            lp = self._log_p_discrete(x, noise=False)
        self.train(was_training)
        return lp.float(), lp_map

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7) -> torch.Tensor:
        """n fictional images/volumes (n, C, ...) in [0, 1] at the given temperature."""
        y, _ = self.model.sample(n, temperature=temperature)
        return samples_to_unit(y.float(), self.n_bits)

    # --- training --------------------------------------------------------------------------
    def _bpd(self, batch: dict, noise: bool) -> torch.Tensor:
        return bits_per_dim(self._log_p_discrete(batch["image"], noise), self.n_dims)  # (B,)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._bpd(batch, noise=True).mean()
        finite = bool(torch.isfinite(loss).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"Glow training loss is not finite ({loss.item()}) at global step "
                f"{self.global_step} (epoch {self.current_epoch}); stopped before any "
                "checkpoint of this state was written. Try a lower optim.lr, gradient clipping "
                "(optim.grad_clip), trainer.precision=32-true, or resume from the last good "
                "checkpoint (ckpt_path=last) with a lower learning rate."
            )
        self.log("train/bpd", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        bpd = self._bpd(batch, noise=False)
        self.log("val/bpd", bpd.mean(), prog_bar=True, sync_dist=True,
                 batch_size=bpd.shape[0])

    def on_train_start(self) -> None:
        """ActNorm data-dependent initialisation, once, identical on every rank.

        Every rank initialises from its own first batch, then rank 0's values are broadcast
        (so all replicas start from rank 0's batch statistics; DDP only syncs parameters at
        wrap time, before this). Skipped when resuming (the flags are in the checkpoint).
        """
        if self.align != "none" and not self.has_template:
            raise RuntimeError(f"glow.align={self.align}: set_template(template of S_normal) "
                               "before training (experiments.train_glow does)")
        if self.model.initialized:
            return
        batch = next(iter(self.trainer.train_dataloader))
        x = batch["image"].to(self.device)
        self.model.initialize_actnorm(self._flow_input(x, noise=True))
        broadcast_actnorm(self.model, src=0)
        log.info("ActNorm initialised from a batch of %d", x.shape[0])

    def configure_optimizers(self):
        """optim.name adam (default) | adamw | sgd | adamax (openai/glow's); optim.scheduler
        none | cosine | warmup (openai/glow's linear warm-up over optim.warmup_epochs, then
        constant). See lightning_modules/optim.py."""
        o = self.optim_cfg
        opt = build_optimizer(o.get("name", "adam"), self.model.parameters(),
                              float(o.get("lr", 1e-3)), float(o.get("weight_decay", 0.0)),
                              float(o.get("momentum", 0.9)))
        name = o.get("scheduler", "none")
        if name == "none":
            return opt
        warmup, total = schedule_steps(self.trainer.estimated_stepping_batches,
                                       self.trainer.max_epochs,
                                       float(o.get("warmup_epochs", 0.0)))
        return lightning_config(opt, build_scheduler(opt, name, warmup, total))


def broadcast_actnorm(model: Glow, src: int = 0) -> None:
    """Copy rank ``src``'s ActNorm parameters and init flags to every rank (no-op without
    torch.distributed). In-place, so DDP's references to the parameters stay valid."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for a in model.actnorms():
        for t in (a.s.data, a.t.data, a.data_dep_init_done):
            torch.distributed.broadcast(t, src=src)
        a._init_cache = False


def load_glow(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> GlowModule:
    """A trained :class:`GlowModule` in eval mode. The checkpoint is read with
    ``weights_only=True`` (no unpickling of arbitrary objects)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"Glow checkpoint {path} does not exist")
    ckpt = read_checkpoint(path, map_location=map_location)  # weights_only; clear if truncated
    hp = ckpt.get("hyper_parameters")
    if not hp or "glow" not in hp:
        raise ValueError(f"{path} is not a GlowModule checkpoint (no glow hyper-parameters)")
    module = GlowModule(**{k: hp[k] for k in ("glow", "input_shape", "n_bits", "optim", "data", "seed")
                           if k in hp})
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
