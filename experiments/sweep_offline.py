"""Run a W&B sweep file locally, without the W&B server: grid and random search.

    python -m experiments.sweep_offline configs/sweeps/glow_cxr.yaml [--count N] [--seed S] \
        [key=value ...]
    make sweep-offline SWEEP=configs/sweeps/glow_cxr.yaml [COUNT=n] [ARGS="profile=cpu ..."]

Each trial is a normal run: a subprocess running the sweep's ``command:`` with the trial's
parameters formatted exactly as W&B's agent formats them (:func:`experiments.sweep.agent_command`),
logged to W&B offline, in its own folder ``outputs/sweeps/<sweep name>/<trial id>`` (passed as
``out_dir=``). The sweep's metric is read from ``<trial out_dir>/metrics.json``; a summary table
(parameters -> metric, best first) is printed and written as ``summary.csv`` and ``summary.md``.
Trials already finished with the same command are reused, so an interrupted sweep resumes.

Why our own sampler: W&B's reference engine (PyPI ``sweeps``) requires numpy<2 from 0.3.0 on
(we pin numpy 2) and pulls in scikit-learn; grid and random search are a few lines. Bayesian
search needs the W&B server (``make sweep``). The grid follows W&B's grid search (parameters in
sorted name order, the first varying slowest; ``int_uniform`` includes max, ``q_uniform`` is
``arange(min, max, q)``, max excluded, as in W&B).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from experiments.config import ConfigError, parse_overrides
from experiments.sweep import (
    ARG_MACROS,
    GRID_KINDS,
    SWEEP_ROOT,
    SweepError,
    agent_command,
    command_entry_point,
    config_for_command,
    flat_parameters,
    load_sweep,
    render_value,
    spec_kind,
    sweep_name,
    with_overrides,
)

log = logging.getLogger(__name__)

RANDOM_KINDS = (
    "constant", "categorical", "categorical_w_probabilities", "int_uniform", "uniform",
    "q_uniform", "log_uniform_values", "q_log_uniform_values", "log_uniform",
)


# --------------------------------------------------------------------------- sampling


def _py(value: Any) -> Any:
    """numpy scalars -> Python numbers (rendered and written to JSON like the agent's values)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _quantize(x: float, q: float) -> int | float:
    """W&B's ``round(x / q) * q``; an int when q is an int (``sweeps.params``)."""
    v = float(np.round(x / q) * q)
    return int(v) if isinstance(q, int) else v


def sample_value(spec: dict, rng: np.random.Generator) -> Any:
    """One random draw from a W&B parameter spec."""
    kind = spec_kind(spec)
    lo, hi, q = spec.get("min"), spec.get("max"), spec.get("q", 1.0)
    if kind == "constant":
        return spec["value"]
    if kind == "categorical":
        return spec["values"][int(rng.integers(len(spec["values"])))]
    if kind == "categorical_w_probabilities":
        p = np.asarray(spec["probabilities"], dtype=float)
        if len(p) != len(spec["values"]) or not math.isclose(p.sum(), 1.0, abs_tol=1e-6):
            raise SweepError(f"probabilities {list(p)} must match values and sum to 1")
        return spec["values"][int(rng.choice(len(p), p=p))]
    if kind == "int_uniform":
        return int(rng.integers(lo, hi + 1))  # both ends included
    if kind == "uniform":
        return float(rng.uniform(lo, hi))
    if kind == "q_uniform":
        return _quantize(rng.uniform(lo, hi), q)
    if kind == "log_uniform_values":  # log(value) uniform on [log min, log max]
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    if kind == "q_log_uniform_values":
        return _quantize(np.exp(rng.uniform(np.log(lo), np.log(hi))), q)
    if kind == "log_uniform":  # W&B's v1: min/max are natural-log exponents
        return float(np.exp(rng.uniform(lo, hi)))
    raise SweepError(f"distribution {kind!r} is not supported offline (supported: "
                     f"{list(RANDOM_KINDS)}); use `make sweep` (W&B) for it")


def grid_values(spec: dict) -> list:
    """The values a grid enumerates for one parameter (W&B's grid search)."""
    kind = spec_kind(spec)
    if kind == "constant":
        return [spec["value"]]
    if kind == "categorical":
        return list(spec["values"])
    if kind == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    if kind == "q_uniform":  # as W&B: np.arange, so max itself is excluded
        return [_py(v) for v in np.arange(spec["min"], spec["max"], spec.get("q", 1.0))]
    raise SweepError(f"distribution {kind!r} cannot be enumerated by a grid "
                     f"(grid takes {list(GRID_KINDS)}); use method: random")


def grid_points(params: dict[str, dict]) -> list[dict[str, Any]]:
    """Every combination, parameters in sorted name order, the first varying slowest;
    repeated combinations once (W&B dedups grid points by value)."""
    names = sorted(params)
    points, seen = [], set()
    for combo in itertools.product(*(grid_values(params[n]) for n in names)):
        key = json.dumps(combo, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            points.append(dict(zip(names, combo)))
    return points


def random_points(params: dict[str, dict], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` independent draws; the same seed gives the same trials."""
    rng = np.random.default_rng(seed)
    names = sorted(params)
    return [{n: _py(sample_value(params[n], rng)) for n in names} for _ in range(count)]


def plan_trials(sweep: dict, count: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials' parameters: the whole grid (capped by ``count``), or ``count`` random draws."""
    params = flat_parameters(sweep)
    method = sweep["method"]
    count = count if count is not None else sweep.get("run_cap")
    if method == "bayes":
        raise SweepError("method: bayes needs the W&B server (it learns from finished runs "
                         "there): use `make sweep`, or change the file to method: grid or random")
    if method == "grid":
        points = grid_points(params)
        return points[:count] if count is not None else points
    if method == "random":
        if not count:
            raise SweepError("method: random needs a number of trials: COUNT=n "
                             "(`--count n`), or run_cap: n in the sweep file")
        return random_points(params, count, seed)
    raise SweepError(f"method: {method!r} is not one of grid, random, bayes")


# --------------------------------------------------------------------------- trials


@dataclass
class Trial:
    trial_id: str
    params: dict[str, Any]
    out_dir: Path
    command: list[str]
    status: str = "pending"  # ok | failed | no-metric | pending
    metric: float = math.nan
    returncode: int | None = None
    seconds: float = 0.0


def read_metric(metrics_path: Path, name: str) -> float:
    """``name`` from a metrics.json: a flat key (``"val/bpd"``) or nested (``{"val": {"bpd"}}``)."""
    data = json.loads(metrics_path.read_text())
    if name in data:
        return float(data[name])
    node: Any = data
    for part in name.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{metrics_path} has no {name!r} (keys: {sorted(data)})")
        node = node[part]
    return float(node)


def trial_env() -> dict[str, str]:
    """The trials' environment: W&B offline, and ``python`` = this interpreter (the agent runs
    ``python`` from PATH)."""
    env = dict(os.environ)
    for k in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        env.pop(k, None)
    env["WANDB_MODE"] = "offline"
    env.setdefault("WANDB_SILENT", "true")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    found = shutil.which("python", path=env["PATH"])
    if not found or not os.path.samefile(found, sys.executable):
        log.warning("`python` on PATH is %s, not this interpreter %s: the trials run with it",
                    found, sys.executable)
    return env


def _done_before(trial: Trial, metric: str) -> bool:
    """A finished trial with the same command (parameters, overrides, out_dir): reuse it."""
    record, metrics = trial.out_dir / "sweep_trial.json", trial.out_dir / "metrics.json"
    if not (record.is_file() and metrics.is_file()):
        return False
    try:
        old = json.loads(record.read_text())
        if old.get("command") != trial.command or old.get("status") != "ok":
            return False
        trial.metric = read_metric(metrics, metric)
    except (OSError, ValueError, KeyError):
        return False
    trial.status, trial.returncode, trial.seconds = "ok", 0, float(old.get("seconds", 0.0))
    return True


def run_trial(trial: Trial, metric: str, env: dict[str, str], stream: bool = False) -> Trial:
    """Run one trial's command; its output goes to ``<out_dir>/trial.log`` (and the console
    with ``stream``). Fills status, metric, return code and time."""
    trial.out_dir.mkdir(parents=True, exist_ok=True)
    logfile = trial.out_dir / "trial.log"
    start = time.monotonic()
    with open(logfile, "w") as fh:
        fh.write("$ " + " ".join(trial.command) + "\n")
        fh.flush()
        if stream:
            proc = subprocess.Popen(trial.command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                fh.write(line)
            rc = proc.wait()
        else:
            rc = subprocess.run(trial.command, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                check=False).returncode
    trial.seconds = time.monotonic() - start
    trial.returncode = rc
    metrics = trial.out_dir / "metrics.json"
    if rc != 0:
        trial.status = "failed"
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        log.error("Trial %s failed (exit %d); last lines of %s:\n%s", trial.trial_id, rc,
                  logfile, "\n".join(tail))
    else:
        try:
            trial.metric = read_metric(metrics, metric)
            trial.status = "ok"
        except (OSError, ValueError, KeyError) as e:
            trial.status = "no-metric"
            log.error("Trial %s finished but its metric is missing: %s", trial.trial_id, e)
    record = {"trial": trial.trial_id, "params": trial.params, "command": trial.command,
              "status": trial.status, "returncode": rc, "metric": trial.metric,
              "seconds": round(trial.seconds, 2)}
    (trial.out_dir / "sweep_trial.json").write_text(json.dumps(record, indent=2, default=str))
    return trial


# --------------------------------------------------------------------------- summary


def sort_trials(trials: list[Trial], goal: str) -> list[Trial]:
    """Best first by the sweep's goal; trials without a metric last, in trial order."""
    ok = [t for t in trials if t.status == "ok" and math.isfinite(t.metric)]
    rest = [t for t in trials if t not in ok]
    ok.sort(key=lambda t: t.metric, reverse=(goal == "maximize"))
    return ok + rest


def summary_rows(trials: list[Trial], metric: str, goal: str) -> list[dict[str, Any]]:
    names = sorted({k for t in trials for k in t.params})
    rows = []
    for rank, t in enumerate(sort_trials(trials, goal), start=1):
        row = {"rank": rank, "trial": t.trial_id}
        row.update({n: render_value(t.params.get(n, "")) for n in names})
        row[metric] = t.metric
        row.update({"status": t.status, "seconds": round(t.seconds, 1), "out_dir": str(t.out_dir)})
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_summary(rows: list[dict[str, Any]], root: Path, title: str) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.md`` (parameters -> metric, best first) in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = root / "summary.csv", root / "summary.md"
    cols = list(rows[0]) if rows else ["rank", "trial"]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    md_cols = [c for c in cols if c != "out_dir"]
    lines = [f"# {title}", "", "| " + " | ".join(md_cols) + " |",
             "|" + "|".join("---" for _ in md_cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in md_cols) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def print_summary(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = [c for c in (rows[0] if rows else {}) if c != "out_dir"]
    for c in cols:
        table.add_column(c, justify="right" if c in ("rank", "seconds") else "left")
    for row in rows:
        style = None if row["status"] == "ok" else "red"
        table.add_row(*(_fmt(row[c]) for c in cols), style=style)
    console = Console()
    if not console.is_terminal:  # a log file: do not squeeze the columns to 80 characters
        widths = [max([len(c)] + [len(_fmt(r[c])) for r in rows]) + 3 for c in cols]
        console = Console(width=max(80, sum(widths) + 1))
    console.print(table)


# --------------------------------------------------------------------------- driver


def run_sweep(sweep_path: str | Path, count: int | None = None, seed: int = 0,
              overrides: list[str] | None = None, root: str | Path = SWEEP_ROOT,
              stream: bool = False, force: bool = False) -> list[dict[str, Any]]:
    """Run a sweep file's grid or random search locally; returns the summary rows, best first."""
    from experiments.common import track

    path = Path(sweep_path)
    sweep = load_sweep(path)
    name = sweep_name(sweep, path)
    metric, goal = sweep["metric"]["name"], sweep["metric"].get("goal", "minimize")
    extra = parse_overrides(overrides or [])
    swept = set(flat_parameters(sweep, path))
    clash = [o for o in extra if o.split("=", 1)[0] in swept | {"out_dir"}]
    if clash:
        raise SweepError(f"{clash}: out_dir is set per trial and the other keys are swept by "
                         f"{path}; drop them")
    if "early_terminate" in sweep:
        log.warning("%s: early_terminate is ignored offline (every trial runs to the end)", path)
    points = plan_trials(sweep, count, seed)
    sweep_root = Path(root) / name
    sweep_root.mkdir(parents=True, exist_ok=True)
    used = dict(sweep, command=with_overrides(sweep["command"], extra))
    (sweep_root / "sweep.yaml").write_text(yaml.safe_dump(used, sort_keys=False))
    env = trial_env()
    trials = []
    for i, params in enumerate(points):
        tid = f"t{i:03d}"
        out = sweep_root / tid
        cmd = agent_command(with_overrides(sweep["command"], extra, out_dir=str(out)), params,
                            program=sweep.get("program"))
        trials.append(Trial(tid, params, out, cmd))
    module = command_entry_point(sweep["command"]) or ""
    if trials and module.startswith("experiments."):
        # A bad override would fail every trial: fail once, now.
        try:
            config_for_command(trials[0].command)
        except ConfigError as e:
            raise SweepError(f"{path}: the trial command does not parse: {e}") from None
    log.info("Sweep %s: %d trial(s), %s search, metric %s (%s); folders under %s", name,
             len(trials), sweep["method"], metric, goal, sweep_root)
    target = sweep["metric"].get("target")
    for t in track(trials, f"sweep {name}", total=len(trials), enabled=not stream):
        if not force and _done_before(t, metric):
            log.info("Trial %s: done before (%s = %s), reused", t.trial_id, metric, t.metric)
        else:
            log.info("Trial %s: %s", t.trial_id, " ".join(t.command))
            run_trial(t, metric, env, stream=stream)
            log.info("Trial %s: %s, %s = %s (%.1f s)", t.trial_id, t.status, metric,
                     _fmt(t.metric), t.seconds)
        if target is not None and t.status == "ok" and (
            t.metric <= target if goal == "minimize" else t.metric >= target
        ):
            log.info("Metric target %s reached: no further trials (as W&B does)", target)
            trials = [x for x in trials if x.status != "pending"]
            break
    rows = summary_rows(trials, metric, goal)
    title = f"Sweep {name}: {metric} ({goal})"
    csv_path, md_path = write_summary(rows, sweep_root, title)
    print_summary(rows, title)
    n_ok = sum(r["status"] == "ok" for r in rows)
    log.info("%d/%d trial(s) ok; summary: %s, %s", n_ok, len(rows), csv_path, md_path)
    if rows and n_ok == 0:
        raise SweepError(f"every trial of {path} failed; see <trial>/trial.log under {sweep_root}")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from experiments.common import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep_offline",
        description="Run a W&B sweep file's grid/random search locally (no W&B server).",
    )
    parser.add_argument("sweep", help="configs/sweeps/<name>.yaml")
    parser.add_argument("--count", type=int, default=None,
                        help="trials to run: required for random search; caps a grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--root", default=SWEEP_ROOT, help="trials go to ROOT/<sweep name>/<id>")
    parser.add_argument("--stream", action="store_true", help="show the trials' output live")
    parser.add_argument("--force", action="store_true", help="re-run finished trials")
    parser.add_argument("overrides", nargs="*",
                        help="key=value added to every trial (e.g. profile=cpu data=padchest)")
    # Overrides may sit anywhere and may be written --key=value as well.
    args, unknown = parser.parse_known_intermixed_args(argv)
    bad = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *unknown]
    for a in args.overrides:
        if a in ARG_MACROS:
            parser.error(f"{a} is a command macro, not an override")
    try:
        return run_sweep(args.sweep, args.count, args.seed, args.overrides, args.root,
                         stream=args.stream, force=args.force)
    except (SweepError, ConfigError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
