"""The one threshold module (both methods): Youden's cut-off and the normal-quantile fallback."""

import numpy as np
import pytest

from experiments.evaluation import roc_with_youden
from lightning_modules.thresholds import cut_points, decision_threshold, youden_cutoff


def brute_youden(y, s):
    """J of every midpoint rule 'score > c' by a full (cuts x scores) table; ties -> largest c."""
    u = np.unique(s)
    cuts = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    pred = s[None, :] > cuts[:, None]
    j = pred[:, y == 1].mean(1) - pred[:, y == 0].mean(1)
    return float(cuts[np.flatnonzero(j >= j.max() - 1e-12)[-1]])


@pytest.mark.parametrize("seed", range(6))
def test_youden_cutoff_matches_brute_force_and_the_roc(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    y[:2] = [0, 1]
    s = rng.normal(size=60) + y
    if seed % 2:
        s = np.round(s, 1)  # ties
    c = youden_cutoff(y, s)
    assert c == brute_youden(y, s)  # bitwise: the same midpoint arithmetic
    assert roc_with_youden(y, s)[3] == c  # the evaluation reports the same cut-off


def test_cut_points_are_midpoints_and_handle_infinities():
    np.testing.assert_allclose(cut_points(np.array([0.0, 1.0, 3.0])), [3.0, 2.0, 0.5, -0.5])
    c = cut_points(np.array([0.0, np.inf, 5.0, -np.inf]))
    assert np.isfinite(c[1:-1]).all() and c[0] == np.inf
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.0, np.inf, 5.0, -np.inf, np.inf])
    assert youden_cutoff(y, s) == pytest.approx(2.5)


def test_decision_threshold_falls_back_to_the_normal_quantile():
    t, how = decision_threshold(np.zeros(101, int), np.arange(101.0))
    assert t == pytest.approx(95.0) and "95th percentile" in how
    t, how = decision_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert t == pytest.approx(0.5) and "Youden" in how
    with pytest.raises(ValueError, match="no normal"):
        decision_threshold(np.ones(3, int), np.arange(3.0))


def test_pick_device():
    import torch

    from lightning_modules.devices import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="tpu"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="use cpu or auto"):
            pick_device("cuda")


def test_cross_fitted_thresholds_never_use_a_cases_own_label():
    from lightning_modules.thresholds import cross_fitted_decisions, stratified_folds

    rng = np.random.default_rng(0)
    y = np.array([0] * 33 + [1] * 33)
    s = rng.normal(size=66) + 1.5 * y
    folds = stratified_folds(y, 5, seed=0)
    assert sorted(np.bincount(folds[y == 1])) == [6, 6, 7, 7, 7]  # stratified
    abnormal, thr = cross_fitted_decisions(y, s, folds)
    assert (abnormal == (s > thr)).all() and ((abnormal == 1) == (y == 1)).mean() > 0.7
    for f in range(5):
        held = folds == f
        # the fold's threshold comes from the other folds only ...
        assert (thr[held] == decision_threshold(y[~held], s[~held])[0]).all()
        # ... so whatever the fold's own labels and scores are, it does not move
        y2, s2 = y.copy(), s.copy()
        y2[held], s2[held] = 1 - y2[held], rng.normal(size=held.sum()) * 10
        assert (cross_fitted_decisions(y2, s2, folds)[1][held] == thr[held]).all()
