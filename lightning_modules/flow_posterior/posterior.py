"""The flow posterior as pure functions (no models, no Trainer).

H. Shibata, S. Hanaoka, Y. Nomura et al., *Versatile anomaly detection method for medical images
with semi-supervised flow-based generative models*, https://arxiv.org/abs/2001.07847 (IJCARS 2021).

Bayes' theorem with M0 = a flow trained on S_normal (models p(x|normal)) and M1 = a flow trained
on the unlabeled S_mixture (models p(x))::

    log p(normal|x) = log p(x|normal) + log p(normal) - log p(x)
                    = log p(x|M0) - log p(x|M1) + const            (paper, eq. 3)

The constant log p(normal) is the same for every image and does not change any ranking, so the
AUROC does not depend on it; it is 0 unless given. The anomaly score is -log p(normal|x) (higher
= more anomalous). The likelihood-only baseline -log p(x|M0) (paper, Appendix A) is dominated by
the image background: both models assign the same high density to empty (zero) pixels, and the
difference of the two log-likelihoods cancels it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

# Hyper-parameters that define what a model's input is. Two models whose log-likelihoods are
# subtracted must agree on all of them; otherwise the difference compares different things.
PREPROCESSING_KEYS: tuple[str, ...] = (
    "input_shape", "n_bits", "modality", "image_size", "volume_size", "align", "intensity_norm",
)


class PreprocessingMismatch(ValueError):
    """M0, M1 and the data configuration disagree on how an image enters the model."""


def log_posterior(log_p_m0: ArrayLike, log_p_m1: ArrayLike,
                  log_prior_normal: float = 0.0) -> ArrayLike:
    """log p(normal|x) = log p(x|M0) - log p(x|M1) + log p(normal) (paper, eq. 3), in nats."""
    if log_p_m0.shape != log_p_m1.shape:
        raise ValueError(
            f"log p(x|M0) and log p(x|M1) must have the same shape, got "
            f"{tuple(log_p_m0.shape)} and {tuple(log_p_m1.shape)}"
        )
    return log_p_m0 - log_p_m1 + log_prior_normal


def posterior_score(log_post: ArrayLike) -> ArrayLike:
    """Anomaly score = -log p(normal|x): higher = more anomalous."""
    return -log_post


def likelihood_score(log_p_m0: ArrayLike) -> ArrayLike:
    """The likelihood-only baseline -log p(x|M0) (paper, Appendix A)."""
    return -log_p_m0


def zero_fraction(images: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Fraction of pixels (voxels) per item that quantise to 0 at ``n_bits`` (Appendix A, Fig. A.20).

    ``images``: (B, C, H, W) or (B, C, D, H, W) in [0, 1]. A pixel counts as zero when it would
    be stored as 0 at the model's bit depth (< half a quantisation step), so resampling does not
    turn an empty background into "non-zero" values like 1e-7.
    """
    step = 1.0 / (2**n_bits - 1)
    flat = images.reshape(images.shape[0], -1)  # (B, N)
    return (flat < 0.5 * step).float().mean(dim=1)  # (B,)


def bits_per_dim(log_p: ArrayLike, n_dims: int, n_bits: int = 8) -> ArrayLike:
    """Bits per dimension of a discrete image with ``n_bits`` levels, from log p(x) in nats of the
    continuous density on [0, 1]^n_dims: bpd = (-log p(x) / n_dims + n_bits log 2) / log 2."""
    return (-log_p / n_dims + n_bits * np.log(2.0)) / np.log(2.0)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings / dataclasses / OmegaConf configs -> {"a.b.c": leaf}."""
    if hasattr(tree, "__dataclass_fields__"):
        tree = {k: getattr(tree, k) for k in tree.__dataclass_fields__}
    if not isinstance(tree, Mapping):
        try:  # DictConfig
            from omegaconf import DictConfig, OmegaConf

            if isinstance(tree, DictConfig):
                tree = OmegaConf.to_container(tree, resolve=True)
        except ImportError:  # pragma: no cover
            pass
    if not isinstance(tree, Mapping):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _normalise(value: Any) -> Any:
    if isinstance(value, torch.Size | list | tuple):
        return tuple(_normalise(v) for v in value)
    if hasattr(value, "__iter__") and not isinstance(value, str | bytes | Mapping):
        return tuple(_normalise(v) for v in value)  # ListConfig
    return value


def preprocessing_signature(hparams: Any) -> dict[str, Any]:
    """The preprocessing a model was trained with, read from its (nested) hyper-parameters.

    Looks for the leaves named in :data:`PREPROCESSING_KEYS` at any depth (``n_bits`` may sit
    under ``glow``, ``image_size`` under ``data``). Only the size that applies to the modality is
    kept: ``image_size`` for 2D (cxr), ``volume_size`` for 3D (bct). Keys not found are absent.
    """
    flat = _flatten(hparams)
    found: dict[str, Any] = {}
    for key in PREPROCESSING_KEYS:
        hits = {k: v for k, v in flat.items() if k == key or k.endswith("." + key)}
        if not hits:
            continue
        # The shallowest occurrence wins (a top-level input_shape over a nested one).
        best = min(hits, key=lambda k: k.count("."))
        found[key] = _normalise(hits[best])
    modality = found.get("modality")
    if modality == "cxr":
        found.pop("volume_size", None)
    elif modality == "bct":
        found.pop("image_size", None)
    return found


def check_same_preprocessing(signatures: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise :class:`PreprocessingMismatch` naming every key on which the signatures disagree.

    ``signatures``: {"M0": {...}, "M1": {...}, "data config": {...}}. A key is compared among the
    signatures that have it; a key only one of them has is not an error (nothing to compare).
    """
    names = list(signatures)
    keys = sorted({k for s in signatures.values() for k in s})
    problems = []
    for key in keys:
        values = {n: signatures[n][key] for n in names if key in signatures[n]}
        if len(set(map(repr, values.values()))) > 1:
            problems.append(f"{key} (" + ", ".join(f"{n}: {v!r}" for n, v in values.items()) + ")")
    if problems:
        raise PreprocessingMismatch(
            "The flow posterior subtracts log-likelihoods of the same input under two models, "
            f"so {', '.join(names)} must share their preprocessing, but they differ in: "
            + "; ".join(problems)
            + ". Train M0 and M1 with the same data/glow settings (delete OUT/m0 or OUT/m1 to "
            "retrain one), or score with the data settings the models were trained with."
        )


# --- Local score and anomaly map (our addition; Shibata et al. score whole images only) -------



def anomaly_map(map_m0: ArrayLike, map_m1: ArrayLike, sigma: float = 0.0) -> np.ndarray:
    """Flow anomaly map A = G_sigma * (l1 - l0), (B, *spatial) float64.

    ``map_m0`` / ``map_m1``: (B, *spatial) per-pixel (per-voxel) contributions to log p(x|M0)
    and log p(x|M1) (``GlowModule.log_likelihood_map``; each sums to the model's log p(x),
    except after glow.align's resampling back onto the image).
    Without smoothing (sigma = 0, no glow.align) A sums over the pixels to -log p(normal|x)
    (eq. 3, up to the constant), so a high value marks where the mixture model explains the image better than
    the normal model. ``sigma``: standard deviation in pixels of a Gaussian applied over the
    spatial axes only (scipy.ndimage.gaussian_filter, reflecting borders).
    """
    a = np.asarray(map_m1, dtype=np.float64) - np.asarray(map_m0, dtype=np.float64)
    if sigma > 0:
        from scipy.ndimage import gaussian_filter

        a = gaussian_filter(a, sigma=(0.0, *(sigma,) * (a.ndim - 1)), mode="reflect")
    return a


def likelihood_map(map_m0: ArrayLike, sigma: float = 0.0) -> np.ndarray:
    """The likelihood-only map G_sigma * (-l0), (B, *spatial) float64: per-pixel contributions
    to -log p(x|M0) (Appendix A's score, per position); sums to -log p(x|M0) without
    smoothing. Our option (glow.map_source=likelihood)."""
    a0 = np.asarray(map_m0, dtype=np.float64)
    return anomaly_map(a0, np.zeros_like(a0), sigma)


def interior_mask(images: ArrayLike, n_bits: int = 8) -> np.ndarray:
    """Pixels (voxels) strictly inside the intensity window, (B, *spatial) bool: quantised
    neither to 0 nor to the top level 2^n - 1, then eroded by one pixel along each spatial axis
    (scipy.ndimage.binary_erosion, cross-shaped). For the brain window: brain and soft tissue
    without the background (0) and the bone (clipped to 127), nor the partial-volume rims
    between them. ``images``: (B, C, *spatial) in [0, 1], C = 1."""
    from scipy.ndimage import binary_erosion

    x = np.asarray(images, dtype=np.float64)
    x = x.reshape(x.shape[0], *x.shape[2:])  # (B, *spatial)
    top = 2**n_bits - 1
    k = np.round(np.clip(x, 0.0, 1.0) * top)
    inside = (k > 0) & (k < top)
    return np.stack([binary_erosion(v, iterations=1) for v in inside]) if len(x) else inside


def position_statistics(maps: ArrayLike, sd_floor_quantile: float = 0.1,
                        valid: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean and standard deviation of the maps of normal images, (*spatial) each
    (our option glow.map_norm=position). The SD is floored at its ``sd_floor_quantile``
    quantile over positions (plus 1e-9), so near-constant positions (the empty background)
    cannot turn a tiny difference into a huge z. ``valid`` (N, *spatial) bool: only these
    entries count (glow.align: the positions each image's registration reached); a position
    valid in fewer than 2 maps gets mean 0 and the floored SD."""
    a = np.asarray(maps, dtype=np.float64)  # (N, *spatial)
    if len(a) < 2:
        raise ValueError(f"position statistics need at least 2 normal maps, got {len(a)}")
    if valid is None:
        mean, sd = a.mean(axis=0), a.std(axis=0)
        return mean, np.maximum(sd, np.quantile(sd, sd_floor_quantile) + 1e-9)
    w = np.asarray(valid, dtype=bool)
    n = w.sum(axis=0)
    seen = n >= 2
    if not seen.any():
        raise ValueError("position statistics: no position is valid in 2 or more normal maps")
    mean = np.where(w, a, 0.0).sum(axis=0) / np.maximum(n, 1)
    sd = np.sqrt(np.where(w, (a - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n, 1))
    floor = np.quantile(sd[seen], sd_floor_quantile) + 1e-9
    return np.where(seen, mean, 0.0), np.where(seen, np.maximum(sd, floor), floor)


def normalise_map(amap: ArrayLike, mean: ArrayLike, sd: ArrayLike) -> np.ndarray:
    """z = (A - mean) / sd per position: how unusual each position is compared with normal
    images at that position. (B, *spatial)."""
    return (np.asarray(amap, dtype=np.float64) - np.asarray(mean)) / np.asarray(sd)


def map_score(amap: ArrayLike, top_fraction: float = 0.01,
              region: ArrayLike | None = None) -> np.ndarray:
    """Image score from an anomaly map: the mean of its highest ``top_fraction`` of pixels
    (at least one pixel: the maximum), (B,). Higher = more anomalous. ``region``: (B, *spatial)
    bool; only these pixels count (an image with an empty region falls back to all pixels)."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    flat = np.asarray(amap, dtype=np.float64).reshape(len(amap), -1)  # (B, N)
    if region is None:
        k = max(1, int(round(top_fraction * flat.shape[1])))
        return np.sort(flat, axis=1)[:, -k:].mean(axis=1)
    keep = np.asarray(region, dtype=bool).reshape(len(amap), -1)
    out = np.empty(len(flat))
    for i, (v, m) in enumerate(zip(flat, keep, strict=True)):
        v = v[m] if m.any() else v
        k = max(1, int(round(top_fraction * v.size)))
        out[i] = np.sort(v)[-k:].mean()
    return out
