"""Patch similarity functions of Kim, Moon, Lee et al., Sci Rep 2023 (multiresolution patch AD).

The anomaly score of a query patch is the *inverse of similarity* to its nearest normal
reference patch: the distance itself for Euclidean, Manhattan and Mahalanobis, ``1 - cos`` for
cosine. Every metric is reduced to one of three pairwise kernels on *prepared* features:

===========  ===================================================  ==================
distance     preparation (done once per feature set)              pairwise kernel
===========  ===================================================  ==================
euclidean    centre on the reference mean (numerical accuracy)    ``||q - r||_2``
mahalanobis  centre, then whiten with ``S^{-1/2}`` (one matmul)    ``||q - r||_2``
manhattan    centre                                               ``||q - r||_1``
cosine       L2-normalise                                         ``1 - q . r``
===========  ===================================================  ==================

``S`` is the sample covariance of the reference features of one patch size. With 2048-d
features and a few thousand patches it is singular, so it is regularised: Ledoit-Wolf style
shrinkage ``(1 - a) S + a tr(S)/p I`` (``patch.shrinkage = a``) or the pseudo-inverse
(``a = 0``: eigenvalues below ``rcond * max`` are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DISTANCES = ("euclidean", "manhattan", "cosine", "mahalanobis")


@dataclass
class FeatureTransform:
    """What :func:`prepare` applies to reference and query features of one patch size."""

    distance: str
    mean: torch.Tensor | None = None  # (D,)
    whitening: torch.Tensor | None = None  # (D, D) symmetric S^{-1/2}

    @property
    def kernel(self) -> str:
        """Pairwise kernel to use on prepared features: ``l2``, ``l1`` or ``cos``."""
        return {"euclidean": "l2", "mahalanobis": "l2", "manhattan": "l1", "cosine": "cos"}[
            self.distance
        ]

    def to(self, device: torch.device | str) -> FeatureTransform:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FeatureTransform(self.distance, move(self.mean), move(self.whitening))


def sample_covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased sample covariance of the rows of ``x`` (N, D) in float64 -> (D, D)."""
    x = x.double()
    xc = x - x.mean(0, keepdim=True)
    return xc.T @ xc / max(x.shape[0] - 1, 1)


def shrunk_covariance(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - a) S + a tr(S)/p I`` (Ledoit & Wolf 2004's target; ``a`` fixed, not estimated)."""
    p = cov.shape[0]
    mu = torch.trace(cov) / p
    return (1.0 - shrinkage) * cov + shrinkage * mu * torch.eye(p, dtype=cov.dtype)


def inverse_sqrt(cov: torch.Tensor, rcond: float = 1e-6) -> torch.Tensor:
    """Symmetric ``S^{-1/2}`` by eigendecomposition; pseudo-inverse for (near-)zero eigenvalues."""
    evals, evecs = torch.linalg.eigh(cov.double())
    keep = evals > rcond * evals.max().clamp_min(torch.finfo(torch.float64).tiny)
    inv_sqrt = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
    return (evecs * inv_sqrt) @ evecs.T


def mahalanobis_vi(ref: torch.Tensor, shrinkage: float, rcond: float = 1e-6) -> torch.Tensor:
    """The inverse covariance ``VI`` implied by :func:`fit_transform` (for tests / scipy)."""
    w = inverse_sqrt(shrunk_covariance(sample_covariance(ref), shrinkage), rcond)
    return w @ w


def fit_transform(ref: torch.Tensor, distance: str, shrinkage: float = 0.1,
                  rcond: float = 1e-6) -> FeatureTransform:
    """Fit the feature preparation for ``distance`` on the reference features ``ref`` (N, D)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not one of {list(DISTANCES)}")
    if distance == "cosine":
        return FeatureTransform(distance)
    mean = ref.double().mean(0).float()  # (D,)
    if distance != "mahalanobis":
        return FeatureTransform(distance, mean=mean)
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"patch.shrinkage={shrinkage} must lie in [0, 1]")
    cov = shrunk_covariance(sample_covariance(ref), shrinkage)  # (D, D) float64
    return FeatureTransform(distance, mean=mean, whitening=inverse_sqrt(cov, rcond).float())


def prepare(x: torch.Tensor, t: FeatureTransform) -> torch.Tensor:
    """Apply the fitted preparation to features ``x`` (N, D) -> (N, D') float32."""
    x = x.float()
    if t.distance == "cosine":
        return torch.nn.functional.normalize(x, dim=1)
    x = x - t.mean.to(x.device)
    if t.whitening is not None:
        x = x @ t.whitening.to(x.device)  # Mahalanobis = Euclidean after whitening
    return x


def pairwise(q: torch.Tensor, r: torch.Tensor, kernel: str) -> torch.Tensor:
    """Distances between prepared features ``q`` (Q, D) and ``r`` (R, D) -> (Q, R).

    ``l2`` uses the matmul expansion ``|q|^2 + |r|^2 - 2 q.r`` (what ``torch.cdist`` does for
    large inputs) and returns *squared* distances: callers take ``sqrt`` of the minima only.
    """
    if kernel == "l2":
        d2 = (q * q).sum(1, keepdim=True) + (r * r).sum(1)[None, :] - 2.0 * (q @ r.T)
        return d2.clamp_min_(0.0)
    if kernel == "l1":
        return torch.cdist(q, r, p=1.0)
    if kernel == "cos":
        return 1.0 - q @ r.T
    raise ValueError(f"unknown kernel {kernel!r}")


def finish(d: torch.Tensor, kernel: str) -> torch.Tensor:
    """Turn :func:`pairwise` values of the selected neighbours into anomaly scores."""
    return d.sqrt() if kernel == "l2" else d


def patch_distance(q: torch.Tensor, r: torch.Tensor, t: FeatureTransform) -> torch.Tensor:
    """Anomaly score between raw features ``q`` (Q, D) and ``r`` (R, D) -> (Q, R)."""
    return finish(pairwise(prepare(q, t), prepare(r, t), t.kernel), t.kernel)
