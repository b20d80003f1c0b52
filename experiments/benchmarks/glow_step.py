"""Forward+backward throughput and activation memory of the project's 2D Glow.

Compares, on the same batch and the same L/K/width:
  * the project's Glow (``lightning_modules.glow``: fused ActNorm + 1x1 conv, in-place ReLUs,
    paper coupling scale) against normflows' own Glow (``nf.flows.GlowBlock`` in an
    ``nf.MultiscaleFlow``, their example), and
  * the project's Glow with gradient checkpointing of the coupling networks on vs off.

    python -m experiments.benchmarks.glow_step [--size 64 --levels 3 --steps 4 --width 128
                                                 --batch 8 --iters 5 --channels-last --compile]

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over a step; on CPU the bytes
of the tensors autograd saves for backward (saved-tensor hooks), a proxy for peak activation
memory.

How close the step is to the machine's limit: the FLOPs of one forward+backward step
(``torch.utils.flop_counter.FlopCounterMode``) times the measured steps per second, against the
FLOP/s of a plain ``torch.mm`` measured in the same run (``fraction_of_matmul_peak``), and the
top operators of a ``torch.profiler`` run of the step (where the rest of the time goes).
The last lines are ``fraction_of_matmul_peak=<x>``, ``throughput_vs_normflows=<x>`` and
``memory_checkpointed_ratio=<x>``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import normflows as nf
import torch

from lightning_modules.glow.torch_model import (
    build_glow,
    dequantize,
    estimate_memory,
    level_shapes,
    saved_activation_bytes,
)


def normflows_glow(levels: int, steps: int, width: int, input_shape: tuple[int, int, int]):
    """normflows' Glow example (GlowBlock, Squeeze, Merge, DiagGaussian) with a fixed prior."""
    c, h, w = input_shape
    q0, flows, merges = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.lu deprecation inside normflows
        for i in range(levels):
            flows_ = [nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), width, split_mode="channel",
                                         scale=True) for _ in range(steps)]
            flows.append(flows_ + [nf.flows.Squeeze()])
            if i > 0:
                merges.append(nf.flows.Merge())
                s = 2 ** (levels - i)
                latent = (c * s, h // s, w // s)
            else:
                s = 2**levels
                latent = (c * 2 ** (levels + 1), h // s, w // s)
            q0.append(nf.distributions.DiagGaussian(latent, trainable=False))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model, x):
    loss = -model.log_prob(x, None).mean()
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def _peak_memory(model, x, device) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(model, x)
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    return saved_activation_bytes(model, x) if hasattr(model, "actnorms") else \
        _saved_bytes_generic(model, x)


def _saved_bytes_generic(model, x) -> int:
    from lightning_modules.glow.torch_model import SavedTensorMeter

    with SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers())) as m:
        loss = -model.log_prob(x, None).mean()
    del loss
    return m.bytes


def step_flops(model, x) -> int:
    """FLOPs of one forward + backward step (matmuls and convolutions, as counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _step(model, x)
    return int(counter.get_total_flops())


def matmul_flops_per_s(device, n: int = 1024, reps: int = 10) -> float:
    """Sustained FLOP/s of a square float32 ``torch.mm`` (the reference for the step)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def top_ops(model, x, k: int = 6) -> list[tuple[str, float]]:
    """The ``k`` operators with the largest share of one step's self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        _step(model, x)
    events = prof.key_averages()
    attr = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -getattr(e, attr))[:k]
    return [(e.key, getattr(e, attr) / total) for e in ranked]


def benchmark(args) -> dict:
    device = torch.device(args.device)
    shape = (1, args.size, args.size)
    level_shapes(shape, args.levels)  # fails early on a bad size
    torch.manual_seed(0)
    x = dequantize(torch.rand(args.batch, *shape), 8, noise=True).to(device)
    cfg = dict(levels=args.levels, steps=args.steps, hidden_channels=args.width,
               coupling_scale="paper", checkpointing=False, fuse_actnorm=True)
    ours = build_glow(cfg, shape).to(device)
    ref = normflows_glow(args.levels, args.steps, args.width, shape).to(device)
    with torch.no_grad():  # ActNorm data-dependent init on the same batch
        ours.initialize_actnorm(x)
        ref.log_prob(x, None)
    models = {"project": ours, "normflows": ref}
    inputs = {"project": x, "normflows": x}
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
        inputs["project"] = x.contiguous(memory_format=torch.channels_last)
    steps = {k: (lambda m=m: m) for k, m in models.items()}
    if args.compile:
        compiled = torch.compile(ours)
        steps["project"] = lambda: compiled

    times = {k: [] for k in models}
    for k in models:  # warm-up (and compilation)
        _step(steps[k](), inputs[k])
    for _ in range(args.iters):  # interleaved, so load changes hit both alike
        for k in models:
            _sync(device)
            t0 = time.perf_counter()
            _step(steps[k](), inputs[k])
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    thr = {k: args.batch / statistics.median(v) for k, v in times.items()}

    mem = {"project": _peak_memory(ours, inputs["project"], device),
           "normflows": _peak_memory(ref, x, device)}
    ours.set_checkpointing(True)
    mem["project_checkpointed"] = _peak_memory(ours, inputs["project"], device)
    ours.set_checkpointing(False)
    times_ck = []
    ours.set_checkpointing(True)
    for _ in range(max(1, args.iters // 2)):
        _sync(device)
        t0 = time.perf_counter()
        _step(ours, inputs["project"])
        _sync(device)
        times_ck.append(time.perf_counter() - t0)
    thr["project_checkpointed"] = args.batch / statistics.median(times_ck)
    ours.set_checkpointing(False)
    flops = step_flops(ours, inputs["project"])
    peak = matmul_flops_per_s(device)
    achieved = flops * thr["project"] / args.batch  # FLOP/s of the project's step
    return {"throughput": thr, "memory": mem, "step_flops": flops, "matmul_flops_per_s": peak,
            "fraction_of_matmul_peak": achieved / peak,
            "top_ops": top_ops(ours, inputs["project"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); 1 is the reliable choice "
                        "on a loaded CPU box")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the project model")
    p.add_argument("--paper-estimate", action="store_true",
                   help="also print estimate_memory() for the paper's 2D and 3D models")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = benchmark(args)
    unit = "saved-for-backward MiB" if args.device == "cpu" else "peak allocated MiB"
    print(f"device={args.device} size={args.size} L={args.levels} K={args.steps} "
          f"width={args.width} batch={args.batch} iters={args.iters} "
          f"threads={torch.get_num_threads()} channels_last={args.channels_last} "
          f"compile={args.compile}")
    for k, v in r["throughput"].items():
        print(f"  {k:22s} {v:8.2f} img/s   {r['memory'].get(k, float('nan')) / 2**20:9.1f} {unit}")
    if args.paper_estimate:
        for name, shape, lk in (("2D 512^2 L7 K32 w512", (1, 512, 512), (7, 32)),
                                ("3D 32x128^2 L4 K32 w512", (1, 32, 128, 128), (4, 32))):
            for ck in (False, True):
                e = estimate_memory(dict(levels=lk[0], steps=lk[1], hidden_channels=512),
                                    shape, 1, checkpointing=ck)
                print(f"  estimate {name} checkpointing={ck}: activations "
                      f"{e['activations_gib']:.2f} GiB/sample, params+Adam "
                      f"{e['params_gib'] + e['optimizer_gib']:.2f} GiB")
    thr_ratio = r["throughput"]["project"] / r["throughput"]["normflows"]
    mem_ratio = r["memory"]["project_checkpointed"] / r["memory"]["project"]
    print(f"  step: {r['step_flops'] / 1e9:.2f} GFLOP; torch.mm {r['matmul_flops_per_s'] / 1e9:.1f} "
          "GFLOP/s in this run; self time by operator:")
    for name, share in r["top_ops"]:
        print(f"    {share:6.1%}  {name}")
    print(f"memory_vs_normflows={r['memory']['project'] / r['memory']['normflows']:.3f}")
    print(f"checkpointing_throughput_cost={r['throughput']['project_checkpointed'] / r['throughput']['project']:.3f}")
    print(f"fraction_of_matmul_peak={r['fraction_of_matmul_peak']:.3f}")
    print(f"throughput_vs_normflows={thr_ratio:.3f}")
    print(f"memory_checkpointed_ratio={mem_ratio:.3f}")
    return r


if __name__ == "__main__":
    main()
