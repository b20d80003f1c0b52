"""The one grid runner of the offline sweeps (:mod:`experiments.sweep_offline`) and the ablations
(:mod:`experiments.ablations`): expand a grid into runs, run each through a callable under a
progress bar, one row per run, failed runs counted and kept as rows, rows written as a CSV file
and a markdown table; and the command line they and :mod:`experiments.sweep` share."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from experiments.common import setup_logging, track
from experiments.config import ConfigError

log = logging.getLogger(__name__)

Row = dict[str, Any]


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
