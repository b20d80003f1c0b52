"""SimCLR patch encoder as a plain torch model (Kim et al. 2023; Chen et al. 2020).

Kim, Moon, Lee et al., Sci Rep 2023 (https://doi.org/10.1038/s41598-023-30589-y): one SimCLR
encoder per patch size, "ResNet-50 ... h in R^2048", a two-layer MLP projection head
(z in R^128) and the NT-Xent loss (eq. 1). SimCLR: Chen et al., ICML 2020
(https://arxiv.org/abs/2002.05709). The projection head is discarded after training; the
detector uses h.
"""

from __future__ import annotations

import torch
import torchvision
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from lightning_modules.simclr.transforms import resize_batch

_FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def resnet_feature_map(net: nn.Module, x: torch.Tensor, layers: list[str] | tuple[str, ...],
                       pool: int = 3) -> torch.Tensor:
    """Dense mid-level features of a torchvision ResNet, PatchCore-style (Roth et al., CVPR
    2022, https://arxiv.org/abs/2106.08265): the maps of ``layers`` (each ``pool`` x ``pool``
    average-pooled, stride 1, so every position also sees its neighbours), deeper maps
    bilinearly resized to the shallowest one, concatenated along channels.

    (B, 1, S, S) -> (B, sum of the layers' channels, S/r, S/r), r = 4, 8, 16, 32 for
    layer1..layer4 (the shallowest layer named).
    """
    bad = [name for name in layers if name not in RESNET_LAYERS]
    if not layers or bad:
        raise ValueError(f"patch.dense_layers={list(layers)} must name some of {RESNET_LAYERS}")
    deepest = max(RESNET_LAYERS.index(name) for name in layers)
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    maps = {}
    for name in RESNET_LAYERS[:deepest + 1]:
        h = getattr(net, name)(h)
        maps[name] = h
    ordered = sorted(layers, key=RESNET_LAYERS.index)
    size = maps[ordered[0]].shape[-2:]
    out = []
    for name in ordered:
        f = maps[name]
        if pool > 1:
            f = nn.functional.avg_pool2d(f, pool, stride=1, padding=pool // 2,
                                         count_include_pad=False)
        if f.shape[-2:] != size:
            f = nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, 1)


def encoder_feature_dim(backbone: str) -> int:
    """Dimension of h for a backbone name (2048 for the paper's ResNet-50)."""
    if backbone not in _FEATURE_DIMS:
        raise ValueError(f"simclr.backbone={backbone!r} is not one of {sorted(_FEATURE_DIMS)}")
    return _FEATURE_DIMS[backbone]


def build_backbone(backbone: str) -> nn.Module:
    """torchvision ResNet (random init, no download) with a 1-channel stem and no classifier:
    (B, 1, S, S) -> (B, feat_dim)."""
    encoder_feature_dim(backbone)
    net = getattr(torchvision.models, backbone)(weights=None)
    # Grey-scale radiographs: one input channel instead of RGB, same geometry as torchvision.
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


class SimCLRModel(nn.Module):
    """Backbone f and projection head g of SimCLR: h = f(x), z = g(h)."""

    def __init__(self, backbone: str = "resnet50", proj_hidden_dim: int = 2048,
                 proj_out_dim: int = 128):
        super().__init__()
        self.feature_dim = encoder_feature_dim(backbone)
        self.backbone = build_backbone(backbone)
        # 2-layer MLP "z = W2 relu(W1 h)" (SimCLR v1), 2048 -> 2048 -> 128 for ResNet-50.
        self.projection_head = SimCLRProjectionHead(self.feature_dim, proj_hidden_dim,
                                                    proj_out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)  # (B, F)
        z = self.projection_head(h)  # (B, D)
        return h, z


class PatchEncoder(nn.Module):
    """The trained backbone alone: (B, 1, s, s) patches in [0, 1] -> (B, feat_dim) features h.

    Carries what the detector must check: ``patch_size``, ``input_size`` (patches are resized
    to it first when it differs), ``backbone``, ``feature_dim``.
    """

    def __init__(self, backbone: nn.Module, *, patch_size: int, backbone_name: str,
                 input_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.patch_size = int(patch_size)
        self.input_size = int(input_size or patch_size)
        self.backbone_name = backbone_name
        self.feature_dim = encoder_feature_dim(backbone_name)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (self.patch_size, self.patch_size):
            raise ValueError(
                f"This encoder was trained on (B, 1, {self.patch_size}, {self.patch_size}) "
                f"patches; got {tuple(x.shape)}. Use the encoder of the matching resolution."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.backbone(resize_batch(x, self.input_size))  # (B, F)

    def feature_map(self, x: torch.Tensor, layers: list[str] | tuple[str, ...] = ("layer2",),
                    pool: int = 3) -> torch.Tensor:
        """Dense features of the patches (see :func:`resnet_feature_map`): (B, C, m, m)."""
        self._check(x)
        return resnet_feature_map(self.backbone, resize_batch(x, self.input_size), layers, pool)
