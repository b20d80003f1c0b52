"""Multiresolution patch anomaly detection pipeline (Kim et al., Sci Rep 2023).

    python -m experiments.pipeline method=patch data=... out_dir=OUT [profile=cpu|paper]

1. one SimCLR encoder per patch size: reused from ``OUT/encoders/res<s>`` (or
   ``patch.encoder_dir``) when a checkpoint exists, else trained by
   ``experiments.train_simclr.train`` on the normal training images;
2. reference databases: features of every normal training patch (``OUT/db/res<s>.safetensors``);
3. validation: patch scores -> per-size scales and calibration of eq. 6 (never the test set);
4. test: anomaly maps, image scores (max of the final map), abnormal iff score > threshold;
5. ``OUT/scores.csv``, ``OUT/metrics.json``, ``OUT/report.html`` and, for
   ``experiments.detect_image`` and the ablations, ``OUT/patch_detector.json``.

With ``patch.n_folds_run=K`` the pipeline runs folds 0..K-1 of ``data.n_folds`` (encoders
trained per fold: the training images differ) into ``OUT/fold<k>`` and reports mean ± sd.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file

from datamodules.manifest import record_splits
from experiments.common import setup_logging, track
from experiments.config import ConfigError, load_config, prepare_run_dir
from lightning_modules.patch_detector.anomaly_map import FUSIONS, MapNormalizer
from lightning_modules.patch_detector.detector import PatchAnomalyDetector
from lightning_modules.patch_detector.reference_db import (
    ReferenceDB,
    ReferenceDBMismatch,
    file_sha256,
)

log = logging.getLogger(__name__)

STATE_FILE = "patch_detector.json"
JOBS = ["simclr", "patch"]  # SimCLR recipe from configs/simclr.yaml, detector from patch.yaml


def load(argv: list[str] | None = None) -> DictConfig:
    cfg = load_config(JOBS, argv)
    check_config(cfg)
    return cfg


def check_config(cfg: DictConfig) -> None:
    p = cfg.patch
    if p.fusion not in FUSIONS:
        raise ConfigError(f"patch.fusion={p.fusion!r} is not one of {list(FUSIONS)}")
    if cfg.data.modality != "cxr" and cfg.data.name not in ("padchest", "rsna", "phantom_cxr"):
        raise ConfigError("The patch detector works on 2D images: set data.modality=cxr.")
    for s in p.patch_sizes:
        if int(s) > int(cfg.data.image_size):
            raise ConfigError(f"patch size {s} is larger than data.image_size="
                              f"{cfg.data.image_size}")
    for name in ("encoder_input_sizes", "encoder_epochs"):
        v = p[name]
        if v is not None and len(v) != len(p.patch_sizes):
            raise ConfigError(f"patch.{name} needs one value per patch size "
                              f"({len(p.patch_sizes)}), got {list(v)}")
    if p.features == "dense" and p.stride_fraction != 1:
        raise ConfigError("patch.features=dense needs patch.stride_fraction=1")
    if not 0 < p.stride_fraction <= 1:
        raise ConfigError(f"patch.stride_fraction={p.stride_fraction} must lie in (0, 1]")
    if p.n_folds_run < 1 or p.n_folds_run > cfg.data.n_folds:
        raise ConfigError(f"patch.n_folds_run={p.n_folds_run} must lie in 1..data.n_folds")


def device_of(cfg: DictConfig) -> torch.device:
    want = cfg.patch.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    return torch.device(want)


# --- encoders ---------------------------------------------------------------------------------
def find_encoder_checkpoint(folder: Path) -> Path | None:
    """The best (else last) SimCLR checkpoint written by ``train_simclr.train`` in ``folder``."""
    metrics = folder / "metrics.json"
    if metrics.is_file():
        best = json.loads(metrics.read_text()).get("best_checkpoint")
        if best and Path(best).is_file():
            return Path(best)
    ckpts = folder / "checkpoints"
    for pattern in ("*best*.ckpt", "last.ckpt"):
        found = sorted(ckpts.glob(pattern))
        if found:
            return found[-1]
    return None


def encoder_folder(cfg: DictConfig, out: Path, size: int) -> Path:
    base = Path(cfg.patch.encoder_dir) if cfg.patch.encoder_dir else out / "encoders"
    return base / f"res{size}"


def ensure_encoders(cfg: DictConfig, dm, out: Path) -> dict[int, Path]:
    """Checkpoint per patch size: reuse, or train the missing ones (scoring is cheap,
    training is not)."""
    paths = {}
    p = cfg.patch
    for i, size in enumerate(int(s) for s in p.patch_sizes):
        folder = encoder_folder(cfg, out, size)
        ckpt = find_encoder_checkpoint(folder)
        if ckpt is not None:
            log.info("Encoder res %d: reusing %s", size, ckpt)
            paths[size] = ckpt
            continue
        if not p.train_encoders:
            raise FileNotFoundError(f"No encoder checkpoint for patch size {size} in {folder} "
                                    "and patch.train_encoders=false; train it with "
                                    f"`make train-simclr RES={size}` or allow training.")
        from experiments.train_simclr import train

        c = copy.deepcopy(cfg)
        c.simclr.patch_size = size
        c.out_dir = str(folder)
        c.simclr.intensity_norm = str(p.intensity_norm)  # train on what the detector sees
        if p.encoder_input_sizes is not None:
            c.simclr.input_size = int(p.encoder_input_sizes[i])
        if p.encoder_epochs is not None:
            c.trainer.max_epochs = int(p.encoder_epochs[i])
        log.info("Encoder res %d: training SimCLR into %s", size, folder)
        result = Path(train(c, datamodule=dm))
        _finish_wandb()  # one W&B run per encoder: train() leaves its run open
        ckpt = result if result.is_file() else find_encoder_checkpoint(folder)
        if ckpt is None:
            raise RuntimeError(f"SimCLR training for size {size} wrote no checkpoint in "
                               f"{folder} (trainer.fast_dev_run saves none)")
        paths[size] = ckpt
    return paths


def _finish_wandb() -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def build_detector(cfg: DictConfig, ckpts: dict[int, Path], device: torch.device
                   ) -> PatchAnomalyDetector:
    from lightning_modules.simclr import load_encoder

    p = cfg.patch
    encoders = {s: load_encoder(ckpts[s], map_location=device).eval() for s in ckpts}
    det = PatchAnomalyDetector(
        encoders, int(cfg.data.image_size), [int(s) for s in p.patch_sizes],
        [int(d) for d in p.locality], distance=p.distance, shrinkage=p.shrinkage,
        stride_fraction=p.stride_fraction, chunk_size=p.chunk_size,
        feature_batch_size=p.feature_batch_size, cell_normalize=p.cell_normalize,
        features=str(p.features), dense_layers=[str(x) for x in p.dense_layers],
        dense_pool=int(p.dense_pool), intensity_norm=str(p.intensity_norm),
    )
    return det.to(device).eval()


# --- features ---------------------------------------------------------------------------------
@torch.no_grad()
def compute_features(det: PatchAnomalyDetector, dm, items, description: str,
                     batch_size: int = 8) -> dict[int, torch.Tensor]:
    """``{size: (n_items, N, D)}`` float32 on the CPU, every patch of every item."""
    device = next(det.parameters()).device
    out: dict[int, list[torch.Tensor]] = {s: [] for s in det.patch_sizes}
    batches = range(0, len(items), batch_size)
    for b0 in track(batches, description, total=len(batches)):
        imgs = np.stack([dm.load(it) for it in items[b0:b0 + batch_size]])  # (B, H, W)
        x = torch.from_numpy(imgs).float().unsqueeze(1).to(device)  # (B, 1, H, W)
        for s, f in det.features(x).items():
            out[s].append(f.cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def _feature_meta(items, shas: dict[int, str], det: PatchAnomalyDetector) -> dict[str, str]:
    return {"paths": json.dumps([it.path for it in items]),
            "encoders": json.dumps({str(s): shas[s] for s in sorted(shas)}),
            "config": json.dumps({str(s): det.patch_config(s) for s in det.patch_sizes})}


def cached_features(path: Path, det, dm, items, shas, description: str, use_cache: bool
                    ) -> dict[int, torch.Tensor]:
    """Features of ``items``, read from ``path`` when it was written for the same items,
    encoders and patch settings; computed (and written) otherwise."""
    meta = _feature_meta(items, shas, det)
    if use_cache and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() == meta:
                log.info("%s: reusing %s", description, path)
                return {s: f.get_tensor(f"res{s}") for s in det.patch_sizes}
    feats = compute_features(det, dm, items, description)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"res{s}": v.contiguous() for s, v in feats.items()}, str(path), metadata=meta)
    return feats


def ensure_dbs(det: PatchAnomalyDetector, dm, out: Path, shas: dict[int, str]) -> None:
    """Load the reference databases that match the encoders, build the others."""
    missing = []
    for s in det.patch_sizes:
        path = out / "db" / f"res{s}.safetensors"
        if path.is_file():
            try:
                det.set_db(ReferenceDB.load(path, shas[s], det.patch_config(s)))
                log.info("Reference DB res %d: reusing %s (%d patches)", s, path,
                         len(det.dbs[s]))
                continue
            except ReferenceDBMismatch as e:
                log.warning("%s Rebuilding it.", e)
        missing.append(s)
    if not missing:
        return
    items = dm.items("train", "normal")
    if not items:
        raise RuntimeError("No normal training images: the reference database needs them.")
    feats = compute_features(det, dm, items, "Reference DB: normal training patches")
    image_ids = [Path(it.path).name for it in items]
    for s in missing:
        f = feats[s]  # (n_img, N, D)
        n_img, n, dim = f.shape
        ct = det.cell_tensors(s)
        db = ReferenceDB(
            patch_size=s, features=f.reshape(n_img * n, dim),
            **{k: v.repeat(n_img) for k, v in ct.items()},
            image_index=torch.arange(n_img, dtype=torch.int32).repeat_interleave(n),
            image_ids=image_ids, encoder_sha256=shas[s], config=det.patch_config(s),
        )
        db.save(out / "db" / f"res{s}.safetensors")
        det.set_db(db)
        log.info("Reference DB res %d: %d patches from %d images", s, len(db), n_img)


# --- scoring ----------------------------------------------------------------------------------
@dataclass
class SplitScores:
    items: list
    labels: np.ndarray  # (n,)
    patch_scores: dict[int, torch.Tensor]  # {size: (n, N)} raw
    final_maps: torch.Tensor | None = None  # (n, H/g, W/g)
    scores: np.ndarray | None = None  # (n,) image scores in (0, 1)
    raw: np.ndarray | None = None  # (n,) max of the fused log map
    extra: dict = field(default_factory=dict)


def fit_normalizer(det: PatchAnomalyDetector, val: SplitScores, sizes: list[int],
                   weights: list[float], fusion: str, image_score: str = "max",
                   topk_fraction: float = 0.01) -> MapNormalizer:
    """Normalize of eq. 6 on the validation set only (see anomaly_map)."""
    normal = val.labels == 0
    if not normal.any():
        raise RuntimeError("The validation set has no normal images: Normalize (eq. 6) is "
                           "fitted on them.")
    norm = MapNormalizer.fit_scales([val.patch_scores[s][torch.from_numpy(normal)]
                                     for s in sizes], sizes, weights, fusion,
                                    image_score, topk_fraction)
    raw = det.raw_image_scores(val.patch_scores, norm).numpy()
    norm.fit_calibration(raw, val.labels)
    return norm


def apply_normalizer(det: PatchAnomalyDetector, split: SplitScores, norm: MapNormalizer) -> None:
    final, scores = det.fuse(split.patch_scores, norm)
    split.final_maps, split.scores = final, scores.numpy().astype(np.float64)
    split.raw = det.raw_image_scores(split.patch_scores, norm).numpy()


def score_split(det, dm, out: Path, split: str, shas, use_cache: bool) -> SplitScores:
    items = [it for it in dm.items(split) if it.label in (0, 1)]
    if not items:
        raise RuntimeError(f"No labelled {split} images.")
    feats = cached_features(out / "features" / f"{split}.safetensors", det, dm, items, shas,
                            f"Features: {split} patches", use_cache)
    scores = det.patch_scores({s: f.to(next(det.parameters()).device) for s, f in feats.items()})
    return SplitScores(items, np.array([it.label for it in items]),
                       {s: v.cpu() for s, v in scores.items()})


# --- outputs ----------------------------------------------------------------------------------
def evaluate(cfg: DictConfig, det, dm, val: SplitScores, test: SplitScores) -> dict:
    from experiments import evaluation as ev

    thr = float(cfg.patch.threshold)
    metrics = ev.binary_metrics(test.labels, test.scores, thr)
    metrics.update(ev.sensitivity_at_specificities(val.labels, val.scores, test.labels,
                                                   test.scores))
    val_m = ev.binary_metrics(val.labels, val.scores, thr)
    metrics.update({f"val/{k}": val_m[k] for k in ("auroc", "accuracy", "sensitivity",
                                                    "specificity")})
    # single-resolution image scores (max of each normalised per-size map): what each size adds
    for s, m_s in zip(det.normalizer.sizes, det.normalizer.scales):
        one = MapNormalizer([s], [1.0], "geometric", [m_s],
                            image_score=det.normalizer.image_score,
                            topk_fraction=det.normalizer.topk_fraction)
        raw = det.raw_image_scores(test.patch_scores, one).numpy()
        metrics[f"auroc_res{s}"] = ev.auroc(test.labels, raw)
    findings = [it.finding for it in test.items]
    if any(findings):
        metrics["per_finding"] = ev.per_finding_metrics(test.labels, test.scores, findings, thr)
    masks = [dm.load_mask(it) for it in test.items]
    if any(m is not None for m in masks):
        shape = next(m for m in masks if m is not None).shape
        # normal test images count with all-negative masks (false alarms on them matter)
        masks = [np.zeros(shape, bool) if m is None and it.label == 0 else m
                 for m, it in zip(masks, test.items)]
        maps = det.upsample(test.final_maps).numpy()
        metrics["pixel_auroc"] = ev.pixel_auroc(masks, list(maps))
        metrics["pixel_auroc_ci"] = list(ev.pixel_auroc_ci(masks, list(maps)))
    metrics["n_reference_images"] = len(dm.items("train", "normal"))
    return metrics


def write_outputs(cfg: DictConfig, out: Path, det, dm, val: SplitScores, test: SplitScores,
                  metrics: dict) -> Path:
    from experiments import evaluation as ev
    from experiments import plots
    from experiments.report import Report

    ev.write_scores_csv(out / "scores.csv", [it.path for it in test.items], test.labels,
                        test.scores, raw_score=list(test.raw),
                        finding=[it.finding for it in test.items])
    ev.write_scores_csv(out / "val_scores.csv", [it.path for it in val.items], val.labels,
                        val.scores, raw_score=list(val.raw))
    ev.write_metrics_json(out / "metrics.json", metrics)

    fig = out / "figures"
    p, n = cfg.patch, det.normalizer
    rep = Report(out, "Multiresolution patch anomaly detection (Kim et al. 2023)")
    rep.add_text(
        f"Patch sizes {list(n.sizes)} on {det.image_size}² images, locality d = "
        f"{[int(d) for d in p.locality]}, {p.distance} distance, weights {list(n.weights)} "
        f"({n.fusion} fusion), grid stride = {p.stride_fraction} × patch size. Normalize (eq. 6) "
        f"fitted on {len(val.items)} validation images; abnormal iff score > {p.threshold}. "
        "From the paper: per-size nearest-reference distances within locality d, the weighted "
        "product of eq. 6 and the image score = max of the final map; ours (documented "
        "choices): how Normalize is defined and fitted, the fusion variant, and the "
        "threshold (paper: 0.5) applied to that Normalize."
    )
    rep.add_metrics(ev.flatten_metrics({k: v for k, v in metrics.items()
                                        if k != "per_finding"}), title="Test metrics")
    if "per_finding" in metrics:
        rep.add_table([{"finding": k, **v} for k, v in metrics["per_finding"].items()],
                      title="Per finding")
    rep.add_figure(plots.plot_roc(fig / "roc.png", test.labels,
                                  {"multiresolution": test.scores,
                                   **{f"res {s} only": test.patch_scores[s].max(1).values.numpy()
                                      for s in n.sizes}},
                                  title="Test ROC"), "ROC on the test set; Youden cut-off marked")
    if any(it.finding for it in test.items):
        rep.add_figure(plots.plot_roc_per_finding(fig / "roc_per_finding.png", test.labels,
                                                  test.scores, [it.finding for it in test.items],
                                                  title="ROC per finding"))
    rep.add_figure(plots.plot_histograms(fig / "histograms.png", test.scores, test.labels,
                                         "image score (max of A_final)", title="Test scores",
                                         thresholds={"threshold": float(p.threshold)}))
    order = np.argsort(-test.scores)
    k = min(int(cfg.eval.n_extremes), len(order))

    def caption(i):
        return f"{'abn' if test.labels[i] else 'nor'} {test.scores[i]:.2f}"

    for name, idx in (("most", order[:k]), ("least", order[::-1][:k])):
        rep.add_figure(plots.plot_image_grid(
            fig / f"{name}_anomalous.png", [dm.load(test.items[i]) for i in idx],
            [caption(i) for i in idx], title=f"{k} {name} anomalous test images"))
    k = min(int(cfg.eval.n_overlays), len(order))
    idx = order[:k]
    maps = det.upsample(test.final_maps[torch.from_numpy(idx.copy())]).numpy()
    rep.add_figure(plots.plot_overlays(
        fig / "overlays.png", [dm.load(test.items[i]) for i in idx], list(maps),
        [caption(i) for i in idx], masks=[dm.load_mask(test.items[i]) for i in idx],
        vmin=0.0, vmax=1.0, title="A_final on the most anomalous test images",
        map_label="A_final"), "Final anomaly maps (lesion masks outlined where known)")
    return rep.write()


def save_state(cfg: DictConfig, out: Path, det: PatchAnomalyDetector,
               ckpts: dict[int, Path], shas: dict[int, str]) -> Path:
    """What ``experiments.detect_image`` needs to score new images (paths relative to OUT
    where they lie inside it)."""
    def rel(p: Path) -> str:
        p = Path(p).resolve()
        try:
            return str(p.relative_to(out.resolve()))
        except ValueError:
            return str(p)

    state = {
        "image_size": det.image_size,
        "patch_sizes": det.patch_sizes,
        "locality": [det.locality[s] for s in det.patch_sizes],
        "distance": det.distance,
        "shrinkage": det.shrinkage,
        "stride_fraction": det.stride_fraction,
        "cell_normalize": det.cell_normalize,
        "features": det.feature_mode,
        "dense_layers": list(det.dense_layers),
        "dense_pool": det.dense_pool,
        "intensity_norm": det.intensity_norm,
        "threshold": float(cfg.patch.threshold),
        "encoders": {str(s): {"checkpoint": rel(ckpts[s]), "sha256": shas[s]}
                     for s in det.patch_sizes},
        "databases": {str(s): f"db/res{s}.safetensors" for s in det.patch_sizes},
        "normalizer": det.normalizer.to_dict(),
    }
    path = out / STATE_FILE
    path.write_text(json.dumps(state, indent=2))
    return path


# --- entry ------------------------------------------------------------------------------------
def prepare(cfg: DictConfig, dm=None):
    """Data, encoders, detector and reference databases of a run (shared with the ablations)."""
    out = Path(cfg.out_dir)
    if dm is None:
        from datamodules.factory import build_datamodule

        dm = build_datamodule(cfg.data)
    dm.setup()
    ckpts = ensure_encoders(cfg, dm, out)
    shas = {s: file_sha256(c) for s, c in ckpts.items()}
    det = build_detector(cfg, ckpts, device_of(cfg))
    ensure_dbs(det, dm, out, shas)
    return dm, det, ckpts, shas


def run_single(cfg: DictConfig, dm=None) -> dict:
    out = prepare_run_dir(cfg)
    torch.manual_seed(int(cfg.seed))
    dm, det, ckpts, shas = prepare(cfg, dm)
    record_splits(dm, out)  # OUT/splits.csv + its sha256 in run_info.json
    use_cache = bool(cfg.patch.cache_features)
    val = score_split(det, dm, out, "val", shas, use_cache)
    test = score_split(det, dm, out, "test", shas, use_cache)
    p = cfg.patch
    det.normalizer = fit_normalizer(det, val, det.patch_sizes, [float(w) for w in p.weights],
                                    p.fusion, str(p.image_score), float(p.topk_fraction))
    apply_normalizer(det, val, det.normalizer)
    apply_normalizer(det, test, det.normalizer)
    metrics = evaluate(cfg, det, dm, val, test)
    save_state(cfg, out, det, ckpts, shas)
    report = write_outputs(cfg, out, det, dm, val, test, metrics)
    log.info("Report: %s", report)
    log_to_wandb(cfg, out, metrics)
    return metrics


def log_to_wandb(cfg: DictConfig, out: Path, metrics: dict) -> None:
    """Scalar test/val metrics to W&B (offline by default; nothing for logger=none)."""
    from experiments.common import make_logger
    from experiments.evaluation import flatten_metrics

    _finish_wandb()
    logger = make_logger(cfg, out, name="patch-pipeline")
    if logger is None:
        return
    scalars = {(k if "/" in k else f"test/{k}"): float(v)
               for k, v in flatten_metrics(metrics).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    logger.log_metrics(scalars)
    logger.finalize("success")
    logger.experiment.finish()


def run(cfg: DictConfig) -> dict:
    from experiments.evaluation import print_metrics_table, summarize_folds, write_metrics_json

    check_config(cfg)
    if int(cfg.patch.n_folds_run) == 1:
        metrics = run_single(cfg)
        print_metrics_table({k: v for k, v in metrics.items() if k != "per_finding"},
                            title=f"Patch detector, test set ({cfg.out_dir})")
        print(f"Report: {Path(cfg.out_dir) / 'report.html'}")
        return metrics
    out = prepare_run_dir(cfg)
    folds = []
    for k in range(int(cfg.patch.n_folds_run)):
        c = copy.deepcopy(cfg)
        c.data.fold = k
        c.out_dir = str(out / f"fold{k}")
        if cfg.patch.encoder_dir:
            c.patch.encoder_dir = str(Path(cfg.patch.encoder_dir) / f"fold{k}")
        log.info("Fold %d of %d", k + 1, cfg.patch.n_folds_run)
        folds.append({m: v for m, v in run_single(c).items() if m != "per_finding"})
    summary = summarize_folds(folds)
    metrics = {key: v["mean"] for key, v in summary.items()}
    metrics.update({f"{key}_sd": v["sd"] for key, v in summary.items()})
    metrics["n_folds"] = len(folds)
    write_metrics_json(out / "metrics.json", metrics)
    from experiments.report import Report

    rep = Report(out, f"Patch detector: {len(folds)}-fold cross-validation")
    rep.add_metrics({k: v for k, v in summary.items()}, title="Mean ± sd over folds")
    rep.add_table([{"fold": k, **f} for k, f in enumerate(folds)], title="Per fold")
    rep.add_text("Each fold's report: " + ", ".join(f"fold{k}/report.html"
                                                    for k in range(len(folds))))
    rep.write()
    print_metrics_table(summary, title=f"Patch detector, {len(folds)}-fold CV")
    print(f"Report: {out / 'report.html'}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    return run(load(argv))


if __name__ == "__main__":
    main()
