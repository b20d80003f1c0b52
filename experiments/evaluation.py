"""Shared evaluation for both methods: image-level and pixel-level metrics, folds, outputs.

Conventions used everywhere in this project:

* label 1 = abnormal (positive class), label 0 = normal;
* **higher score = more anomalous**;
* an item is predicted abnormal iff ``score > threshold`` (strictly greater).

Metrics (Kim et al., Sci Rep 2023, eqs. 7-10; https://doi.org/10.1038/s41598-023-40614-1)::

    accuracy    = (TP + TN) / (TP + TN + FP + FN)      (eq. 7)
    precision   = TP / (TP + FP)                        (eq. 8)
    sensitivity = TP / (TP + FN)                        (eq. 9, recall)
    specificity = TN / (TN + FP)                        (eq. 10)

plus AUROC and the ROC curve with Youden's cut-off J = TPR - FPR (Shibata et al., IJCARS 2021,
https://arxiv.org/abs/2001.07847). Confusion counts, ROC and AUROC are torchmetrics'; this
module adds what torchmetrics does not do for raw anomaly scores:

* torchmetrics treats float predictions outside [0, 1] as logits and applies a sigmoid.
  Anomaly scores are unbounded (-log p is ~1e5 nats for a 512² image) and the sigmoid would
  saturate them to ties at 1.0. Thresholded metrics therefore receive integer predictions
  ``score > threshold`` computed here; AUROC and ROC receive the dense ranks of the scores
  scaled into (0, 1], which keeps the order and the ties exactly, and ROC thresholds are mapped
  back to score units.
* Undefined ratios (e.g. precision with no predicted positives, AUROC with one class) are NaN
  with a logged warning, not 0 and not a crash.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.stats
import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc, binary_stat_scores

from lightning_modules.thresholds import cut_points, youden_cutoff

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "auroc",
    "auroc_ci",
    "accuracy",
    "precision",
    "sensitivity",
    "specificity",
    "threshold",
    "youden_threshold",
    "n_normal",
    "n_abnormal",
)


# --- input checks ---------------------------------------------------------------------------
def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_labels_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels int64 (N,), scores float64 (N,)); raise a clear error on bad input."""
    y = _as_numpy(labels).reshape(-1)
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = sorted({int(v) for v in np.unique(y)} - {0, 1})
        raise ValueError(
            f"labels must be 0 (normal) or 1 (abnormal); found {bad}. Unlabeled items (-1) "
            "cannot be evaluated: drop them before calling the evaluation."
        )
    n_nan = int(np.isnan(s).sum())
    if n_nan:
        raise ValueError(
            f"{n_nan} of {s.size} scores are NaN; the scoring step failed for these items "
            "(check the model / inputs), evaluation needs a finite or +-inf score for every item."
        )
    return y.astype(np.int64), s


def _dense_rank01(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores -> (ranks in (0, 1] with ties kept, sorted distinct scores ascending)."""
    distinct, inverse = np.unique(s, return_inverse=True)
    return (inverse + 1) / len(distinct), distinct


def _one_class(y: np.ndarray, what: str) -> bool:
    n_abn = int(y.sum())
    n_norm = int(y.size - n_abn)
    if n_abn == 0 or n_norm == 0:
        log.warning(
            "%s: only one class present (%d normal, %d abnormal); AUROC is undefined -> NaN.",
            what, n_norm, n_abn,
        )
        return True
    return False


# --- image-level metrics --------------------------------------------------------------------
def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve; ties count 1/2. NaN (with a warning) if only one class."""
    y, s = _check_labels_scores(labels, scores)
    if _one_class(y, "auroc"):
        return float("nan")
    ranks, _ = _dense_rank01(s)
    # validate_args=False: inputs are checked above; torchmetrics would re-scan them (slow on
    # millions of pooled pixels)
    return float(binary_auroc(torch.from_numpy(ranks), torch.from_numpy(y), validate_args=False))


def confusion(labels: Any, scores: Any, threshold: float) -> dict[str, int]:
    """TP, FP, TN, FN with ``abnormal iff score > threshold``."""
    y, s = _check_labels_scores(labels, scores)
    pred = torch.from_numpy((s > threshold).astype(np.int64))
    tp, fp, tn, fn, _ = binary_stat_scores(pred, torch.from_numpy(y)).tolist()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def roc_with_youden(
    labels: Any, scores: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """ROC curve and Youden's cut-off.

    Returns ``(fpr, tpr, thresholds, youden_threshold)``; the arrays run from (0, 0) to (1, 1).
    Point ``i`` is the (FPR, TPR) of the rule ``score > thresholds[i]`` (this project's rule),
    so ``thresholds[0]`` is the largest score (nothing predicted abnormal) and later thresholds
    lie half-way between consecutive distinct scores (robust when applied to new data).
    ``youden_threshold`` is the threshold maximising J = TPR - FPR; among ties, the largest
    threshold (the most specific rule). With one class only, all outputs are NaN.
    """
    y, s = _check_labels_scores(labels, scores)
    if _one_class(y, "roc_with_youden"):
        nan = np.array([np.nan])
        return nan, nan, nan, float("nan")
    ranks, _ = _dense_rank01(s)
    fpr_t, tpr_t, thr_rank = binary_roc(
        torch.from_numpy(ranks), torch.from_numpy(y), validate_args=False
    )
    fpr = fpr_t.double().numpy()
    tpr = tpr_t.double().numpy()
    # torchmetrics point k>=1 is the rule `rank >= thr_rank[k]`, i.e. `score >= v_k` with v_k
    # the k-th largest distinct score; point 0 (prepended by torchmetrics) predicts nothing:
    # the same rules as `score > t` for the cut points t (half-way to the next lower score).
    thresholds = cut_points(s)
    assert len(thresholds) == len(fpr) == len(thr_rank)
    return fpr, tpr, thresholds, youden_cutoff(y, s)


def binary_metrics(labels: Any, scores: Any, threshold: float) -> dict[str, Any]:
    """Image-level metrics at ``threshold`` (abnormal iff score > threshold), eqs. 7-10 + AUROC.

    Keys: auroc, auroc_ci ([low, high], 95 % DeLong: :func:`delong_ci`), accuracy, precision,
    sensitivity, specificity, threshold, youden_threshold, n_normal, n_abnormal, tp, fp, tn,
    fn. Ratios whose denominator is 0 are NaN (warned); so are CI bounds with < 2 items of a
    class.
    """
    y, s = _check_labels_scores(labels, scores)
    if y.size == 0:
        raise ValueError("binary_metrics: no items to evaluate (empty labels/scores)")
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("binary_metrics: threshold is NaN")
    pred = torch.from_numpy((s > threshold).astype(np.int64))  # (N,) 0/1, our strict rule
    target = torch.from_numpy(y)
    tp, fp, tn, fn, _ = (int(v) for v in binary_stat_scores(pred, target).tolist())

    def ratio(name: str, num: int, den: int) -> float:
        if den == 0:
            log.warning("%s is undefined (denominator 0 at threshold %g) -> NaN", name, threshold)
            return float("nan")
        return num / den

    # The counts are torchmetrics'; the ratios are formed here in float64 because torchmetrics
    # returns float32 (0.8333333134...). tests/unit/experiments/test_evaluation.py checks both agree with
    # binary_accuracy / binary_precision / binary_recall / binary_specificity.
    out = {
        "accuracy": ratio("accuracy", tp + tn, tp + tn + fp + fn),  # eq. 7
        "precision": ratio("precision", tp, tp + fp),  # eq. 8
        "sensitivity": ratio("sensitivity", tp, tp + fn),  # eq. 9
        "specificity": ratio("specificity", tn, tn + fp),  # eq. 10
    }
    if _one_class(y, "binary_metrics"):  # one warning, not one per derived metric
        auc = youden = float("nan")
        ci = [float("nan"), float("nan")]
    else:
        auc, youden = auroc(y, s), roc_with_youden(y, s)[3]
        ci = list(delong_ci(y, s)[1:3])
    out.update(
        auroc=auc,
        auroc_ci=ci,
        threshold=threshold,
        youden_threshold=youden,
        n_normal=int((y == 0).sum()),
        n_abnormal=int((y == 1).sum()),
        tp=tp, fp=fp, tn=tn, fn=fn,
    )
    return out


def _split_findings(finding: Any, sep: str | None) -> list[str]:
    if finding is None:
        return []
    if isinstance(finding, str):
        parts = finding.split(sep) if sep else [finding]
    elif isinstance(finding, Iterable):
        parts = [str(f) for f in finding]
    else:
        parts = [str(finding)]
    return [p.strip() for p in parts if p and p.strip()]


def per_finding_metrics(
    labels: Any,
    scores: Any,
    findings: Sequence[Any],
    threshold: float | None = None,
    sep: str | None = "|",
) -> dict[str, dict[str, Any]]:
    """AUROC of each finding's abnormal items against ALL normal items.

    ``findings[i]`` is a string (split on ``sep``, e.g. ``"effusion|nodule"``), a list of
    strings, or ``""``/None. Abnormal items without a finding are grouped as ``"unspecified"``;
    an item with several findings counts for each. Returns ``{finding: {"auroc", "n",
    "n_normal", "sensitivity"}}`` sorted by finding, where ``n`` is the number of abnormal items
    with that finding and ``sensitivity`` is measured at ``threshold`` (the global threshold;
    if None, the Youden cut-off of the whole set).
    """
    y, s = _check_labels_scores(labels, scores)
    if len(findings) != y.size:
        raise ValueError(f"findings has {len(findings)} entries for {y.size} labels/scores")
    if threshold is None:
        threshold = roc_with_youden(y, s)[3]
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(y == 1):
        names = _split_findings(findings[i], sep) or ["unspecified"]
        for name in dict.fromkeys(names):
            groups.setdefault(name, []).append(int(i))
    normal = np.flatnonzero(y == 0)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(groups):
        idx = np.asarray(groups[name])
        sel = np.concatenate([normal, idx])
        out[name] = {
            "auroc": auroc(y[sel], s[sel]),
            "n": int(idx.size),
            "n_normal": int(normal.size),
            "sensitivity": float((s[idx] > threshold).mean()) if idx.size else float("nan"),
        }
    return out


# --- uncertainty ----------------------------------------------------------------------------
# DeLong, DeLong & Clarke-Pearson, Biometrics 44 (1988): the AUROC is a two-sample U-statistic;
# its variance follows from the structural components V10 (one per abnormal item: the share of
# normals it outranks) and V01 (one per normal item: the share of abnormals that outrank it).
# Sun & Xu, IEEE Signal Process. Lett. 21 (2014), "Fast implementation of DeLong's algorithm":
# the components are differences of midranks, so everything is O(N log N) (three rankings).
class AurocCI(NamedTuple):
    """AUROC with its DeLong variance and ``level`` confidence interval (clipped to [0, 1])."""

    auroc: float
    low: float
    high: float
    variance: float


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return float(scipy.stats.norm.ppf(0.5 + level / 2.0))


def delong_components(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Midrank AUROCs and DeLong structural components of ``k`` score vectors on the same cases.

    ``scores`` is (N,) or (k, N). Returns ``(auc (k,), v10 (k, m), v01 (k, n))`` for the ``m``
    abnormal and ``n`` normal items: ``v10[r, i] = P(s_i > S_normal) + 0.5 P(s_i = S_normal)``
    and ``v01[r, j] = P(S_abnormal > s_j) + 0.5 P(S_abnormal = s_j)``; ``auc = mean(v10)``.
    """
    s2 = _as_numpy(scores).astype(np.float64)
    s2 = s2.reshape(1, -1) if s2.ndim == 1 else s2
    y, _ = _check_labels_scores(labels, s2[0])
    for row in s2[1:]:
        _check_labels_scores(y, row)
    pos, neg = s2[:, y == 1], s2[:, y == 0]  # (k, m), (k, n)
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        nan = np.full(len(s2), np.nan)
        return nan, np.zeros((len(s2), m)), np.zeros((len(s2), n))
    tx = scipy.stats.rankdata(pos, axis=1)  # midranks within the abnormals
    ty = scipy.stats.rankdata(neg, axis=1)  # midranks within the normals
    tz = scipy.stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # pooled midranks
    v10 = (tz[:, :m] - tx) / n  # (k, m): normals below each abnormal (ties 1/2)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # (k, n): abnormals above each normal (ties 1/2)
    auc = v10.mean(axis=1)
    return auc, v10, v01


def delong_covariance(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(auc (k,), cov (k, k))``: DeLong covariance ``S10 / m + S01 / n`` of k AUROCs.

    NaN where it is undefined (fewer than 2 items of a class).
    """
    auc, v10, v01 = delong_components(labels, scores)
    k, m, n = len(auc), v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        return auc, np.full((k, k), np.nan)
    s10 = np.atleast_2d(np.cov(v10))  # (k, k), ddof = 1 as in DeLong et al.
    s01 = np.atleast_2d(np.cov(v01))
    return auc, s10 / m + s01 / n


def delong_ci(labels: Any, scores: Any, level: float = 0.95) -> AurocCI:
    """AUROC with DeLong's asymptotic normal ``level`` CI ``auc ± z sqrt(var)``, clipped to
    [0, 1]. NaN bounds when a class has fewer than 2 items."""
    auc, cov = delong_covariance(labels, scores)
    a, var = float(auc[0]), float(cov[0, 0])
    if math.isnan(a) or math.isnan(var):
        return AurocCI(a, float("nan"), float("nan"), var)
    half = _z(level) * math.sqrt(max(var, 0.0))
    return AurocCI(a, max(0.0, a - half), min(1.0, a + half), var)


def delong_test(labels: Any, scores_a: Any, scores_b: Any) -> float:
    """Two-sided p-value of DeLong's paired test of AUROC(a) = AUROC(b) on the same cases.

    ``z = (A_a - A_b) / sqrt(var_a + var_b - 2 cov_ab)``; 1.0 when the two AUROCs are equal
    and the difference has no variance (e.g. identical or monotonically related scores).
    """
    auc, cov = delong_covariance(labels, np.stack([_as_numpy(scores_a).reshape(-1),
                                                   _as_numpy(scores_b).reshape(-1)]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if math.isnan(var) or math.isnan(diff):
        return float("nan")
    if var <= 1e-15:
        return 1.0 if abs(diff) < 1e-12 else 0.0
    return float(2.0 * scipy.stats.norm.sf(abs(diff) / math.sqrt(var)))


def bootstrap_auroc_ci(labels: Any, scores: Any, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Stratified-bootstrap percentile CI of the AUROC (cases resampled within each class)."""
    y, s = _check_labels_scores(labels, scores)
    if _one_class(y, "bootstrap_auroc_ci"):
        return float("nan"), float("nan")
    _z(level)
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    # all resamples at once: row b = (m resampled abnormals, n resampled normals)
    boot = np.concatenate([rng.choice(pos, size=(n_boot, pos.size)),
                           rng.choice(neg, size=(n_boot, neg.size))], axis=1)  # (B, m + n)
    y_b = np.r_[np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)]
    reps = delong_components(y_b, boot)[0]  # (B,)
    lo, hi = np.quantile(reps, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return float(lo), float(hi)


def roc_band(labels: Any, scores: Any, n_boot: int = 200, level: float = 0.95, seed: int = 0,
             n_grid: int = 101) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise ``level`` band of the ROC curve: ``(fpr_grid, tpr_low, tpr_high)`` from a
    stratified bootstrap (cases resampled within each class); the TPR of a resample at FPR f
    is that of the rule ``score > t`` with t its normals' upper f-quantile."""
    y, s = _check_labels_scores(labels, scores)
    grid = np.linspace(0.0, 1.0, n_grid)
    if _one_class(y, "roc_band"):
        nan = np.full(n_grid, np.nan)
        return grid, nan, nan.copy()
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    tprs = np.empty((n_boot, n_grid))
    for b in range(n_boot):
        p_b, n_b = rng.choice(pos, pos.size), rng.choice(neg, neg.size)
        t = np.quantile(n_b, 1.0 - grid)  # (G,) cut-offs with FPR ~ grid
        tprs[b] = (p_b[None, :] > t[:, None]).mean(1)
    tprs[:, -1] = 1.0  # FPR 1: everything flagged
    lo, hi = np.quantile(tprs, [0.5 - level / 2.0, 0.5 + level / 2.0], axis=0)
    return grid, lo, hi


def pixel_pair_counts(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(C (n, n), P (n,), N (n,))`` over the n images that have a mask: ``C[i, j]`` = number
    of (lesion pixel of image i, background pixel of image j) pairs with the lesion pixel
    scoring higher (ties 1/2); P, N = lesion / background pixels per image. The pooled pixel
    AUROC of a multiset of images with counts ``w`` is ``w^T C w / ((w . P)(w . N))``."""
    if isinstance(masks, np.ndarray | torch.Tensor) and isinstance(maps, np.ndarray | torch.Tensor):
        masks, maps = list(_as_numpy(masks)), list(_as_numpy(maps))
    pos, neg = [], []
    for m, a in zip(masks, maps):
        if m is None:
            continue
        m, a = _as_numpy(m) > 0, _as_numpy(a).astype(np.float64)
        if m.shape != a.shape:
            raise ValueError(f"pixel_pair_counts: mask shape {m.shape} != map shape {a.shape}")
        pos.append(a[m])
        neg.append(np.sort(a[~m]))
    n_img = len(pos)
    p_cnt = np.array([p.size for p in pos], dtype=np.float64)
    n_cnt = np.array([q.size for q in neg], dtype=np.float64)
    c = np.zeros((n_img, n_img))
    if n_img == 0 or p_cnt.sum() == 0:
        return c, p_cnt, n_cnt
    all_pos = np.concatenate(pos)
    owner = np.repeat(np.arange(n_img), p_cnt.astype(np.int64))
    for j, q in enumerate(neg):  # column j: lesion pixels of every image vs background of j
        if q.size == 0:
            continue
        left = np.searchsorted(q, all_pos, "left")
        below = left + 0.5 * (np.searchsorted(q, all_pos, "right") - left)
        c[:, j] = np.bincount(owner, weights=below, minlength=n_img)
    return c, p_cnt, n_cnt


def pixel_auroc_ci(masks: Any, maps: Any, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float]:
    """Bootstrap percentile CI of the pooled pixel AUROC (:func:`pixel_auroc`), resampling
    *images* (the independent units, not pixels), stratified by whether an image has lesion
    pixels. Each resample is exact without re-ranking (:func:`pixel_pair_counts`). Items whose
    mask is None are skipped, as in :func:`pixel_auroc`.
    """
    _z(level)
    c, p_cnt, n_cnt = pixel_pair_counts(masks, maps)
    if p_cnt.sum() == 0 or n_cnt.sum() == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n_img = len(p_cnt)
    w = np.zeros((n_boot, n_img))  # (B, n) resample counts per image
    rows = np.arange(n_boot)[:, None]
    for g in (np.flatnonzero(p_cnt > 0), np.flatnonzero(p_cnt == 0)):
        if g.size:
            np.add.at(w, (rows, g[rng.integers(0, g.size, size=(n_boot, g.size))]), 1.0)
    num = np.einsum("bi,ij,bj->b", w, c, w)
    den = (w @ p_cnt) * (w @ n_cnt)
    reps = num[den > 0] / den[den > 0]
    lo, hi = np.quantile(reps, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return float(lo), float(hi)


def sens_at_spec(val_labels: Any, val_scores: Any, test_labels: Any, test_scores: Any,
                 spec: float = 0.90) -> dict[str, float]:
    """Test sensitivity at the threshold that gives specificity ``spec`` on *validation* data.

    The threshold is the smallest validation-normal score ``t`` with
    ``mean(val_normal <= t) >= spec`` (abnormal iff score > t), so it never sees a test label.
    Returns ``{"sensitivity", "specificity", "threshold", "val_specificity"}`` (test values,
    the threshold, the specificity actually reached on validation).
    """
    if not 0.0 < spec < 1.0:
        raise ValueError(f"sens_at_spec: spec must be in (0, 1), got {spec}")
    yv, sv = _check_labels_scores(val_labels, val_scores)
    yt, st = _check_labels_scores(test_labels, test_scores)
    neg = np.sort(sv[yv == 0])
    if neg.size == 0:
        raise ValueError("sens_at_spec: no normal validation items to fix the threshold on")
    k = max(int(math.ceil(spec * neg.size - 1e-9)) - 1, 0)  # (k+1)/n >= spec
    t = float(neg[k])
    pos_t, neg_t = st[yt == 1], st[yt == 0]
    return {
        "sensitivity": float((pos_t > t).mean()) if pos_t.size else float("nan"),
        "specificity": float((neg_t <= t).mean()) if neg_t.size else float("nan"),
        "threshold": t,
        "val_specificity": float((neg <= t).mean()),
    }


def sensitivity_at_specificities(val_labels: Any, val_scores: Any, test_labels: Any,
                                  test_scores: Any, specs=(0.90, 0.95)) -> dict[str, float]:
    """``sens_at_spec_0.90`` / ``sens_at_spec_0.95``: test sensitivity at thresholds fixed on
    validation normals (:func:`sens_at_spec`); NaN without validation normals."""
    out = {}
    for spec in specs:
        try:
            out[f"sens_at_spec_{spec:.2f}"] = sens_at_spec(val_labels, val_scores, test_labels,
                                                           test_scores, spec)["sensitivity"]
        except ValueError:
            out[f"sens_at_spec_{spec:.2f}"] = float("nan")
    return out


def cross_fitted_metrics(labels: Any, scores: Any, k: int = 5, seed: int = 0
                         ) -> dict[str, Any]:
    """:func:`binary_metrics` for a data set without a validation set: the test cases are
    split into ``k`` stratified folds and each fold is decided by the threshold chosen on the
    other folds (``lightning_modules.thresholds.cross_fitted_decisions``: Youden's J), so no
    case's threshold saw its own label. ``sens_at_spec_*`` likewise (the other folds' normals
    fix each fold's threshold). AUROC and its CI do not depend on a threshold. ``threshold`` is
    the median of the fold thresholds (for display)."""
    from lightning_modules.thresholds import cross_fitted_decisions, stratified_folds

    y, s = _check_labels_scores(labels, scores)
    k = int(min(k, (y == 0).sum(), (y == 1).sum()))
    if k < 2:
        raise ValueError("cross-fitting needs at least 2 normal and 2 abnormal test cases")
    folds = stratified_folds(y, k, seed)
    _, thresholds = cross_fitted_decisions(y, s, folds)
    out = binary_metrics(y, s, float(np.median(thresholds)))
    decided = binary_metrics(y, s - thresholds, 0.0)  # the rule s > threshold of each case
    out.update({key: decided[key] for key in ("accuracy", "precision", "sensitivity",
                                               "specificity", "tp", "fp", "tn", "fn")})
    out["threshold_source"] = (f"cross-fitted on test ({k} stratified folds, each decided by "
                               "Youden's J on the other folds; no validation set)")
    for spec in (0.90, 0.95):
        hits = []
        for f in range(k):
            held = folds == f
            if (y[held] == 1).any():
                r = sens_at_spec(y[~held], s[~held], y[held], s[held], spec)
                hits.append((r["sensitivity"], int((y[held] == 1).sum())))
        out[f"sens_at_spec_{spec:.2f}"] = float(sum(a * n for a, n in hits) /
                                                sum(n for _, n in hits))
    return out


# --- pixel level ----------------------------------------------------------------------------
def pixel_auroc(masks: Any, maps: Any, max_pixels: int = 10_000_000, seed: int = 0) -> float:
    """Pixel-level AUROC: all pixels (voxels) of all images pooled; lesion pixels positive.

    ``masks`` and ``maps`` are sequences of same-shape 2D (H, W) or 3D (D, H, W) arrays (or one
    stacked array each); entries whose mask is None are skipped (counted and logged). NaN if
    there are no masks or the pooled pixels hold only one class.

    Exact up to ``max_pixels`` pooled pixels (10 M: ~20 s on 2 CPU cores). Above it (e.g.
    1,358 test images of 512² = 356 M pixels, ~10 GB to rank) the same random fraction of
    every image's pixels is drawn (seeded, logged), which keeps memory and time bounded;
    measured on 26 M pixels: 0.75527 subsampled vs 0.75513 exact.
    """
    if isinstance(masks, np.ndarray | torch.Tensor) and isinstance(maps, np.ndarray | torch.Tensor):
        masks, maps = list(_as_numpy(masks)), list(_as_numpy(maps))
    if len(masks) != len(maps):
        raise ValueError(f"pixel_auroc: {len(masks)} masks for {len(maps)} anomaly maps")
    pairs, skipped = [], 0
    for i, (m, a) in enumerate(zip(masks, maps)):
        if m is None:
            skipped += 1
            continue
        m, a = _as_numpy(m), _as_numpy(a)
        if m.shape != a.shape:
            raise ValueError(
                f"pixel_auroc: item {i}: mask shape {m.shape} != anomaly map shape {a.shape}; "
                "resize the anomaly map to the mask (image) size first"
            )
        if m.ndim not in (2, 3):
            raise ValueError(f"pixel_auroc: item {i}: expected 2D or 3D arrays, got {m.shape}")
        pairs.append((m, a))
    if skipped:
        log.info("pixel_auroc: %d of %d items have no mask and were skipped", skipped, len(masks))
    if not pairs:
        log.warning("pixel_auroc: no masks given -> NaN")
        return float("nan")
    total = sum(m.size for m, _ in pairs)
    fraction = min(1.0, max_pixels / total)
    if fraction < 1.0:
        log.info("pixel_auroc: %d pixels pooled; estimating on a seeded random %.2f %% of each "
                 "image's pixels", total, 100 * fraction)
    rng = np.random.default_rng(seed)
    ys, ss = [], []
    for m, a in pairs:
        y_i = (m > 0).reshape(-1)  # (P,) lesion pixels
        s_i = a.reshape(-1)  # (P,)
        if fraction < 1.0:
            keep = rng.choice(y_i.size, size=max(1, round(fraction * y_i.size)), replace=False)
            y_i, s_i = y_i[keep], s_i[keep]
        ys.append(y_i)
        ss.append(s_i.astype(np.float64))
    y = np.concatenate(ys).astype(np.int64)
    s = np.concatenate(ss)
    if np.isnan(s).any():
        raise ValueError(f"pixel_auroc: {int(np.isnan(s).sum())} anomaly-map pixels are NaN")
    return auroc(y, s)


# --- cross-validation -----------------------------------------------------------------------
def summarize_folds(fold_metrics: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample SD (ddof=1) of every numeric key over folds (Kim et al.: five-fold CV).

    Keys missing from some fold or NaN in some fold are summarised over the folds that have a
    finite value (``n`` says how many); with one value the SD is NaN.
    """
    if not fold_metrics:
        raise ValueError("summarize_folds: no folds given")
    keys = sorted({k for m in fold_metrics for k, v in m.items() if _is_number(v)})
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        vals = np.array(
            [float(m[k]) for m in fold_metrics if k in m and _is_number(m[k])], dtype=np.float64
        )
        vals = vals[~np.isnan(vals)]
        out[k] = {
            "mean": float(vals.mean()) if vals.size else float("nan"),
            "sd": float(vals.std(ddof=1)) if vals.size > 1 else float("nan"),
            "n": int(vals.size),
        }
    return out


def pooled_auroc(fold_scores: Sequence[tuple[Any, Any]], level: float = 0.95) -> dict[str, Any]:
    """AUROC and its DeLong CI of the test cases of all folds pooled (``[(labels, scores)]``,
    one pair per fold; scores on a common calibrated scale, e.g. the patch method's (0, 1))."""
    y = np.concatenate([_as_numpy(f[0]).reshape(-1) for f in fold_scores])
    s = np.concatenate([_as_numpy(f[1]).reshape(-1) for f in fold_scores])
    ci = delong_ci(y, s, level)
    return {"pooled_auroc": ci.auroc, "pooled_auroc_ci": [ci.low, ci.high],
            "pooled_n": int(len(y))}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


# --- outputs --------------------------------------------------------------------------------
def write_scores_csv(
    path: str | Path,
    paths: Sequence[Any],
    labels: Any,
    scores: Any,
    **extra_columns: Sequence[Any],
) -> Path:
    """Write ``path,label,score[,extra...]`` (label 1 = abnormal; higher score = more anomalous).

    Extra columns keep their keyword order, e.g. ``finding=..., fold=...``. Scores are written
    with full precision (``repr``), so the file reproduces the metrics exactly.
    """
    y = _as_numpy(labels).reshape(-1)
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    n = len(paths)
    cols = {"label": y, "score": s, **extra_columns}
    for name, col in cols.items():
        if len(col) != n:
            raise ValueError(f"write_scores_csv: column {name!r} has {len(col)} rows, paths has {n}")
    for reserved in ("path", "label", "score"):
        if reserved in extra_columns:
            raise ValueError(f"write_scores_csv: extra column {reserved!r} is reserved")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "score", *extra_columns])
        for i in range(n):
            extras = [_csv_cell(extra_columns[k][i]) for k in extra_columns]
            w.writerow([str(paths[i]), int(y[i]), repr(float(s[i])), *extras])
    return path


def _csv_cell(v: Any) -> Any:
    if isinstance(v, torch.Tensor | np.generic):
        v = v.item()
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else v


def _jsonable(v: Any, digits: int) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x, digits) for k, x in v.items()}
    if isinstance(v, torch.Tensor | np.ndarray):
        v = v.tolist()
    if isinstance(v, list | tuple):
        return [_jsonable(x, digits) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, int | str):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return None  # JSON has no NaN/inf; null = undefined
        return float(f"{v:.{digits}g}")
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"write_metrics_json: cannot serialise {type(v).__name__}: {v!r}")


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any], digits: int = 6) -> Path:
    """Write metrics as JSON: floats to ``digits`` significant digits, NaN/inf -> null,
    sorted keys (nested dicts too), so that sweeps and diffs read them easily."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(metrics, digits), indent=2, sort_keys=True) + "\n")
    return path


def print_metrics_table(metrics: Mapping[str, Any], title: str = "Metrics") -> None:
    """Print metrics as a rich table on the console (nested dicts are flattened with '/')."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in flatten_metrics(metrics, split_intervals=False).items():
        table.add_row(k, format_value(v))
    Console().print(table)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "",
                    split_intervals: bool = True) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; ``{"mean": m, "sd": s}`` leaves stay dicts.

    Intervals (a ``[low, high]`` pair of numbers under a key ending in ``_ci``, e.g.
    ``auroc_ci``) become two scalars ``<key>_low`` / ``<key>_high``, so that every leaf can be
    logged as a number (W&B, CSV); ``split_intervals=False`` keeps the pairs (for display).
    """
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not {"mean", "sd"} <= set(v):
            out.update(flatten_metrics(v, key + "/", split_intervals))
        elif split_intervals and _is_interval(key, v):
            out[f"{key}_low"], out[f"{key}_high"] = (_scalar(x) for x in v)
        else:
            out[key] = v
    return out


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor | np.generic):
        return v.item()
    return float("nan") if v is None else v


def _is_interval(key: str, v: Any) -> bool:
    if isinstance(v, torch.Tensor | np.ndarray):
        v = v.tolist()
    return (key.endswith("_ci") and isinstance(v, list | tuple) and len(v) == 2
            and all(x is None or _is_number(_scalar(x)) for x in v))


def format_value(v: Any) -> str:
    """Human-readable value: 4 significant digits, NaN as 'n/a', mean ± sd for fold summaries."""
    if isinstance(v, Mapping) and {"mean", "sd"} <= set(v):
        return f"{format_value(v['mean'])} ± {format_value(v['sd'])}"
    if isinstance(v, torch.Tensor | np.generic):
        v = v.item()
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.4e}"
    if isinstance(v, list | tuple):  # e.g. auroc_ci = [low, high]
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)
