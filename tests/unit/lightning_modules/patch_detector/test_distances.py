"""Similarity functions of the patch detector against independent references (scipy)."""

import numpy as np
import pytest
import torch
from scipy.spatial import distance as sd

from lightning_modules.patch_detector.distances import (
    fit_transform,
    inverse_sqrt,
    mahalanobis_vi,
    patch_distance,
    sample_covariance,
    shrunk_covariance,
)


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(6, 6, generator=g)
    ref = torch.randn(40, 6, generator=g) @ mix + 3.0  # correlated, off-centre
    q = torch.randn(5, 6, generator=g) @ mix + 3.0
    return q, ref


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 0.7])
def test_mahalanobis_equals_scipy(feats, shrinkage):
    q, ref = feats
    t = fit_transform(ref, "mahalanobis", shrinkage=shrinkage)
    vi = mahalanobis_vi(ref, shrinkage).numpy()
    got = patch_distance(q, ref, t).double().numpy()
    want = np.array([[sd.mahalanobis(a, b, vi) for b in ref.double().numpy()]
                     for a in q.double().numpy()])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_vi_is_the_inverse_of_the_shrunk_sample_covariance(feats):
    _, ref = feats
    s = np.cov(ref.double().numpy(), rowvar=False)  # numpy's unbiased covariance
    a = 0.3
    target = (1 - a) * s + a * np.trace(s) / s.shape[0] * np.eye(s.shape[0])
    np.testing.assert_allclose(mahalanobis_vi(ref, a).numpy(), np.linalg.inv(target), rtol=1e-8)
    np.testing.assert_allclose(sample_covariance(ref).numpy(), s, rtol=1e-10)


def test_pseudo_inverse_for_singular_covariance():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 10, generator=g, dtype=torch.float64)  # rank 3 < 10
    cov = shrunk_covariance(sample_covariance(ref), 0.0)
    w = inverse_sqrt(cov)
    np.testing.assert_allclose((w @ w).numpy(), np.linalg.pinv(cov.numpy(), rcond=1e-6),
                               atol=1e-6)


@pytest.mark.parametrize("name,scipy_name", [("euclidean", "euclidean"),
                                             ("manhattan", "cityblock"),
                                             ("cosine", "cosine")])
def test_other_distances_equal_scipy(feats, name, scipy_name):
    q, ref = feats
    got = patch_distance(q, ref, fit_transform(ref, name)).double().numpy()
    want = sd.cdist(q.double().numpy(), ref.double().numpy(), scipy_name)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_distance_fails(feats):
    with pytest.raises(ValueError, match="hamming"):
        fit_transform(feats[1], "hamming")
