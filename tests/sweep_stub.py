"""Stand-in entry point for the sweep tests: parses its overrides like every entry point
(``load_config``: ``key=value`` and ``--key=value``), writes ``<out_dir>/metrics.json`` with a
metric computed from the swept values, trains nothing.

    val/bpd = (log10(optim.lr) + 3)^2 + 0.1 * glow.steps       (minimum at lr = 1e-3)

``seed=666`` makes it fail, to test how a sweep reports failed trials.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.config import load_config, prepare_run_dir  # noqa: E402


def stub_metric(lr: float, steps: int) -> float:
    return (math.log10(lr) + 3.0) ** 2 + 0.1 * steps


def main(argv: list[str] | None = None) -> None:
    cfg = load_config("base", argv)
    if cfg.seed == 666:
        raise SystemExit("sweep_stub: seed=666 fails on purpose")
    out = prepare_run_dir(cfg)
    metrics = {
        "val/bpd": stub_metric(cfg.optim.lr, cfg.glow.steps),
        "test/bpd": -1.0,  # must never be what a sweep reads
        "argv": sys.argv[1:],
        "wandb_mode": os.environ.get("WANDB_MODE"),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
