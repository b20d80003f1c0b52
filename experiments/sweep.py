"""Hyper-parameter sweeps with W&B: create a sweep from ``configs/sweeps/<name>.yaml``, run an agent.

    python -m experiments.sweep configs/sweeps/glow_cxr.yaml [--count N] [key=value ...]
    make sweep SWEEP=configs/sweeps/glow_cxr.yaml [COUNT=n] [ARGS="data=padchest data.root=..."]

The sweep files are in W&B's own format (https://docs.wandb.ai/models/sweeps/sweep-config-keys).
Their ``command:`` runs one of our entry points with the trial's parameters appended by the agent
as ``key=value`` (``${args_no_hyphens}``) or ``--key=value`` (``${args}``); the entry point's
:func:`experiments.config.load_config` validates them like any other override, so a typo in a
sweep file fails the first run loudly. Under DDP every rank re-parses the same command line, so
every rank sees the swept values.

This module also holds what the offline runner (:mod:`experiments.sweep_offline`) shares with the
agent: loading and checking a sweep file and building the exact command line the agent would run.
Sites without W&B access use ``make sweep-offline`` (grid and random search, no server).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    load_config,
    parse_overrides,
    validate,
)

log = logging.getLogger(__name__)

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
# Distributions a grid can enumerate (as W&B's grid search does).
GRID_KINDS = ("constant", "categorical", "int_uniform", "q_uniform")
# Argument macros whose output our parser reads: lists of ``--key=value`` / ``key=value``.
ARG_MACROS = ("${args}", "${args_no_hyphens}")
# Macros W&B offers that our entry points cannot read (JSON, ``--key value``, Hydra's ``+key``,
# booleans as bare flags).
UNSUPPORTED_ARG_MACROS = (
    "${args_json}", "${args_json_file}", "${args_no_equals}", "${args_no_boolean_flags}",
    "${args_append_hydra}", "${args_override_hydra}",
)
# Default output folder of a sweep's runs: one folder per W&B run id (set by the agent in the
# run's environment). OmegaConf resolves ``${oc.env:...}`` when the entry point reads out_dir.
SWEEP_ROOT = "outputs/sweeps"
RUN_DIR_TEMPLATE = SWEEP_ROOT + "/{name}/${{oc.env:WANDB_RUN_ID,local}}"

# Metrics each entry point writes to <out_dir>/metrics.json and logs to W&B (helper brief,
# "Every entry point ..."). A sweep may only optimise a validation metric: never the test set.
ENTRY_POINT_METRICS: dict[str, tuple[str, ...]] = {
    "experiments.train_simclr": ("val/knn_acc", "val/alignment", "val/uniformity", "val/loss"),
    "experiments.train_glow": ("val/bpd",),
    "experiments.pipeline": ("val/auroc",),
}
# Job YAMLs an entry point loads, for checking a command when the entry point module has no
# ``load(argv)`` of its own; names that do not exist (yet) fall back to the schema + base.yaml.
_ENTRY_POINT_JOBS = {
    "experiments.train_simclr": ["simclr"],
}


class SweepError(ValueError):
    """A sweep file or set-up that cannot be used; the message names the file and the fix."""


# --------------------------------------------------------------------------- sweep files


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML (W&B's format) and check it (:func:`validate_sweep`)."""
    p = Path(path)
    if not p.is_file():
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


def sweep_name(sweep: dict, path: str | Path) -> str:
    """The sweep's ``name:`` (or the file's stem), safe as a folder name."""
    name = str(sweep.get("name") or Path(path).stem)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def flat_parameters(sweep: dict, path: str | Path = "<sweep>") -> dict[str, dict]:
    """``parameters:`` as {dotted key: spec}. Nested ``parameters:`` blocks are refused: W&B's
    agent would pass them as one ``--optim={'lr': 0.1}`` argument; write ``optim.lr`` instead."""
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: 'parameters' must be a non-empty mapping of config keys")
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise SweepError(f"{path}: parameters.{key} must be a mapping such as "
                             "{values: [...]}, {value: x} or {min: a, max: b}")
        if "parameters" in spec:
            raise SweepError(f"{path}: parameters.{key} is a nested block; write nested config "
                             f"keys as dotted names instead (e.g. '{key}.lr: {{values: [...]}}')")
    return params


def spec_kind(spec: dict) -> str:
    """The W&B distribution of a parameter spec, with W&B's defaults filled in:
    ``value`` -> constant, ``values`` -> categorical (or categorical_w_probabilities),
    ``min``/``max`` -> int_uniform when both are ints, else uniform."""
    if "distribution" in spec:
        return str(spec["distribution"])
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical_w_probabilities" if "probabilities" in spec else "categorical"
    if "min" in spec and "max" in spec:
        ints = all(isinstance(spec[k], int) and not isinstance(spec[k], bool)
                   for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    return "unknown"


def _example_values(spec: dict) -> list:
    """Values a spec can produce, for type checks: every listed value, or the range's ends."""
    kind = spec_kind(spec)
    if kind == "constant":
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if kind in ("log_uniform", "inv_log_uniform", "q_log_uniform"):
        return []  # min/max are exponents (W&B's "v1" distributions), not config values
    ends = [spec[k] for k in ("min", "max") if k in spec]
    if not all(isinstance(e, int | float) for e in ends):
        return []  # reported as not numbers
    if kind.startswith("q_"):  # round(x / q) * q: an int only when q is an int (W&B)
        q = spec.get("q", 1.0)
        return [int(round(e / q) * q) if isinstance(q, int) else float(round(e / q) * q)
                for e in ends]
    if kind in ("uniform", "log_uniform_values", "inv_log_uniform_values"):
        return [float(e) for e in ends]  # drawn as floats even when min/max are ints
    return ends


def render_value(value: Any) -> str:
    """How W&B's agent writes a value on the command line: ``f"{key}={value}"`` (Python ``str``:
    ``True``, ``1e-05``, ``[0.1, 1.2]``, ``None``) - see
    ``wandb.sdk.launch.sweeps.utils.create_sweep_command_args``."""
    return f"{value}"


def _check_value(schema: DictConfig, key: str, value: Any) -> str | None:
    """None if ``key=<value as the agent renders it>`` merges into the schema and passes
    :func:`experiments.config.validate`; else the reason."""
    if value is None:
        return ("null is passed by the W&B agent as the text 'None'; leave the key out of the "
                "sweep (or set it in the command) instead")
    if isinstance(value, dict):
        return "mapping values are passed as one Python-repr argument; sweep dotted keys instead"
    try:
        items = parse_overrides([f"--{key}={render_value(value)}"])
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(items))
        validate(merged)
    except (ConfigError, OmegaConfBaseException) as e:
        return str(e).splitlines()[0]
    return None


def _selector_exists(key: str, value: Any) -> bool:
    if key == "profile" and value == "auto":
        return True
    folder = "profiles" if key == "profile" else "data"
    return (CONFIG_DIR / folder / f"{value}.yaml").is_file()


def command_entry_point(command: list) -> str | None:
    """The module run by ``python -m <module>`` in a sweep command, or None."""
    items = [str(c) for c in command]
    if "-m" in items and items.index("-m") + 1 < len(items):
        return items[items.index("-m") + 1]
    return None


def validate_sweep(sweep: dict, path: str | Path = "<sweep>") -> None:
    """Check a sweep file against W&B's format and our config schema; raise :class:`SweepError`
    listing every problem (method, metric, command macros, parameter names, value types)."""
    problems = []
    method = sweep.get("method")
    if method not in METHODS:
        problems.append(f"method: {method!r} is not one of {list(METHODS)}")
    metric = sweep.get("metric")
    if not isinstance(metric, dict) or not metric.get("name"):
        problems.append("metric: needs {name: val/..., goal: minimize|maximize}")
        metric = {}
    else:
        if metric.get("goal", "minimize") not in GOALS:
            problems.append(f"metric.goal: {metric.get('goal')!r} is not one of {list(GOALS)}")
        if not str(metric["name"]).startswith("val/"):
            problems.append(f"metric.name: {metric['name']!r} - a sweep optimises a validation "
                            "metric ('val/...'), never the test set")
    command = sweep.get("command")
    if not isinstance(command, list) or not command:
        problems.append("command: needs a list, e.g. [${env}, python, -m, experiments.train_glow, "
                        "${args_no_hyphens}]")
        command = []
    items = [str(c) for c in command]
    if not any(m in items for m in ARG_MACROS):
        bad = [m for m in UNSUPPORTED_ARG_MACROS if m in items]
        problems.append(
            "command: must pass the trial's parameters with ${args_no_hyphens} (key=value) or "
            "${args} (--key=value)" + (f"; {bad} cannot be read by our entry points" if bad else "")
        )
    module = command_entry_point(command)
    if module in ENTRY_POINT_METRICS and metric.get("name"):
        if metric["name"] not in ENTRY_POINT_METRICS[module]:
            problems.append(f"metric.name: {metric['name']!r} is not written by {module} "
                            f"(it writes {list(ENTRY_POINT_METRICS[module])})")
    try:
        params = flat_parameters(sweep, path)
    except SweepError as e:
        problems.append(str(e).split(": ", 1)[-1])
        params = {}
    schema = OmegaConf.structured(Config)
    fixed = {i.split("=", 1)[0].lstrip("-") for i in items if "=" in i and not i.startswith("$")}
    for key, spec in params.items():
        if key in ("data", "profile"):  # file selectors: data=<configs/data/NAME.yaml>
            for value in _example_values(spec):
                if not _selector_exists(key, value):
                    problems.append(f"parameters.{key}: {value!r} names no configs/{key}/ file")
            continue
        if OmegaConf.select(schema, key, default="__missing__") == "__missing__":
            problems.append(f"parameters.{key}: not a config key (see experiments/config.py)")
            continue
        if key in fixed:
            problems.append(f"parameters.{key}: also set in command; the command's value would "
                            "be overridden silently - remove one")
        kind = spec_kind(spec)
        if kind == "unknown":
            problems.append(f"parameters.{key}: needs values, value or min/max")
            continue
        if method == "grid" and kind not in GRID_KINDS:
            problems.append(f"parameters.{key}: distribution {kind!r} cannot be used with "
                            f"method: grid (use values, value, int_uniform or q_uniform)")
        if kind in ("int_uniform",) and not all(
            isinstance(spec.get(k), int) for k in ("min", "max")
        ):
            problems.append(f"parameters.{key}: int_uniform needs integer min and max")
        bounds = [spec[k] for k in ("min", "max", "q") if k in spec]
        if any(isinstance(b, bool) or not isinstance(b, int | float) for b in bounds):
            problems.append(f"parameters.{key}: min/max/q must be numbers, got {bounds} "
                            "(YAML reads 1e-4 as text: write 0.0001 or 1.0e-4)")
            continue
        if "min" in spec and "max" in spec and not spec["min"] <= spec["max"]:
            problems.append(f"parameters.{key}: min {spec['min']} > max {spec['max']}")
        for value in _example_values(spec):
            reason = _check_value(schema, key, value)
            if reason:
                problems.append(f"parameters.{key}: value {value!r}: {reason}")
    if problems:
        raise SweepError(f"{path}: invalid sweep file:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- command lines


def with_overrides(command: list, overrides: list[str], out_dir: str | None = None) -> list[str]:
    """The sweep's command with extra ``key=value`` items (and ``out_dir=``) placed just before
    the argument macro, so the trial's parameters still come last. An ``out_dir=`` already in
    the command is replaced."""
    items = [str(c) for c in command]
    if out_dir is not None:
        items = [c for c in items if not c.lstrip("-").startswith("out_dir=")]
        overrides = [*overrides, f"out_dir={out_dir}"]
    idx = next((i for i, c in enumerate(items) if c in ARG_MACROS), len(items))
    return items[:idx] + list(overrides) + items[idx:]


def agent_command(command: list, params: dict[str, Any], program: str | None = None,
                  args_json_file: str | None = None) -> list[str]:
    """The argv W&B's agent runs for a trial with ``params`` ({key: value}).

    Mirrors ``wandb.wandb_agent.Agent._command_run`` (wandb 0.31): ``${envvar:X}`` expanded by
    ``create_sweep_command``, arguments formatted by W&B's own ``create_sweep_command_args``,
    ``${env}`` -> ``/usr/bin/env``, ``${interpreter}`` -> ``python``, ``${program}`` -> program.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_command = sweep_utils.create_sweep_command(list(command))  # it edits its argument
    sweep_vars = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}}
    )
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [program] if program else []
    sweep_vars["args_json_file"] = [args_json_file] if args_json_file else []
    sweep_vars["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    argv = []
    for c in map(str, sweep_command):
        if c.startswith("${") and c.endswith("}"):
            argv += sweep_vars.get(c[2:-1]) or []
        else:
            argv.append(c)
    return argv


def command_overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` items of a command line (what the entry point's parser receives)."""
    module = command_entry_point(argv)
    start = argv.index(module) + 1 if module else 0
    return [a for a in argv[start:] if "=" in a]


def config_for_command(argv: list[str]) -> DictConfig:
    """Parse a trial's command line the way its entry point will, without running it.

    Uses the entry point's own ``load(argv)`` where it has one (``experiments.pipeline_<method>``
    do), else :func:`load_config` with the entry point's job YAMLs (those that exist)."""
    module = command_entry_point(argv)
    overrides = command_overrides(argv)
    target = module
    if module == "experiments.pipeline":
        from experiments.pipeline import method_from_argv

        target = f"experiments.pipeline_{method_from_argv(overrides)}"
    if target:
        try:
            mod = importlib.import_module(target)
        except ImportError:
            mod = None
        if mod is not None and hasattr(mod, "load"):
            return mod.load(overrides)
    jobs = [j for j in _ENTRY_POINT_JOBS.get(module, []) if (CONFIG_DIR / f"{j}.yaml").is_file()]
    jobs = jobs or ["base"]
    return load_config(jobs, overrides)


# --------------------------------------------------------------------------- online (W&B)


def _offline_hint(path: str | Path = "<file>") -> str:
    return f"Without W&B access, run the same sweep locally: make sweep-offline SWEEP={path}"


def check_wandb_mode(path: str | Path = "<file>") -> None:
    """Raise :class:`SweepError` when ``WANDB_MODE`` says offline/disabled (no import needed)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if not mode:
        os.environ.pop("WANDB_MODE", None)  # wandb rejects an empty WANDB_MODE
    if mode in ("offline", "dryrun", "disabled"):
        raise SweepError(f"WANDB_MODE={mode}: a W&B sweep needs the W&B server. Unset WANDB_MODE "
                         f"(or set WANDB_MODE=online). {_offline_hint(path)}")


def check_wandb_access(path: str | Path = "<file>") -> None:
    """Raise :class:`SweepError` unless W&B can be used online: not in offline/disabled mode and
    credentials present (``WANDB_API_KEY``, ``wandb login`` / ~/.netrc, settings file)."""
    hint = _offline_hint(path)
    check_wandb_mode(path)
    import wandb

    settings = wandb.setup().settings
    if settings._offline or settings._noop:
        raise SweepError("W&B is set to offline/disabled mode (`wandb offline` or a settings "
                         f"file); run `wandb online` first. {hint}")
    if not wandb.login(prompt=False, verify=False):
        raise SweepError("No W&B credentials found (WANDB_API_KEY, `wandb login` / ~/.netrc). "
                         f"Run `wandb login` or export WANDB_API_KEY. {hint}")


def server_config(sweep: dict, name: str, overrides: list[str]) -> dict:
    """The sweep config sent to W&B: our extra overrides placed in the command, and a per-run
    ``out_dir`` (``outputs/sweeps/<name>/<run id>``) unless the command sets one."""
    cfg = copy.deepcopy(sweep)
    has_out_dir = any(str(c).lstrip("-").startswith("out_dir=") for c in cfg["command"])
    out_dir = None if has_out_dir else RUN_DIR_TEMPLATE.format(name=name)
    cfg["command"] = with_overrides(cfg["command"], overrides, out_dir)
    cfg.setdefault("name", name)
    return cfg


def _network_errors() -> tuple[type[BaseException], ...]:
    import requests
    import wandb

    return (wandb.errors.Error, requests.RequestException, OSError, TimeoutError)


def main(argv: list[str] | None = None) -> str:
    from experiments.common import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep",
        description="Create a W&B sweep from a sweep YAML and start an agent on this machine.",
    )
    parser.add_argument("sweep", help="configs/sweeps/<name>.yaml")
    parser.add_argument("--count", type=int, default=None,
                        help="number of runs this agent does (default: until the sweep ends)")
    parser.add_argument("--project", default=None,
                        help="W&B project (default: the file's project:, else logger.project)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: yours)")
    parser.add_argument("--sweep-id", default=None,
                        help="join an existing sweep (another machine's agent) instead")
    parser.add_argument("overrides", nargs="*",
                        help="key=value added to every run's command (e.g. data=padchest)")
    # Overrides may sit anywhere and may be written --key=value as well.
    args, unknown = parser.parse_known_intermixed_args(argv)
    bad = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *unknown]
    try:
        return _run_online(args)
    except (SweepError, ConfigError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None


def _run_online(args: argparse.Namespace) -> str:
    path = Path(args.sweep)
    sweep = load_sweep(path)
    check_wandb_mode(path)
    name = sweep_name(sweep, path)
    overrides = parse_overrides(args.overrides)
    swept = set(flat_parameters(sweep, path))
    clash = [o for o in overrides if o.split("=", 1)[0] in swept]
    if clash:
        raise SweepError(f"{clash} set keys that {path} sweeps over; drop them or edit the sweep")
    items = dict(o.split("=", 1) for o in overrides)
    if items.get("logger.name") == "none":
        raise SweepError("logger=none: the W&B sweep would never see the runs' metrics")
    project = (args.project or sweep.get("project") or items.get("logger.project")
               or Config().logger.project)
    entity = args.entity or sweep.get("entity") or items.get("logger.entity")
    # The runs' WandbLogger must log to the sweep's project/entity, or the sweep never sees them.
    if items.get("logger.project", project) != project:
        raise SweepError(f"logger.project={items['logger.project']} differs from the sweep's "
                         f"project {project}; give one of them")
    overrides += [f"logger.project={project}"] if "logger.project" not in items else []
    overrides += [f"logger.entity={entity}"] if entity and "logger.entity" not in items else []
    check_wandb_access(path)
    cfg = server_config(sweep, name, overrides)
    # The first run would fail on a bad override: fail now, before anything is created.
    try:
        config_for_command(agent_command(cfg["command"], {}, cfg.get("program")))
    except ConfigError as e:
        raise SweepError(f"{path}: the command does not parse: {e}") from None
    import wandb

    # Runs started by the agent log online (make_logger is offline unless asked), and the
    # agent's `python` is this interpreter.
    os.environ["WANDB_MODE"] = "online"
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                          os.environ.get("PATH", "")])
    hint = _offline_hint(path)
    try:
        sweep_id = args.sweep_id or wandb.sweep(cfg, entity=entity, project=project)
    except _network_errors() as e:
        raise SweepError(f"Could not create the sweep on W&B ({type(e).__name__}: {e}). "
                         f"{hint}") from None
    log.info("Sweep %s (%s/%s): runs write to %s/%s/<run id>", sweep_id, entity or "<you>",
             project, SWEEP_ROOT, name)
    log.info("More agents elsewhere: python -m experiments.sweep %s --sweep-id %s", path,
             sweep_id)
    try:
        wandb.agent(sweep_id, entity=entity, project=project, count=args.count)
    except _network_errors() as e:
        raise SweepError(f"The W&B agent stopped ({type(e).__name__}: {e}). {hint}") from None
    return sweep_id


if __name__ == "__main__":
    main()
