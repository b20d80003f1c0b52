"""Flow posterior pipeline: configuration, val threshold, evaluation, and end to end on phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.base import Item
from experiments import pipeline_flow
from experiments.config import ConfigError
from lightning_modules.flow_posterior import FlowScores


def _items(labels, findings=None):
    findings = findings or [""] * len(labels)
    return [Item(f"img{i}.png", y, f) for i, (y, f) in enumerate(zip(labels, findings))]


def test_split_argv_takes_config_and_finds_modality():
    rest, preset, mod = pipeline_flow.split_argv(["method=flow", "--config=flow_bct_paper", "a=1"])
    assert rest == ["method=flow", "a=1"] and preset == "flow_bct_paper" and mod == "bct"
    assert pipeline_flow.split_argv(["data.modality=bct"])[2] == "bct"
    # the command line wins over the preset
    assert pipeline_flow.split_argv(["config=flow_bct_paper", "data.modality=cxr"])[2] == "cxr"
    assert pipeline_flow.split_argv([])[2] == "cxr"
    with pytest.raises(ConfigError, match="flow_nope"):
        pipeline_flow.split_argv(["config=flow_nope"])
    with pytest.raises(ConfigError, match="modality"):
        pipeline_flow.split_argv(["data.modality=mri"])


def test_threshold_is_youden_on_val_never_test():
    y_val = np.array([0, 0, 0, 1, 1, 1])
    s_val = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    thr, how = pipeline_flow.val_threshold(y_val, s_val)
    assert 2.0 < thr < 3.0 and "Youden" in how
    val = FlowScores(-s_val, np.zeros(6), np.zeros(6))  # score = -log_p_m0 + log_p_m1 = s_val
    # On test, the best cut-off lies elsewhere (between 10 and 11): the val one must be used.
    s_test = np.array([9.0, 10.0, 11.0, 12.0])
    test = FlowScores(-s_test, np.zeros(4), np.zeros(4))
    m = pipeline_flow.evaluate(_items(y_val), val, _items([0, 0, 1, 1]), test)
    assert m["threshold"] == pytest.approx(thr) and m["val/threshold"] == pytest.approx(thr)
    assert m["auroc"] == 1.0 and m["specificity"] == 0.0 and m["sensitivity"] == 1.0
    assert m["val/auroc"] == 1.0


def test_threshold_without_val_abnormals_is_a_val_percentile():
    thr, how = pipeline_flow.val_threshold(np.zeros(100, int), np.arange(100.0))
    assert thr == pytest.approx(94.05) and "95th" in how
    with pytest.raises(ConfigError, match="val/normal"):
        pipeline_flow.val_threshold(np.ones(3, int), np.arange(3.0))


def test_evaluate_reports_likelihood_and_per_finding_aurocs():
    rng = np.random.default_rng(0)
    labels = [0] * 20 + [1] * 20
    findings = [""] * 20 + ["Lung Opacity"] * 10 + ["No Lung Opacity / Not Normal"] * 10
    # posterior separates only 'Lung Opacity'; the likelihood ranks the classes backwards
    post = np.r_[rng.normal(0, 1, 20), rng.normal(5, 1, 10), rng.normal(0, 1, 10)]
    lik = np.r_[np.full(20, 10.0), np.full(20, 0.0)] + rng.normal(0, 0.1, 40)
    scores = FlowScores(log_p_m0=-lik, log_p_m1=-lik + post, zero_fraction=np.zeros(40))
    np.testing.assert_allclose(scores.score, post)
    m = pipeline_flow.evaluate(_items(labels, findings), scores, _items(labels, findings), scores)
    assert m["auroc_likelihood"] == 0.0
    assert m["per_finding"]["Lung Opacity"]["auroc"] == 1.0
    assert 0.2 < m["per_finding"]["No Lung Opacity / Not Normal"]["auroc"] < 0.8
    assert m["per_finding_likelihood"]["Lung Opacity"]["auroc"] == 0.0
    assert m["per_finding"]["Lung Opacity"]["n"] == 10


def test_evaluate_needs_both_classes_in_test():
    s = FlowScores(np.zeros(3), np.zeros(3), np.zeros(3))
    with pytest.raises(ConfigError, match="S_unknown"):
        pipeline_flow.evaluate(_items([0, 1, 1]), s, _items([1, 1, 1]), s)
