"""PatchDetectorModule's validation stage: the choice of eq. 6's weights (patch.select_weights)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_modules.patch_detector.lightning_model import (
    PatchDetectorModule,
    SplitScores,
    default_weight_candidates,
    select_weights,
)
from tests.support import toy_detector


def _val(signal_size: int, n: int = 20, seed: int = 0) -> SplitScores:
    """Patch scores of n normal + n abnormal images: only ``signal_size`` sees the lesion; the
    other size ranks the abnormal images *below* the normal ones (so all sizes together lose)."""
    g = torch.Generator().manual_seed(seed)
    labels = np.r_[np.zeros(n, int), np.ones(n, int)]
    scores = {}
    for s, cells in ((8, 16), (16, 4)):
        sc = 1 + 0.1 * torch.rand(2 * n, cells, generator=g)
        if s == signal_size:
            sc[n:, 3] += 0.5 + torch.rand(n, generator=g)  # one lesion cell per abnormal image
        else:
            sc[n:] -= 0.5
        scores[s] = sc
    return SplitScores(np.arange(2 * n), labels, scores)


@pytest.mark.parametrize("signal_size, expected", [(8, [1.0, 0.0]), (16, [0.0, 1.0])])
def test_select_weights_picks_the_size_that_ranks_validation_best(signal_size, expected):
    det = toy_detector()
    val = _val(signal_size)
    cands = [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    best, table = select_weights(det, val, [8, 16], cands, "geometric")
    assert best == expected
    assert [r["weights"] for r in table] == cands
    # each candidate's AUROC is the AUROC of its own raw image score (max of its fused map)
    from lightning_modules.patch_detector.lightning_model import MapNormalizer

    for r in table:
        norm = MapNormalizer.fit_scales([val.patch_scores[s][:20] for s in (8, 16)], [8, 16],
                                        r["weights"], "geometric")
        raw = det.raw_image_scores(val.patch_scores, norm).numpy()
        assert r["val_auroc"] == pytest.approx(roc_auc_score(val.labels, raw), abs=1e-6)
    assert table[cands.index(expected)]["val_auroc"] == 1.0
    assert table[cands.index([1.0 - expected[0], 1.0 - expected[1]])]["val_auroc"] < 0.5


def test_select_weights_ties_keep_the_earlier_candidate_and_bad_input_fails():
    det = toy_detector()
    val = _val(8)
    # [2, 0] and [1, 0] give the same ranking (the exponent scales the log map): first wins
    assert select_weights(det, val, [8, 16], [[2.0, 0.0], [1.0, 0.0]], "geometric")[0] == [2, 0]
    assert select_weights(det, val, [8, 16], [[1.0, 0.0], [2.0, 0.0]], "geometric")[0] == [1, 0]
    with pytest.raises(ValueError, match="weight candidate"):
        select_weights(det, val, [8, 16], [[0.0, 0.0]], "geometric")
    normal_only = SplitScores(val.index[:20], val.labels[:20],
                              {s: v[:20] for s, v in val.patch_scores.items()})
    with pytest.raises(RuntimeError, match="normal and abnormal"):
        select_weights(det, normal_only, [8, 16], [[1.0, 0.0]], "geometric")


def test_select_weights_never_takes_a_constant_score_or_chooses_on_a_tiny_val_set():
    det = toy_detector()
    val = _val(16)
    # size 16 gives every image the same score (a collapsed encoder): AUROC 0.5, which beats
    # size 8's (below 0.5 here), but it ranks nothing
    val.patch_scores[16] = torch.ones_like(val.patch_scores[16])
    best, table = select_weights(det, val, [8, 16], [[1.0, 0.0], [0.0, 1.0]], "geometric")
    assert table[1]["val_auroc"] == 0.5 > table[0]["val_auroc"] and best == [1.0, 0.0]
    best, table = select_weights(det, val, [8, 16], [[0.0, 1.0], [1.0, 0.0]], "geometric")
    assert best == [1.0, 0.0]  # not even as the first candidate
    # 9 + 9 validation images: the first candidate stays, although the other is perfect
    small = _val(16, n=9)
    best, table = select_weights(det, small, [8, 16], [[1.0, 0.0], [0.0, 1.0]], "geometric")
    assert table[1]["val_auroc"] == 1.0 and best == [1.0, 0.0]
    assert select_weights(det, _val(16, n=10), [8, 16], [[1.0, 0.0], [0.0, 1.0]],
                          "geometric")[0] == [0.0, 1.0]


def test_product_fusion_tries_positive_candidates_only():
    det = toy_detector()
    best, table = select_weights(det, _val(16), [8, 16], [[1.0, 1.0], [0.0, 1.0], [1.0, 2.0]],
                                 "product")
    assert [r["weights"] for r in table] == [[1.0, 1.0], [1.0, 2.0]] and best in ([1, 1], [1, 2])


def test_default_candidates():
    assert default_weight_candidates(3) == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                                            [0, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("select", [True, False])
def test_validation_stage_stores_the_chosen_weights(select):
    det = toy_detector()
    for s, enc in det.encoders.items():  # the settings the module records as hyper-parameters
        enc.patch_size, enc.input_size, enc.backbone_name = int(s), int(s), "pool"
    module = PatchDetectorModule(det, [1.0, 1.0], select_weights=select,
                                 weight_candidates=[[0.0, 1.0], [1.0, 0.0]])
    val = _val(16)
    module._take = lambda stage: val  # the collected validation scores
    module.on_validation_epoch_end()
    want = [0.0, 1.0] if select else [1.0, 1.0]
    assert list(module.hparams.weights) == want  # what the checkpoint's hyper-parameters hold
    assert det.normalizer.weights == want
    assert ("weight_selection" in val.extra) == select
    if select:  # the configured weights are tried first
        assert [r["weights"] for r in val.extra["weight_selection"]] == [[1, 1], [0, 1], [1, 0]]
