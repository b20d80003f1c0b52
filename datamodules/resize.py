"""Resizing of images, masks and volumes to the configured input size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_2d(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of a (H, W) float image; values stay in
    the input range."""
    h, w = (size, size) if isinstance(size, int) else size
    if img.shape == (h, w):
        return img.astype(np.float32, copy=False)
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]  # (1,1,H,W)
    y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    lo, hi = float(img.min()), float(img.max())
    return y[0, 0].clamp_(lo, hi).numpy()


def resize_mask(mask: np.ndarray, size: int | tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D or 3D mask; returns bool."""
    shape = (size,) * mask.ndim if isinstance(size, int) else tuple(size)
    if mask.shape == shape:
        return mask.astype(bool, copy=False)
    x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    y = F.interpolate(x, size=shape, mode="nearest")
    return y[0, 0].numpy() > 0.5


def resize_3d(vol: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resample of a (D, H, W) float volume to ``shape`` (paper: 32x128x128)."""
    shape = tuple(int(s) for s in shape)
    if vol.shape == shape:
        return vol.astype(np.float32, copy=False)
    x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]  # (1,1,D,H,W)
    y = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return y[0, 0].numpy()
