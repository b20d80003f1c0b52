"""Two reference detectors that need no training (README "Detection benchmark": every quality
claim is made next to them, measured in the same run on the same images).

Both are pure functions on numpy arrays of images in a common shape: 2D ``(N, H, W)`` or 3D
``(N, D, H, W)``, intensities as the methods see them (e.g. [0, 1]; brain window / 127 for
head CT). Both return ``(scores (N,), maps)``; higher = more anomalous.

**Per-pixel z-score** (:func:`zscore_scores`). Mean image ``mu`` and per-pixel standard
deviation ``sigma`` (ddof = 0) over the normal training images; ``sigma`` is floored at
``std_floor`` times its mean over the pixels (constant background would otherwise give
``0 / 0`` or huge z from a single grey level). Map = ``|x - mu| / max(sigma, floor)``; image
score = mean of the top ``top_fraction`` (1 %, at least one pixel) of the map.

**Random-init CNN feature-map nearest neighbour** (:func:`cnn_nn_scores`). A torchvision
ResNet-18 with ``weights=None`` (random init, ``torch.manual_seed(seed)``), its stem changed
to one input channel, cut after ``layer2`` (stride 8, 128 channels), in eval mode (BatchNorm
with its initial running statistics, i.e. identity). Each 2D image (each axial slice of a
volume) is bilinearly resized to ``input_size``² and mapped to a ``(128, s, s)`` feature map,
``s = input_size / 8``. A query feature at grid cell ``(i, j)`` scores by its Euclidean
distance to the nearest reference feature (every position of every normal training image)
within Chebyshev distance ``d`` on the grid
(:func:`lightning_modules.patch_detector.locality.locality_nearest`, the patch detector's
exact search); 3D: the reference features are those of slices ``z - depth_window .. z +
depth_window`` of the training volumes (same in-plane window), i.e. a Chebyshev box of
``(depth_window, d, d)`` cells. Map = the distances on the feature grid ``(N, s, s)`` /
``(N, D, s, s)``; image score = its maximum.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from lightning_modules.patch_detector.distances import fit_transform, prepare
from lightning_modules.patch_detector.locality import locality_nearest


def _stack(images: np.ndarray | list, what: str) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"{what}: expected (N, H, W) or (N, D, H, W) images, got {x.shape}")
    return x


# --- per-pixel z-score ----------------------------------------------------------------------
def zscore_fit(train: np.ndarray, std_floor: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Mean image and floored per-pixel SD of the normal training images -> (mu, sigma)."""
    x = _stack(train, "zscore_fit").astype(np.float64)
    mu, sd = x.mean(0), x.std(0)
    floor = max(std_floor * float(sd.mean()), 1e-6)
    return mu, np.maximum(sd, floor)


def zscore_maps(images: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``|x - mu| / sigma`` per pixel (voxel), same shape as ``images``."""
    x = _stack(images, "zscore_maps").astype(np.float64)
    if x.shape[1:] != mu.shape:
        raise ValueError(f"zscore_maps: images {x.shape[1:]} vs mean image {mu.shape}")
    return (np.abs(x - mu) / sigma).astype(np.float32)


def top_fraction_mean(maps: np.ndarray, top_fraction: float = 0.01) -> np.ndarray:
    """Mean of the largest ``top_fraction`` values of each map (at least one) -> (N,)."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(math.ceil(top_fraction * flat.shape[1])))
    return np.sort(flat, axis=1)[:, -k:].mean(1)


def zscore_scores(train: np.ndarray, test: np.ndarray, top_fraction: float = 0.01,
                  std_floor: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel z-score baseline: ``(scores (N,), |z| maps like test)``."""
    mu, sigma = zscore_fit(train, std_floor)
    maps = zscore_maps(test, mu, sigma)
    return top_fraction_mean(maps, top_fraction), maps


# --- random-init CNN feature-map nearest neighbour ------------------------------------------
def random_cnn(seed: int = 0) -> torch.nn.Module:
    """ResNet-18 (random init, seeded) with a 1-channel stem, cut after layer2; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.resnet18(weights=None)
        net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        torch.nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    body = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1,
                               net.layer2)
    return body.eval().requires_grad_(False)


@torch.no_grad()
def cnn_feature_maps(images2d: np.ndarray, net: torch.nn.Module, input_size: int = 128,
                     batch_size: int = 64) -> torch.Tensor:
    """(N, H, W) images -> (N, 128, s, s) layer-2 feature maps, ``s = input_size / 8``."""
    out = []
    for i in range(0, len(images2d), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images2d[i:i + batch_size]))[:, None]
        if x.shape[-2:] != (input_size, input_size):
            shrink = x.shape[-1] > input_size
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear",
                              align_corners=False, antialias=shrink)
        out.append(net(x.float()))  # (B, 128, s, s)
    return torch.cat(out)


def _grid_cells(s_h: int, s_w: int) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(s_h), torch.arange(s_w), indexing="ij")
    return torch.stack([ii.reshape(-1), jj.reshape(-1)], 1)  # (s_h*s_w, 2)


def _as_rows(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, h, w) -> features (N*h*w, C) and their cells (N*h*w, 2), image-major."""
    n, c, h, w = f.shape
    return f.permute(0, 2, 3, 1).reshape(-1, c), _grid_cells(h, w).repeat(n, 1)


def cnn_nn_scores(train: np.ndarray, test: np.ndarray, d: int = 1, input_size: int = 128,
                  depth_window: int = 1, seed: int = 0,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Random-init CNN nearest-neighbour baseline: ``(scores (N,), maps)``, maps on the
    feature grid ``(N, s, s)`` (2D) or ``(N, D, s, s)`` (3D); see the module docstring."""
    train, test = _stack(train, "cnn_nn_scores"), _stack(test, "cnn_nn_scores")
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"cnn_nn_scores: train {train.shape[1:]} vs test {test.shape[1:]}")
    net = random_cnn(seed)
    is3d = train.ndim == 4
    depth = train.shape[1] if is3d else 1
    flat = (lambda v: v.reshape(-1, *v.shape[2:])) if is3d else (lambda v: v)
    ref = cnn_feature_maps(flat(train), net, input_size, batch_size)  # (Nr*D, C, s, s)
    qry = cnn_feature_maps(flat(test), net, input_size, batch_size)  # (Nq*D, C, s, s)
    c, s_h, s_w = ref.shape[1:]
    ref = ref.reshape(len(train), depth, c, s_h, s_w)
    qry = qry.reshape(len(test), depth, c, s_h, s_w)
    t = fit_transform(ref.permute(0, 1, 3, 4, 2).reshape(-1, c), "euclidean")
    maps = torch.empty(len(test), depth, s_h, s_w)
    dz = depth_window if is3d else 0
    for z in range(depth):
        r, r_cells = _as_rows(ref[:, max(z - dz, 0):z + dz + 1].reshape(-1, c, s_h, s_w))
        q, q_cells = _as_rows(qry[:, z])
        dist, _ = locality_nearest(prepare(q, t), q_cells, prepare(r, t), r_cells, d, t.kernel)
        maps[:, z] = dist.reshape(len(test), s_h, s_w)
    maps_np = maps.numpy() if is3d else maps[:, 0].numpy()
    return maps_np.reshape(len(test), -1).max(1), maps_np
