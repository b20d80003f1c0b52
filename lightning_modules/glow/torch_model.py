"""Multi-scale Glow in 2D and 3D (plain PyTorch + normflows, no Lightning).

Shibata et al., *Versatile anomaly detection method for medical images with semi-supervised
flow-based generative models*, https://arxiv.org/abs/2001.07847 — 2D Glow for radiographs
(L=7, K=32, 512x512x1) and 3D Glow for head CT (L=4, K=32, width 512, 32x128x128x1,
Appendix B). Built on ``nf.MultiscaleFlow``: per level (data -> latent) a squeeze, K steps of
flow, then half the channels are factored out to a fixed N(0, I) prior (openai/glow layout,
so a single-channel input is squeezed before its first coupling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import normflows as nf
import torch

from lightning_modules.glow.config import INTENSITY_NORMS

from . import layers2d
from .layers2d import ActNorm, GlowStep
from .layers3d import Squeeze3d

# -------------------------------------------------------------------------------------------
# Dequantisation and units


def quantize(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """x in [0, 1] (``MedicalDataModule.load``) -> integer levels k in {0, ..., 2^n - 1}.

    8-bit radiographs are k/255, the 7-bit brain window is I/127 (README "Glow (flow models M0 / M1)"), so
    k = round(x (2^n - 1)); resampled (non-integer) inputs are rounded to the nearest level.
    """
    top = 2**n_bits - 1
    return torch.round(x.clamp(0, 1) * top)


def dequantize(x: torch.Tensor, n_bits: int, noise: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow input y = (k + u) / 2^n - 1/2 with u ~ U(0, 1) in training (uniform dequantisation)
    or u = 1/2 (the bin centre, deterministic) at evaluation. y lies in [-1/2, 1/2)."""
    k = quantize(x, n_bits)
    if noise:
        u = torch.rand(k.shape, generator=generator, device=k.device, dtype=k.dtype)
    else:
        u = torch.full_like(k, 0.5)
    return (k + u) / 2**n_bits - 0.5




def intensity_normalize(x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Per-image intensity normalisation before dequantisation (our option; the paper feeds
    the raw 8-bit / 7-bit values).

    ``rank``: each pixel becomes its mid-rank among the image's own pixels,
    (#{< v} + #{= v} / 2) / N in [0, 1] (histogram equalisation with ties kept): invariant to
    any increasing intensity map, so a gain or gamma change of the exposure leaves the input
    unchanged, while a lesion brighter than its surroundings stays brighter.
    x: (B, C, ...) in [0, 1].
    """
    if mode == "none":
        return x
    if mode != "rank":
        raise ValueError(f"glow.intensity_norm={mode!r} is not one of {INTENSITY_NORMS}")
    flat = x.reshape(x.shape[0], -1)  # (B, N)
    srt = flat.sort(dim=1).values.contiguous()
    lo = torch.searchsorted(srt, flat.contiguous(), right=False)
    hi = torch.searchsorted(srt, flat.contiguous(), right=True)
    ranks = (lo + hi).to(x.dtype) / (2 * flat.shape[1])
    # a non-finite input stays non-finite (the training loop's NaN check must still see it)
    ranks = torch.where(torch.isfinite(flat), ranks, flat)
    return ranks.reshape(x.shape)


def discrete_log_likelihood(log_p_y: torch.Tensor, n_dims: int, n_bits: int) -> torch.Tensor:
    """log P(k) ~ log p(y) - D n log 2: the density of y = (k + u)/2^n integrated over the bin."""
    return log_p_y - n_dims * n_bits * math.log(2.0)


def bits_per_dim(log_p: torch.Tensor, n_dims: int) -> torch.Tensor:
    return -log_p / (n_dims * math.log(2.0))


def samples_to_unit(y: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Flow output y -> image in [0, 1] on the data's grid k / (2^n - 1)."""
    k = torch.floor((y + 0.5) * 2**n_bits).clamp(0, 2**n_bits - 1)
    return k / (2**n_bits - 1)


# -------------------------------------------------------------------------------------------
# The flow


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


class Glow(nf.MultiscaleFlow):
    """``nf.MultiscaleFlow`` whose log-likelihood is accumulated in float32 (float64 for a
    float64 model) even under autocast: a 512^2 NLL is ~1e5-1e6 nats, beyond float16."""

    def __init__(self, q0, flows, merges, input_shape: tuple[int, ...]):
        super().__init__(q0, flows, merges, class_cond=False)
        self.input_shape = tuple(input_shape)
        self.n_dims = math.prod(self.input_shape)

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """log p(x) of the continuous input, (B,) float32."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        log_q = torch.zeros(x.shape[0], dtype=acc, device=x.device)
        z = x
        for i in range(self.num_levels - 1, -1, -1):
            for flow in reversed(self.flows[i]):
                z, log_det = flow.inverse(z)
                log_q = log_q + log_det
            if i > 0:
                [z, z_], _ = self.merges[i - 1].inverse(z)
            else:
                z_ = z
            log_q = log_q + self.q0[i].log_prob(z_.to(acc))
        return log_q

    def log_prob_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position contributions to log p(x), (B, *spatial) at input resolution, that sum
        exactly to :meth:`log_prob` (our addition; Shibata et al. give no map).

        A position of level l (spatial size S / 2^(l+1)) covers a block of 2^(l+1) pixels per
        axis. Its contribution is the log-density of the latents factored out there (summed
        over channels), plus the coupling log-dets at that position (log scale summed over
        channels) and the per-position share of the ActNorm / 1x1-conv log-dets (the same at
        every position); it is spread evenly over its block (nearest upsampling divided by
        the block size). Coupling networks see a 3x3 neighbourhood per step, so a position's
        value depends on nearby pixels too: local, not strictly per pixel.
        """
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        spatial = tuple(x.shape[2:])
        out = torch.zeros((x.shape[0], *spatial), dtype=acc, device=x.device)
        couplings = [m for m in self.modules() if isinstance(m, layers2d.AffineCoupling)]
        for c in couplings:
            c.record_positions = True
        try:
            z = x
            for i in range(self.num_levels - 1, -1, -1):
                level = None
                for flow in reversed(self.flows[i]):
                    z, log_det = flow.inverse(z)
                    if not isinstance(flow, GlowStep):
                        continue  # squeeze: a permutation, log-det 0
                    pos = flow.coupling.coupling.position_log_det.to(acc)  # (B, *S_l)
                    n_pos = pos[0].numel()
                    rest = (log_det.to(acc) - pos.flatten(1).sum(1)) / n_pos  # (B,) or ()
                    pos = pos + rest.reshape(-1, *(1,) * (pos.dim() - 1))
                    level = pos if level is None else level + pos
                if i > 0:
                    [z, z_], _ = self.merges[i - 1].inverse(z)
                else:
                    z_ = z
                prior = _gaussian_positions(z_.to(acc))  # (B, *S_l)
                level = prior if level is None else level + prior
                out = out + _spread(level, spatial)
        finally:
            for c in couplings:
                c.record_positions = False
                c.position_log_det = None
        return out

    def latents(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.inverse_and_log_det(x)[0]

    @torch.no_grad()
    def initialize_actnorm(self, x: torch.Tensor) -> None:
        """Data-dependent ActNorm initialisation (Glow) from one batch, level by level."""
        self.log_prob(x)

    def actnorms(self) -> list[ActNorm]:
        return [m for m in self.modules() if isinstance(m, ActNorm)]

    @property
    def initialized(self) -> bool:
        return all(m.initialized for m in self.actnorms())

    def set_checkpointing(self, enabled: bool) -> None:
        for m in self.modules():
            if hasattr(m, "checkpointing"):
                m.checkpointing = enabled


def _gaussian_positions(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over channels: (B, C, *S) -> (B, *S)."""
    return (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)


def _spread(level: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """(B, *S_l) per-position values -> (B, *spatial), each spread evenly over its block."""
    for axis, size in enumerate(spatial):
        f = size // level.shape[axis + 1]
        level = level.repeat_interleave(f, dim=axis + 1) / f
    return level


def level_shapes(input_shape: tuple[int, ...], levels: int) -> list[tuple[int, ...]]:
    """Shape entering the K steps of each level, data side first: (C f (f/2)^j, S / 2^(j+1))
    with f = 2^dims (4 in 2D, 8 in 3D)."""
    c, *spatial = input_shape
    f = 2 ** len(spatial)
    for s in spatial:
        if s % 2**levels:
            raise ValueError(
                f"input shape {tuple(input_shape)}: every spatial size must be divisible by "
                f"2^levels = {2**levels} (glow.levels={levels}); change data.image_size / "
                "data.volume_size or glow.levels"
            )
    return [
        (c * f * (f // 2) ** j, *(s // 2 ** (j + 1) for s in spatial)) for j in range(levels)
    ]


def build_glow(glow_cfg: Any, input_shape: tuple[int, ...] | list[int]) -> Glow:
    """Multi-scale Glow for ``input_shape`` = (C, H, W) (2D) or (C, D, H, W) (3D).

    ``glow_cfg``: the ``glow`` config section (or a dict) with levels (L), steps (K),
    hidden_channels, coupling_scale (paper|glow), checkpointing, fuse_actnorm, coupling_net
    (normflows|openai).
    """
    input_shape = tuple(int(s) for s in input_shape)
    dims = len(input_shape) - 1
    if dims not in (2, 3):
        raise ValueError(f"input_shape must be (C,H,W) or (C,D,H,W), got {input_shape}")
    L, K = int(_get(glow_cfg, "levels")), int(_get(glow_cfg, "steps"))
    hidden = int(_get(glow_cfg, "hidden_channels"))
    scale_map = _get(glow_cfg, "coupling_scale", "paper")
    ckpt = bool(_get(glow_cfg, "checkpointing", False))
    fused = bool(_get(glow_cfg, "fuse_actnorm", True))
    net_style = _get(glow_cfg, "coupling_net", "normflows")
    shapes = level_shapes(input_shape, L)  # data side first
    squeeze = nf.flows.Squeeze if dims == 2 else Squeeze3d

    q0, flows, merges = [], [], []
    for i in range(L):  # normflows' order: i = 0 is the deepest level (generative order)
        j = L - 1 - i
        shape = shapes[j]
        steps = [GlowStep(shape[0], hidden, dims, scale_map, ckpt, fused, net_style)
                 for _ in range(K)]
        flows.append(steps + [squeeze()])
        latent = shape if i == 0 else (shape[0] // 2, *shape[1:])
        q0.append(nf.distributions.DiagGaussian(latent, trainable=False))  # fixed N(0, I)
        if i > 0:
            merges.append(nf.flows.Merge("channel"))
    return Glow(q0, flows, merges, input_shape)


# -------------------------------------------------------------------------------------------
# Memory: what a training step stores for backward


class SavedTensorMeter:
    """Sum of the bytes of distinct tensors autograd saves for backward (activations), via
    ``torch.autograd.graph.saved_tensors_hooks``; parameters are not counted. A proxy for
    peak activation memory that works on CPU and on the ``meta`` device."""

    def __init__(self, exclude: list[torch.Tensor] | None = None):
        self.bytes = 0
        self._seen: set[int] = set()
        self._exclude = {self._key(t) for t in (exclude or [])}

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _pack(self, t: torch.Tensor):
        k = self._key(t)
        if k not in self._seen and k not in self._exclude:
            self._seen.add(k)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        layers2d.checkpoint_input_observer = self._pack
        return self

    def __exit__(self, *exc):
        layers2d.checkpoint_input_observer = None
        self._ctx.__exit__(*exc)


def saved_activation_bytes(model: Glow, x: torch.Tensor) -> int:
    with SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers())) as m:
        loss = -model.log_prob(x).mean()
    del loss
    return m.bytes


def estimate_memory(glow_cfg: Any, input_shape: tuple[int, ...], batch_size: int,
                    checkpointing: bool | None = None) -> dict[str, float]:
    """Training memory (GiB) of one Glow step on one device, float32, Adam.

    Activations are counted exactly with :class:`SavedTensorMeter` on the ``meta`` device (no
    memory, no compute), so the paper-scale models can be estimated on a laptop. With
    checkpointing, ``recompute_gib`` adds the coupling network recomputed during backward at
    the largest level. Not counted: other transient gradient buffers, cuDNN workspaces and the
    allocator's fragmentation (add ~10-20 %).
    """
    cfg = {k: _get(glow_cfg, k) for k in
           ("levels", "steps", "hidden_channels", "coupling_scale", "checkpointing",
            "fuse_actnorm", "coupling_net") if _get(glow_cfg, k) is not None}
    if checkpointing is not None:
        cfg["checkpointing"] = checkpointing
    model = build_glow(cfg, input_shape)
    for a in model.actnorms():
        a.data_dep_init_done.fill_(1.0)
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to("meta")
    for a in model.actnorms():
        a._init_cache = True
    x = torch.empty((batch_size, *input_shape), device="meta")
    act = saved_activation_bytes(model, x)
    gib = 2.0**30
    # Backward transient: with checkpointing, the recomputed coupling network of the largest
    # level holds its two hidden activations plus one gradient of that size at once.
    n_pix = math.prod(level_shapes(input_shape, int(cfg["levels"]))[0][1:])
    hidden = int(cfg["hidden_channels"])
    transient = 3 * hidden * n_pix * batch_size * 4 if cfg.get("checkpointing") else 0
    out = {
        "params_gib": n_params * 4 / gib,
        "optimizer_gib": n_params * 4 * 3 / gib,  # grads + Adam's two moments
        "activations_gib": act / gib,
        "recompute_gib": transient / gib,
    }
    out["total_gib"] = sum(out.values())
    out["n_params_millions"] = n_params / 1e6
    return out



