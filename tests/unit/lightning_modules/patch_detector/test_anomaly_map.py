"""Anomaly maps, eq. 6 fusion and the validation-fitted Normalize (Kim et al. 2023)."""

import numpy as np
import pytest
import torch

from lightning_modules.patch_detector.anomaly_map import (
    MapNormalizer,
    fuse_log_maps,
    map_block,
    patch_scores_to_map,
)
from lightning_modules.thresholds import youden_cutoff


def test_each_pixel_gets_its_patch_score():
    # 4x4 image, 2x2 patches, row-major grid
    xs, ys = torch.tensor([0, 2, 0, 2]), torch.tensor([0, 0, 2, 2])
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = patch_scores_to_map(scores, xs, ys, 2, 4)
    want = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]).float()
    assert torch.equal(m[0], want)
    # the same on the 2-pixel block grid
    assert torch.equal(patch_scores_to_map(scores, xs, ys, 2, 4, block=2)[0],
                       torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_overlapping_patches_are_averaged():
    # 4x1-strip logic in 2D: 4x4 image, 2x2 patches, stride 1 -> 3x3 grid
    xs = torch.tensor([0, 1, 2] * 3)
    ys = torch.tensor([0] * 3 + [1] * 3 + [2] * 3)
    scores = torch.zeros(1, 9)
    scores[0, 4] = 9.0  # the centre patch covers pixels (1..2, 1..2)
    m = patch_scores_to_map(scores, xs, ys, 2, 4)[0]
    assert float(m[0, 0]) == 0.0  # covered by patch 0 only
    assert float(m[1, 1]) == pytest.approx(9.0 / 4)  # covered by 4 patches
    assert float(m[0, 1]) == pytest.approx(9.0 / 4 * 0)  # patches 0, 1 only


def test_map_block_is_the_gcd():
    assert map_block(1024, [(128, 128), (256, 256), (512, 512), (1024, 1024)]) == 128
    assert map_block(256, [(32, 16), (64, 32)]) == 16


def test_eq6_product_on_hand_made_maps():
    a1 = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
    a2 = torch.tensor([[[3.0, 1.0], [0.5, 2.0]]])
    w = [0.1, 1.2]
    m = [2.0, 0.5]
    got = fuse_log_maps([a1, a2], m, w, "product").exp()
    want = (w[0] * a1 / m[0]) * (w[1] * a2 / m[1])  # literal eq. 6 on scaled maps
    torch.testing.assert_close(got, want)
    # unscaled literal eq. 6 differs only by the constant m1*m2
    torch.testing.assert_close(got * m[0] * m[1], (w[0] * a1) * (w[1] * a2))


def test_eq6_geometric_weights_are_exponents():
    a1 = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
    a2 = torch.tensor([[[3.0, 1.0], [0.5, 2.0]]])
    got = fuse_log_maps([a1, a2], [2.0, 0.5], [0.1, 1.2], "geometric").exp()
    want = (a1 / 2.0) ** 0.1 * (a2 / 0.5) ** 1.2
    torch.testing.assert_close(got, want)
    # weight 0 removes a size
    only2 = fuse_log_maps([a1, a2], [2.0, 0.5], [0.0, 1.0], "geometric").exp()
    torch.testing.assert_close(only2, a2 / 0.5)


def test_youden_cutoff_separates_and_is_a_midpoint():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.3, 0.8, 0.9])
    c = youden_cutoff(labels, scores)
    # best rule: > 0.25 (tpr 1, fpr 1/3) ties with > 0.575 (tpr 2/3, fpr 0): J = 2/3 both;
    # the more specific one wins
    assert c == pytest.approx((0.35 + 0.8) / 2)


def test_calibration_puts_the_validation_youden_cut_at_half():
    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.normal(0, 1, 50), rng.normal(2, 1, 50)])
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    n = MapNormalizer([32], [1.0], "geometric", [1.0])
    n.fit_calibration(raw, y)
    p = n.normalize(torch.tensor(raw)).numpy()
    assert ((p > 0.5) == (raw > youden_cutoff(y, raw))).all()
    assert ((p > 0) & (p < 1)).all()
    # JSON round trip
    assert MapNormalizer.from_dict(n.to_dict()) == n


def test_scales_are_validation_normal_medians():
    n = MapNormalizer.fit_scales([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[10.0, 30.0, 20.0]])],
                                 [32, 64], [1.0, 1.0], "geometric")
    assert n.scales == [2.0, 20.0]


