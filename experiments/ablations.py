"""Ablations of the patch detector (Kim et al., Sci Rep 2023, Tables 2 and 3).

    python -m experiments.ablations configs/ablations/table2.yaml [pipeline overrides...]

An ablation YAML names a grid of detector variants::

    name: table2
    overrides: []            # pipeline overrides applied before the command line's
    grid:                    # the Cartesian product of the lists below
      sizes: each            # each | all | [[128], [128, 256], ...]
      distance: [euclidean, manhattan, cosine, mahalanobis]
      # weights: [[0.1, 1.2, 1.2, 1.0], ...]   (with sizes: all)
      # fusion: [geometric, product]

Every variant reuses the run in ``out_dir`` (encoders, reference databases, cached val/test
features; whatever is missing is trained/built once, exactly as the pipeline does), so only
the locality search and the validation-fitted normalisation are recomputed: scoring is cheap,
re-training is not. Writes ``<out_dir>/ablations/<name>.csv`` and ``.md`` (one row per
variant: test AUROC, accuracy, precision, sensitivity, specificity, validation AUROC) and
prints the table; a variant that fails is a row with its error (:mod:`experiments.grid`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from experiments.cli import entry
from experiments.config import ConfigError, parse_overrides
from experiments.grid import cartesian, cli, failed, override_problem, run_grid, write_table

log = logging.getLogger(__name__)
GRID_KEYS = ("sizes", "distance", "weights", "fusion")


def load_spec(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Ablation file {path} does not exist (see configs/ablations/).")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(spec) - {"name", "overrides", "grid", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    bad = set(spec.get("grid", {})) - set(GRID_KEYS)
    if bad:
        raise ConfigError(f"{path}: unknown grid keys {sorted(bad)}; use {list(GRID_KEYS)}")
    for key in ("distance", "fusion"):  # a typo fails here, not in every variant
        for value in spec.get("grid", {}).get(key, []):
            if reason := override_problem(f"patch.{key}", value):
                raise ConfigError(f"{path}: grid.{key}: {value!r}: {reason}")
    spec.setdefault("name", path.stem)
    return spec


def expand_grid(grid: dict, sizes: list[int], weights: list[float], distance: str,
                fusion: str) -> list[dict]:
    """Variants ``{"sizes", "weights", "distance", "fusion"}`` of the Cartesian product."""
    size_sets: list[list[int]]
    s = grid.get("sizes", "all")
    if s == "each":
        size_sets = [[x] for x in sizes]
    elif s == "all":
        size_sets = [list(sizes)]
    else:
        size_sets = [[int(x) for x in ss] for ss in s]
        for ss in size_sets:
            if not set(ss) <= set(sizes):
                raise ConfigError(f"ablation sizes {ss} are not all in patch.patch_sizes {sizes}")
    axes = {"sizes": size_sets, "weights": grid.get("weights", [None]),
            "distance": grid.get("distance", [distance]), "fusion": grid.get("fusion", [fusion])}
    variants = []
    for v in cartesian(axes):
        if v["weights"] is None:  # the run's weights for these sizes (1 for a single size)
            v["weights"] = [1.0] if len(v["sizes"]) == 1 else [
                weights[sizes.index(x)] for x in v["sizes"]]
        if len(v["weights"]) != len(v["sizes"]):
            raise ConfigError(f"weights {v['weights']} need one value per size {v['sizes']}")
        if v["fusion"] == "product" and min(v["weights"]) <= 0:
            log.warning("skipping weights %s with fusion=product (needs positive weights)",
                        v["weights"])
            continue
        variants.append({**v, "weights": [float(x) for x in v["weights"]]})
    return variants


def run_overrides(argv: list[str]) -> list[str]:
    """The data/simclr/patch settings of the run in ``out_dir=`` (its ``config.yaml``) as
    overrides, so that ``out_dir=RUN`` alone reproduces the run's detector."""
    out_dir = dict(i.split("=", 1) for i in parse_overrides(argv)).get("out_dir")
    if out_dir is None or not (Path(out_dir) / "config.yaml").is_file():
        return []
    saved = OmegaConf.load(Path(out_dir) / "config.yaml")
    items = []
    for section in ("data", "simclr", "patch"):
        for key, value in OmegaConf.to_container(saved[section]).items():
            items.append(f"{section}.{key}={json.dumps(value)}")
    log.info("Using the data/simclr/patch settings of %s/config.yaml", out_dir)
    return items


def run_ablation(spec_path: str | Path, overrides: list[str]) -> list[dict]:
    """Score every variant of the ablation file on the run in ``out_dir``; the table's rows."""
    from experiments import evaluation as ev
    from experiments import pipeline_patch as pp
    from experiments.config import prepare_run_dir
    from lightning_modules.patch_detector.lightning_model import apply_normalizer, fit_normalizer

    spec = load_spec(spec_path)
    cfg = pp.load(["method=patch", *run_overrides(overrides), *spec.get("overrides", []),
                   *overrides])
    out = prepare_run_dir(cfg)
    dm, module, trainer = pp.prepare(cfg)
    det = module.detector
    test_loader = pp.loader(dm, pp.labelled(dm, "test"))
    n_test = len(test_loader.dataset)

    def split_scores(distance: str) -> tuple:
        """Validation and test patch scores of the run's detector under ``distance``."""
        det.distance = distance
        trainer.validate(module, pp.loader(dm, pp.labelled(dm, "val")), verbose=False)
        trainer.test(module, test_loader, verbose=False)
        return module.val_result, module.test_result

    p = cfg.patch
    variants = expand_grid(spec.get("grid", {}), det.patch_sizes, [float(w) for w in p.weights],
                           p.distance, p.fusion)
    log.info("Ablation %s: %d variants", spec["name"], len(variants))
    scores_by_distance: dict[str, tuple] = {}

    def label(v: dict) -> dict:
        return {"sizes": "/".join(map(str, v["sizes"])),
                "weights": "/".join(f"{w:g}" for w in v["weights"]),
                "distance": v["distance"], "fusion": v["fusion"]}

    def score(_: int, v: dict) -> dict:
        if v["distance"] not in scores_by_distance:
            scores_by_distance[v["distance"]] = split_scores(v["distance"])
        val, test = scores_by_distance[v["distance"]]
        norm = fit_normalizer(det, val, v["sizes"], v["weights"], v["fusion"],
                              str(cfg.patch.image_score), float(cfg.patch.topk_fraction))
        apply_normalizer(det, val, norm)
        apply_normalizer(det, test, norm)
        m = ev.binary_metrics(test.labels, test.scores, float(p.threshold))
        row = {**label(v), **{k: m[k] for k in ("auroc", "accuracy", "precision",
                                                "sensitivity", "specificity")},
               "val_auroc": ev.auroc(val.labels, val.scores)}
        log.info("%s", row)
        return row

    # No grid progress bar: the trainer draws its own, and rich cannot nest live displays.
    rows = run_grid(variants, score, f"Ablation {spec['name']}", label=label, progress=False)
    n_val = ", ".join(sorted({str(len(val.labels)) for val, _ in scores_by_distance.values()}))
    note = (f"Run: `{out}`; test set n = {n_test}; Normalize fitted on validation "
            f"(n = {n_val or '-'}) for each variant.")
    csv_path, _ = write_table(rows, out / "ablations" / spec["name"], f"Ablation {spec['name']}",
                              note, fmt=".3f")
    print(f"Summary: {csv_path} and .md")
    if rows and all(map(failed, rows)):
        raise RuntimeError(f"every variant of ablation {spec['name']} failed (see the log)")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    arguments = {
        "spec": dict(help="configs/ablations/<name>.yaml"),
        "overrides": dict(nargs="*", help="pipeline overrides, e.g. out_dir=RUN profile=cpu"),
    }
    return cli("python -m experiments.ablations", "Score an ablation grid of detector variants "
               "on a patch pipeline run.", arguments,
               lambda a: run_ablation(a.spec, a.overrides), argv)


if __name__ == "__main__":
    entry(main)
