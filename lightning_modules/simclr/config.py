"""Schema of the ``simclr`` config section (SimCLR patch encoders, Kim et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimCLRConfig:
    patch_size: int = 256  # the resolution this encoder is trained for (RES=)
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 (h in R^2048 for resnet50)
    proj_hidden_dim: int = 2048
    proj_out_dim: int = 128
    temperature: float = 0.5  # paper silent; lightly's default
    crop_scale: float = 0.5  # random crop keeping 50 % of the patch (paper)
    rotation_deg: float = 5.0  # random rotation +-5 deg (paper)
    input_size: int | None = None  # resize patches to this before the encoder; None = patch_size
