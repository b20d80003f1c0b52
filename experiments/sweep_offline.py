"""Run a W&B sweep file locally, without the W&B server: grid and random search.

    python -m experiments.sweep_offline configs/sweeps/glow_cxr.yaml [--count N] [--seed S] \
        [key=value ...]
    make sweep-offline SWEEP=configs/sweeps/glow_cxr.yaml [COUNT=n] [ARGS="profile=cpu ..."]

Each trial is a normal run, in ``outputs/sweeps/<sweep name>/<trial id>``: the sweep's command as
W&B's agent would run it, logged to W&B offline. The metric is read from its ``metrics.json``;
the summary, best first, goes to ``summary.csv`` and ``summary.md``. Finished trials with the
same command are reused, so an interrupted sweep resumes. Our own sampler, because W&B's engine
(PyPI ``sweeps``) requires numpy<2; its grid order is W&B's (sorted names, the first slowest).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from experiments import grid
from experiments.cli import entry
from experiments.config import parse_overrides
from experiments.sweep import (
    SWEEP_ROOT,
    SweepError,
    agent_command,
    check_command,
    command_entry_point,
    flat_parameters,
    load_sweep,
    sweep_name,
    with_overrides,
)

log = logging.getLogger(__name__)


def _quantize(x: float, q: float) -> int | float:
    """W&B's ``round(x / q) * q``; an int when q is an int."""
    v = float(np.round(x / q) * q)
    return int(v) if isinstance(q, int) else v


def sample_value(spec: dict, rng: np.random.Generator) -> Any:
    """One random draw from a W&B parameter spec (``log_uniform``: W&B's v1, min/max are
    natural-log exponents; ``log_uniform_values``: log(value) uniform on [log min, log max])."""
    lo, hi, q, values = spec.get("min"), spec.get("max"), spec.get("q", 1.0), spec.get("values")
    draw = {
        "constant": lambda: spec["value"],
        "categorical": lambda: values[int(rng.integers(len(values)))],
        "categorical_w_probabilities": lambda: values[int(rng.choice(
            len(values), p=np.asarray(spec["probabilities"], dtype=float)))],
        "int_uniform": lambda: int(rng.integers(lo, hi + 1)),  # both ends included
        "uniform": lambda: float(rng.uniform(lo, hi)),
        "q_uniform": lambda: _quantize(rng.uniform(lo, hi), q),
        "log_uniform_values": lambda: float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
        "q_log_uniform_values": lambda: _quantize(np.exp(rng.uniform(np.log(lo), np.log(hi))), q),
        "log_uniform": lambda: float(np.exp(rng.uniform(lo, hi))),
    }
    kind = grid.spec_kind(spec)
    if kind not in draw:
        raise SweepError(f"distribution {kind!r} is not supported offline (supported: "
                         f"{list(draw)}); use `make sweep` (W&B) for it")
    value = draw[kind]()
    return value.item() if isinstance(value, np.generic) else value


def grid_values(spec: dict) -> list:
    """The values a grid enumerates for one parameter (W&B's grid search)."""
    kind = grid.spec_kind(spec)
    if kind in ("constant", "categorical"):
        return grid.example_values(spec)
    if kind == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    if kind == "q_uniform":  # as W&B: np.arange, so max itself is excluded
        return np.arange(spec["min"], spec["max"], spec.get("q", 1.0)).tolist()
    raise SweepError(f"distribution {kind!r} cannot be enumerated by a grid; use method: random")


def grid_points(params: dict[str, dict]) -> list[dict[str, Any]]:
    """Every combination, parameters in sorted name order (W&B dedups repeated points)."""
    return grid.cartesian({n: grid_values(params[n]) for n in sorted(params)})


def random_points(params: dict[str, dict], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` independent draws; the same seed gives the same trials."""
    rng = np.random.default_rng(seed)
    return [{n: sample_value(params[n], rng) for n in sorted(params)} for _ in range(count)]


def plan_trials(sweep: dict, count: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials' parameters: the whole grid (capped by ``count``), or ``count`` random draws."""
    count = count if count is not None else sweep.get("run_cap")
    if sweep["method"] == "bayes":
        raise SweepError("method: bayes needs the W&B server (it learns from finished runs "
                         "there): use `make sweep`, or change the file to method: grid or random")
    if sweep["method"] == "grid":
        return grid_points(flat_parameters(sweep))[:count]
    if not count:
        raise SweepError("method: random needs a number of trials: COUNT=n "
                         "(`--count n`), or run_cap: n in the sweep file")
    return random_points(flat_parameters(sweep), count, seed)


def read_metric(metrics_path: Path, name: str) -> float:
    """``name`` from a metrics.json: a flat key (``"val/bpd"``) or nested (``{"val": {"bpd"}}``)."""
    node = data = json.loads(metrics_path.read_text())
    for part in [name] if name in data else name.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{metrics_path} has no {name!r} (keys: {sorted(data)})")
        node = node[part]
    return float(node)


def trial_env() -> dict[str, str]:
    """W&B offline, no agent variables, and ``python`` (which the command runs) = this one."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")}
    env.update(WANDB_MODE="offline", WANDB_SILENT=env.get("WANDB_SILENT", "true"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    found = shutil.which("python", path=env["PATH"])
    if not found or not os.path.samefile(found, sys.executable):
        log.warning("`python` on PATH is %s, not this interpreter %s: the trials run with it",
                    found, sys.executable)
    return env


def run_trial(tid: str, params: dict, command: list[str], out: Path, metric: str, env: dict,
              stream: bool = False, force: bool = False) -> dict[str, Any]:
    """One trial's summary row: its command run (output in ``<out>/trial.log``, and on the
    console with ``stream``) and recorded in ``<out>/sweep_trial.json``, or the finished trial
    with the same command reused."""
    record_path, logfile = out / "sweep_trial.json", out / "trial.log"
    row = {"trial": tid, **{k: str(v) for k, v in params.items()}, metric: math.nan,
           "status": "ok", "seconds": 0.0, "out_dir": str(out)}
    try:
        old = {} if force else json.loads(record_path.read_text())
        if old.get("command") == command and old.get("status") == "ok":
            row[metric], row["seconds"] = read_metric(out / "metrics.json", metric), old["seconds"]
            log.info("Trial %s: done before (%s = %s), reused", tid, metric, row[metric])
            return row
    except (OSError, ValueError, KeyError):
        pass  # not run yet, or its files are unreadable: run it
    out.mkdir(parents=True, exist_ok=True)
    log.info("Trial %s: %s", tid, " ".join(command))
    start = time.monotonic()
    with open(logfile, "w") as fh:
        fh.write("$ " + " ".join(command) + "\n")
        fh.flush()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE if stream else fh,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout if stream else ():
            sys.stdout.write(line)
            fh.write(line)
        rc = proc.wait()
    row["seconds"] = round(time.monotonic() - start, 1)
    if rc != 0:
        row["status"] = "failed"
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
        log.error("Trial %s failed (exit %d); last lines of %s:\n%s", tid, rc, logfile, tail)
    else:
        try:
            row[metric] = read_metric(out / "metrics.json", metric)
        except (OSError, ValueError, KeyError) as e:
            row["status"] = "no-metric"
            log.error("Trial %s finished but its metric is missing: %s", tid, e)
    record = {"trial": tid, "params": params, "command": command, "status": row["status"],
              "returncode": rc, "metric": row[metric], "seconds": row["seconds"]}
    record_path.write_text(json.dumps(record, indent=2, default=str))
    log.info("Trial %s: %s, %s = %s (%.1f s)", tid, row["status"], metric, row[metric],
             row["seconds"])
    return row


def run_sweep(sweep_path: str | Path, count: int | None = None, seed: int = 0,
              overrides: list[str] | None = None, root: str | Path = SWEEP_ROOT,
              stream: bool = False, force: bool = False) -> list[dict[str, Any]]:
    """Run a sweep file's grid or random search locally; returns the summary rows, best first."""
    path, sweep = Path(sweep_path), load_sweep(sweep_path)
    name, metric, goal = (sweep_name(sweep, path), sweep["metric"]["name"],
                          sweep["metric"].get("goal", "minimize"))
    extra = parse_overrides(overrides or [])
    if clash := [o for o in extra if o.split("=", 1)[0] in {*flat_parameters(sweep), "out_dir"}]:
        raise SweepError(f"{clash}: out_dir is set per trial and the other keys are swept by "
                         f"{path}; drop them")
    if "early_terminate" in sweep:
        log.warning("%s: early_terminate is ignored offline (every trial runs to the end)", path)
    points, folder, env = plan_trials(sweep, count, seed), Path(root) / name, trial_env()
    folder.mkdir(parents=True, exist_ok=True)
    used = dict(sweep, command=with_overrides(sweep["command"], extra))
    (folder / "sweep.yaml").write_text(yaml.safe_dump(used, sort_keys=False))
    commands = [agent_command(with_overrides(sweep["command"], extra, str(folder / f"t{i:03d}")),
                              p, program=sweep.get("program")) for i, p in enumerate(points)]
    if points and (command_entry_point(sweep["command"]) or "").startswith("experiments."):
        check_command(commands[0], path)
    log.info("Sweep %s: %d trial(s), %s search, metric %s (%s); folders under %s", name,
             len(points), sweep["method"], metric, goal, folder)
    target, sign = sweep["metric"].get("target"), (1 if goal == "minimize" else -1)

    def reached(row: dict) -> bool:  # W&B stops a sweep once its metric target is reached
        hit = target is not None and not grid.failed(row) and sign * (row[metric] - target) <= 0
        if hit:
            log.info("Metric target %s reached: no further trials (as W&B does)", target)
        return hit

    rows = grid.run_grid(points, lambda i, p: run_trial(
        f"t{i:03d}", p, commands[i], folder / f"t{i:03d}", metric, env, stream, force),
        f"sweep {name}", stop=reached, progress=not stream)
    ok = sorted((r for r in rows if not grid.failed(r) and math.isfinite(r[metric])),
                key=lambda r: sign * r[metric])
    rows = [{"rank": k, **r} for k, r in enumerate(ok + [r for r in rows if r not in ok], 1)]
    title = f"Sweep {name}: {metric} ({goal})"
    csv_path, md_path = grid.write_table(rows, folder / "summary", title)
    log.info("%d/%d trial(s) ok; summary: %s, %s", len(ok), len(rows), csv_path, md_path)
    if rows and not ok:
        raise SweepError(f"every trial of {path} failed; see <trial>/trial.log under {folder}")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    arguments = {
        "sweep": dict(help="configs/sweeps/<name>.yaml"),
        "--count": dict(type=int, help="trials to run: required for random search; caps a grid"),
        "--seed": dict(type=int, default=0, help="seed of the random search"),
        "--root": dict(default=SWEEP_ROOT, help="trials go to ROOT/<sweep name>/<id>"),
        "--stream": dict(action="store_true", help="show the trials' output live"),
        "--force": dict(action="store_true", help="re-run finished trials"),
        "overrides": dict(nargs="*", help="key=value added to every trial (e.g. profile=cpu)"),
    }
    return grid.cli("python -m experiments.sweep_offline", "Run a W&B sweep file's grid/random "
                    "search locally (no W&B server).", arguments, lambda a: run_sweep(
                        a.sweep, a.count, a.seed, a.overrides, a.root, a.stream, a.force), argv)


if __name__ == "__main__":
    entry(main)
