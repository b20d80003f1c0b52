"""``make demo``: both methods end to end on embedded phantom data with ``profile=cpu``.

W&B is off (``logger=none``) to keep it fast; pass ``logger=wandb`` for offline runs.
Runs the patch detector on phantom chest radiographs, then the flow posterior on phantom chest
radiographs (2D Glow) and phantom head-CT volumes (3D Glow); prints each metrics table, the
report paths and the wall time. Extra ``key=value`` arguments go to every pipeline run;
``print_config=true`` prints the three runs' resolved configurations and exits.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from experiments import pipeline
from experiments.cli import entry
from experiments.common import setup_logging
from experiments.config import PrintConfig, print_config_requested

log = logging.getLogger(__name__)

RUNS = (
    ("patch", ["method=patch", "data=folder", "data.modality=cxr"]),
    ("flow_cxr", ["method=flow", "data=folder", "data.modality=cxr"]),
    ("flow_bct", ["method=flow", "data=folder", "data.modality=bct"]),
)


def config_yaml(argv: list[str]) -> str:
    """The resolved configuration of one pipeline run (what ``print_config=true`` prints)."""
    try:
        pipeline.main([*argv, "print_config=true"])
    except PrintConfig as request:
        return request.yaml
    raise RuntimeError("the pipeline ran instead of printing its configuration")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    out_root = Path("outputs/demo")
    extra = []
    for a in argv:
        if a.lstrip("-").startswith("out_dir="):
            out_root = Path(a.split("=", 1)[1])
        else:
            extra.append(a)

    def run_argv(name: str, args: list[str]) -> list[str]:
        return [*args, "profile=cpu", "logger=none", f"out_dir={out_root / name}", *extra]

    if print_config_requested(extra):
        raise PrintConfig(None, yaml="".join(f"# === {name} ===\n{config_yaml(run_argv(name, a))}"
                                             for name, a in RUNS))
    results, times = {}, {}
    t_all = time.perf_counter()
    for name, args in RUNS:
        t0 = time.perf_counter()
        results[name] = pipeline.main(run_argv(name, args))
        times[name] = time.perf_counter() - t0
    total = time.perf_counter() - t_all

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"make demo: phantom data, profile=cpu ({total:.0f} s)")
    for col in ("run", "AUROC [95 % CI]", "AUROC (likelihood only)", "pixel AUROC", "time"):
        table.add_column(col)

    def fmt(v, ci=None):
        if v is None:
            return "–"
        if ci is None or len(ci) != 2:
            return f"{v:.3f}"
        return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"  # 95 % CI: DeLong / bootstrap over images

    for name, m in results.items():
        lik = m.get("likelihood") or {}
        table.add_row(name, fmt(m.get("auroc"), m.get("auroc_ci")),
                      fmt(m.get("auroc_likelihood"), lik.get("auroc_ci")),
                      fmt(m.get("pixel_auroc"), m.get("pixel_auroc_ci")),
                      f"{times[name]:.0f} s")
    console = Console()
    console.print(table)
    for name in results:
        console.print(f"report ({name}): {out_root / name / 'report.html'}", soft_wrap=True)
    return results


if __name__ == "__main__":
    entry(main)
