"""Hyper-parameter sweeps with W&B: create a sweep from ``configs/sweeps/<name>.yaml``, run an agent.

    python -m experiments.sweep configs/sweeps/glow_cxr.yaml [--count N] [key=value ...]
    make sweep SWEEP=configs/sweeps/glow_cxr.yaml [COUNT=n] [ARGS="data=padchest data.root=..."]

Sweep files are in W&B's format (https://docs.wandb.ai/models/sweeps/sweep-config-keys); the
agent appends the trial's ``key=value`` (``${args_no_hyphens}``) or ``--key=value`` (``${args}``),
parsed on every DDP rank. W&B's public API only; :mod:`experiments.sweep_offline` needs no server.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from experiments.cli import entry
from experiments.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    load_config,
    parse_overrides,
    resolve_job,
)
from experiments.grid import cli, spec_problems

log = logging.getLogger(__name__)

METHODS, GOALS = ("grid", "random", "bayes"), ("minimize", "maximize")
# The macros our entry points can read (not W&B's JSON, `--key value`, Hydra or bare flags).
ARG_MACROS = ("${args}", "${args_no_hyphens}")
MACROS = (*ARG_MACROS, "${env}", "${interpreter}", "${program}")
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")
# One folder per run: the agent sets WANDB_RUN_ID, OmegaConf resolves it when out_dir is read.
SWEEP_ROOT = "outputs/sweeps"
RUN_DIR_TEMPLATE = SWEEP_ROOT + "/{name}/${{oc.env:WANDB_RUN_ID,local}}"
OFFLINE_HINT = "Without W&B access, run the same sweep locally: make sweep-offline SWEEP={}"
# What each entry point writes to <out_dir>/metrics.json and logs; only validation metrics.
ENTRY_POINT_METRICS: dict[str, tuple[str, ...]] = {
    "experiments.train_simclr": ("val/knn_acc", "val/alignment", "val/uniformity", "val/loss"),
    "experiments.train_glow": ("val/bpd",),
    "experiments.pipeline": ("val/auroc",),
}


class SweepError(ConfigError):
    """A sweep file or set-up that cannot be used; the message names the file and the fix."""


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML and check it (:func:`validate_sweep`)."""
    if not (p := Path(path)).is_file():
        avail = sorted(str(q) for q in (CONFIG_DIR / "sweeps").glob("*.yaml"))
        raise SweepError(f"Sweep file {p} does not exist. Available: {avail}")
    try:
        sweep = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(sweep, dict):
        raise SweepError(f"{p}: a sweep file is a mapping with method, metric, parameters, command")
    validate_sweep(sweep, p)
    return sweep


def sweep_name(sweep: dict, path: str | Path) -> str:  # the name:, or the stem, as a folder
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(sweep.get("name") or Path(path).stem))


def flat_parameters(sweep: dict, path: str | Path = "<sweep>") -> dict[str, dict]:
    """``parameters:`` as {dotted config key: spec}; a SweepError if empty."""
    if not isinstance(params := sweep.get("parameters"), dict) or not params:
        raise SweepError(f"{path}: 'parameters' must be a non-empty mapping of config keys")
    return params


def command_entry_point(command: list) -> str | None:  # python -m <module>'s module, or None
    items = [str(c) for c in command]
    return items[items.index("-m") + 1] if "-m" in items[:-1] else None


def validate_sweep(sweep: dict, path: str | Path = "<sweep>") -> None:
    """Check a sweep file against W&B's format and our config schema; raise :class:`SweepError`
    listing every problem (method, metric, command macros, parameter names, value types)."""
    method, metric, command = sweep.get("method"), sweep.get("metric"), sweep.get("command")
    metric = metric if isinstance(metric, dict) else {}
    items = [str(c) for c in command] if isinstance(command, list) else []
    name, module = metric.get("name"), command_entry_point(items)
    written = ENTRY_POINT_METRICS.get(module, (name,))
    bad = [c for c in items if re.fullmatch(r"\$\{.*\}", c) and c not in MACROS
           and not ENVVAR.fullmatch(c)]
    problems = [msg for wrong, msg in [
        (method not in METHODS, f"method: {method!r} is not one of {list(METHODS)}"),
        (not name, "metric: needs {name: val/..., goal: minimize|maximize}"),
        (metric.get("goal", "minimize") not in GOALS,
         f"metric.goal: {metric.get('goal')!r} is not one of {list(GOALS)}"),
        (name and not str(name).startswith("val/"), f"metric.name: {name!r} - a sweep optimises "
         "a validation metric ('val/...'), never the test set"),
        (name and name not in written,
         f"metric.name: {name!r} is not written by {module} (it writes {list(written)})"),
        (not items, "command: needs a list: [${env}, python, -m, MODULE, ${args_no_hyphens}]"),
        (bad or not set(items) & set(ARG_MACROS), "command: must pass the trial's parameters "
         "with ${args_no_hyphens} (key=value) or ${args} (--key=value)"
         + (f"; {bad} cannot be read by our entry points" if bad else "")),
    ] if wrong]
    try:
        params = flat_parameters(sweep, path)
    except SweepError as e:
        problems, params = [*problems, str(e).split(": ", 1)[-1]], {}
    fixed = {i.split("=", 1)[0].lstrip("-") for i in items if "=" in i and not i.startswith("$")}
    for key, spec in params.items():
        also = ["also set in command, whose value would silently win: remove one"] * (key in fixed)
        problems += [f"parameters.{key}: {p}" for p in also + spec_problems(key, spec, method)]
    if problems:
        raise SweepError(f"{path}: invalid sweep file:\n  - " + "\n  - ".join(problems))


def with_overrides(command: list, overrides: list[str], out_dir: str | None = None) -> list[str]:
    """The command with extra ``key=value`` items (and ``out_dir=``, replacing the command's)
    just before the argument macro, so that the trial's parameters still come last."""
    items = [str(c) for c in command]
    if out_dir is not None:
        items = [c for c in items if not c.lstrip("-").startswith("out_dir=")]
        overrides = [*overrides, f"out_dir={out_dir}"]
    idx = next((i for i, c in enumerate(items) if c in ARG_MACROS), len(items))
    return items[:idx] + list(overrides) + items[idx:]


def agent_command(command: list, params: dict[str, Any], program: str | None = None) -> list[str]:
    """The argv W&B's agent runs for a trial with ``params``: our copy of wandb 0.31's
    ``Agent._command_run``, whose helpers are private. Values are written with Python's ``str``
    (``True``, ``1e-05``, ``[0.1, 1.2]``); ``${envvar:X}`` is $X, or X when unset."""
    flags = [f"{k}={v}" for k, v in params.items()]
    macros = {"${args}": ["--" + f for f in flags], "${args_no_hyphens}": flags,
              "${env}": ["/usr/bin/env"] if os.name != "nt" else [],
              "${interpreter}": ["python"], "${program}": [program] if program else []}
    return [a for c in map(str, command)
            for a in macros.get(c, [ENVVAR.sub(lambda m: os.environ.get(m[1], m[1]), c)])]


def config_for_command(argv: list[str]) -> DictConfig:
    """Parse a trial's command line as its entry point will, without running it: with the entry
    point's ``load(argv)``, else :func:`load_config` with its job YAML (simclr) or base.yaml."""
    module = command_entry_point(argv)
    overrides = [a for a in argv[argv.index(module) + 1 if module else 0:] if "=" in a]
    if module == "experiments.pipeline":
        module = f"experiments.pipeline_{resolve_job('pipeline', overrides).method}"
    try:
        load = getattr(importlib.import_module(module), "load", None) if module else None
    except ImportError:  # not on this branch (yet): the schema and the YAMLs still parse
        load = None
    if load:
        return load(overrides)
    return load_config("simclr" if module == "experiments.train_simclr" else "base", overrides)


def check_command(argv: list[str], path: str | Path) -> None:
    """A bad override would fail every run: fail once, now."""
    try:
        config_for_command(argv)
    except ConfigError as e:
        raise SweepError(f"{path}: the command does not parse: {e}") from None


def check_wandb_access(path: str | Path = "<file>") -> None:
    """Raise :class:`SweepError` unless W&B is online (``WANDB_MODE``, settings) with a login."""
    if not (mode := os.environ.get("WANDB_MODE", "").lower()):
        os.environ.pop("WANDB_MODE", None)  # wandb rejects an empty WANDB_MODE
    import wandb

    if mode in ("offline", "dryrun", "disabled"):
        problem = f"WANDB_MODE={mode}: a W&B sweep needs the W&B server. Unset it (or =online)."
    elif wandb.setup().settings.mode in ("offline", "dryrun", "disabled"):
        problem = "W&B is set to offline (`wandb offline` or a settings file): `wandb online`."
    elif not wandb.login(prompt=False, verify=False):
        problem = "No W&B credentials found: run `wandb login` or export WANDB_API_KEY."
    else:
        return
    raise SweepError(f"{problem} {OFFLINE_HINT.format(path)}")


def server_config(sweep: dict, name: str, overrides: list[str]) -> dict:
    """The config sent to W&B: our overrides in the command, a per-run out_dir unless set."""
    own = any(str(c).lstrip("-").startswith("out_dir=") for c in sweep["command"])
    out_dir = None if own else RUN_DIR_TEMPLATE.format(name=name)
    return {"name": name, **sweep, "command": with_overrides(sweep["command"], overrides, out_dir)}


def run_online(args: Any) -> str:
    """Create the sweep on W&B (or join ``--sweep-id``) and run an agent here; the sweep id."""
    path, sweep, overrides = Path(args.sweep), load_sweep(args.sweep), parse_overrides(args.overrides)
    items = dict(o.split("=", 1) for o in overrides)
    if clash := sorted(set(items) & set(flat_parameters(sweep, path))):
        raise SweepError(f"{clash} set keys that {path} sweeps over; drop them or edit the sweep")
    if items.get("logger.name") == "none":
        raise SweepError("logger=none: the W&B sweep would never see the runs' metrics")
    # The runs' WandbLogger must log to the sweep's project/entity, or the sweep never sees them.
    project = (args.project or sweep.get("project") or items.get("logger.project")
               or Config().logger.project)
    entity = args.entity or sweep.get("entity") or items.get("logger.entity")
    if items.get("logger.project", project) != project:
        raise SweepError(f"logger.project={items['logger.project']} differs from the sweep's "
                         f"project {project}; give one of them")
    overrides += [f"logger.{k}={v}" for k, v in (("project", project), ("entity", entity))
                  if v and f"logger.{k}" not in items]
    check_wandb_access(path)
    cfg = server_config(sweep, name := sweep_name(sweep, path), overrides)
    check_command(agent_command(cfg["command"], {}, cfg.get("program")), path)
    import requests
    import wandb

    # The agent's runs log online (make_logger is offline unless asked); its `python` is ours.
    os.environ["WANDB_MODE"] = "online"
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        step = "Could not create the sweep on W&B"
        sweep_id = args.sweep_id or wandb.sweep(cfg, entity=entity, project=project)
        log.info("Sweep %s (%s/%s): runs write to %s/%s/<run id>; more agents elsewhere: "
                 "python -m experiments.sweep %s --sweep-id %s", sweep_id, entity or "<you>",
                 project, SWEEP_ROOT, name, path, sweep_id)
        step = "The W&B agent stopped"
        wandb.agent(sweep_id, entity=entity, project=project, count=args.count)
    except (wandb.Error, requests.RequestException, OSError, TimeoutError) as e:
        raise SweepError(f"{step} ({type(e).__name__}: {e}). {OFFLINE_HINT.format(path)}") from None
    return sweep_id


def main(argv: list[str] | None = None) -> str:
    arguments = {
        "sweep": dict(help="configs/sweeps/<name>.yaml"),
        "--count": dict(type=int, help="runs this agent does (default: until the sweep ends)"),
        "--project": dict(help="W&B project (default: the file's project:, else logger.project)"),
        "--entity": dict(help="W&B entity (default: yours)"),
        "--sweep-id": dict(help="join an existing sweep (another machine's agent) instead"),
        "overrides": dict(nargs="*", help="key=value added to every run (e.g. data=padchest)"),
    }
    return cli("python -m experiments.sweep", "Create a W&B sweep from a sweep YAML and start "
               "an agent here.", arguments, run_online, argv)


if __name__ == "__main__":
    entry(main)
