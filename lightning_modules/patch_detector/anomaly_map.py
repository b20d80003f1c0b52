"""Anomaly maps and their fusion across patch sizes (Kim et al., Sci Rep 2023, eq. 6).

Per patch size ``s`` the map ``A(s)`` gives every pixel the score of its patch (with an
overlapping grid, ``patch.stride_fraction < 1``, the mean score of the patches covering it).
The paper fuses the maps by

    A_final = Normalize(w1 A(s1) ⊙ w2 A(s2) ⊙ ... ⊙ wk A(sk))                      (eq. 6)

and calls an image abnormal iff ``max A_final > 0.5``. The paper does not define Normalize;
here it is fitted on the validation set only, in two steps, so that scores are comparable
across images and runs and the 0.5 cut-off means something:

1. **Per-size scale.** Raw distances have arbitrary, size-dependent units (a Mahalanobis
   distance in 2048-d is ~45, a cosine score ~0.1), so each ``A(s)`` is divided by ``m_s``, the
   median score of validation *normal* patches of that size: ``Ã(s) = A(s) / m_s`` is ~1 on
   normal tissue whatever the distance. In a literal element-wise product the weights are then
   only a constant factor ``Π w_k`` that any normalisation removes, i.e. they would have no
   effect; ``patch.fusion=geometric`` (default) therefore applies them as exponents,
   ``Π Ã(s_k)^{w_k}``, i.e. a weighted sum of log-scores, where ``w_k`` is the relative
   influence of size ``s_k`` (w=0 drops it). ``patch.fusion=product`` is eq. 6 read literally,
   ``Π w_k Ã(s_k)``, for comparison. Both are computed in log space (no under/overflow).
2. **Calibration.** With ``F`` the fused log-map and ``r = max F`` an image's raw score,
   ``A_final = sigmoid((F - c) / σ)`` where ``c`` is the Youden-optimal cut-off of ``r`` on the
   validation images (the midpoint between the two raw scores it separates) and ``σ`` the
   standard deviation of ``r`` on the validation images. Hence ``A_final`` lies in (0, 1), the
   image score is ``max A_final = sigmoid((r - c)/σ)``, and ``score > 0.5`` reproduces exactly
   the validation Youden cut-off. Without abnormal validation images ``c`` is the 95th
   percentile of the normal ones (specificity 0.95 on validation).

``image_score=topk`` (our option, not the paper's) uses ``r`` = the mean of the top
``topk_fraction`` of ``F``'s blocks instead of its maximum; the image score is then
``sigmoid((r - c)/σ)`` (no longer exactly ``max A_final``), calibrated the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import reduce

import numpy as np
import torch

from lightning_modules.patch_detector.config import IMAGE_SCORES
from lightning_modules.thresholds import decision_threshold

FUSIONS = ("geometric", "product")

_EPS = 1e-6  # floor of Ã before the log: a perfect match (distance 0) stays finite


def map_block(image_size: int, sizes_and_strides: list[tuple[int, int]]) -> int:
    """Largest block ``g`` (pixels) on which every per-size map is constant: the gcd of the image
    size, the patch sizes and the strides. Maps are computed on the ``(H/g, W/g)`` block grid
    (exact, and 16x smaller than pixels for the paper's 128-pixel patches)."""
    return reduce(math.gcd, [image_size, *[v for pair in sizes_and_strides for v in pair]])


def patch_scores_to_map(scores: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, size: int,
                        image_size: int, block: int = 1) -> torch.Tensor:
    """A(s): each pixel gets its patch's score; overlapping patches are averaged.

    Args:
        scores: (B, N) patch scores of one size. xs, ys: (N,) top-left pixels of the patches.
        size: patch size; image_size: H = W; block: map resolution in pixels (see map_block).

    Returns:
        (B, image_size // block, image_size // block) float32. Pixels no patch covers (grid
        edges when the image side is not ``size + k*stride``) get the image's lowest score.
    """
    b, n = scores.shape
    m = image_size // block
    acc = torch.zeros(b, m, m, dtype=torch.float32, device=scores.device)
    cnt = torch.zeros(m, m, dtype=torch.float32, device=scores.device)
    k = size // block
    for i in range(n):
        y0, x0 = int(ys[i]) // block, int(xs[i]) // block
        acc[:, y0:y0 + k, x0:x0 + k] += scores[:, i, None, None].float()
        cnt[y0:y0 + k, x0:x0 + k] += 1
    covered = cnt > 0
    out = acc / cnt.clamp_min(1)
    if not bool(covered.all()):
        low = scores.float().min(1).values[:, None, None].expand_as(out)
        out = torch.where(covered, out, low)
    return out


def fuse_log_maps(maps: list[torch.Tensor], scales: list[float], weights: list[float],
                  fusion: str = "geometric") -> torch.Tensor:
    """log of the eq. 6 product on per-size-scaled maps (B, h, w) -> (B, h, w).

    geometric: Σ_k w_k log(A_k / m_k); product (literal eq. 6): Σ_k log(w_k A_k / m_k).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"patch.fusion={fusion!r} is not one of {list(FUSIONS)}")
    if not (len(maps) == len(scales) == len(weights)):
        raise ValueError("one scale and one weight per map")
    out = torch.zeros_like(maps[0], dtype=torch.float32)
    for a, m, w in zip(maps, scales, weights):
        rel = (a.float() / m).clamp_min(_EPS)
        if fusion == "geometric":
            out = out + w * torch.log(rel) if w != 0 else out
        else:
            if w <= 0:
                raise ValueError("patch.fusion=product needs positive weights")
            out = out + torch.log(w * rel)
    return out


def image_reduce(fused: torch.Tensor, how: str = "max", topk_fraction: float = 0.01
                 ) -> torch.Tensor:
    """Image score from a (B, h, w) map: its maximum (paper) or the mean of its top
    ``topk_fraction`` of blocks (at least one; ``topk``, our option: one extreme block, often a
    pose or edge artefact, no longer decides alone)."""
    if how not in IMAGE_SCORES:
        raise ValueError(f"patch.image_score={how!r} is not one of {list(IMAGE_SCORES)}")
    flat = fused.flatten(1)  # (B, h*w)
    if how == "max":
        return flat.max(1).values
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"patch.topk_fraction={topk_fraction} must lie in (0, 1]")
    k = max(1, int(round(topk_fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


@dataclass
class MapNormalizer:
    """Normalize of eq. 6, fitted on the validation set (see the module docstring)."""

    sizes: list[int]
    weights: list[float]
    fusion: str
    scales: list[float]  # m_s: median validation-normal patch score per size
    center: float = 0.0  # c: raw image-score cut-off (validation Youden)
    spread: float = 1.0  # σ: sd of validation raw image scores
    image_score: str = "max"  # max (paper) | topk (mean of the top topk_fraction blocks)
    topk_fraction: float = 0.01

    def fused_log_map(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return fuse_log_maps(maps, self.scales, self.weights, self.fusion)  # (B, h, w)

    def image_raw(self, fused: torch.Tensor) -> torch.Tensor:
        """Raw image score r of fused log-maps (B, h, w) -> (B,)."""
        return image_reduce(fused, self.image_score, self.topk_fraction)

    def normalize(self, fused: torch.Tensor) -> torch.Tensor:
        # float64: a float32 sigmoid saturates at 1 already 17 spreads above the cut-off,
        # which would tie the most anomalous images
        return torch.sigmoid((fused.double() - self.center) / self.spread)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MapNormalizer:
        return cls(**d)

    @classmethod
    def fit_scales(cls, normal_patch_scores: list[torch.Tensor], sizes: list[int],
                   weights: list[float], fusion: str, image_score: str = "max",
                   topk_fraction: float = 0.01) -> MapNormalizer:
        """Step 1: m_s from the validation normal patch scores of each size."""
        scales = []
        for s, sc in zip(sizes, normal_patch_scores):
            sc = sc.flatten().float()
            sc = sc[torch.isfinite(sc)]
            if sc.numel() == 0:
                raise ValueError(f"No validation normal patch scores for size {s}: the "
                                 "normalisation needs normal validation images.")
            m = float(sc.median())
            scales.append(m if m > 0 else float(sc.mean()) or 1.0)
        return cls(list(map(int, sizes)), list(map(float, weights)), fusion, scales,
                   image_score=image_score, topk_fraction=float(topk_fraction))

    def fit_calibration(self, raw_image_scores: np.ndarray, labels: np.ndarray) -> None:
        """Step 2: c (Youden on validation, or the normal 95th percentile) and σ."""
        r = np.asarray(raw_image_scores, dtype=np.float64)
        y = np.asarray(labels).astype(int)
        self.center, _ = decision_threshold(y, r, specificity=0.95)
        sd = float(np.std(r))
        self.spread = sd if sd > 0 else 1.0
