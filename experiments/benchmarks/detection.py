"""Benchmark: detection quality of every method on sets no profile was tuned on, next to the
two references of the README ("Detection benchmark") measured on the same images (issue 11).

    python -m experiments.benchmarks.detection [--sets cxr,bct,digits] [--methods patch,flow]
        [--seed 9001] [--out outputs/benchmarks/detection] [--quick]
        [--patch-args "k=v ..."] [--flow-args "k=v ..."]

Sets (generated once, cached under ``.cache/benchmark/<name>-<hash of the settings>/``;
report seeds 9001-9099 only: seeds 100-199 are for tuning):

* ``cxr``: hard chest phantoms (``datamodules.phantoms.write_folder(style="hard")``: pose,
  exposure, habitus; small faint lesions), 200 normal + 400 unlabeled mixture (half abnormal)
  training images, 30 + 30 val, 50 + 50 test; written at 128² for the patch method and at 64²
  for the flow method (same seed: the same cases at two sizes).
* ``bct``: hard head-CT phantoms, 16×32×32 HU ``.npy`` volumes (``data.modality=bct``), same
  counts; flow method only (the patch method is 2D).
* ``digits``: scikit-learn's real 8×8 handwritten digits (``load_digits``, 16 grey levels) as
  8-bit PNGs, class 3 normal. Class 3 (183 images) is shuffled (``--seed``): 100 train/normal,
  25 val and 50 test normals; train/mixture = the 8 class-3 images left over + the 100
  train/normal images again (training sets may share cases, DESIGN §5; val/test never enter
  training) + 108 images of the other classes; val/test abnormals: 25 / 50 other-class images.

Each method runs through the user's entry point, ``experiments.pipeline.main([method=...,
data=folder, data.root=DIR, profile=cpu, logger=none, out_dir=...])``, in this process; its
``scores.csv`` gives the test AUROC and its 95 % DeLong CI. The baselines
(:mod:`experiments.baselines`: per-pixel z-score, random-init ResNet-18 layer-2 nearest
neighbour) are fitted on the same ``train/normal`` images and scored on the same test images,
read with the project's readers at the size they were written (volumes: brain window / 127).

Table columns: ``auroc [ci]`` of the method, of the z-score and of the CNN baseline;
``margin`` = method AUROC − max(baseline AUROCs); ``p`` = paired DeLong test of the method
against the better baseline; ``time`` = wall seconds of the method's whole run (train, score,
evaluate, report; budget 300 s at profile=cpu). A phantom set *counts* only if the z-score
baseline's AUROC is ≤ 0.65 on it (else it is too easy to tell anything). A second table
gives, per finding (phantoms: nodule, consolidation, effusion, cardiomegaly; bleed, infarct;
digits: the digit shown), the AUROC of the test abnormals with that finding against all test
normals, for each method and reference: which kind of abnormality a method misses. Writes
``OUT/detection.json``, ``OUT/detection.csv`` and ``OUT/detection_findings.csv``; the last
line printed is
``min_margin_over_baselines=<x>`` (the minimum over every method row; nan if a run failed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import shlex
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from experiments import baselines
from experiments.evaluation import delong_ci, delong_test, per_finding_metrics

log = logging.getLogger(__name__)

ZSCORE_GATE = 0.65  # a phantom set counts only if the z-score baseline stays at or below it
TIME_BUDGET_S = 300.0  # per method run at profile=cpu (issue 11)
REPORT_SEEDS = range(9001, 9100)
DEV_SEEDS = range(100, 200)
CACHE = Path(".cache/benchmark")

# methods per set, and the written data each method reads
SET_METHODS = {"cxr": ("patch", "flow"), "bct": ("flow",), "digits": ("patch", "flow")}


@dataclass(frozen=True)
class Counts:
    train_normal: int
    train_mixture: int
    val: int  # per class
    test: int  # per class


FULL = {
    "counts": Counts(200, 400, 30, 50),
    "cxr_size": {"patch": 128, "flow": 64},
    "bct_size": (16, 32, 32),
    "digits": {"train_normal": 100, "val": 25, "test": 50, "mixture_normal": 108,
               "mixture_abnormal": 108},
    "cnn_input": {"2d": 128, "3d": 64},
}
QUICK = {
    "counts": Counts(12, 12, 4, 6),
    "cxr_size": {"patch": 64, "flow": 32},
    "bct_size": (8, 16, 16),
    "digits": {"train_normal": 12, "val": 4, "test": 6, "mixture_normal": 6,
               "mixture_abnormal": 6},
    "cnn_input": {"2d": 64, "3d": 32},
}
# --quick: tiny models so the whole suite runs in about a minute (structure, not quality)
QUICK_ARGS = {
    "patch": ["data.image_size=64", "data.batch_size=32", "patch.patch_sizes=[16,32,64]",
              "patch.locality=[1,0,0]", "patch.weights=[0.5,1.0,1.0]", "simclr.input_size=16",
              "simclr.proj_hidden_dim=32", "simclr.proj_out_dim=16", "simclr.val_max_patches=32",
              "trainer.max_epochs=1", "trainer.limit_train_batches=2",
              "patch.encoder_epochs=null", "eval.n_extremes=4", "eval.n_overlays=2"],
    "flow": ["glow.steps=2", "glow.hidden_channels=16", "glow.levels=2", "data.batch_size=16",
             "trainer.max_epochs=2", "eval.n_extremes=4", "glow.n_samples=1"],
    "flow_cxr": ["data.image_size=16"],
    "flow_bct": ["data.volume_size=[8,16,16]", "glow.m0_epochs=null"],
}


@dataclass
class Row:
    set: str
    data: str  # which written variant, e.g. "cxr 128px"
    method: str  # patch | flow | z-score | random-CNN
    auroc: float
    auroc_ci: list[float]
    n_test: str  # "normal+abnormal"
    zscore_auroc: float = float("nan")
    zscore_ci: list[float] = field(default_factory=lambda: [float("nan")] * 2)
    cnn_auroc: float = float("nan")
    cnn_ci: list[float] = field(default_factory=lambda: [float("nan")] * 2)
    margin: float = float("nan")
    p_vs_best_baseline: float = float("nan")
    time_s: float = float("nan")
    error: str = ""
    # finding -> {"n": abnormal test images with it, "auroc", "zscore_auroc", "cnn_auroc"}:
    # those images against all test normals (phantom findings; digits: the digit shown)
    by_finding: dict[str, dict] = field(default_factory=dict)


# --- data -----------------------------------------------------------------------------------
def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _cached(name: str, settings: dict, write) -> Path:
    """``write(tmp_dir)`` once per distinct settings; atomic rename into the cache."""
    root = CACHE / f"{name}-{_key(settings)}"
    if (root / ".complete").is_file():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    write(tmp)
    (tmp / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    (tmp / ".complete").touch()
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    log.info("wrote %s in %.0f s", root, time.perf_counter() - t0)
    return root


def phantom_set(modality: str, size, counts: Counts, seed: int) -> Path:
    from datamodules.phantoms import write_folder
    from datamodules.phantoms.anatomy import CT_STYLES, CXR_STYLES

    # The style's ranges are part of the key: a recalibrated style is a new set.
    style = (CT_STYLES if modality == "bct" else CXR_STYLES)["hard"]
    settings = {"kind": "phantom", "modality": modality, "size": size, "seed": seed,
                "style": "hard", "style_ranges": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in style.items()},
                **asdict(counts)}

    def write(tmp: Path) -> None:
        write_folder(tmp, modality, n_train_normal=counts.train_normal,
                     n_train_mixture=counts.train_mixture, n_val=counts.val,
                     n_test=counts.test, size=size, seed=seed, style="hard",
                     with_dicom=False, progress=False)

    name = f"{modality}{size if isinstance(size, int) else 'x'.join(map(str, size))}"
    return _cached(name, settings, write)


def write_digits(root: Path, normal_class: int = 3, train_normal: int = 100, val: int = 25,
                 test: int = 50, mixture_normal: int = 108, mixture_abnormal: int = 108,
                 seed: int = 9003) -> Path:
    """scikit-learn's 8×8 digits as 8-bit PNGs in the folder layout (see the module doc).

    ``train/mixture`` holds ``mixture_normal`` class-``normal_class`` images (those left over
    after train/val/test first, then train/normal images again) and ``mixture_abnormal``
    images of other classes; val/test images never enter training."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(digits.target == normal_class))
    other = rng.permutation(np.flatnonzero(digits.target != normal_class))
    n_fixed = train_normal + val + test
    if n_fixed > normal.size or val + test + mixture_abnormal > other.size:
        raise ValueError(f"write_digits: asked for {n_fixed} of {normal.size} class-"
                         f"{normal_class} images")
    tr_n, va_n, te_n = np.split(normal[:n_fixed], [train_normal, train_normal + val])
    spare_n = normal[n_fixed:]
    mix_n = np.r_[spare_n, tr_n][:mixture_normal]
    if mix_n.size < mixture_normal:
        raise ValueError(f"write_digits: only {mix_n.size} normals for the mixture")
    va_a, te_a, mix_a = np.split(other[:val + test + mixture_abnormal], [val, val + test])
    plan = {"train/normal": tr_n, "train/mixture": np.r_[mix_n, mix_a],
            "val/normal": va_n, "val/abnormal": va_a, "test/normal": te_n,
            "test/abnormal": te_a}
    truth = []
    for group, idx in plan.items():
        folder = root / group
        folder.mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(rng.permutation(idx) if group == "train/mixture" else idx):
            img = np.rint(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 8 bit
            path = folder / f"img{k:05d}.png"
            Image.fromarray(img, mode="L").save(path)
            truth.append((f"{group}/{path.name}", int(digits.target[i] != normal_class),
                          int(digits.target[i])))
    with (root / "digits_truth.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "digit"), *truth])
    return root


def digits_set(cfg: dict, seed: int) -> Path:
    settings = {"kind": "digits", "normal_class": 3, "seed": seed, **cfg}
    return _cached("digits", settings, lambda tmp: write_digits(tmp, seed=seed, **cfg))


def load_split(root: Path, split: str, is3d: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys ``split/group/name``, labels, images (N, ...)) of ``root/split/{normal,abnormal}``
    (``train`` -> ``train/normal`` only), read as the pipelines read them."""
    from datamodules.dicom import load_brain_volume
    from datamodules.images import read_2d

    groups = [("normal", 0)] if split == "train" else [("normal", 0), ("abnormal", 1)]
    keys, labels, images = [], [], []
    for group, label in groups:
        for p in sorted((root / split / group).glob("*.npy" if is3d else "*.png")):
            if is3d:
                shape = np.load(p, mmap_mode="r").shape
                images.append(load_brain_volume(p, shape))
            else:
                images.append(read_2d(p))
            keys.append(f"{split}/{group}/{p.name}")
            labels.append(label)
    return keys, np.array(labels), np.stack(images).astype(np.float32)


def _item_key(path: str) -> str:
    return "/".join(Path(path).parts[-3:])


# --- runs -----------------------------------------------------------------------------------
@dataclass
class Scored:
    keys: list[str]
    labels: np.ndarray
    scores: dict[str, np.ndarray]  # name -> (N,) aligned with keys
    findings: list[str] | None = None  # aligned with keys, "" = normal (read_findings)


def read_findings(root: Path, keys: list[str]) -> list[str] | None:
    """What each test item shows, aligned with ``keys`` ("" for normals), from the set's
    ground truth (``phantom_truth.csv``: the phantom's finding; ``digits_truth.csv``: the
    digit); None when the set has neither."""
    if (root / "phantom_truth.csv").is_file():
        path, column = root / "phantom_truth.csv", "finding"
    elif (root / "digits_truth.csv").is_file():
        path, column = root / "digits_truth.csv", "digit"
    else:
        return None
    with path.open(newline="") as f:
        truth = {r["path"]: (r[column] if r["label"] == "1" else "") for r in csv.DictReader(f)}
    missing = [k for k in keys if k not in truth]
    if missing:
        raise ValueError(f"{path}: no row for {len(missing)} test items (e.g. {missing[0]}); "
                         f"delete {root} to have the set written again")
    prefix = "digit " if column == "digit" else ""
    return [prefix + truth[k] if truth[k] else "" for k in keys]


def run_baselines(root: Path, is3d: bool, cnn_input: int) -> Scored:
    t0 = time.perf_counter()
    _, _, train = load_split(root, "train", is3d)
    keys, y, test = load_split(root, "test", is3d)
    z, _ = baselines.zscore_scores(train, test)
    c, _ = baselines.cnn_nn_scores(train, test, input_size=cnn_input)
    log.info("baselines on %s: %.0f s", root.name, time.perf_counter() - t0)
    return Scored(keys, y, {"z-score": z, "random-CNN": c}, read_findings(root, keys))


def run_method(method: str, root: Path, modality: str, out: Path, extra: list[str]
               ) -> tuple[dict[str, float], float]:
    """One pipeline run as a user would type it; returns ({key: score}, wall seconds)."""
    import pandas as pd

    from experiments import pipeline

    argv = [f"method={method}", "data=folder", f"data.root={root.resolve()}",
            f"data.modality={modality}", "profile=cpu", "logger=none", f"out_dir={out}",
            *extra]
    log.info("run: python -m experiments.pipeline %s", shlex.join(argv))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    pipeline.main(argv)
    wall = time.perf_counter() - t0
    table = pd.read_csv(out / "scores.csv")
    return {_item_key(p): float(s) for p, s in zip(table["path"], table["score"])}, wall


def _auc_ci(y: np.ndarray, s: np.ndarray) -> tuple[float, list[float]]:
    ci = delong_ci(y, s)
    return ci.auroc, [ci.low, ci.high]


def by_finding(ref: Scored, s: np.ndarray | None) -> dict[str, dict]:
    """AUROC of the abnormal test images of each finding against all test normals
    (:func:`experiments.evaluation.per_finding_metrics`), for the method's scores ``s`` (nan
    when None) and for both references."""
    if ref.findings is None:
        return {}
    per = {k: per_finding_metrics(ref.labels, v, ref.findings, sep=None)
           for k, v in (("auroc", s), ("zscore_auroc", ref.scores["z-score"]),
                        ("cnn_auroc", ref.scores["random-CNN"])) if v is not None}
    names = per["zscore_auroc"]
    return {name: {"n": names[name]["n"],
                   **{k: float(per[k][name]["auroc"]) if k in per else float("nan")
                      for k in ("auroc", "zscore_auroc", "cnn_auroc")}}
            for name in names}


def method_row(set_name: str, data: str, method: str, ref: Scored,
               by_key: dict[str, float] | None, wall: float, error: str = "") -> Row:
    y = ref.labels
    (za, zci), (ca, cci) = (_auc_ci(y, ref.scores[k]) for k in ("z-score", "random-CNN"))
    row = Row(set_name, data, method, float("nan"), [float("nan")] * 2,
              f"{int((y == 0).sum())}+{int((y == 1).sum())}", za, zci, ca, cci,
              time_s=wall, error=error, by_finding=by_finding(ref, None))
    if by_key is None:
        return row
    missing = [k for k in ref.keys if k not in by_key]
    if missing:
        row.error = f"{len(missing)} test items missing from scores.csv (e.g. {missing[0]})"
        return row
    s = np.array([by_key[k] for k in ref.keys])
    row.auroc, row.auroc_ci = _auc_ci(y, s)
    best = "z-score" if za >= ca else "random-CNN"
    row.margin = row.auroc - max(za, ca)
    row.p_vs_best_baseline = delong_test(y, s, ref.scores[best])
    row.by_finding = by_finding(ref, s)
    return row


# --- output ---------------------------------------------------------------------------------
def _fmt(a: float, ci: list[float]) -> str:
    if math.isnan(a):
        return "n/a"
    return f"{a:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def print_table(rows: list[Row], gates: dict[str, dict]) -> None:
    head = (f"{'set':7s} {'data':13s} {'method':6s} {'n test':7s} {'AUROC [95% CI]':22s} "
            f"{'z-score':22s} {'random-CNN':22s} {'margin':>7s} {'p':>7s} {'time':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        t = "" if math.isnan(r.time_s) else f"{r.time_s:6.0f}s"
        flag = " !" if r.time_s > TIME_BUDGET_S else ""
        margin = "n/a" if math.isnan(r.margin) else f"{r.margin:+.3f}"
        p = "n/a" if math.isnan(r.p_vs_best_baseline) else f"{r.p_vs_best_baseline:.3f}"
        print(f"{r.set:7s} {r.data:13s} {r.method:6s} {r.n_test:7s} "
              f"{_fmt(r.auroc, r.auroc_ci):22s} {_fmt(r.zscore_auroc, r.zscore_ci):22s} "
              f"{_fmt(r.cnn_auroc, r.cnn_ci):22s} {margin:>7s} {p:>7s} {t:>7s}{flag}")
        if r.error:
            print(f"        FAILED: {r.error}")
    print("margin = method AUROC - max(baseline AUROCs); p = paired DeLong test vs the better "
          f"baseline; time = wall time of the method's run (budget {TIME_BUDGET_S:.0f} s, "
          "! = over).")
    for data, g in gates.items():
        verdict = "counts" if g["counts"] else "does NOT count (too easy)"
        print(f"gate {data}: z-score AUROC {g['zscore_auroc']:.3f} "
              f"{'<=' if g['counts'] else '>'} {ZSCORE_GATE} -> {verdict}; random-CNN "
              f"{g['cnn_auroc']:.3f}")


def finding_rows(rows: list[Row]) -> list[dict]:
    """Long table of ``Row.by_finding``: one row per (data, method or reference, finding);
    the references once per data."""
    out, seen = [], set()
    for r in rows:
        for name, d in r.by_finding.items():
            if r.method in ("patch", "flow"):
                out.append({"set": r.set, "data": r.data, "method": r.method, "finding": name,
                            "n_abnormal": d["n"], "auroc": d["auroc"]})
            for ref, key in (("z-score", "zscore_auroc"), ("random-CNN", "cnn_auroc")):
                if (r.data, ref, name) not in seen:
                    seen.add((r.data, ref, name))
                    out.append({"set": r.set, "data": r.data, "method": ref, "finding": name,
                                "n_abnormal": d["n"], "auroc": d[key]})
    return sorted(out, key=lambda x: (x["data"], x["method"] in ("z-score", "random-CNN")))


def print_findings(rows: list[Row]) -> None:
    """Per data: a column per finding, a row per method and reference."""
    table = finding_rows(rows)
    if not table:
        return
    print("\nPer finding: test AUROC of the abnormal images with that finding against all "
          "test normals (n = how many)")
    for data in dict.fromkeys(t["data"] for t in table):
        part = [t for t in table if t["data"] == data]
        names = list(dict.fromkeys(t["finding"] for t in part))
        width = [max(len(n), 5) + 2 for n in names]
        n = {t["finding"]: t["n_abnormal"] for t in part}
        print(f"  {data:13s} {'':10s}" + "".join(f"{x:>{w}s}" for x, w in zip(names, width)))
        print(f"  {'':13s} {'n':10s}" + "".join(f"{n[x]:>{w}d}" for x, w in zip(names, width)))
        for method in dict.fromkeys(t["method"] for t in part):
            a = {t["finding"]: t["auroc"] for t in part if t["method"] == method}
            print(f"  {'':13s} {method:10s}" + "".join(
                f"{a[x]:>{w}.3f}" if x in a and not math.isnan(a[x]) else f"{'n/a':>{w}s}"
                for x, w in zip(names, width)))


def write_outputs(out: Path, rows: list[Row], gates: dict, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from experiments.evaluation import write_metrics_json

    write_metrics_json(out / "detection.json",
                       {"rows": [asdict(r) for r in rows], "gates": gates, **meta}, digits=4)
    with (out / "detection.csv").open("w", newline="") as f:
        w = csv.writer(f)
        cols = [c for c in asdict(rows[0]) if c != "by_finding"] if rows else []
        w.writerow([c for c in cols if not c.endswith("ci")] +
                   [f"{c}_{b}" for c in cols if c.endswith("ci") for b in ("low", "high")])
        for r in rows:
            d = asdict(r)
            w.writerow([d[c] for c in cols if not c.endswith("ci")] +
                       [d[c][i] for c in cols if c.endswith("ci") for i in (0, 1)])
    table = finding_rows(rows)
    with (out / "detection_findings.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["set", "data", "method", "finding", "n_abnormal",
                                          "auroc"])
        w.writeheader()
        w.writerows(table)


# --- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--sets", default="cxr,bct,digits")
    p.add_argument("--methods", default="patch,flow")
    p.add_argument("--seed", type=int, default=9001,
                   help="report seed (9001-9099); cxr uses it, bct seed+1, digits seed+2")
    p.add_argument("--out", default="outputs/benchmarks/detection")
    p.add_argument("--quick", action="store_true", help="tiny sets and models (for the tests)")
    p.add_argument("--patch-args", default="", help="extra overrides for every patch run")
    p.add_argument("--flow-args", default="", help="extra overrides for every flow run")
    a = p.parse_args(argv)
    from experiments.common import setup_logging

    setup_logging()
    sets = [s for s in a.sets.split(",") if s]
    methods = [m for m in a.methods.split(",") if m]
    for s in sets:
        if s not in SET_METHODS:
            raise SystemExit(f"unknown set {s!r}; choose from {sorted(SET_METHODS)}")
    for m in methods:
        if m not in ("patch", "flow"):
            raise SystemExit(f"unknown method {m!r}; choose from patch, flow")
    if a.seed in DEV_SEEDS:
        raise SystemExit(f"--seed {a.seed} is a development seed (100-199, used for tuning); "
                         "the benchmark reports on seeds 9001-9099")
    if a.seed not in REPORT_SEEDS:
        log.warning("--seed %d is outside the report range 9001-9099", a.seed)
    cfg = QUICK if a.quick else FULL
    out = Path(a.out)
    extra = {"patch": shlex.split(a.patch_args), "flow": shlex.split(a.flow_args)}

    # (set, data label, folder, modality, is3d, methods that read it)
    plan = []
    for s in sets:
        todo = [m for m in SET_METHODS[s] if m in methods]
        if s == "cxr":
            for m in todo:
                size = cfg["cxr_size"][m]
                plan.append((s, f"cxr {size}px", phantom_set("cxr", size, cfg["counts"], a.seed),
                             "cxr", False, [m]))
            if not todo:  # baselines only
                size = cfg["cxr_size"]["patch"]
                plan.append((s, f"cxr {size}px", phantom_set("cxr", size, cfg["counts"], a.seed),
                             "cxr", False, []))
        elif s == "bct":
            shape = cfg["bct_size"]
            plan.append((s, "bct " + "x".join(map(str, shape)),
                         phantom_set("bct", shape, cfg["counts"], a.seed + 1), "bct", True, todo))
        else:
            plan.append((s, "digits 8px", digits_set(cfg["digits"], a.seed + 2), "cxr", False,
                         todo))

    rows: list[Row] = []
    gates: dict[str, dict] = {}
    t_start = time.perf_counter()
    for set_name, data, root, modality, is3d, todo in plan:
        ref = run_baselines(root, is3d, cfg["cnn_input"]["3d" if is3d else "2d"])
        za, zci = _auc_ci(ref.labels, ref.scores["z-score"])
        ca, cci = _auc_ci(ref.labels, ref.scores["random-CNN"])
        if set_name != "digits":
            gates[data] = {"zscore_auroc": za, "cnn_auroc": ca, "counts": bool(za <= ZSCORE_GATE)}
        if not todo:
            rows.append(method_row(set_name, data, "-", ref, None, float("nan")))
        for m in todo:
            args = list(extra[m])
            if a.quick:
                args = QUICK_ARGS[m] + QUICK_ARGS.get(f"{m}_{modality}", []) + args
            run_out = out / "runs" / f"{data.replace(' ', '_')}_{m}"
            try:
                by_key, wall = run_method(m, root, modality, run_out, args)
                rows.append(method_row(set_name, data, m, ref, by_key, wall))
            except Exception as e:  # one failed method must not hide the others' numbers
                log.error("%s on %s failed:\n%s", m, data, traceback.format_exc())
                rows.append(method_row(set_name, data, m, ref, None, float("nan"),
                                       error=f"{type(e).__name__}: {e}"))
    total = time.perf_counter() - t_start

    print()
    print_table(rows, gates)
    print_findings(rows)
    method_rows = [r for r in rows if r.method in ("patch", "flow")]
    failed = any(r.error or math.isnan(r.margin) for r in method_rows)
    margins = [r.margin for r in method_rows]
    min_margin = float("nan") if failed or not margins else min(margins)
    print(f"total wall time {total:.0f} s; written {out / 'detection.json'}, "
          f"{out / 'detection.csv'}, {out / 'detection_findings.csv'}")
    write_outputs(out, rows, gates, {"seed": a.seed, "quick": a.quick, "total_s": total,
                                     "min_margin_over_baselines": min_margin,
                                     "patch_args": a.patch_args, "flow_args": a.flow_args})
    print(f"min_margin_over_baselines={min_margin:.3f}")
    return min_margin


if __name__ == "__main__":
    main()
