"""One GPU check (issue 16): the paper-scale steps on one GPU, measured next to their estimates.

    python -m experiments.benchmarks.gpu_check [--out outputs/gpu_check.json] [--quick]
    make gpu-check

Sections (each timed on its own; one that fails, e.g. out of memory, is recorded with its
error and the others still run):

* ``simclr``: SimCLR ResNet-50 on 256² patches, bf16-mixed, batch 64 (2 views): patches/s of
  the Lightning step and its ratio to a bare PyTorch loop (``benchmarks.simclr_step``);
* ``glow2d``: Glow 512², L7 K32 width 512 (the paper's RSNA model), gradient checkpointing,
  micro-batch 64: peak memory of a training step (forward, backward, Adam) and img/s, next to
  ``estimate_memory``;
* ``glow3d``: 3D Glow 32×128×128, L4 K32 width 512 (head CT, Appendix B), batch 1: the same;
* ``locality``: the locality search at paper scale (1,800 × 64 × 2,048 database, 200 query
  images) on the GPU, float32 and bfloat16 databases, vs the whole-database search.

Writes ``--out`` (JSON) and prints a table. Without CUDA it says so, writes
``{"cuda": false}`` and exits 0. ``--quick`` shrinks every model (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch


def _sync(device: str = "cuda") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def simclr(quick: bool) -> dict:
    import copy

    from torch.utils.data import DataLoader

    from experiments.benchmarks.simclr_step import RepeatBatch, time_bare, time_lightning
    from lightning_modules.simclr import SimCLRModule

    size, batch, steps, warmup = (64, 8, 3, 1) if quick else (256, 64, 12, 3)
    backbone = "resnet18" if quick else "resnet50"
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    data = {"view0": torch.rand(batch, 1, size, size, device=device),
            "view1": torch.rand(batch, 1, size, size, device=device)}
    loader = DataLoader(RepeatBatch(data, warmup + 1 + steps), batch_size=None)
    proto = SimCLRModule(size, backbone=backbone, scheduler="cosine", warmup_epochs=0,
                         proj_hidden_dim=2048 if backbone == "resnet50" else 512)
    time_bare(copy.deepcopy(proto.model), loader, device, "bf16-mixed", warmup, proto.hparams)
    bare = statistics.median(t[0] for t in time_bare(copy.deepcopy(proto.model), loader, device,
                                                     "bf16-mixed", warmup, proto.hparams))
    light = statistics.median(t[0] for t in time_lightning(copy.deepcopy(proto), loader, device,
                                                           "bf16-mixed", warmup))
    return {"backbone": backbone, "patch_size": size, "batch": batch, "precision": "bf16-mixed",
            "patches_per_s": batch / light, "patches_per_s_bare": batch / bare,
            "lightning_vs_bare": light / bare}


def glow(shape: tuple[int, ...], levels: int, steps: int, width: int, batch: int,
         checkpointing: bool, iters: int = 3, device: str = "cuda") -> dict:
    """Training steps (forward, backward, Adam) of the project's Glow: peak memory (CUDA;
    NaN elsewhere), items/s."""
    cuda = torch.device(device).type == "cuda"
    from lightning_modules.glow.torch_model import build_glow, dequantize, estimate_memory

    cfg = dict(levels=levels, steps=steps, hidden_channels=width, coupling_scale="paper",
               coupling_net="openai", checkpointing=checkpointing, fuse_actnorm=True)
    est = estimate_memory(cfg, shape, batch, checkpointing=checkpointing)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_glow(cfg, shape).to(device)
    x = dequantize(torch.rand(batch, *shape, device=device), 8, noise=True)
    with torch.no_grad():
        model.initialize_actnorm(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(iters + 1):
        _sync(device)
        t0 = time.perf_counter()
        loss = -model.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i:  # the first step pays cuDNN's algorithm search
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"shape": list(shape), "levels": levels, "steps": steps, "width": width,
            "batch": batch, "checkpointing": checkpointing, "items_per_s":
            batch / statistics.median(times), "peak_gib": peak,
            "estimated_gib": est["total_gib"], "measured_vs_estimated": peak / est["total_gib"],
            "loss_finite": bool(torch.isfinite(loss).item())}


def locality(quick: bool) -> dict:
    from experiments.benchmarks import locality_search as ls

    if quick:
        ls.PAPER.update(n_ref=50, n_query=10, dim=64)
    out = {}
    for name in ("float32", "bfloat16"):
        sec, peak_mb, scores, index, t_full, gb = ls.paper_measure(name, "cuda",
                                                                   full=name == "float32")
        out[name] = {"seconds": sec, "peak_mb": peak_mb, "database_gb": gb,
                     "whole_db_seconds": t_full, "_index": index}
    same = float((out["bfloat16"].pop("_index") == out["float32"].pop("_index")).mean())
    out["bfloat16"]["neighbours_as_float32"] = same
    out["speedup_vs_full_db"] = out["float32"]["whole_db_seconds"] / out["float32"]["seconds"]
    out.update({k: v for k, v in ls.PAPER.items()})
    return out


SECTIONS = {
    "simclr": lambda q: simclr(q),
    "glow2d": lambda q: glow((1, 64, 64) if q else (1, 512, 512), 3 if q else 7, 2 if q else 32,
                             32 if q else 512, 4 if q else 64, True),
    "glow3d": lambda q: glow((1, 8, 32, 32) if q else (1, 32, 128, 128), 2 if q else 4,
                             2 if q else 32, 32 if q else 512, 1, False),
    "locality": lambda q: locality(q),
}


def print_table(res: dict) -> None:
    print(f"GPU check on {res['device']} (torch {res['torch']}, CUDA {res['cuda_version']})")
    for name, r in res["sections"].items():
        if "error" in r:
            print(f"  {name:9s} FAILED after {r['seconds']:.0f} s: {r['error']}")
            continue
        if name == "simclr":
            line = (f"{r['backbone']} {r['patch_size']}² {r['precision']} batch {r['batch']}: "
                    f"{r['patches_per_s']:.0f} patches/s (Lightning), "
                    f"{r['patches_per_s_bare']:.0f} bare, ratio {r['lightning_vs_bare']:.3f}")
        elif name.startswith("glow"):
            line = (f"{'x'.join(map(str, r['shape'][1:]))} L{r['levels']} K{r['steps']} "
                    f"w{r['width']} batch {r['batch']} checkpointing {r['checkpointing']}: "
                    f"{r['items_per_s']:.2f} items/s, peak {r['peak_gib']:.1f} GiB vs "
                    f"estimated {r['estimated_gib']:.1f} GiB "
                    f"(x{r['measured_vs_estimated']:.2f})")
        else:
            f32, b16 = r["float32"], r["bfloat16"]
            line = (f"{r['n_ref']} x {r['grid']}² x {r['dim']}-d vs {r['n_query']} images: "
                    f"{f32['seconds']:.2f} s float32 ({f32['peak_mb'] / 1024:.1f} GiB peak), "
                    f"{b16['seconds']:.2f} s bfloat16 ({b16['peak_mb'] / 1024:.1f} GiB, "
                    f"{100 * b16['neighbours_as_float32']:.1f} % same neighbours); whole DB "
                    f"{f32['whole_db_seconds']:.2f} s (x{r['speedup_vs_full_db']:.2f})")
        print(f"  {name:9s} {line}  [{r['seconds']:.0f} s]")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/gpu_check.json")
    p.add_argument("--quick", action="store_true", help="tiny models (checks the script)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("CUDA is not available: no GPU to check (run `make gpu-check` on a GPU machine).")
        res = {"cuda": False}
        out.write_text(json.dumps(res, indent=2))
        return res
    res = {"cuda": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cuda_version": torch.version.cuda, "quick": a.quick, "sections": {}}
    for name in a.sections.split(","):
        t0 = time.perf_counter()
        try:
            r = SECTIONS[name](a.quick)
        except Exception as e:  # one failed section (e.g. OOM) must not hide the others
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        r["seconds"] = time.perf_counter() - t0
        res["sections"][name] = r
        torch.cuda.empty_cache()
        out.write_text(json.dumps(res, indent=2, default=float))  # partial results survive
    print_table(res)
    print(f"written {out}")
    return res


if __name__ == "__main__":
    main()
