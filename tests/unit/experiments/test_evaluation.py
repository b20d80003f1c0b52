"""Evaluation maths against hand-computed confusion matrices and brute-force references."""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_precision,
    binary_recall,
    binary_specificity,
)

from experiments.evaluation import (
    auroc,
    binary_metrics,
    bootstrap_auroc_ci,
    delong_ci,
    delong_covariance,
    delong_test,
    flatten_metrics,
    format_value,
    per_finding_metrics,
    pixel_auroc,
    pixel_auroc_ci,
    pixel_pair_counts,
    print_metrics_table,
    roc_with_youden,
    sens_at_spec,
    summarize_folds,
    write_metrics_json,
    write_scores_csv,
)


# --- brute-force references -----------------------------------------------------------------
def brute_auroc(y, s) -> float:
    """Fraction of (normal, abnormal) pairs ordered correctly; ties count 1/2."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return (gt + 0.5 * eq) / (pos.size * neg.size)


def brute_rates(y, s, t) -> tuple[float, float]:
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    pred = s > t
    return pred[y == 1].mean(), pred[y == 0].mean()  # TPR, FPR


def brute_youden(y, s) -> float:
    """Max of TPR - FPR over every rule `score > t`, t scanning all scores and below the min."""
    s = np.asarray(s, dtype=np.float64)
    cands = np.concatenate([np.unique(s), [s.min() - 1.0]])
    return max(brute_rates(y, s, t)[0] - brute_rates(y, s, t)[1] for t in cands)


# --- eqs. 7-10 on a hand-computed confusion matrix ------------------------------------------
# labels  0    0    0    0    1    1    1    1    1    0
# scores .1   .2   .6   .5   .7   .5   .9   .3   .8   .4      threshold 0.5, abnormal iff > 0.5
# pred    0    0    1    0    1    0    1    0    1    0
# TP = 3 (.7 .9 .8), FN = 2 (.5 .3), FP = 1 (.6), TN = 4 (.1 .2 .5 .4)
LABELS = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
SCORES = [0.1, 0.2, 0.6, 0.5, 0.7, 0.5, 0.9, 0.3, 0.8, 0.4]


def test_confusion_metrics_hand_computed():
    m = binary_metrics(LABELS, SCORES, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 2, 1, 4)
    assert m["accuracy"] == pytest.approx(7 / 10)  # eq. 7 (TP+TN)/all
    assert m["precision"] == pytest.approx(3 / 4)  # eq. 8 TP/(TP+FP)
    assert m["sensitivity"] == pytest.approx(3 / 5)  # eq. 9 TP/(TP+FN)
    assert m["specificity"] == pytest.approx(4 / 5)  # eq. 10 TN/(TN+FP)
    assert m["auroc"] == pytest.approx(brute_auroc(LABELS, SCORES), abs=1e-6)
    assert (m["n_normal"], m["n_abnormal"], m["threshold"]) == (5, 5, 0.5)
    for key in ("auroc", "accuracy", "precision", "sensitivity", "specificity", "threshold",
                "youden_threshold", "n_normal", "n_abnormal"):
        assert key in m


def test_threshold_boundary_is_strict():
    """A score equal to the threshold is NORMAL (abnormal iff score > threshold)."""
    y = [0, 1, 1]
    s = [0.5, 0.5, 0.50001]
    m = binary_metrics(y, s, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 0, 1)
    # just below: both 0.5 items flip to abnormal
    m = binary_metrics(y, s, np.nextafter(0.5, 0.0))
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 0, 1, 0)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 50)
    s = rng.random(50).round(1)  # many ties, some exactly at the threshold
    m = binary_metrics(y, s, 0.5)
    pred = torch.from_numpy((s > 0.5).astype(np.int64))
    t = torch.from_numpy(y)
    assert m["accuracy"] == pytest.approx(float(binary_accuracy(pred, t)), abs=1e-6)
    assert m["precision"] == pytest.approx(float(binary_precision(pred, t)), abs=1e-6)
    assert m["sensitivity"] == pytest.approx(float(binary_recall(pred, t)), abs=1e-6)
    assert m["specificity"] == pytest.approx(float(binary_specificity(pred, t)), abs=1e-6)


def test_unbounded_scores_are_not_squashed():
    """torchmetrics would sigmoid scores outside [0,1]; large NLLs must keep their order."""
    y = [0, 0, 1, 1]
    s = [1.0e5, 1.0e5 + 1, 1.0e5 + 2, 1.0e5 + 3]  # sigmoid = 1.0 for all of them
    assert auroc(y, s) == pytest.approx(1.0)
    m = binary_metrics(y, s, 1.0e5 + 1.5)
    assert (m["tp"], m["fp"]) == (2, 0)
    assert roc_with_youden(y, s)[3] == pytest.approx(1.0e5 + 1.5)


@pytest.mark.parametrize("seed", range(8))
def test_auroc_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(5, 60)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.normal(size=n) * 100 + y * 50
    if seed % 2:
        s = np.round(s / 50)  # heavy ties
    assert auroc(y, s) == pytest.approx(brute_auroc(y, s), abs=1e-6)


def test_auroc_one_class_is_nan_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert "only one class" in caplog.text
    m = binary_metrics([0, 0], [0.2, 0.7], 0.5)  # no crash; undefined ratios are NaN
    assert math.isnan(m["auroc"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == 0.5


def test_nan_scores_error_names_count():
    with pytest.raises(ValueError, match="2 of 4 scores are NaN"):
        binary_metrics([0, 1, 0, 1], [0.1, np.nan, np.nan, 0.3], 0.5)


def test_bad_labels_rejected():
    with pytest.raises(ValueError, match=r"\[-1\]"):
        auroc([0, 1, -1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0, 1], [0.1])


# --- ROC + Youden ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_roc_points_and_youden_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 40
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.normal(size=n) + y
    if seed % 2:
        s = np.round(s, 0)  # ties
    fpr, tpr, thr, youden = roc_with_youden(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(thr) < 0)  # strictly decreasing thresholds
    for f, t, th in zip(fpr, tpr, thr):  # point i <-> rule score > thr[i]
        bt, bf = brute_rates(y, s, th)
        assert (t, f) == pytest.approx((bt, bf), abs=1e-6)
    tpr_y, fpr_y = brute_rates(y, s, youden)
    assert tpr_y - fpr_y == pytest.approx(brute_youden(y, s), abs=1e-6)
    # the metric dict reports the same cut-off
    assert binary_metrics(y, s, 0.0)["youden_threshold"] == youden
    # trapezoid area under the returned curve = AUROC
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auroc(y, s), abs=1e-6)


def test_youden_hand_computed():
    # normals .1 .2 .4 ; abnormals .3 .8 .9 : best rule "score > 0.6" (TPR 2/3, FPR 0), J=2/3
    # and "score > 0.25" (TPR 1, FPR 1/3), J=2/3 too: ties -> the larger threshold.
    fpr, tpr, thr, youden = roc_with_youden([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.4, 0.3, 0.8, 0.9])
    assert youden == pytest.approx(0.6)


# --- per finding ----------------------------------------------------------------------------
def test_per_finding_metrics():
    y = [0, 0, 0, 1, 1, 1, 1, 1]
    s = [0.1, 0.4, 0.6, 0.9, 0.2, 0.7, 0.5, 0.8]
    f = ["", "", None, "opacity", "opacity", "effusion|opacity", ["nodule"], ""]
    out = per_finding_metrics(y, s, f, threshold=0.55)
    assert list(out) == ["effusion", "nodule", "opacity", "unspecified"]
    normals = [0.1, 0.4, 0.6]
    opac = [0.9, 0.2, 0.7]
    assert out["opacity"]["n"] == 3 and out["opacity"]["n_normal"] == 3
    assert out["opacity"]["auroc"] == pytest.approx(
        brute_auroc([0] * 3 + [1] * 3, normals + opac), abs=1e-6
    )
    assert out["opacity"]["sensitivity"] == pytest.approx(2 / 3)
    assert out["effusion"]["auroc"] == pytest.approx(1.0)  # 0.7 vs .1 .4 .6
    assert out["nodule"]["auroc"] == pytest.approx(brute_auroc([0, 0, 0, 1], normals + [0.5]))
    assert out["nodule"]["sensitivity"] == 0.0  # 0.5 is not > 0.55
    assert out["unspecified"]["n"] == 1
    # default threshold = Youden of the whole set
    youden = roc_with_youden(y, s)[3]
    out2 = per_finding_metrics(y, s, f)
    assert out2["opacity"]["sensitivity"] == pytest.approx(np.mean(np.array(opac) > youden))


# --- pixel AUROC ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 8), (3, 6, 5)])
def test_pixel_auroc_brute_force(shape):
    rng = np.random.default_rng(1)
    masks = [rng.random(shape) < 0.2 for _ in range(3)]
    maps = [rng.random(shape) + m * 0.5 for m in masks]
    y = np.concatenate([m.ravel() for m in masks]).astype(int)
    s = np.concatenate([a.ravel() for a in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(brute_auroc(y, s), abs=1e-6)
    # stacked arrays and items without a mask
    assert pixel_auroc(np.stack(masks), np.stack(maps)) == pytest.approx(brute_auroc(y, s), 1e-6)
    assert pixel_auroc(masks + [None], maps + [maps[0]]) == pytest.approx(
        brute_auroc(y, s), abs=1e-6
    )


def test_pixel_auroc_errors():
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc([np.zeros((4, 4))], [np.zeros((8, 8))])
    assert math.isnan(pixel_auroc([None], [np.zeros((4, 4))]))


# --- folds ----------------------------------------------------------------------------------
def test_summarize_folds_against_numpy():
    rng = np.random.default_rng(0)
    folds = [{"auroc": rng.random(), "accuracy": rng.random(), "n_normal": 10 + i,
              "note": "text is ignored"} for i in range(5)]
    out = summarize_folds(folds)
    for k in ("auroc", "accuracy", "n_normal"):
        vals = np.array([f[k] for f in folds], dtype=float)
        assert out[k]["mean"] == pytest.approx(vals.mean())
        assert out[k]["sd"] == pytest.approx(vals.std(ddof=1))
        assert out[k]["n"] == 5
    assert "note" not in out
    one = summarize_folds([{"auroc": 0.7}, {"auroc": float("nan")}])
    assert one["auroc"]["mean"] == 0.7 and math.isnan(one["auroc"]["sd"])


# --- outputs --------------------------------------------------------------------------------
def test_write_scores_csv(out_dir):
    p = write_scores_csv(out_dir / "scores.csv", ["a.png", "b.png"], np.array([0, 1]),
                         torch.tensor([0.25, 1e5 + 0.1], dtype=torch.float64),
                         finding=["", "opacity"], fold=[0, 0])
    rows = list(csv.reader(p.open()))
    assert rows[0] == ["path", "label", "score", "finding", "fold"]
    assert rows[1] == ["a.png", "0", "0.25", "", "0"]
    assert rows[2][:2] == ["b.png", "1"] and float(rows[2][2]) == 1e5 + 0.1
    with pytest.raises(ValueError, match="finding"):
        write_scores_csv(out_dir / "x.csv", ["a"], [0], [0.1], finding=["x", "y"])


def test_write_metrics_json(out_dir):
    m = {"specificity": float("nan"), "auroc": np.float32(0.7512345678), "n_normal": np.int64(3),
         "per_finding": {"b": {"auroc": 0.123456789}, "a": {"auroc": float("inf")}},
         "curve": np.array([0.5, 1.0])}
    p = write_metrics_json(out_dir / "metrics.json", m)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    d = json.loads(text)
    assert d["specificity"] is None and d["per_finding"]["a"]["auroc"] is None
    assert d["auroc"] == pytest.approx(0.751235) and d["n_normal"] == 3
    assert d["per_finding"]["b"]["auroc"] == 0.123457
    assert list(d) == sorted(d) and list(d["per_finding"]) == ["a", "b"]
    assert d["curve"] == [0.5, 1.0]


def test_print_metrics_table(capsys):
    print_metrics_table({"auroc": 0.75, "specificity": float("nan"),
                         "folds": {"auroc": {"mean": 0.7, "sd": 0.05}}}, "Test set")
    out = capsys.readouterr().out
    assert "Test set" in out and "0.75" in out and "n/a" in out and "0.7 ± 0.05" in out
    assert format_value(123456.0) == "1.2346e+05"


def test_pixel_auroc_subsampled_close_to_exact():
    rng = np.random.default_rng(3)
    masks = [rng.random((64, 64)) < 0.1 for _ in range(4)]
    maps = [rng.random((64, 64)) + 0.6 * m for m in masks]
    exact = pixel_auroc(masks, maps)
    approx = pixel_auroc(masks, maps, max_pixels=8000)
    assert approx != exact and approx == pytest.approx(exact, abs=0.02)
    assert pixel_auroc(masks, maps, max_pixels=8000) == approx  # seeded


def test_infinite_scores():
    """+inf (e.g. -log p underflow) is the most anomalous; thresholds stay usable."""
    y = [0, 1, 1, 0, 1]
    s = [0.0, np.inf, 5.0, -np.inf, np.inf]
    assert auroc(y, s) == pytest.approx(brute_auroc(y, s))
    fpr, tpr, thr, youden = roc_with_youden(y, s)
    for f, t, th in zip(fpr, tpr, thr):
        if np.isfinite(th) or th == np.inf:
            bt, bf = brute_rates(y, s, th)
            assert (t, f) == pytest.approx((bt, bf))
    assert youden == pytest.approx(2.5)


# --- confidence intervals -------------------------------------------------------------------
def brute_delong_variance(y, s) -> float:
    """DeLong (1988) from its definition: structural components by an O(m n) pair loop."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (m, n)
    v10, v01 = psi.mean(1), psi.mean(0)
    return v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size


def binormal(rng, n, delta):
    y = np.r_[np.zeros(n), np.ones(n)].astype(int)
    return y, rng.normal(size=2 * n) + delta * y


@pytest.mark.parametrize("ties", [False, True])
def test_delong_variance_brute_force(ties):
    rng = np.random.default_rng(4)
    y = np.array([0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
    s = rng.normal(size=y.size) + y
    if ties:
        s = np.round(s)
    auc, cov = delong_covariance(y, s)
    assert auc[0] == pytest.approx(brute_auroc(y, s))
    assert cov[0, 0] == pytest.approx(brute_delong_variance(y, s), rel=1e-12)
    ci = delong_ci(y, s)
    half = 1.959964 * math.sqrt(ci.variance)
    assert (ci.low, ci.high) == pytest.approx((max(0, auc[0] - half), min(1, auc[0] + half)))


def test_delong_ci_agrees_with_stratified_bootstrap():
    y, s = binormal(np.random.default_rng(0), 50, 0.9)
    ci = delong_ci(y, s)
    lo, hi = bootstrap_auroc_ci(y, s, n_boot=2000, seed=1)
    assert ci.auroc == pytest.approx(auroc(y, s))
    assert abs(ci.low - lo) < 0.02 and abs(ci.high - hi) < 0.02


def test_delong_ci_coverage_on_binormal_scores():
    """400 simulated 50 + 50 test sets with true AUROC 0.75: ~95 % of the CIs contain it."""
    rng = np.random.default_rng(2)
    delta = scipy.stats.norm.ppf(0.75) * math.sqrt(2.0)  # AUROC = Phi(delta / sqrt 2)
    hits = 0
    for _ in range(400):
        y, s = binormal(rng, 50, delta)
        ci = delong_ci(y, s)
        hits += ci.low <= 0.75 <= ci.high
    assert 0.92 <= hits / 400 <= 0.98


def test_delong_paired_test():
    rng = np.random.default_rng(5)
    y, a = binormal(rng, 50, 1.5)
    assert delong_test(y, a, a) == 1.0
    assert delong_test(y, a, 3 * a + 2) == 1.0  # same order, same AUROC
    b = 0.1 * a + rng.normal(size=a.size)  # mostly noise: AUROC ~0.55
    assert delong_test(y, a, b) < 1e-3
    # under H0 (two equally noisy readings of one signal) p < 0.05 in ~5 % of 300 trials
    rejections = 0
    for _ in range(300):
        y, a = binormal(rng, 40, 1.0)
        rejections += delong_test(y, a + rng.normal(size=a.size),
                                  a + rng.normal(size=a.size)) < 0.05
    assert 0.02 <= rejections / 300 <= 0.09


def test_binary_metrics_carries_delong_ci(out_dir):
    y, s = binormal(np.random.default_rng(6), 30, 1.0)
    m = binary_metrics(y, s, 0.5)
    assert m["auroc_ci"][0] < m["auroc"] < m["auroc_ci"][1]
    assert m["auroc_ci"] == pytest.approx(list(delong_ci(y, s)[1:3]))
    flat = flatten_metrics({"likelihood": m, **m})
    assert flat["auroc_ci_low"] == m["auroc_ci"][0] and flat["auroc_ci_high"] == m["auroc_ci"][1]
    assert "likelihood/auroc_ci_low" in flat and "auroc_ci" not in flat
    assert all(not isinstance(v, list) for v in flat.values())
    d = json.loads(write_metrics_json(out_dir / "m.json", m).read_text())
    assert d["auroc_ci"] == pytest.approx(m["auroc_ci"], abs=1e-6)
    assert format_value(m["auroc_ci"]).startswith("[0.")
    one = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert all(math.isnan(v) for v in one["auroc_ci"])


def test_print_metrics_table_shows_interval(capsys):
    print_metrics_table({"auroc": 0.75, "auroc_ci": [0.625, 0.875]})
    out = capsys.readouterr().out
    assert "[0.625, 0.875]" in out


def test_sens_at_spec_hand_computed():
    # 10 val normals 0.0..0.9: spec 0.9 needs >= 9 of them <= t -> t = 0.8
    yv = np.r_[np.zeros(10), np.ones(3)].astype(int)
    sv = np.r_[np.arange(10) / 10, [0.5, 0.95, 0.99]]
    yt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    st = np.array([0.1, 0.85, 0.7, 0.8, 0.79, 0.81, 0.95, 0.8])
    r = sens_at_spec(yv, sv, yt, st, 0.90)
    assert r["threshold"] == pytest.approx(0.8) and r["val_specificity"] == pytest.approx(0.9)
    assert r["sensitivity"] == pytest.approx(2 / 4)  # 0.81, 0.95 > 0.8; 0.8 is not
    assert r["specificity"] == pytest.approx(3 / 4)
    assert sens_at_spec(yv, sv, yt, st, 0.95)["threshold"] == pytest.approx(0.9)
    # the threshold depends on validation data only
    assert sens_at_spec(yv, sv, yt, -st, 0.90)["threshold"] == r["threshold"]


def test_pixel_auroc_ci_exact_resamples():
    rng = np.random.default_rng(7)
    masks = [rng.random((6, 6)) < 0.2 for _ in range(4)] + [np.zeros((6, 6), bool)] * 2
    maps = [np.round(rng.random((6, 6)) + 0.5 * m, 1) for m in masks]  # ties included
    c, p, n = pixel_pair_counts(masks, maps)
    w = np.ones(len(masks))
    assert w @ c @ w / ((w @ p) * (w @ n)) == pytest.approx(pixel_auroc(masks, maps))
    w = np.array([2, 0, 1, 1, 0, 2.0])  # a resample with repeated images
    rep = [i for i, k in enumerate(w) for _ in range(int(k))]
    assert w @ c @ w / ((w @ p) * (w @ n)) == pytest.approx(
        pixel_auroc([masks[i] for i in rep], [maps[i] for i in rep]))
    lo, hi = pixel_auroc_ci(masks, maps, n_boot=500)
    assert lo <= pixel_auroc(masks, maps) <= hi and hi - lo > 0.01


def test_roc_band_brackets_the_true_curve():
    """Binormal scores (abnormal ~ N(1, 1), normal ~ N(0, 1)): the true TPR at FPR f is
    1 - Phi(Phi^-1(1 - f) - 1); the pointwise 95 % band of a 400-case sample contains it
    at most FPRs, and narrows with more cases."""
    from experiments.evaluation import roc_band

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200, int), np.zeros(200, int)]
    s = rng.normal(size=400) + y
    grid, lo, hi = roc_band(y, s, n_boot=300)
    true = 1 - scipy.stats.norm.cdf(scipy.stats.norm.ppf(1 - grid[1:-1]) - 1)
    inside = (lo[1:-1] <= true + 1e-9) & (true <= hi[1:-1] + 1e-9)
    assert inside.mean() > 0.85 and (lo <= hi).all() and hi[-1] == 1.0
    y4 = np.r_[np.ones(800, int), np.zeros(800, int)]
    _, lo4, hi4 = roc_band(y4, rng.normal(size=1600) + y4, n_boot=300)
    assert (hi4 - lo4)[1:-1].mean() < 0.7 * (hi - lo)[1:-1].mean()


def test_report_shows_the_interval_next_to_its_value(tmp_path):
    from experiments.report import Report

    rep = Report(tmp_path, "t").add_metrics({"auroc": 0.8108, "auroc_ci": [0.6864, 0.9351],
                                             "accuracy": 0.79})
    html = rep.write().read_text()
    assert "0.8108 [0.6864, 0.9351]" in html and "auroc_ci" not in html


def test_pooled_auroc_pools_cases_not_fold_aurocs():
    from experiments.evaluation import pooled_auroc

    # each fold separates perfectly, but fold 2's scores sit higher: pooled AUROC < 1
    f1 = ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    f2 = ([0, 0, 1, 1], [0.35, 0.45, 0.6, 0.7])
    m = pooled_auroc([f1, f2])
    want = brute_auroc(f1[0] + f2[0], f1[1] + f2[1])
    assert m["pooled_auroc"] == pytest.approx(want) and want < 1.0 and m["pooled_n"] == 8
    assert m["pooled_auroc_ci"][0] <= want <= m["pooled_auroc_ci"][1]
