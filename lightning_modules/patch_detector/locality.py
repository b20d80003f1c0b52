"""Locality-restricted nearest-neighbour search (Kim et al., Sci Rep 2023, "locality" d).

A query patch of size ``s`` at grid cell ``(i, j)`` is compared only with reference patches of
the same size whose cell ``(k, l)`` satisfies ``max(|i - k|, |j - l|) <= d`` (Chebyshev
distance), over all reference images; its score is the distance to the nearest of them. The
paper uses d = 2, 1, 0, 0 for patch sizes 128, 256, 512, 1024.

This is our own code because no nearest-neighbour library (faiss, torch_cluster, sklearn,
lightly's kNN) supports a per-query candidate set defined by grid position. It is exact:
reference features are sorted by cell once, so the candidates of a query cell are ``2d + 1``
contiguous row slices of the sorted array; every query of that cell (from every query image)
is compared with those slices by batched matmuls, chunked so that no intermediate matrix
exceeds ``chunk_size x chunk_size`` values. :func:`locality_nearest_bruteforce` is the
loop-over-queries reference it is tested against.
"""

from __future__ import annotations

import torch

from lightning_modules.patch_detector.distances import finish, pairwise


def _grid_keys(cells: torch.Tensor, n_cols: int) -> torch.Tensor:
    return cells[:, 0].long() * n_cols + cells[:, 1].long()


@torch.no_grad()
def locality_nearest(query: torch.Tensor, query_cells: torch.Tensor, ref: torch.Tensor,
                     ref_cells: torch.Tensor, d: int | None, kernel: str = "l2",
                     chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest reference of each query patch within Chebyshev distance ``d`` on the grid.

    Args:
        query: prepared query features (Q, D) (see ``distances.prepare``).
        query_cells: (Q, 2) integer grid cells (row, col) of the query patches.
        ref: prepared reference features (R, D), same preparation.
        ref_cells: (R, 2) grid cells of the reference patches.
        d: Chebyshev radius in cells; ``None`` = no locality (search the whole database).
        kernel: ``l2`` | ``l1`` | ``cos`` (``FeatureTransform.kernel``).
        chunk_size: bound on the rows of each query / reference block.

    Returns:
        scores (Q,) float32 distances (``inf`` where the window holds no reference) and
        index (Q,) long into ``ref`` (-1 where none).
    """
    device = ref.device
    query, query_cells, ref_cells = query.to(device), query_cells.to(device), ref_cells.to(device)
    n_q = query.shape[0]
    best = torch.full((n_q,), float("inf"), device=device)
    best_idx = torch.full((n_q,), -1, dtype=torch.long, device=device)
    if n_q == 0 or ref.shape[0] == 0:
        return best, best_idx
    if d is None:
        for q0 in range(0, n_q, chunk_size):
            qs = slice(q0, q0 + chunk_size)
            b, bi = _scan(query[qs], ref, 0, kernel, chunk_size)
            best[qs], best_idx[qs] = b, bi
        return finish(best, kernel), best_idx

    n_rows = int(max(query_cells[:, 0].max(), ref_cells[:, 0].max())) + 1
    n_cols = int(max(query_cells[:, 1].max(), ref_cells[:, 1].max())) + 1
    # Sort the references by cell once: a window row is then one contiguous slice.
    rkey = _grid_keys(ref_cells, n_cols)
    order = torch.argsort(rkey, stable=True)  # (R,)
    ref_sorted = ref[order]
    counts = torch.bincount(rkey, minlength=n_rows * n_cols)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    ends = torch.cumsum(counts, 0).tolist()

    qkey = _grid_keys(query_cells, n_cols)
    for key in torch.unique(qkey).tolist():
        qidx = torch.nonzero(qkey == key).squeeze(1)  # (Qc,) queries of this cell
        i, j = divmod(key, n_cols)
        c0, c1 = max(j - d, 0), min(j + d, n_cols - 1)
        slices = []
        for row in range(max(i - d, 0), min(i + d, n_rows - 1) + 1):
            a, b = starts[row * n_cols + c0], ends[row * n_cols + c1]
            if b > a:
                slices.append((a, b))
        for q0 in range(0, qidx.numel(), chunk_size):
            qi = qidx[q0:q0 + chunk_size]
            q = query[qi]  # (Qc, D)
            cur = torch.full((qi.numel(),), float("inf"), device=device)
            cur_idx = torch.full((qi.numel(),), -1, dtype=torch.long, device=device)
            for a, b in slices:
                v, vi = _scan(q, ref_sorted[a:b], a, kernel, chunk_size)
                better = v < cur
                cur = torch.where(better, v, cur)
                cur_idx = torch.where(better, vi, cur_idx)
            best[qi] = cur
            best_idx[qi] = torch.where(cur_idx >= 0, order[cur_idx.clamp_min(0)], cur_idx)
    return finish(best, kernel), best_idx


def _scan(q: torch.Tensor, ref: torch.Tensor, offset: int, kernel: str,
          chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running minimum of ``pairwise(q, ref)`` over reference chunks -> (values, index+offset)."""
    cur = torch.full((q.shape[0],), float("inf"), device=q.device)
    cur_idx = torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
    for r0 in range(0, ref.shape[0], chunk_size):
        dist = pairwise(q, ref[r0:r0 + chunk_size], kernel)  # (Qc, Rc)
        v, vi = dist.min(1)
        better = v < cur
        cur = torch.where(better, v, cur)
        cur_idx = torch.where(better, vi + (offset + r0), cur_idx)
    return cur, cur_idx


@torch.no_grad()
def locality_nearest_bruteforce(query: torch.Tensor, query_cells: torch.Tensor,
                                ref: torch.Tensor, ref_cells: torch.Tensor, d: int | None,
                                kernel: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation: a Python loop over query patches, each over its window."""
    scores = torch.full((query.shape[0],), float("inf"))
    index = torch.full((query.shape[0],), -1, dtype=torch.long)
    for n in range(query.shape[0]):
        if d is None:
            cand = torch.arange(ref.shape[0])
        else:
            cheb = (ref_cells - query_cells[n]).abs().max(1).values
            cand = torch.nonzero(cheb <= d).squeeze(1)
        if cand.numel() == 0:
            continue
        dist = pairwise(query[n:n + 1], ref[cand], kernel)[0]
        k = int(torch.argmin(dist))
        scores[n] = finish(dist[k], kernel)
        index[n] = cand[k]
    return scores, index
