"""Grids over config keys and the one grid runner of the offline sweeps
(:mod:`experiments.sweep_offline`) and the ablations (:mod:`experiments.ablations`).

A grid is a set of axes: plain lists of values (ablations), or W&B's parameter specs (sweep files:
``value``, ``values``, ``min``/``max``, ``distribution``; checked against our config schema before
any run). :func:`run_grid` runs every point through a callable under a progress bar, one row each,
failed runs counted and kept as rows; :func:`write_table` writes the rows as CSV and markdown;
:func:`cli` is the command line of the sweeps and the ablations.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from experiments.common import setup_logging, track
from experiments.config import CONFIG_DIR, Config, ConfigError, parse_overrides, validate

log = logging.getLogger(__name__)

Row = dict[str, Any]
GRID_KINDS = ("constant", "categorical", "int_uniform", "q_uniform")  # what a grid enumerates


def cartesian(axes: dict[str, Iterable]) -> list[dict[str, Any]]:
    """Every combination of the axes' values as ``{axis: value}``, the first axis varying
    slowest; a combination that repeats another's values is kept once."""
    names = list(axes)
    points, seen = [], set()
    for combo in itertools.product(*(list(axes[n]) for n in names)):
        key = json.dumps(combo, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            points.append(dict(zip(names, combo)))
    return points


@functools.cache
def _schema() -> Any:
    return OmegaConf.structured(Config)  # merging into it leaves it as it is


def override_problem(key: str, value: Any) -> str | None:
    """Why the override ``key=<value as str() writes it>`` fails our config schema, or None."""
    if value is None:
        return "null is passed by the W&B agent as the text 'None'; leave the key out instead"
    if folder := {"data": "data", "profile": "profiles"}.get(key):  # data=<configs/data/X.yaml>
        auto = (key, value) == ("profile", "auto")
        return None if auto or (CONFIG_DIR / folder / f"{value}.yaml").is_file() else (
            f"names no configs/{folder}/ file")
    try:
        items = OmegaConf.from_dotlist(parse_overrides([f"--{key}={value}"]))
        validate(OmegaConf.merge(_schema(), items))
    except ConfigKeyError:
        return "not a config key (see experiments/config.py)"
    except (ConfigError, OmegaConfBaseException) as e:
        return str(e).splitlines()[0]
    return None


def spec_kind(spec: dict) -> str:
    """A parameter's W&B distribution, with W&B's defaults: ``value`` -> constant, ``values`` ->
    categorical(_w_probabilities), ``min``/``max`` -> int_uniform if both are ints, else uniform."""
    if "distribution" in spec:
        return str(spec["distribution"])
    if "value" in spec or "values" in spec:
        return ("constant" if "value" in spec else
                "categorical_w_probabilities" if "probabilities" in spec else "categorical")
    ints = all(type(spec.get(k)) is int for k in ("min", "max"))
    return ("int_uniform" if ints else "uniform") if "min" in spec and "max" in spec else "unknown"


def example_values(spec: dict) -> list:
    """Values a spec can produce, for type checks: every listed value, or the range's ends."""
    kind, ends, q = spec_kind(spec), [spec[k] for k in ("min", "max") if k in spec], spec.get("q")
    if "value" in spec or "values" in spec:
        return [spec["value"]] if kind == "constant" else list(spec["values"])
    if kind == "log_uniform":  # W&B's "v1": min/max are natural-log exponents
        return [math.exp(e) for e in ends]
    if kind in ("inv_log_uniform", "q_log_uniform"):
        return []
    if kind.startswith("q_"):  # round(x / q) * q: an int only when q is an int (W&B)
        return [(int if isinstance(q, int) else float)(round(e / (q or 1.0)) * (q or 1.0))
                for e in ends]
    return [float(e) for e in ends] if "uniform" in kind and kind != "int_uniform" else ends


def spec_problems(key: str, spec: Any, method: Any) -> list[str]:
    """What is wrong with the spec of config key ``key`` for a ``method`` (grid/random) search:
    its form, its distribution, and the first of its values that our config refuses."""
    if not isinstance(spec, dict) or "parameters" in spec:  # the agent would pass one repr
        return [f"must be a mapping such as {{values: [...]}}; write nested config keys as "
                f"dotted names (e.g. '{key}.lr: {{values: [...]}}')"]
    kind, bounds = spec_kind(spec), [spec[k] for k in ("min", "max", "q") if k in spec]
    if any(isinstance(b, bool) or not isinstance(b, int | float) for b in bounds):
        return [f"min/max/q must be numbers, got {bounds} (YAML reads 1e-4 as text: write 0.0001)"]
    p, lo, hi = spec.get("probabilities"), spec.get("min", -math.inf), spec.get("max", math.inf)
    bad = [(v, r) for v in example_values(spec) if (r := override_problem(key, v))]
    return [msg for wrong, msg in [
        (kind == "unknown", "needs values, value or min/max"),
        (method == "grid" and kind not in GRID_KINDS,
         f"distribution {kind!r} cannot be used with method: grid (use {GRID_KINDS})"),
        (not lo <= hi, f"min {lo} > max {hi}"),
        (p is not None and (len(p) != len(spec["values"]) or abs(sum(p) - 1) > 1e-6),
         f"probabilities {p} must match values and sum to 1"),
        (bad, "value {!r}: {}".format(*bad[0]) if bad else ""),  # the first says enough
    ] if wrong]


def failed(row: Row) -> bool:
    """A row whose run did not give its results (``status`` other than ``ok``)."""
    return row.get("status", "ok") != "ok"


def run_grid(points: list[dict], run: Callable[[int, dict], Row], description: str,
             label: Callable[[dict], Row] = dict, stop: Callable[[Row], bool] | None = None,
             progress: bool = True) -> list[Row]:
    """``run(i, point)`` for every point, in order, under a progress bar; returns the rows.

    A run that raises becomes the row ``{**label(point), status: failed, error: ...}`` and the
    grid goes on; a row for which ``stop(row)`` is true ends the grid. Failed rows (any
    ``status`` other than ``ok``) are counted and logged, never dropped."""
    rows = []
    for i, point in enumerate(track(points, description, total=len(points), enabled=progress)):
        try:
            row = run(i, point)
        except Exception as e:  # one broken run must not lose the results of the others
            log.exception("%s: run %d (%s) failed", description, i, label(point))
            row = {**label(point), "status": "failed", "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        if stop is not None and stop(row):
            break
    n_failed = sum(map(failed, rows))
    if n_failed:
        log.error("%s: %d of %d run(s) failed", description, n_failed, len(rows))
    return rows


def write_table(rows: list[Row], stem: Path, title: str, note: str = "", fmt: str = ".6g",
                hide: tuple[str, ...] = ("out_dir",)) -> tuple[Path, Path]:
    """``<stem>.csv`` (every column) and ``<stem>.md`` (``# title``, the note, a markdown table
    without the ``hide`` columns, floats as ``fmt``), and prints the table. Columns are those of
    all rows (a failed row's ``status``/``error`` too), in order of first appearance."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, restval="")
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, fmt)
        return str(v).replace("|", "\\|")

    md_cols = [c for c in cols if c not in hide]
    table = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    table += ["| " + " | ".join(cell(r.get(c, "")) for c in md_cols) + " |" for r in rows]
    md_path.write_text("\n".join([f"# {title}", "", *([note, ""] if note else []), *table]) + "\n")
    print("\n".join([title, *table]))
    return csv_path, md_path


def cli(prog: str, description: str, arguments: dict[str, dict], run: Callable[[Any], Any],
        argv: list[str] | None = None) -> Any:
    """``prog SPEC.yaml [options] [key=value ...]``: ``arguments`` are {name or flag: argparse
    keywords} and end with ``overrides``, which may stand anywhere, also as ``--key=value``.
    Returns ``run(args)``; a :class:`ConfigError` is logged and exits with status 2."""
    setup_logging()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, kwargs in arguments.items():
        parser.add_argument(name, **kwargs)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if bad := [u for u in unknown if not (u.startswith("--") and "=" in u)]:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *unknown]
    try:
        return run(args)
    except ConfigError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
