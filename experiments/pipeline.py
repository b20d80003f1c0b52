"""One command per method: train -> score -> evaluate -> report.

    python -m experiments.pipeline method=patch|flow data=... out_dir=OUT [profile=cpu|paper]

Writes OUT/scores.csv (path,label,score; label 1 = abnormal; higher = more anomalous),
OUT/metrics.json and OUT/report.html (README: "Evaluation outputs and how to read the report"). The work is done by
``experiments.pipeline_<method>`` (``load(argv)`` -> config, ``run(cfg)`` -> metrics).
"""

from __future__ import annotations

import importlib
import sys

from experiments.cli import entry
from experiments.common import setup_logging
from experiments.config import resolve_job


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    module = importlib.import_module(f"experiments.pipeline_{resolve_job('pipeline', argv).method}")
    cfg = module.load(argv)
    return module.run(cfg)


if __name__ == "__main__":
    entry(main)
