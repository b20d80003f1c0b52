"""Schema of the ``simclr`` config section (SimCLR patch encoders, Kim et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SimCLRConfig:
    patch_size: int = 256  # the resolution this encoder is trained for (RES=)
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 (h in R^2048 for resnet50)
    proj_hidden_dim: int = 2048
    proj_out_dim: int = 128
    temperature: float = 0.5  # paper silent; lightly's default
    crop_scale: float = 0.5  # random crop keeping 50 % of the patch area (paper)
    # Upper bound of the kept area fraction; None = crop_scale (exactly 50 %, the paper's wording).
    crop_scale_max: float | None = None
    rotation_deg: float = 5.0  # random rotation +-5 deg (paper)
    # Intensity augmentation (ours; the paper has none): random brightness / contrast factors
    # in [1 - x, 1 + x] and gamma in [1/(1 + g), 1 + g]; 0 = off (paper).
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    # Per-image intensity normalisation of the training images (= patch.intensity_norm; set by
    # the patch pipeline so the encoder sees what the detector feeds it)
    intensity_norm: str = "none"
    input_size: int | None = None  # resize patches to this before the encoder; None = patch_size
    # Patch grid stride in pixels; None = patch_size (the paper's non-overlapping grid).
    stride: int | None = None
    # Keep the training/val images in memory (uint16) when they need at most this many GiB.
    cache_max_gb: float = 8.0
    # Validation: at most this many val patches (fixed random subset) for the
    # alignment / uniformity / kNN metrics; k of the kNN classifier.
    val_max_patches: int = 2048
    knn_k: int = 5
    val_seed: int = 0  # seeds the val views so the metrics are comparable across epochs
    channels_last: bool = False  # memory format for the encoder (faster convolutions on GPU)
    # Encode the 2B views of a batch this many at a time with activation checkpointing
    # (gradient caching): the exact NT-Xent over every negative with activation memory set by
    # the chunk (lightning_modules/simclr/chunked.py). Our addition: the paper does not say how
    # its batch of 256 patches at 512^2 / 1024^2 fitted; null = one pass (the paper's loss).
    chunk_size: int | None = None
    # chunk_size per patch size ({patch_size: chunk}) where simclr.chunk_size is null; the
    # paper profile sets it so every size fits 4 x 80 GB (configs/profiles/paper.yaml; ours).
    chunk_size_per_patch: dict[int, int] = field(default_factory=dict)


def resolved_chunk_size(simclr: Any) -> int | None:
    """simclr.chunk_size if set, else simclr.chunk_size_per_patch[patch_size], else None (one
    pass over all views)."""
    if simclr.chunk_size is not None:
        return int(simclr.chunk_size)
    per = simclr.chunk_size_per_patch or {}
    chunk = per.get(int(simclr.patch_size))
    return None if chunk is None else int(chunk)
