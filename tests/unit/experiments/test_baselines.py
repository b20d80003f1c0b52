"""The two reference detectors: definitions on hand-made inputs, separation of a bright blob,
chance on noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.baselines import (
    cnn_feature_maps,
    cnn_nn_scores,
    random_cnn,
    top_fraction_mean,
    zscore_fit,
    zscore_scores,
)
from experiments.evaluation import auroc


def blob_set(rng, n, size=32, depth=None, blob=True, contrast=0.5):
    """Noisy flat images; the second half gets a bright disc (radius 3) at a random place."""
    shape = (n, size, size) if depth is None else (n, depth, size, size)
    x = (0.3 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    y = np.zeros(n, int)
    if blob:
        y[n // 2:] = 1
        yy, xx = np.ogrid[:size, :size]
        for i in range(n // 2, n):
            cy, cx = rng.integers(6, size - 6, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 9
            (x[i] if depth is None else x[i, depth // 2])[disc] += contrast
    return x, y


def test_zscore_definition():
    train = np.stack([np.zeros((4, 4)), 2 * np.ones((4, 4))]).astype(np.float32)
    train[:, 0, 0] = 5.0  # constant pixel: SD 0 -> floored
    mu, sigma = zscore_fit(train, std_floor=0.1)
    assert mu[1, 1] == 1.0 and sigma[1, 1] == 1.0
    assert sigma[0, 0] == pytest.approx(0.1 * 15 / 16)  # 0.1 x mean SD (15 of 16 pixels: 1)
    test = np.ones((1, 4, 4), np.float32)
    test[0, 2, 3] = 4.0  # z = 3
    scores, maps = zscore_scores(train, test, top_fraction=0.01)
    assert maps[0, 2, 3] == pytest.approx(3.0) and scores[0] == pytest.approx(maps[0, 0, 0])
    assert top_fraction_mean(np.arange(200.0).reshape(1, 200), 0.01)[0] == pytest.approx(198.5)


def test_random_cnn_is_seeded_and_layer2():
    a, b = random_cnn(0), random_cnn(0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(random_cnn(1).parameters()))
    f = cnn_feature_maps(np.zeros((3, 40, 40), np.float32), a, input_size=64)
    assert f.shape == (3, 128, 8, 8)


@pytest.mark.parametrize("depth", [None, 4])
def test_baselines_separate_a_bright_blob(depth):
    rng = np.random.default_rng(0)
    train, _ = blob_set(rng, 30, depth=depth, blob=False)
    test, y = blob_set(rng, 30, depth=depth)
    z, zmap = zscore_scores(train, test)
    c, cmap = cnn_nn_scores(train, test, input_size=64)
    assert zmap.shape == test.shape
    assert cmap.shape == ((30, 8, 8) if depth is None else (30, depth, 8, 8))
    assert auroc(y, z) > 0.9 and auroc(y, c) > 0.9


def test_baselines_at_chance_on_noise():
    """Control: the 'abnormal' half carries its blob, but every image is replaced by noise."""
    rng = np.random.default_rng(1)
    train, _ = blob_set(rng, 30, blob=False)
    test, y = blob_set(rng, 60)
    noise_train = rng.random(train.shape).astype(np.float32)
    noise_test = rng.random(test.shape).astype(np.float32)
    for fn in (zscore_scores, lambda a, b: cnn_nn_scores(a, b, input_size=64)):
        s, _ = fn(noise_train, noise_test)
        assert abs(auroc(y, s) - 0.5) < 0.2


def test_cnn_nn_locality_window():
    """A feature seen in training at another place is anomalous with d = 0, not with d = big."""
    rng = np.random.default_rng(2)
    train, _ = blob_set(rng, 10, size=64, blob=False, contrast=0.0)
    train[:, 8:16, 8:16] += 0.6  # every normal image: a bright square top left
    test = train[:2].copy()
    test[:, 8:16, 8:16] -= 0.6
    test[:, 48:56, 48:56] += 0.6  # the same square bottom right
    s0, _ = cnn_nn_scores(train, test, d=0, input_size=64)
    s_all, _ = cnn_nn_scores(train, test, d=8, input_size=64)
    assert (s_all < s0).all()
