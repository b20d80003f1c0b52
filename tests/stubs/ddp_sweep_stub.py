"""Tiny 2-process CPU DDP Lightning run for the sweep tests: every rank parses the command line
with ``load_config`` and writes the value it resolved for ``optim.lr`` to
``<out_dir>/rank<r>.json``; rank 0 also writes metrics.json. Shows that swept values, passed as
command-line overrides, reach every DDP rank (Lightning re-launches the same command per rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from experiments.config import load_config  # noqa: E402


class TinyModule(pl.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main() -> None:
    cfg = load_config("base")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)
    trainer.fit(TinyModule(cfg.optim.lr), data)
    rank = trainer.global_rank
    record = {"rank": rank, "world_size": trainer.world_size, "lr": cfg.optim.lr}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps({"val/loss": cfg.optim.lr}))
    # gloo's threads must stop before the interpreter does: left to exit, a rank can abort
    # ("terminate called without an active exception", exit -6; seen once in make test-slow)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
