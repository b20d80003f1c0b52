"""Stand-in entry point for the sweep tests: parses its overrides like every entry point
(``load_config``: ``key=value`` and ``--key=value``), writes ``<out_dir>/metrics.json`` with a
metric computed from the swept values, trains nothing.

    val/bpd = (log10(optim.lr) + 3)^2 + 0.1 * glow.steps       (minimum at lr = 1e-3)

``optim.lr=0.5`` makes it fail, to test how a sweep reports failed trials.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The stub stands in for an entry point's parsing, not its models: register the model packages
# as bare namespaces so that importing their ``config.py`` schema files does not run package
# ``__init__``s that import torch/Lightning (~13 s per trial here, which is not under test).
for _pkg in ("lightning_modules.glow", "lightning_modules.simclr",
             "lightning_modules.patch_detector"):
    if _pkg not in sys.modules:
        _mod = types.ModuleType(_pkg)
        _mod.__path__ = [str(ROOT / _pkg.replace(".", "/"))]
        sys.modules[_pkg] = _mod

from experiments.config import load_config, prepare_run_dir  # noqa: E402


def stub_metric(lr: float, steps: int) -> float:
    return (math.log10(lr) + 3.0) ** 2 + 0.1 * steps


def main(argv: list[str] | None = None) -> None:
    cfg = load_config("base", argv)
    if cfg.optim.lr == 0.5:
        raise SystemExit("sweep_stub: optim.lr=0.5 fails on purpose")
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
