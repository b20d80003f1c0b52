"""Activation memory of a SimCLR step with and without ``simclr.chunk_size``, and the time
overhead of chunking.

    python -m experiments.benchmarks.simclr_chunk_memory [--backbone resnet50]
        [--batch-size 256] [--chunk-size 32] [--sizes 256 512 1024] [--time-size 64]

Memory: the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``)
during the forward of the 2B views of a batch of B patches, counted on the meta device (shapes
only, no arithmetic, so paper-size ResNet-50s at 1024^2 are measured in seconds on a laptop).
Without chunks all 2B views' activations are alive at once; with ``chunk_size`` the
checkpointed forward keeps only the chunk inputs, and the backward re-runs one chunk at a time,
so the peak is one chunk's activations (+ the inputs). Weights, gradients and optimiser state
are not counted (they do not depend on the batch).

Time: one optimiser step of the same module on the CPU at ``--time-size`` with and without
chunks (same weights, same batch; median of ``--repeats``). Last line
``chunk_time_overhead=<chunked / unchunked step time>``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves during ``model(x)`` (meta or real tensors); an upper
    bound: a tensor saved by two operations counts twice."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def memory_table(backbone: str, batch: int, chunk: int, sizes: list[int]) -> list[dict]:
    from lightning_modules.simclr.torch_model import SimCLRModel

    with torch.device("meta"):
        model = SimCLRModel(backbone, 2048, 128).train()
    rows = []
    for s in sizes:
        full = saved_bytes(model, torch.empty(2 * batch, 1, s, s, device="meta"))
        per_chunk = saved_bytes(model, torch.empty(chunk, 1, s, s, device="meta"))
        inputs = 2 * batch * s * s * 4
        rows.append({"patch": s, "full_GiB": full / 2**30,
                     "chunk_GiB": (per_chunk + inputs) / 2**30, "ratio": (per_chunk + inputs)
                     / full})
    return rows


def step_time(chunk: int | None, size: int, batch: int, repeats: int, backbone: str) -> float:
    from lightning_modules.simclr.lightning_model import SimCLRModule

    torch.manual_seed(0)
    m = SimCLRModule(patch_size=size, backbone=backbone, proj_hidden_dim=128, proj_out_dim=64,
                     optimizer="adam", lr=1e-4, chunk_size=chunk).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x0, x1 = (torch.rand(batch, 1, size, size, generator=g) for _ in range(2))
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        *_, loss = m.forward_views(x0, x1)
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256, help="patches (2x views)")
    p.add_argument("--chunk-size", type=int, default=32, help="views per chunk")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--time-size", type=int, default=64)
    p.add_argument("--time-batch", type=int, default=32)
    p.add_argument("--time-backbone", default="resnet18")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    print(f"Activation memory of one step, {a.backbone}, batch {a.batch_size} patches "
          f"({2 * a.batch_size} views), chunk {a.chunk_size} views (meta-device count):")
    print(f"{'patch':>6} {'one pass GiB':>13} {'chunked GiB':>12} {'ratio':>7}")
    for r in memory_table(a.backbone, a.batch_size, a.chunk_size, a.sizes):
        print(f"{r['patch']:>6} {r['full_GiB']:>13.1f} {r['chunk_GiB']:>12.2f} "
              f"{r['ratio']:>7.3f}")
    t_full = step_time(None, a.time_size, a.time_batch, a.repeats, a.time_backbone)
    t_chunk = step_time(max(1, a.time_batch // 4), a.time_size, a.time_batch, a.repeats,
                        a.time_backbone)
    ratio = t_chunk / t_full
    print(f"Step time on CPU ({a.time_backbone}, {a.time_size}^2, batch {a.time_batch}, "
          f"chunk {max(1, a.time_batch // 4)} views): one pass {t_full * 1e3:.0f} ms, chunked "
          f"{t_chunk * 1e3:.0f} ms (the re-run forward; ~1.3x expected)")
    print(f"chunk_time_overhead={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
