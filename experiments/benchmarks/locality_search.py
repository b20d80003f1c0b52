"""Benchmark: exact locality search vs a brute-force loop vs full-database search.

    python -m experiments.benchmarks.locality_search [--dim 2048] [--grid 8] [--n-ref 200]
        [--n-query 20] [--d 2] [--distance mahalanobis] [--device cpu] [--paper-scale]

Same random data for all: ``n_ref`` reference images and ``n_query`` query images, each a
``grid x grid`` patch grid with ``dim``-d features. Checks that the vectorised search returns
exactly the brute-force loop's neighbours and prints the time ratios against the brute-force
loop, the same search over the whole database, ``torch.cdist`` + min (PatchCore-style) and
faiss' exact ``IndexFlatL2`` (``pip install faiss-cpu``; ``make benchmarks`` installs it).

``--paper-scale`` adds Kim et al.'s size: a database of 1,800 images x 64 cells x 2,048-d
(0.94 GB in float32) against 200 query images, with the database stored in float32, bfloat16
and float16 (each in its own process, so that its peak resident memory is its own), the
neighbours and scores of the half-precision databases compared with float32's.

The last lines are ``speedup_vs_bruteforce=``, ``speedup_vs_full_db=``, ``speedup_vs_cdist=``,
``speedup_vs_faiss=``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from lightning_modules.patch_detector.distances import fit_transform, prepare
from lightning_modules.patch_detector.locality import (
    locality_nearest,
    locality_nearest_bruteforce,
)


def _timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--n-ref", type=int, default=200)
    p.add_argument("--n-query", type=int, default=20)
    p.add_argument("--d", type=int, default=2)
    p.add_argument("--distance", default="mahalanobis")
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: comparable on a shared machine)")
    p.add_argument("--paper-scale", action="store_true",
                   help="also 1,800 reference x 200 query images (minutes; ~4 GB of memory)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    paper = paper_scale(a) if a.paper_scale else None

    g = torch.Generator().manual_seed(a.seed)
    cells = torch.tensor(list(itertools.product(range(a.grid), range(a.grid))))
    ref_cells, q_cells = cells.repeat(a.n_ref, 1), cells.repeat(a.n_query, 1)
    ref = torch.randn(len(ref_cells), a.dim, generator=g)
    query = torch.randn(len(q_cells), a.dim, generator=g)
    t = fit_transform(ref, a.distance, shrinkage=0.1)
    dev = torch.device(a.device)
    ref_p, query_p = prepare(ref, t).to(dev), prepare(query, t).to(dev)
    print(f"{a.n_ref} reference / {a.n_query} query images, {a.grid}x{a.grid} grid, "
          f"{a.dim}-d features, d={a.d}, {a.distance}, device={dev}: "
          f"{len(ref)} reference and {len(query)} query patches")

    locality_nearest(query_p[:64], q_cells[:64], ref_p, ref_cells, a.d, t.kernel)  # warm-up
    t_fast, (s_fast, i_fast) = _timed(lambda: locality_nearest(
        query_p, q_cells, ref_p, ref_cells, a.d, t.kernel, a.chunk_size), repeats=3)
    t_loop, (s_loop, i_loop) = _timed(lambda: locality_nearest_bruteforce(
        query_p.cpu(), q_cells, ref_p.cpu(), ref_cells, a.d, t.kernel))
    t_full, (s_full, _) = _timed(lambda: locality_nearest(
        query_p, q_cells, ref_p, ref_cells, None, t.kernel, a.chunk_size), repeats=3)

    # What a user would otherwise pick: PatchCore-style cdist + min over the whole database,
    # and faiss' exact IndexFlatL2 (benchmark-only extra: pip install faiss-cpu).
    def cdist_min():
        return min_over_chunks(query_p, ref_p)

    t_cdist, _ = _timed(cdist_min, repeats=3)
    t_faiss = float("nan")
    try:
        import faiss

        faiss.omp_set_num_threads(a.threads)
        index = faiss.IndexFlatL2(ref_p.shape[1])
        index.add(ref_p.cpu().numpy())
        t_faiss, _ = _timed(lambda: index.search(query_p.cpu().numpy(), 1), repeats=3)
    except ImportError:
        print("faiss not installed (pip install faiss-cpu): speedup_vs_faiss=nan")

    identical = torch.equal(i_fast.cpu(), i_loop)
    max_diff = float((s_fast.cpu() - s_loop).abs().max())
    print(f"locality search (vectorised): {t_fast:8.3f} s")
    print(f"brute-force loop over queries:{t_loop:8.3f} s  (x{t_loop / t_fast:.1f} slower)")
    print(f"full-DB search (no locality): {t_full:8.3f} s  (x{t_full / t_fast:.2f} vs locality)")
    print(f"identical neighbours: {identical}; max |score difference| = {max_diff:.2e}")
    print(f"full-DB scores <= locality scores everywhere: "
          f"{bool((s_full.cpu() <= s_fast.cpu() + 1e-4).all())}")
    if not identical:
        raise SystemExit("locality search disagrees with the brute-force loop")
    print(f"torch.cdist + min, whole DB:  {t_cdist:8.3f} s;  faiss IndexFlatL2: {t_faiss:8.3f} s")
    if paper is not None:
        print_paper_scale(paper)
    speedup = t_loop / t_fast
    print(f"speedup_vs_bruteforce={speedup:.1f}")
    print(f"speedup_vs_full_db={t_full / t_fast:.2f}")
    print(f"speedup_vs_cdist={t_cdist / t_fast:.2f}")
    print(f"speedup_vs_faiss={t_faiss / t_fast:.2f}")
    return speedup


def min_over_chunks(q: torch.Tensor, r: torch.Tensor, chunk: int = 4096):
    """Nearest reference of every query over the whole database with ``torch.cdist``."""
    out = [torch.cdist(q[i:i + chunk], r).min(1) for i in range(0, q.shape[0], chunk)]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


# --- paper scale ----------------------------------------------------------------------------
PAPER = {"n_ref": 1800, "n_query": 200, "grid": 8, "dim": 2048, "d": 2}


def _paper_run(dtype_name: str, device: str, threads: int, full: bool, queue) -> None:
    """:func:`paper_measure` in a fresh process (so that its peak memory is its own)."""
    torch.set_num_threads(threads)
    queue.put(paper_measure(dtype_name, device, full))


def paper_measure(dtype_name: str, device: str, full: bool) -> tuple:
    """The paper-scale search with the database stored as ``dtype_name``: (seconds, peak MB
    (CUDA: allocated; CPU: this process's resident set), scores, index (numpy), whole-DB
    seconds (nan unless ``full``), database GB)."""
    import resource

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    cells = torch.tensor(list(itertools.product(range(PAPER["grid"]), range(PAPER["grid"]))))
    ref_cells, q_cells = cells.repeat(PAPER["n_ref"], 1), cells.repeat(PAPER["n_query"], 1)
    dtype = getattr(torch, dtype_name)
    # built in slices so that a half-precision database never exists in float32 at once
    ref = torch.empty(len(ref_cells), PAPER["dim"], dtype=dtype)
    for i in range(0, len(ref), 8192):
        ref[i:i + 8192] = torch.randn(min(8192, len(ref) - i), PAPER["dim"], generator=g)
    query = torch.randn(len(q_cells), PAPER["dim"], generator=g)
    dev = torch.device(device)
    ref, query = ref.to(dev), query.to(dev)
    t0 = time.perf_counter()
    scores, index = locality_nearest(query, q_cells, ref, ref_cells, PAPER["d"], "l2")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    t_full = float("nan")
    if full:
        t0 = time.perf_counter()
        locality_nearest(query, q_cells, ref, ref_cells, None, "l2")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_full = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return (seconds, peak, scores.cpu().numpy(), index.cpu().numpy(), t_full,
            ref.numel() * ref.element_size() / 2**30)


def paper_scale(a) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for name in ("float32", "bfloat16", "float16"):
        q = ctx.Queue()
        proc = ctx.Process(target=_paper_run, args=(name, a.device, a.threads,
                                                    name == "float32", q))
        proc.start()
        out[name] = q.get()
        proc.join()
    return out


def print_paper_scale(res: dict) -> None:
    p = PAPER
    print(f"paper scale: {p['n_ref']} reference / {p['n_query']} query images, "
          f"{p['grid']}x{p['grid']} grid, {p['dim']}-d, d={p['d']}, l2:")
    s32, i32 = res["float32"][2], res["float32"][3]
    for name, (sec, peak, s, i, t_full, gb) in res.items():
        same = float((i == i32).mean())
        diff = float(abs(s - s32).max())
        extra = f"; whole-DB search {t_full:.1f} s (x{t_full / sec:.2f})" if t_full == t_full \
            else ""
        print(f"  database {name:8s} {gb:5.2f} GB: {sec:7.1f} s, peak memory {peak:7.0f} MB, "
              f"neighbours as float32 {100 * same:5.1f} %, max |score change| {diff:.2e}{extra}")
    print(f"paper_scale_seconds={res['float32'][0]:.1f}")


if __name__ == "__main__":
    main()
