"""Locality search (Kim et al. 2023) equals a brute-force loop for every d and distance."""

import itertools

import pytest
import torch

from lightning_modules.patch_detector.distances import fit_transform, mahalanobis_vi, prepare
from lightning_modules.patch_detector.locality import (
    locality_nearest,
    locality_nearest_bruteforce,
)


def _grid_cells(n_images, n):
    cells = torch.tensor(list(itertools.product(range(n), range(n))))  # (n*n, 2)
    return cells.repeat(n_images, 1)


def _reference_distances(q, r, name, vi):
    """Independent float64 formulas on all pairs (Q, R)."""
    q, r = q.double(), r.double()
    diff = q[:, None, :] - r[None, :, :]  # (Q, R, D)
    if name == "euclidean":
        return diff.pow(2).sum(-1).sqrt()
    if name == "manhattan":
        return diff.abs().sum(-1)
    if name == "cosine":
        return 1 - (q @ r.T) / (q.norm(dim=1)[:, None] * r.norm(dim=1)[None, :])
    return torch.einsum("qrd,de,qre->qr", diff, vi.double(), diff).sqrt()


@pytest.mark.parametrize("distance", ["euclidean", "manhattan", "cosine", "mahalanobis"])
@pytest.mark.parametrize("d", [0, 1, 2, 4, None])
def test_locality_search_equals_brute_force(distance, d):
    g = torch.Generator().manual_seed(7)
    n, dim = 4, 8
    ref_cells, q_cells = _grid_cells(6, n), _grid_cells(3, n)
    ref = torch.randn(len(ref_cells), dim, generator=g)
    query = torch.randn(len(q_cells), dim, generator=g)
    t = fit_transform(ref, distance, shrinkage=0.2)
    # small chunks so that chunking across slices is exercised
    scores, index = locality_nearest(prepare(query, t), q_cells, prepare(ref, t), ref_cells, d,
                                     t.kernel, chunk_size=5)
    vi = mahalanobis_vi(ref, 0.2) if distance == "mahalanobis" else None
    dist = _reference_distances(query, ref, distance, vi)  # (Q, R)
    if d is not None:
        cheb = (q_cells[:, None, :] - ref_cells[None, :, :]).abs().amax(-1)
        dist[cheb > d] = float("inf")
    want, arg = dist.min(1)
    assert torch.equal(index, arg)
    torch.testing.assert_close(scores.double(), want, rtol=1e-4, atol=1e-4)
    # and the loop version used by the benchmark agrees
    bs, bi = locality_nearest_bruteforce(prepare(query, t), q_cells, prepare(ref, t), ref_cells,
                                         d, t.kernel)
    assert torch.equal(bi, index)
    torch.testing.assert_close(bs, scores)


def test_window_is_clipped_at_grid_border_and_uses_all_reference_images():
    # one reference image has a perfect match at cell (0, 1); d=1 from (0, 0) must find it,
    # d=0 must not.
    cells = _grid_cells(2, 3)
    ref = torch.randn(len(cells), 4)
    query = ref[9 + 1:9 + 2].clone()  # image 1, cell (0, 1)
    qc = torch.tensor([[0, 0]])
    s1, i1 = locality_nearest(query, qc, ref, cells, 1)
    assert int(i1) == 10 and float(s1) < 1e-3
    s0, i0 = locality_nearest(query, qc, ref, cells, 0)
    assert int(i0) in (0, 9) and float(s0) > 1e-3


def test_empty_window_gives_inf():
    ref = torch.randn(3, 4)
    ref_cells = torch.tensor([[0, 0], [0, 1], [1, 0]])
    s, i = locality_nearest(torch.randn(1, 4), torch.tensor([[3, 3]]), ref, ref_cells, 1)
    assert torch.isinf(s).all() and int(i) == -1


@pytest.mark.parametrize("d", [0, 1, None])
def test_groups_exclude_same_image_matches(d):
    # searching the database against itself: without groups every patch finds itself (0);
    # with image ids as groups it finds the nearest patch of *another* image (brute force)
    g = torch.Generator().manual_seed(3)
    cells = _grid_cells(5, 3)
    groups = torch.arange(5).repeat_interleave(9)
    ref = torch.randn(len(cells), 6, generator=g)
    s_self, _ = locality_nearest(ref, cells, ref, cells, d)
    assert float(s_self.max()) < 1e-2  # float32 |q|^2+|r|^2-2q.r round-off
    s, i = locality_nearest(ref, cells, ref, cells, d, chunk_size=7, query_groups=groups,
                            ref_groups=groups)
    assert (groups[i] != groups).all() and float(s.min()) > 0.1
    bs, bi = locality_nearest_bruteforce(ref, cells, ref, cells, d, query_groups=groups,
                                         ref_groups=groups)
    assert torch.equal(bi, i)
    torch.testing.assert_close(bs, s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [1, None])
@pytest.mark.parametrize("regular", [True, False])
def test_half_precision_database_moves_each_score_by_at_most_the_rounding(dtype, d, regular):
    """A float16 / bfloat16 database halves its memory; the arithmetic stays float32, so by the
    triangle inequality every l2 score moves by at most max_r |r - round(r)|."""
    g = torch.Generator().manual_seed(3)
    ref_cells, q_cells = _grid_cells(20, 4), _grid_cells(3, 4)
    if not regular:  # some cells missing: the row-block path
        ref_cells = ref_cells[3:]
    ref = torch.randn(len(ref_cells), 64, generator=g)
    query = torch.randn(len(q_cells), 64, generator=g)
    t = fit_transform(ref, "mahalanobis", shrinkage=0.2)
    r32, q32 = prepare(ref, t), prepare(query, t)
    s32, i32 = locality_nearest(q32, q_cells, r32, ref_cells, d, t.kernel, chunk_size=7)
    r16 = r32.to(dtype)
    s16, i16 = locality_nearest(q32, q_cells, r16, ref_cells, d, t.kernel, chunk_size=7)
    bound = float((r32 - r16.float()).norm(dim=1).max())
    assert bound > 0  # the rounding is real, so the check below can fail
    assert float((s16 - s32).abs().max()) <= bound + 1e-5
    assert float((i16 == i32).float().mean()) > 0.9  # neighbours almost all unchanged
    # a control: perturbing the database by more than the bound moves the scores beyond it
    noisy = r32 + 10 * bound * torch.randn(r32.shape, generator=g)
    s_bad, _ = locality_nearest(q32, q_cells, noisy, ref_cells, d, t.kernel)
    assert float((s_bad - s32).abs().max()) > bound
