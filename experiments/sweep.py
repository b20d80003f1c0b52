"""Hyper-parameter sweeps with W&B: create a sweep from ``configs/sweeps/<name>.yaml``, run an agent.

    python -m experiments.sweep configs/sweeps/glow_cxr.yaml [--count N] [key=value ...]
    make sweep SWEEP=configs/sweeps/glow_cxr.yaml [COUNT=n] [ARGS="data=padchest data.root=..."]

The sweep files are in W&B's own format (https://docs.wandb.ai/models/sweeps/sweep-config-keys).
Their ``command:`` runs one of our entry points with the trial's parameters appended by the agent
as ``key=value`` (``${args_no_hyphens}``) or ``--key=value`` (``${args}``); the entry point
validates them like any other override, and :func:`validate_sweep` checks the file against our
config schema first, so a typo fails before any run. Under DDP every rank re-parses the same
command line, so every rank sees the swept values. Only W&B's public API is used
(``wandb.sweep``, ``wandb.agent``, ``wandb.login``, ``wandb.setup``).

This module also holds what the offline runner (:mod:`experiments.sweep_offline`, ``make
sweep-offline``: grid and random search without a server) shares: loading and checking a sweep
file, the exact command line the agent would run, and the command-line interface.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.config import CONFIG_DIR, Config, ConfigError, load_config, parse_overrides
from experiments.config import validate as validate_config

log = logging.getLogger(__name__)

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
GRID_KINDS = ("constant", "categorical", "int_uniform", "q_uniform")  # what a grid enumerates
# The argument macros our parser reads (``--key=value`` / ``key=value``), and the other macros
# the agent fills in. W&B's JSON, ``--key value``, Hydra and bare-flag macros are refused.
ARG_MACROS = ("${args}", "${args_no_hyphens}")
MACROS = (*ARG_MACROS, "${env}", "${interpreter}", "${program}")
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")
# A run's folder: one per W&B run id (set by the agent in the run's environment), resolved by
# OmegaConf when the entry point reads out_dir.
SWEEP_ROOT = "outputs/sweeps"
RUN_DIR_TEMPLATE = SWEEP_ROOT + "/{name}/${{oc.env:WANDB_RUN_ID,local}}"
# What each entry point writes to <out_dir>/metrics.json and logs; only validation metrics.
ENTRY_POINT_METRICS: dict[str, tuple[str, ...]] = {
    "experiments.train_simclr": ("val/knn_acc", "val/alignment", "val/uniformity", "val/loss"),
    "experiments.train_glow": ("val/bpd",),
    "experiments.pipeline": ("val/auroc",),
}
# Job YAMLs of an entry point that has no ``load(argv)`` (missing ones: schema + base.yaml).
_ENTRY_POINT_JOBS = {"experiments.train_simclr": ["simclr"]}


class SweepError(ValueError):
    """A sweep file or set-up that cannot be used; the message names the file and the fix."""


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
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(sweep.get("name") or Path(path).stem))


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
    """A parameter's W&B distribution, with W&B's defaults: ``value`` -> constant, ``values`` ->
    categorical(_w_probabilities), ``min``/``max`` -> int_uniform if both are ints, else uniform."""
    if "distribution" in spec:
        return str(spec["distribution"])
    if "value" in spec or "values" in spec:
        return ("constant" if "value" in spec else
                "categorical_w_probabilities" if "probabilities" in spec else "categorical")
    if "min" in spec and "max" in spec:
        ints = all(type(spec[k]) is int for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    return "unknown"


def example_values(spec: dict) -> list:
    """Values a spec can produce, for type checks: every listed value, or the range's ends."""
    kind = spec_kind(spec)
    if "value" in spec or "values" in spec:
        return [spec["value"]] if kind == "constant" else list(spec["values"])
    if kind in ("log_uniform", "inv_log_uniform", "q_log_uniform"):
        return []  # min/max are exponents (W&B's "v1" distributions), not config values
    ends = [spec[k] for k in ("min", "max") if k in spec]
    if kind.startswith("q_"):  # round(x / q) * q: an int only when q is an int (W&B)
        q = spec.get("q", 1.0)
        return [int(round(e / q) * q) if isinstance(q, int) else float(round(e / q) * q)
                for e in ends]
    if kind in ("uniform", "log_uniform_values", "inv_log_uniform_values"):
        return [float(e) for e in ends]  # drawn as floats even when min/max are ints
    return ends


def _value_problem(schema: DictConfig, key: str, value: Any) -> str | None:
    """Why ``key=<value as the agent writes it>`` does not pass our config schema, or None."""
    if value is None:
        return ("null is passed by the W&B agent as the text 'None'; leave the key out of the "
                "sweep (or set it in the command) instead")
    if isinstance(value, dict):
        return "mapping values are passed as one Python-repr argument; sweep dotted keys instead"
    try:
        items = parse_overrides([f"--{key}={value}"])
        validate_config(OmegaConf.merge(schema, OmegaConf.from_dotlist(items)))
    except (ConfigError, OmegaConfBaseException) as e:
        return str(e).splitlines()[0]
    return None


def _parameter_problems(key: str, spec: dict, method: Any, schema: DictConfig, fixed: set):
    kind = spec_kind(spec)
    if key in ("data", "profile"):  # file selectors: data=<configs/data/NAME.yaml>
        folder = "profiles" if key == "profile" else "data"
        for v in example_values(spec):
            if (key, v) != ("profile", "auto") and not (CONFIG_DIR / folder / f"{v}.yaml").is_file():
                yield f"{v!r} names no configs/{folder}/ file"
        return
    if OmegaConf.select(schema, key, default="__missing__") == "__missing__":
        yield "not a config key (see experiments/config.py)"
        return
    if key in fixed:
        yield "also set in command; the command's value would be overridden silently - remove one"
    if kind == "unknown":
        yield "needs values, value or min/max"
        return
    if method == "grid" and kind not in GRID_KINDS:
        yield (f"distribution {kind!r} cannot be used with method: grid "
               "(use values, value, int_uniform or q_uniform)")
    bounds = [spec[k] for k in ("min", "max", "q") if k in spec]
    if any(isinstance(b, bool) or not isinstance(b, int | float) for b in bounds):
        yield (f"min/max/q must be numbers, got {bounds} "
               "(YAML reads 1e-4 as text: write 0.0001 or 1.0e-4)")
        return
    if kind == "int_uniform" and not all(type(spec.get(k)) is int for k in ("min", "max")):
        yield "int_uniform needs integer min and max"
    if "min" in spec and "max" in spec and not spec["min"] <= spec["max"]:
        yield f"min {spec['min']} > max {spec['max']}"
    for value in example_values(spec):
        if reason := _value_problem(schema, key, value):
            yield f"value {value!r}: {reason}"


def command_entry_point(command: list) -> str | None:
    """The module run by ``python -m <module>`` in a sweep command, or None."""
    items = [str(c) for c in command]
    return items[items.index("-m") + 1] if "-m" in items[:-1] else None


def validate_sweep(sweep: dict, path: str | Path = "<sweep>") -> None:
    """Check a sweep file against W&B's format and our config schema; raise :class:`SweepError`
    listing every problem (method, metric, command macros, parameter names, value types)."""
    problems = []
    method, metric, command = sweep.get("method"), sweep.get("metric"), sweep.get("command")
    if method not in METHODS:
        problems.append(f"method: {method!r} is not one of {list(METHODS)}")
    if not isinstance(metric, dict) or not metric.get("name"):
        problems.append("metric: needs {name: val/..., goal: minimize|maximize}")
        metric = {}
    name = metric.get("name")
    if metric.get("goal", "minimize") not in GOALS:
        problems.append(f"metric.goal: {metric.get('goal')!r} is not one of {list(GOALS)}")
    if name and not str(name).startswith("val/"):
        problems.append(f"metric.name: {name!r} - a sweep optimises a validation metric "
                        "('val/...'), never the test set")
    if not isinstance(command, list) or not command:
        problems.append("command: needs a list, e.g. [${env}, python, -m, experiments.train_glow, "
                        "${args_no_hyphens}]")
        command = []
    items = [str(c) for c in command]
    module = command_entry_point(items)
    if name and name not in ENTRY_POINT_METRICS.get(module, (name,)):
        problems.append(f"metric.name: {name!r} is not written by {module} "
                        f"(it writes {list(ENTRY_POINT_METRICS[module])})")
    bad = [c for c in items if re.fullmatch(r"\$\{.*\}", c) and c not in MACROS
           and not ENVVAR.fullmatch(c)]
    if bad or not any(m in items for m in ARG_MACROS):
        problems.append("command: must pass the trial's parameters with ${args_no_hyphens} "
                        "(key=value) or ${args} (--key=value)"
                        + (f"; {bad} cannot be read by our entry points" if bad else ""))
    try:
        params = flat_parameters(sweep, path)
    except SweepError as e:
        problems.append(str(e).split(": ", 1)[-1])
        params = {}
    schema = OmegaConf.structured(Config)
    fixed = {i.split("=", 1)[0].lstrip("-") for i in items if "=" in i and not i.startswith("$")}
    for key, spec in params.items():
        problems += [f"parameters.{key}: {p}"
                     for p in _parameter_problems(key, spec, method, schema, fixed)]
    if problems:
        raise SweepError(f"{path}: invalid sweep file:\n  - " + "\n  - ".join(problems))


def with_overrides(command: list, overrides: list[str], out_dir: str | None = None) -> list[str]:
    """The sweep's command with extra ``key=value`` items (and ``out_dir=``, replacing the
    command's) just before the argument macro, so that the trial's parameters still come last."""
    items = [str(c) for c in command]
    if out_dir is not None:
        items = [c for c in items if not c.lstrip("-").startswith("out_dir=")]
        overrides = [*overrides, f"out_dir={out_dir}"]
    idx = next((i for i, c in enumerate(items) if c in ARG_MACROS), len(items))
    return items[:idx] + list(overrides) + items[idx:]


def agent_command(command: list, params: dict[str, Any], program: str | None = None) -> list[str]:
    """The argv W&B's agent runs for a trial with ``params`` ({key: value}).

    Our copy of what wandb 0.31's agent does (``Agent._command_run``), whose helpers live in a
    private module: ``${envvar:X}`` -> $X (X when unset), ``${args}`` -> ``--key=value`` and
    ``${args_no_hyphens}`` -> ``key=value`` with values as Python's ``str`` writes them (``True``,
    ``1e-05``, ``[0.1, 1.2]``), ``${env}`` -> ``/usr/bin/env``, ``${interpreter}`` -> ``python``,
    ``${program}`` -> program. ``test_agent_formatting_is_wandbs`` pins it."""
    flags = [f"{k}={v}" for k, v in params.items()]
    macros = {"${args}": ["--" + f for f in flags], "${args_no_hyphens}": flags,
              "${env}": ["/usr/bin/env"] if os.name != "nt" else [],
              "${interpreter}": ["python"], "${program}": [program] if program else []}
    argv = []
    for c in map(str, command):
        c = ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), c)
        argv += macros.get(c, [c])
    return argv


def config_for_command(argv: list[str]) -> DictConfig:
    """Parse a trial's command line as its entry point will, without running it: with the entry
    point's own ``load(argv)`` where it has one (``experiments.pipeline_<method>`` do), else
    :func:`load_config` with the entry point's job YAMLs (those that exist)."""
    module = command_entry_point(argv)
    overrides = [a for a in argv[argv.index(module) + 1 if module else 0:] if "=" in a]
    target = module
    if module == "experiments.pipeline":
        from experiments.pipeline import method_from_argv

        target = f"experiments.pipeline_{method_from_argv(overrides)}"
    try:
        mod = importlib.import_module(target) if target else None
    except ImportError:
        mod = None
    if hasattr(mod, "load"):
        return mod.load(overrides)
    jobs = [j for j in _ENTRY_POINT_JOBS.get(module, []) if (CONFIG_DIR / f"{j}.yaml").is_file()]
    return load_config(jobs or ["base"], overrides)


def run_cli(prog: str, description: str, count_help: str, overrides_help: str,
            run: Callable[[argparse.Namespace], Any], argv: list[str] | None,
            options: Callable[[argparse.ArgumentParser], None] = lambda p: None) -> Any:
    """The command line of ``make sweep`` and ``make sweep-offline``: a sweep file, ``--count``,
    the CLI's ``options``, and overrides anywhere (``key=value`` or ``--key=value``); runs
    ``run(args)``, a :class:`SweepError`/:class:`ConfigError` exits with status 2."""
    from experiments.common import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("sweep", help="configs/sweeps/<name>.yaml")
    parser.add_argument("--count", type=int, default=None, help=count_help)
    options(parser)
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    args, unknown = parser.parse_known_intermixed_args(argv)
    bad = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *unknown]
    try:
        return run(args)
    except (SweepError, ConfigError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None


def check_wandb_access(path: str | Path = "<file>") -> None:
    """Raise :class:`SweepError` unless W&B can be used online: not offline/disabled (by
    ``WANDB_MODE`` or ``wandb offline``) and credentials present (``WANDB_API_KEY``, ``wandb
    login`` / ~/.netrc)."""
    hint = f"Without W&B access, run the same sweep locally: make sweep-offline SWEEP={path}"
    mode = os.environ.get("WANDB_MODE", "").lower()
    if not mode:
        os.environ.pop("WANDB_MODE", None)  # wandb rejects an empty WANDB_MODE
    if mode in ("offline", "dryrun", "disabled"):
        raise SweepError(f"WANDB_MODE={mode}: a W&B sweep needs the W&B server. Unset WANDB_MODE "
                         f"(or set WANDB_MODE=online). {hint}")
    import wandb

    if wandb.setup().settings.mode in ("offline", "dryrun", "disabled"):
        raise SweepError(f"W&B is set to offline/disabled mode (`wandb offline` or a settings "
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


def run_online(args: argparse.Namespace) -> str:
    """Create the sweep on W&B (or join ``--sweep-id``) and run an agent here; the sweep id."""
    path, sweep = Path(args.sweep), load_sweep(args.sweep)
    overrides = parse_overrides(args.overrides)
    items = dict(o.split("=", 1) for o in overrides)
    if clash := sorted(set(items) & set(flat_parameters(sweep, path))):
        raise SweepError(f"{clash} set keys that {path} sweeps over; drop them or edit the sweep")
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
    import requests
    import wandb

    name = sweep_name(sweep, path)
    cfg = server_config(sweep, name, overrides)
    try:  # the first run would fail on a bad override: fail now, before anything is created
        config_for_command(agent_command(cfg["command"], {}, cfg.get("program")))
    except ConfigError as e:
        raise SweepError(f"{path}: the command does not parse: {e}") from None
    # The agent's runs log online (make_logger is offline unless asked); its `python` is ours.
    os.environ["WANDB_MODE"] = "online"
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    network = (wandb.Error, requests.RequestException, OSError, TimeoutError)
    hint = f"Without W&B access, run the same sweep locally: make sweep-offline SWEEP={path}"
    try:
        sweep_id = args.sweep_id or wandb.sweep(cfg, entity=entity, project=project)
    except network as e:
        raise SweepError(f"Could not create the sweep on W&B ({type(e).__name__}: {e}). "
                         f"{hint}") from None
    log.info("Sweep %s (%s/%s): runs write to %s/%s/<run id>", sweep_id, entity or "<you>",
             project, SWEEP_ROOT, name)
    log.info("More agents elsewhere: python -m experiments.sweep %s --sweep-id %s", path, sweep_id)
    try:
        wandb.agent(sweep_id, entity=entity, project=project, count=args.count)
    except network as e:
        raise SweepError(f"The W&B agent stopped ({type(e).__name__}: {e}). {hint}") from None
    return sweep_id


def _online_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", default=None,
                        help="W&B project (default: the file's project:, else logger.project)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: yours)")
    parser.add_argument("--sweep-id", default=None,
                        help="join an existing sweep (another machine's agent) instead")


def main(argv: list[str] | None = None) -> str:
    return run_cli("python -m experiments.sweep",
                   "Create a W&B sweep from a sweep YAML and start an agent on this machine.",
                   "number of runs this agent does (default: until the sweep ends)",
                   "key=value added to every run's command (e.g. data=padchest)",
                   run_online, argv, _online_options)


if __name__ == "__main__":
    main()
