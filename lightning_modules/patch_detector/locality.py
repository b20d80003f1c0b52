"""Locality-restricted nearest-neighbour search (Kim et al., Sci Rep 2023, "locality" d).

A query patch of size ``s`` at grid cell ``(i, j)`` is compared only with reference patches of
the same size whose cell ``(k, l)`` satisfies ``max(|i - k|, |j - l|) <= d`` (Chebyshev
distance), over all reference images; its score is the distance to the nearest of them. The
paper uses d = 2, 1, 0, 0 for patch sizes 128, 256, 512, 1024.

This is our own code because no nearest-neighbour library (faiss, torch_cluster, sklearn,
lightly's kNN) supports a per-query candidate set defined by grid position. It is exact:
reference and query features are sorted by cell once (row-major); reference grid row ``k`` of
all reference images is then one contiguous slice, and so are the query patches of rows
``k-d .. k+d`` of all query images that can see it. Each such pair is one batched matmul per
chunk; columns outside the window are masked and a running minimum is kept. Chunks bound every intermediate
matrix to ``chunk_size x chunk_size`` values. :func:`locality_nearest_bruteforce` is the
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
                     chunk_size: int = 4096, query_groups: torch.Tensor | None = None,
                     ref_groups: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest reference of each query patch within Chebyshev distance ``d`` on the grid.

    Args:
        query: prepared query features (Q, D) (see ``distances.prepare``).
        query_cells: (Q, 2) integer grid cells (row, col) of the query patches.
        ref: prepared reference features (R, D), same preparation; float32, or float16 /
            bfloat16 to halve the database's memory (each chunk is upcast to float32 for the
            arithmetic, so only the stored values are rounded: every score moves by at most
            ``max_r |r - round(r)|`` for l2, see ``tests``).
        ref_cells: (R, 2) grid cells of the reference patches.
        d: Chebyshev radius in cells; ``None`` = no locality (search the whole database).
        kernel: ``l2`` | ``l1`` | ``cos`` (``FeatureTransform.kernel``).
        chunk_size: bound on the rows of each query / reference block.
        query_groups, ref_groups: optional (Q,) / (R,) integer ids (e.g. source image); a
            reference is never matched to a query of the same id (leave-one-image-out scores
            of the reference database itself, see ``PatchAnomalyDetector.reference_scales``).

    Returns:
        scores (Q,) float32 distances (``inf`` where the window holds no reference) and
        index (Q,) long into ``ref`` (-1 where none).
    """
    device = ref.device
    query = query.to(device).float()  # a half-precision query (the database's own rows) too
    query_cells, ref_cells = query_cells.to(device), ref_cells.to(device)
    n_q = query.shape[0]
    best = torch.full((n_q,), float("inf"), device=device)
    best_idx = torch.full((n_q,), -1, dtype=torch.long, device=device)
    if n_q == 0 or ref.shape[0] == 0:
        return best, best_idx
    if (query_groups is None) != (ref_groups is None):
        raise ValueError("give both query_groups and ref_groups, or neither")
    if d is None:
        if query_groups is not None:  # whole database = a window wider than any grid
            d = int(max(query_cells.max(), ref_cells.max())) + 1
        else:
            for q0 in range(0, n_q, chunk_size):
                qs = slice(q0, q0 + chunk_size)
                b, bi = _scan(query[qs], ref, 0, kernel, chunk_size)
                best[qs], best_idx[qs] = b, bi
            return finish(best, kernel), best_idx

    n_rows = int(max(query_cells[:, 0].max(), ref_cells[:, 0].max())) + 1
    n_cols = int(max(query_cells[:, 1].max(), ref_cells[:, 1].max())) + 1
    # Sort references and queries by cell once (row-major): a grid row of either is then one
    # contiguous slice, and the query rows k-d..k+d that can see reference row k are one slice.
    r_order = torch.argsort(_grid_keys(ref_cells, n_cols), stable=True)  # (R,)
    q_order = torch.argsort(_grid_keys(query_cells, n_cols), stable=True)  # (Q,)
    ref_s, ref_col = ref[r_order], ref_cells[r_order, 1].long()
    query_s, q_col = query[q_order], query_cells[q_order, 1].long()
    if query_groups is not None:
        q_grp = query_groups.to(device)[q_order].long()
        r_grp = ref_groups.to(device)[r_order].long()
    grid = _regular(query_cells, ref_cells, n_rows, n_cols)
    if grid is not None:  # every cell equally often: search cell by cell, no wasted work
        n_qi, n_ri = grid
        b, bi = _cell_search(
            query_s.reshape(n_rows, n_cols, n_qi, -1), ref_s.reshape(n_rows, n_cols, n_ri, -1),
            d, kernel, chunk_size,
            None if query_groups is None else q_grp.reshape(n_rows, n_cols, n_qi),
            None if query_groups is None else r_grp.reshape(n_rows, n_cols, n_ri))
        best, best_idx = b.reshape(-1), torch.where(b.reshape(-1).isfinite(),
                                                    r_order[bi.reshape(-1).clamp_min(0)], -1)
        scores, index = torch.empty_like(best), torch.empty_like(best_idx)
        scores[q_order], index[q_order] = best, best_idx
        return finish(scores, kernel), index
    r_bounds = _row_bounds(ref_cells[:, 0], n_rows)
    q_bounds = _row_bounds(query_cells[:, 0], n_rows)

    # One block = one reference grid row (all reference images) against every query patch
    # that can see it (query rows k-d..k+d, all query images); columns with |j - l| > d are
    # masked before the minimum. Blocks this large keep the matmuls compute-bound: blocks of
    # one query cell (~n_query rows) were 4x slower than even a search of the whole database.
    for k in range(n_rows):
        ra, rb = r_bounds[k], r_bounds[k + 1]
        qa, qb = q_bounds[max(k - d, 0)], q_bounds[min(k + d, n_rows - 1) + 1]
        if rb <= ra or qb <= qa:
            continue
        for q0 in range(qa, qb, chunk_size):
            q1 = min(q0 + chunk_size, qb)
            q, qc = query_s[q0:q1], q_col[q0:q1]  # (Qc, D), (Qc,)
            for r0 in range(ra, rb, chunk_size):
                r1 = min(r0 + chunk_size, rb)
                dist = pairwise(q, ref_s[r0:r1].float(), kernel)  # (Qc, Rc)
                dist.masked_fill_((qc[:, None] - ref_col[None, r0:r1]).abs() > d, float("inf"))
                if query_groups is not None:
                    dist.masked_fill_(q_grp[q0:q1, None] == r_grp[None, r0:r1], float("inf"))
                v, vi = dist.min(1)
                better = v < best[q0:q1]
                best[q0:q1] = torch.where(better, v, best[q0:q1])
                best_idx[q0:q1] = torch.where(better, r_order[vi + r0], best_idx[q0:q1])
    scores, index = torch.empty_like(best), torch.empty_like(best_idx)
    scores[q_order], index[q_order] = best, best_idx  # back to the caller's query order
    return finish(scores, kernel), index


def _regular(query_cells: torch.Tensor, ref_cells: torch.Tensor, n_rows: int, n_cols: int
             ) -> tuple[int, int] | None:
    """(queries per cell, references per cell) when both sets hold every cell of the
    ``n_rows x n_cols`` grid equally often (whole images on one grid: the usual case), else
    None."""
    out = []
    for cells in (query_cells, ref_cells):
        counts = torch.bincount(_grid_keys(cells, n_cols), minlength=n_rows * n_cols)
        if counts.numel() != n_rows * n_cols or int(counts.min()) != int(counts.max()) or \
                int(counts[0]) == 0:
            return None
        out.append(int(counts[0]))
    return out[0], out[1]


def _cell_search(q4: torch.Tensor, r4: torch.Tensor, d: int, kernel: str, chunk_size: int,
                 q_grp: torch.Tensor | None, r_grp: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Locality search on a regular grid: ``q4`` (G_r, G_c, n_q, D), ``r4`` (G_r, G_c, n_r, D)
    (patches of each cell contiguous). For every reference cell (k, l), the query cells of its
    window (|i - k|, |j - l| <= d: a (2d+1) x (2d+1) block of the grid, clipped at the edges)
    are gathered into one matrix and compared with the cell's references in one matmul: exactly
    the pairs inside the window -- (2d+1)^2 / G^2 of the full search's work, edges excluded --
    with no masking, and each reference read once. (One matmul per grid row and cell offset,
    with ~n_q query rows each, was memory-bound: 1.2x the full search instead of ~3x.) Returns
    the minimum (G_r, G_c, n_q) and its index as a flat cell-sorted reference index."""
    n_rows, n_cols, n_q, dim = q4.shape
    n_r = r4.shape[2]
    best = torch.full((n_rows, n_cols, n_q), float("inf"), device=q4.device)
    best_idx = torch.full((n_rows, n_cols, n_q), -1, dtype=torch.long, device=q4.device)
    qq = (q4 * q4).sum(-1) if kernel == "l2" else None  # (G_r, G_c, n_q)
    step = max(1, int(chunk_size))
    for k in range(n_rows):
        i0, i1 = max(0, k - d), min(n_rows, k + d + 1)
        for col in range(n_cols):
            j0, j1 = max(0, col - d), min(n_cols, col + d + 1)
            window = (i1 - i0, j1 - j0, n_q)
            q = q4[i0:i1, j0:j1].reshape(-1, dim)  # (M, D), M = window cells x n_q
            base = (k * n_cols + col) * n_r
            cur = best[i0:i1, j0:j1].reshape(-1).clone()  # (M,), written back below
            cur_idx = best_idx[i0:i1, j0:j1].reshape(-1).clone()
            for r0 in range(0, n_r, step):
                r = r4[k, col, r0:r0 + step].float()  # (Rc, D); a float16 database upcast
                rr = (r * r).sum(1) if kernel == "l2" else None  # (Rc,)
                for m0 in range(0, q.shape[0], step):
                    qs = slice(m0, m0 + step)
                    if kernel == "l2":
                        dist = torch.addmm(rr[None, :], q[qs], r.T, alpha=-2.0)
                        dist += qq[i0:i1, j0:j1].reshape(-1, 1)[qs]
                        dist.clamp_min_(0.0)
                    elif kernel == "l1":
                        dist = torch.cdist(q[qs], r, p=1.0)
                    elif kernel == "cos":
                        dist = 1.0 - q[qs] @ r.T
                    else:
                        raise ValueError(f"unknown kernel {kernel!r}")
                    if q_grp is not None:
                        dist.masked_fill_(q_grp[i0:i1, j0:j1].reshape(-1, 1)[qs]
                                          == r_grp[k, col, None, r0:r0 + step], float("inf"))
                    v, vi = dist.min(1)
                    better = v < cur[qs]
                    cur[qs] = torch.where(better, v, cur[qs])
                    cur_idx[qs] = torch.where(better, base + r0 + vi, cur_idx[qs])
            best[i0:i1, j0:j1] = cur.reshape(window)
            best_idx[i0:i1, j0:j1] = cur_idx.reshape(window)
    return best, best_idx


def _row_bounds(rows: torch.Tensor, n_rows: int) -> list[int]:
    """Start offsets of each grid row in row-sorted order, plus the total at the end."""
    counts = torch.bincount(rows.long(), minlength=n_rows)
    return [0] + torch.cumsum(counts, 0).tolist()


def _scan(q: torch.Tensor, ref: torch.Tensor, offset: int, kernel: str,
          chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running minimum of ``pairwise(q, ref)`` over reference chunks -> (values, index+offset)."""
    cur = torch.full((q.shape[0],), float("inf"), device=q.device)
    cur_idx = torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
    for r0 in range(0, ref.shape[0], chunk_size):
        dist = pairwise(q, ref[r0:r0 + chunk_size].float(), kernel)  # (Qc, Rc)
        v, vi = dist.min(1)
        better = v < cur
        cur = torch.where(better, v, cur)
        cur_idx = torch.where(better, vi + (offset + r0), cur_idx)
    return cur, cur_idx


@torch.no_grad()
def locality_nearest_bruteforce(query: torch.Tensor, query_cells: torch.Tensor,
                                ref: torch.Tensor, ref_cells: torch.Tensor, d: int | None,
                                kernel: str = "l2", query_groups: torch.Tensor | None = None,
                                ref_groups: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation: a Python loop over query patches, each over its window."""
    scores = torch.full((query.shape[0],), float("inf"))
    index = torch.full((query.shape[0],), -1, dtype=torch.long)
    for n in range(query.shape[0]):
        if d is None:
            cand = torch.arange(ref.shape[0])
        else:
            cheb = (ref_cells - query_cells[n]).abs().max(1).values
            cand = torch.nonzero(cheb <= d).squeeze(1)
        if query_groups is not None:
            cand = cand[ref_groups[cand] != query_groups[n]]
        if cand.numel() == 0:
            continue
        dist = pairwise(query[n:n + 1], ref[cand], kernel)[0]
        k = int(torch.argmin(dist))
        scores[n] = finish(dist[k], kernel)
        index[n] = cand[k]
    return scores, index
