"""Training-step time of :class:`SimCLRModule` under a Lightning Trainer vs a bare PyTorch loop.

Both runs use the same lightly parts (``SimCLRProjectionHead``, ``NTXentLoss``, ``LARS``,
``CosineWarmupScheduler``), the same initial weights (a deep copy), the same batch (served by
the same DataLoader) and the same precision, on the same machine, in one process. The time of
an iteration is measured between consecutive batch ends (so loop, logging and data overhead
count), after ``--warmup`` iterations; runs alternate ``--repeats`` times and the best median
of each side is compared (the side that runs first alternates). The last line printed is ``step_time_ratio=<lightning/bare>``.

    python -m experiments.benchmarks.simclr_step                     # CPU, < 2 min
    python -m experiments.benchmarks.simclr_step --backbone resnet50 --patch-size 256 \\
        --batch-size 64 --precision bf16-mixed --channels-last       # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset


class RepeatBatch(Dataset):
    """The same ready-made batch ``n`` times (DataLoader with ``batch_size=None``)."""

    def __init__(self, batch: dict[str, torch.Tensor], n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now() -> tuple[float, float]:
    """(wall clock, CPU time of this process over all its threads)."""
    return time.perf_counter(), time.process_time()


def time_lightning(module, loader, device, precision: str, warmup: int):
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self):
            self.times: list[tuple[float, float]] = []
            self.t: tuple[float, float] | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            now = _now()
            if self.t is not None and batch_idx > warmup:
                self.times.append((now[0] - self.t[0], now[1] - self.t[1]))
            self.t = now

    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=len(loader), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(module, loader)
    return timer.times


def time_bare(model, loader, device, precision: str, warmup: int, hp):
    from lightly.loss import NTXentLoss
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.utils.lars import LARS
    from lightly.utils.scheduler import CosineWarmupScheduler

    model = model.to(device).train()
    criterion = NTXentLoss(temperature=hp.temperature, gather_distributed=True)
    decay, no_decay = get_weight_decay_parameters([model])
    opt = LARS([{"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}],
               lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    sched = CosineWarmupScheduler(opt, warmup_epochs=0, max_epochs=len(loader))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if precision == "bf16-mixed" else contextlib.nullcontext())
    times, t = [], None
    for i, batch in enumerate(loader):
        x = torch.cat([batch["view0"], batch["view1"]]).to(device)  # (2B, 1, S, S)
        if hp.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            _, z = model(x)
            z0, z1 = z.float().chunk(2)
            loss = criterion(z0, z1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _sync(device)
        now = _now()
        if t is not None and i > warmup:
            times.append((now[0] - t[0], now[1] - t[1]))
        t = now
    return times


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="patches per step (2 views each)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="clock of the reported ratio; cpu (process CPU time) is steadier on a "
                        "shared, busy CPU machine; wall is what matters on a GPU")
    args = p.parse_args(argv)

    import pytorch_lightning as pl

    from lightning_modules.simclr import SimCLRModule

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.backends.cudnn.benchmark = True
    pl.seed_everything(0, verbose=False)
    s = args.patch_size
    batch = {"view0": torch.rand(args.batch_size, 1, s, s, device=device),
             "view1": torch.rand(args.batch_size, 1, s, s, device=device)}
    loader = DataLoader(RepeatBatch(batch, args.warmup + 1 + args.steps), batch_size=None)
    proto = SimCLRModule(s, backbone=args.backbone, scheduler="cosine", warmup_epochs=0,
                         channels_last=args.channels_last,
                         proj_hidden_dim=2048 if args.backbone == "resnet50" else 512)
    print(f"device={device} backbone={args.backbone} patch={s} batch={args.batch_size} "
          f"precision={args.precision} channels_last={args.channels_last} "
          f"threads={torch.get_num_threads()} steps={args.steps} warmup={args.warmup}")

    clock = 0 if args.clock == "wall" else 1
    best = {(side, c): float("inf") for side in ("bare", "lightning") for c in (0, 1)}
    for r in range(args.repeats):
        def bare():
            return time_bare(copy.deepcopy(proto.model), loader, device, args.precision,
                             args.warmup, proto.hparams)

        def light():
            return time_lightning(copy.deepcopy(proto), loader, device, args.precision,
                                  args.warmup)

        # Alternate which side runs first, so warm caches / allocator state favour neither.
        if r % 2 == 0:
            runs = {"bare": bare(), "lightning": light()}
        else:
            runs = {"lightning": light(), "bare": bare()}
        line = []
        for side, times in runs.items():
            for c, name in ((0, "wall"), (1, "cpu")):
                med = statistics.median(t[c] for t in times)
                best[side, c] = min(best[side, c], med)
                line.append(f"{side} {name} {med * 1e3:.1f}")
        print(f"repeat {r}: " + ", ".join(line) + " ms/step")
    n = args.batch_size
    for side, label in (("bare", "bare PyTorch loop"), ("lightning", "Lightning Trainer")):
        print(f"{label}: {best[side, 0] * 1e3:.1f} ms/step wall ({n / best[side, 0]:.1f} "
              f"patches/s), {best[side, 1] * 1e3:.1f} ms/step CPU time")
    print(f"wall-clock ratio {best['lightning', 0] / best['bare', 0]:.3f}, "
          f"CPU-time ratio {best['lightning', 1] / best['bare', 1]:.3f}")
    ratio = best["lightning", clock] / best["bare", clock]
    print(f"step_time_ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
