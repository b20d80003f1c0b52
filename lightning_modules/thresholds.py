"""Decision thresholds, chosen on validation data only (never on test), for both methods.

The rule everywhere is "abnormal iff score > t". The candidate cut-offs lie half-way between
consecutive distinct scores, so a score equal to a validation score is never on the boundary.

- :func:`youden_cutoff`: the cut-off maximising Youden's J = sensitivity + specificity - 1;
  among ties the largest (the more specific rule).
- :func:`decision_threshold`: Youden's cut-off when both classes are present, else the
  ``specificity`` quantile of the normal scores (e.g. a validation set of normals only).
"""

from __future__ import annotations

import numpy as np


def cut_points(scores: np.ndarray) -> np.ndarray:
    """Cut-offs of the rules ``score > t``, descending: the largest score (nothing flagged),
    then half-way between consecutive distinct scores; the last lies below the smallest score.
    Infinite scores get finite neighbours where one exists (a -inf score is never flagged)."""
    desc = np.unique(np.asarray(scores, dtype=np.float64))[::-1]  # (m,) distinct, descending
    if len(desc) > 1:
        lower = np.append(desc[1:], desc[-1] - (desc[-2] - desc[-1]))  # next lower neighbour
    else:
        lower = desc - 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        mid = (desc + lower) / 2.0
        mid = np.where(np.isfinite(mid), mid, desc + (lower - desc) / 2.0)  # overflow-safe
        mid = np.where(
            np.isfinite(mid), mid,
            np.where(np.isfinite(lower), lower,
                     np.where(np.isfinite(desc), desc - 1.0 - np.abs(desc),
                              np.where(desc > 0, 0.0, -np.inf))),
        )
    return np.concatenate([desc[:1], mid])


def youden_cutoff(labels: np.ndarray, scores: np.ndarray) -> float:
    """Cut-off ``c`` maximising TPR - FPR of the rule ``score > c`` (ties: the largest ``c``).
    Needs both classes. O(n log n): counts by binary search, no (cuts x scores) table."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    if not len(pos) or not len(neg):
        raise ValueError("Youden's cut-off needs normal and abnormal scores.")
    cuts = cut_points(s)
    tpr = (len(pos) - np.searchsorted(pos, cuts, side="right")) / len(pos)
    fpr = (len(neg) - np.searchsorted(neg, cuts, side="right")) / len(neg)
    j = tpr - fpr
    return float(cuts[int(np.flatnonzero(j >= j.max() - 1e-12)[0])])


def decision_threshold(labels: np.ndarray, scores: np.ndarray, specificity: float = 0.95
                       ) -> tuple[float, str]:
    """``(threshold, how it was chosen)`` from validation labels and scores."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if (y == 1).any() and (y == 0).any():
        return youden_cutoff(y, s), "Youden's J on val"
    if (y == 0).any():
        return (float(np.quantile(s[y == 0], specificity)),
                f"{100 * specificity:g}th percentile of val normals")
    raise ValueError("val has no normal images, so no decision threshold can be chosen "
                     "(never on test).")


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index (n,) in 0..k-1, each class dealt round-robin in a shuffled order."""
    y = np.asarray(labels).astype(int)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % k
    return fold


def cross_fitted_decisions(labels: np.ndarray, scores: np.ndarray, folds: np.ndarray,
                           specificity: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """For a data set without a separate validation set (e.g. the paper's 33 + 33 head CTs):
    each fold's threshold is chosen with :func:`decision_threshold` on the *other* folds and
    applied to the fold (``folds`` from :func:`stratified_folds`). Every case is decided, and no
    case's threshold saw its own label or score.

    Returns ``(abnormal, thresholds)``: the decisions (n,) bool and each case's threshold (n,)."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    folds = np.asarray(folds)
    if len(np.unique(folds)) < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    thresholds = np.empty(len(y), dtype=np.float64)
    for f in np.unique(folds):
        held = folds == f
        thresholds[held] = decision_threshold(y[~held], s[~held], specificity)[0]
    return s > thresholds, thresholds
