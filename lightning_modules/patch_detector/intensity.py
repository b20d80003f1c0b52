"""Per-image intensity normalisation before the patch encoders (not in Kim et al. 2023).

The paper feeds raw intensities. Exposure, gamma and body habitus then move every patch
feature of an image together, and the image score follows the image's brightness (issue 11:
Spearman +0.4 to +0.7 with the mean body intensity). ``percentile`` maps each image's own
``low``-th and ``high``-th intensity percentiles to 0 and 1 (clipped), i.e. a robust
window/level per image, the usual first step of radiograph pre-processing. ``rank`` maps
each pixel to its mid-rank among its own image's pixels, ``(#{< v} + #{= v} / 2) / N`` in
(0, 1) (histogram equalisation, ties kept): invariant to *any* increasing intensity map, so
a gain, offset or gamma change of the exposure leaves the encoders' input unchanged, while a
lesion brighter than its surroundings stays brighter.
"""

from __future__ import annotations

import torch

from lightning_modules.patch_detector.config import INTENSITY_NORMS


def intensity_normalize(images: torch.Tensor, mode: str = "none", low: float = 1.0,
                        high: float = 99.0) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> same shape; ``none`` returns the input unchanged."""
    if mode not in INTENSITY_NORMS:
        raise ValueError(f"patch.intensity_norm={mode!r} is not one of {list(INTENSITY_NORMS)}")
    if mode == "none":
        return images
    if mode == "rank":
        return rank_normalize(images)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 <= low ({low}) < high ({high}) <= 100")
    flat = images.flatten(1).float()  # (B, H*W)
    q = torch.quantile(flat, torch.tensor([low / 100, high / 100], device=flat.device), dim=1)
    lo, hi = q[0][:, None, None, None], q[1][:, None, None, None]  # (B, 1, 1, 1)
    return ((images.float() - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)


def rank_normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> same shape: each value's mid-rank within its own image, in (0, 1)."""
    flat = images.reshape(images.shape[0], -1).float().contiguous()  # (B, N)
    srt = flat.sort(dim=1).values.contiguous()
    below = torch.searchsorted(srt, flat, right=False)  # #{< v}
    upto = torch.searchsorted(srt, flat, right=True)  # #{<= v}
    return ((below + upto).float() / (2 * flat.shape[1])).reshape(images.shape)
