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
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc, binary_stat_scores

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "auroc",
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
    return float(binary_auroc(torch.from_numpy(ranks), torch.from_numpy(y)))


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
    ranks, distinct = _dense_rank01(s)
    fpr_t, tpr_t, thr_rank = binary_roc(torch.from_numpy(ranks), torch.from_numpy(y))
    fpr = fpr_t.double().numpy()
    tpr = tpr_t.double().numpy()
    # torchmetrics point k>=1 is the rule `rank >= thr_rank[k]`, i.e. `score >= v_k` with v_k
    # the k-th largest distinct score; point 0 (prepended by torchmetrics) predicts nothing.
    # Rewrite as `score > t` with t half-way to the next lower distinct score.
    desc = distinct[::-1]  # (m,) distinct scores, descending
    if len(desc) > 1:
        gap = desc[-2] - desc[-1]
        lower = np.append(desc[1:], desc[-1] - gap)  # next lower neighbour of each v_k
    else:
        lower = desc - 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        mid = desc + (lower - desc) / 2.0  # overflow-safe midpoint
        # infinite scores: any finite value between the two neighbours; a -inf score can
        # never be flagged by `score > t`, so the last point is then not reachable.
        mid = np.where(
            np.isfinite(mid), mid,
            np.where(np.isfinite(lower), lower,
                     np.where(np.isfinite(desc), desc - 1.0 - np.abs(desc),
                              np.where(desc > 0, 0.0, -np.inf))),
        )
    thresholds = np.concatenate([[desc[0]], mid])
    assert len(thresholds) == len(fpr) == len(thr_rank)
    j = tpr - fpr
    best = int(np.argmax(j))  # first maximum = largest threshold
    return fpr, tpr, thresholds, float(thresholds[best])


def binary_metrics(labels: Any, scores: Any, threshold: float) -> dict[str, Any]:
    """Image-level metrics at ``threshold`` (abnormal iff score > threshold), eqs. 7-10 + AUROC.

    Keys: auroc, accuracy, precision, sensitivity, specificity, threshold, youden_threshold,
    n_normal, n_abnormal, tp, fp, tn, fn. Ratios whose denominator is 0 are NaN (warned).
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
    # returns float32 (0.8333333134...). tests/test_evaluation.py checks both agree with
    # binary_accuracy / binary_precision / binary_recall / binary_specificity.
    out = {
        "accuracy": ratio("accuracy", tp + tn, tp + tn + fp + fn),  # eq. 7
        "precision": ratio("precision", tp, tp + fp),  # eq. 8
        "sensitivity": ratio("sensitivity", tp, tp + fn),  # eq. 9
        "specificity": ratio("specificity", tn, tn + fp),  # eq. 10
    }
    _, _, _, youden = roc_with_youden(y, s)
    out.update(
        auroc=auroc(y, s),
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


# --- pixel level ----------------------------------------------------------------------------
def pixel_auroc(masks: Any, maps: Any, max_pixels: int = 20_000_000, seed: int = 0) -> float:
    """Pixel-level AUROC: all pixels (voxels) of all images pooled; lesion pixels positive.

    ``masks`` and ``maps`` are sequences of same-shape 2D (H, W) or 3D (D, H, W) arrays (or one
    stacked array each); entries whose mask is None are skipped (counted and logged). NaN if
    there are no masks or the pooled pixels hold only one class.

    Exact up to ``max_pixels`` pooled pixels. Above it (e.g. 1,358 test images of 512² =
    356 M pixels, ~10 GB to rank) the same random fraction of every image's pixels is drawn
    (seeded, logged), which keeps memory bounded; the standard error of the estimate is then
    below 1e-3 for any realistic lesion fraction.
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
    for k, v in flatten_metrics(metrics).items():
        table.add_row(k, format_value(v))
    Console().print(table)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; ``{"mean": m, "sd": s}`` leaves stay dicts."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not {"mean", "sd"} <= set(v):
            out.update(flatten_metrics(v, key + "/"))
        else:
            out[key] = v
    return out


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
    return str(v)
