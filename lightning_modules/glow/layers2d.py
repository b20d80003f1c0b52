"""Glow layers (2D, and the parts shared with 3D) on top of normflows 1.7.3.

Shibata et al., *Versatile anomaly detection method for medical images with semi-supervised
flow-based generative models*, https://arxiv.org/abs/2001.07847 (Glow: Kingma & Dhariwal,
https://arxiv.org/abs/1807.03039).

Direction convention (normflows'): ``forward`` maps latent -> data (generation), ``inverse``
maps data -> latent (the normalising direction used for the likelihood). Both return
``(output, log|det J|)`` of the map they compute; log-dets are float32 (or float64) per sample
or a scalar that broadcasts over the batch.
"""

from __future__ import annotations

import warnings

import normflows as nf
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_modules.glow.config import COUPLING_NETS

SCALE_MAPS = ("paper", "glow")
LOGSCALE_FACTOR = 3.0  # openai/glow conv2d_zeros(logscale_factor=3)

# Set by torch_model.SavedTensorMeter: the inputs a checkpointed coupling keeps alive for its
# recomputation are not packed by saved-tensor hooks, so they are reported here.
checkpoint_input_observer = None


def coupling_scale(h: torch.Tensor, scale_map: str) -> torch.Tensor:
    """Multiplicative scale of the affine coupling in the data -> latent direction.

    paper: sigma(h - 0.1) + 0.6 in (0.6, 1.6) (Shibata et al.: a scale that can grow as well
    as shrink; about 1.08 at the zero-initialised start);
    glow: sigma(h + 2) in (0, 1), what normflows hard-codes for scale_map='sigmoid'.
    """
    if scale_map == "paper":
        return torch.sigmoid(h - 0.1) + 0.6
    if scale_map == "glow":
        return torch.sigmoid(h + 2.0)
    raise ValueError(f"coupling scale map {scale_map!r} is not one of {SCALE_MAPS}")


def _sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)  # (B,)


class ActNorm(nf.flows.ActNorm):
    """normflows' ActNorm (works in 4D and 5D: shape (C,1,1) or (C,1,1,1)) with an explicit,
    DDP-safe data-dependent initialisation.

    normflows replaces its ``data_dep_init_done`` buffer by a new CPU tensor on first use, which
    detaches it from the module's device and from DDP's buffer list; here the flag is set in
    place and :meth:`initialize` can be called once on a chosen batch (then broadcast).
    """

    _init_cache = False  # python mirror of the buffer: no device sync per step once True

    @property
    def initialized(self) -> bool:
        if not self._init_cache:
            self._init_cache = bool(self.data_dep_init_done.item() > 0)
        return self._init_cache

    def _load_from_state_dict(self, *args, **kwargs):
        self._init_cache = False
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set s, t so that ``inverse(x)`` has zero mean and unit variance per channel."""
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        std = x.std(dim=self.batch_dims, keepdim=True)
        self.s.data.copy_(torch.log(std + 1e-6))
        self.t.data.copy_(x.mean(dim=self.batch_dims, keepdim=True))
        self.data_dep_init_done.fill_(1.0)
        self._init_cache = True

    def forward(self, z):  # latent -> data
        if not self.initialized:
            raise RuntimeError(
                "ActNorm used in the generative direction before its data-dependent "
                "initialisation; run the flow on data first (Glow.initialize_actnorm)."
            )
        return nf.flows.AffineConstFlow.forward(self, z)

    def inverse(self, z):  # data -> latent
        if not self.initialized:
            self.initialize(z)
        return nf.flows.AffineConstFlow.inverse(self, z)


class ActNormLayer(nn.Module):
    """ActNorm as a layer of a coupling network (openai/glow's ``conv2d`` with ``do_actnorm``):
    (x - t) exp(-s) per channel, s and t initialised from the first batch so the output has
    zero mean and unit variance (its log-det is not part of the flow's)."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.actnorm = ActNorm((channels,) + (1,) * dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(x)[0]


class ZeroConv(nn.Module):
    """openai/glow's ``conv2d_zeros``: a 3x3 (3x3x3) convolution initialised to zero whose
    output is multiplied by exp(logscale_factor * logs), logs a learned per-channel log-scale
    (initialised to 0). The factor 3 (openai's) lets the scale move 3x faster than logs."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2,
                 logscale_factor: float = LOGSCALE_FACTOR):
        super().__init__()
        self.conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims](in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels, *(1,) * dims))
        self.logscale_factor = float(logscale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


class CouplingNet(nn.Module):
    """NN() of the affine coupling, for 2D (Conv2d) and 3D (Conv3d, which normflows lacks).

    ``style="normflows"`` (default): conv3 -> ReLU -> conv1 -> ReLU -> zero-init conv3, the
    layout of normflows' ``ConvNet2d``. ``style="openai"``: openai/glow's ``f()``, the network of
    "the original Glow code" Shibata et al. ran: conv3 (no bias) -> ActNorm -> ReLU -> conv1 (no
    bias) -> ActNorm -> ReLU -> :class:`ZeroConv` (zero-init conv3 with a learned log-scale,
    factor 3). Hidden weights ~ N(0, 0.05^2) as openai's ``default_initializer``; openai's
    edge-padding channel is not reproduced. Either way the last layer is zero, so at the start
    NN() = 0 for every input: shift 0 and the constant scale s(0) (identity up to that scale).
    ReLUs are in-place (one saved activation fewer per step).
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, dims: int = 2,
                 style: str = "normflows"):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        if style == "normflows":
            last = conv(hidden_channels, out_channels, 3, padding=1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.net = nn.Sequential(
                conv(in_channels, hidden_channels, 3, padding=1),
                nn.ReLU(inplace=True),
                conv(hidden_channels, hidden_channels, 1),
                nn.ReLU(inplace=True),
                last,
            )
        elif style == "openai":
            c1 = conv(in_channels, hidden_channels, 3, padding=1, bias=False)
            c2 = conv(hidden_channels, hidden_channels, 1, bias=False)
            for c in (c1, c2):
                nn.init.normal_(c.weight, std=0.05)
            self.net = nn.Sequential(
                c1, ActNormLayer(hidden_channels, dims), nn.ReLU(inplace=True),
                c2, ActNormLayer(hidden_channels, dims), nn.ReLU(inplace=True),
                ZeroConv(hidden_channels, out_channels, dims),
            )
        else:
            raise ValueError(f"glow.coupling_net={style!r} is not one of {COUPLING_NETS}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AffineCoupling(nf.flows.AffineCoupling):
    """normflows' affine coupling with the scale map of Shibata et al. (or Glow's) and optional
    gradient checkpointing of the coupling network.

    Data -> latent (``inverse``): z2' = (z2 - shift) * scale, log|det| = sum log scale
    (eqs. B.6-B.7 of the paper); shift = h[:, 0::2], scale = coupling_scale(h[:, 1::2]) as in
    normflows. scale and the log-det are computed in float32 even under autocast.
    """

    def __init__(self, param_map: nn.Module, scale_map: str = "paper", checkpointing: bool = False):
        if scale_map not in SCALE_MAPS:
            raise ValueError(f"coupling scale map {scale_map!r} is not one of {SCALE_MAPS}")
        super().__init__(param_map, scale=True, scale_map=scale_map)
        self.checkpointing = checkpointing
        # Set by Glow.log_prob_map: keep log scale summed over channels, (B, *spatial), of the
        # last data -> latent pass (the per-position part of this coupling's log-det).
        self.record_positions = False
        self.position_log_det: torch.Tensor | None = None

    def _shift_scale(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.checkpointing and torch.is_grad_enabled():
            if checkpoint_input_observer is not None:
                checkpoint_input_observer(z1)
            h = checkpoint(self.param_map, z1, use_reentrant=False, preserve_rng_state=False)
        else:
            h = self.param_map(z1)
        h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        return h[:, 0::2], coupling_scale(h[:, 1::2], self.scale_map)

    def forward(self, z):  # latent -> data
        z1, z2 = z
        shift, scale = self._shift_scale(z1)
        z2 = z2 / scale + shift
        return [z1, z2], -_sum_per_sample(torch.log(scale))

    def inverse(self, z):  # data -> latent
        z1, z2 = z
        shift, scale = self._shift_scale(z1)
        z2 = (z2 - shift) * scale
        log_scale = torch.log(scale)
        if self.record_positions:
            self.position_log_det = log_scale.sum(1)  # (B, *spatial)
        return [z1, z2], _sum_per_sample(log_scale)


class AffineCouplingBlock(nf.flows.Flow):
    """Split channels in half (normflows' ``Split('channel')``), couple, merge back."""

    def __init__(self, channels: int, hidden_channels: int, dims: int = 2,
                 scale_map: str = "paper", checkpointing: bool = False,
                 net_style: str = "normflows"):
        super().__init__()
        if channels < 2:
            raise ValueError("affine coupling needs >= 2 channels: squeeze the input first")
        c1, c2 = (channels + 1) // 2, channels // 2  # torch.chunk's split
        net = CouplingNet(c1, hidden_channels, 2 * c2, dims, net_style)
        self.split = nf.flows.Split("channel")
        self.coupling = AffineCoupling(net, scale_map, checkpointing)

    def forward(self, z):
        z12, _ = self.split(z)
        (z1, z2), log_det = self.coupling(z12)
        return torch.cat([z1, z2], 1), log_det

    def inverse(self, z):
        z12, _ = self.split(z)
        (z1, z2), log_det = self.coupling.inverse(z12)
        return torch.cat([z1, z2], 1), log_det


def _conv1x1(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 (2D) or 1x1x1 (3D) convolution with a (C_out, C_in) matrix."""
    if x.dim() == 4:
        return F.conv2d(x, w[..., None, None], bias)
    return F.conv3d(x, w[..., None, None, None], bias)


class GlowStep(nf.flows.Flow):
    """One step of flow: ActNorm -> invertible 1x1 conv -> affine coupling (data -> latent),
    the order of openai/glow and of normflows' ``GlowBlock`` (which lists it latent -> data).

    ``fused=True`` applies ActNorm and the 1x1 convolution in the data -> latent direction as one
    convolution with weight W diag(exp(-s)) and bias -W diag(exp(-s)) t: one pass over the
    activations and one saved tensor fewer per step, same function (tested).
    """

    def __init__(self, channels: int, hidden_channels: int, dims: int = 2,
                 scale_map: str = "paper", checkpointing: bool = False, fused: bool = True,
                 net_style: str = "normflows"):
        super().__init__()
        self.channels, self.dims, self.fused = channels, dims, fused
        self.actnorm = ActNorm((channels,) + (1,) * dims)
        with warnings.catch_warnings():  # normflows' LU init calls the deprecated torch.lu
            warnings.simplefilter("ignore", UserWarning)
            if dims == 2:
                self.invconv = nf.flows.Invertible1x1Conv(channels, use_lu=True)
            else:
                from .layers3d import InvertibleConv1x1x1

                self.invconv = InvertibleConv1x1x1(channels)
        self.coupling = AffineCouplingBlock(channels, hidden_channels, dims, scale_map,
                                            checkpointing, net_style)

    def forward(self, z):  # latent -> data
        z, ld_c = self.coupling(z)
        z, ld_w = self.invconv(z)
        z, ld_a = self.actnorm(z)
        return z, ld_c + ld_w + ld_a

    def inverse(self, z):  # data -> latent
        if self.fused and self.actnorm.initialized:
            a = self.actnorm
            w = self.invconv._assemble_W()  # (C, C): the data -> latent matrix P L U
            e = torch.exp(-a.s).reshape(-1)  # (C,)
            w = w * e[None, :]
            bias = -(w @ a.t.reshape(-1))
            z_in = z
            z = _conv1x1(z_in, w.to(z_in.dtype), bias.to(z_in.dtype))
            n_pix = z_in.shape[2:].numel()
            ld = n_pix * (torch.sum(self.invconv.log_S) - torch.sum(a.s))
        else:
            z, ld_a = self.actnorm.inverse(z)
            z, ld_w = self.invconv.inverse(z)
            ld = ld_a + ld_w
        z, ld_c = self.coupling.inverse(z)
        return z, ld + ld_c
