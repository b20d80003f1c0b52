"""Multiresolution patch anomaly detection pipeline (Kim et al., Sci Rep 2023): build, fit,
test, write.

    python -m experiments.pipeline method=patch data=... out_dir=OUT [profile=cpu|paper]

1. one SimCLR encoder per patch size: reused from ``OUT/encoders/res<s>`` when its
   ``fingerprint.json`` says it was trained on the same data and settings with the same code
   (or from ``patch.encoder_dir``, as given), else trained by ``experiments.train_simclr.train``
   on the normal training images;
2. :class:`~lightning_modules.patch_detector.lightning_model.PatchDetectorModule` does the
   rest in Lightning's stages: fit = reference databases of the normal training patches,
   validate = Normalize of eq. 6 (never the test set), test = anomaly maps and image scores;
3. ``OUT/scores.csv``, ``OUT/metrics.json``, ``OUT/report.html`` and ``OUT/patch_detector.ckpt``
   (databases, normalisation and encoders in one checkpoint, for ``experiments.detect_image``).

With ``patch.n_folds_run=K`` the pipeline runs folds 0..K-1 of ``data.n_folds`` (encoders
trained per fold: the training images differ) into ``OUT/fold<k>`` and reports mean ± sd.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from datamodules.base import ItemDataset
from datamodules.manifest import record_splits
from experiments.cli import entry
from experiments.common import setup_logging
from experiments.config import ConfigError, git_commit, load_config, prepare_run_dir
from lightning_modules.devices import pick_device
from lightning_modules.patch_detector.anomaly_map import FUSIONS, MapNormalizer
from lightning_modules.patch_detector.detector import PatchAnomalyDetector
from lightning_modules.patch_detector.lightning_model import PatchDetectorModule, SplitScores
from lightning_modules.patch_detector.reference_db import file_sha256

log = logging.getLogger(__name__)

CKPT_FILE = "patch_detector.ckpt"
FINGERPRINT = "fingerprint.json"  # in each encoder folder, written after a finished training
JOBS = ["simclr", "patch"]  # SimCLR recipe from configs/simclr.yaml, detector from patch.yaml
FEATURE_BATCH = 8  # images per forward pass when scoring


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
    """``patch.device`` (auto: the GPU unless ``trainer.accelerator=cpu``)."""
    want = cfg.patch.device
    return pick_device("cpu" if want == "auto" and cfg.trainer.accelerator == "cpu" else want)


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


def encoder_cfg(cfg: DictConfig, size: int, i: int, folder: Path) -> DictConfig:
    """The configuration the encoder of patch size ``size`` (``i``-th) is trained with."""
    p, c = cfg.patch, copy.deepcopy(cfg)
    c.simclr.patch_size = size
    c.out_dir = str(folder)
    c.simclr.intensity_norm = str(p.intensity_norm)  # train on what the detector sees
    if p.encoder_input_sizes is not None:
        c.simclr.input_size = int(p.encoder_input_sizes[i])
    if p.encoder_epochs is not None:
        c.trainer.max_epochs = int(p.encoder_epochs[i])
    return c


def encoder_fingerprint(c: DictConfig, dm) -> dict:
    """What an encoder depends on: its training / validation images, the resolved settings of
    its training and the code version (``git_commit``)."""
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

    data = {k: v for k, v in OmegaConf.to_container(c.data, resolve=True).items()
            if k not in ("num_workers", "root")}  # the item list below stands for the root
    return {"items": digest([[it.path, it.label] for s in ("train", "val")
                             for it in dm.items(s)]),
            "settings": digest({k: OmegaConf.to_container(c[k], resolve=True)
                                for k in ("simclr", "optim", "trainer")} | {"data": data,
                                                                             "seed": c.seed}),
            "code": git_commit()}


def reusable_encoder(cfg: DictConfig, folder: Path, fingerprint: dict) -> Path | None:
    """The finished encoder in ``folder`` if its fingerprint matches; None when there is
    none (or an unfinished one: training resumes or restarts); refuse on a mismatch."""
    ckpt = find_encoder_checkpoint(folder)
    if cfg.patch.encoder_dir:  # encoders the user chose explicitly: used as given
        return ckpt
    mode, fp = str(cfg.patch.reuse_encoders), folder / FINGERPRINT
    if ckpt is None or mode == "retrain" or not fp.is_file():
        return None
    old = json.loads(fp.read_text())
    differs = [k for k in fingerprint if old.get(k) != fingerprint[k]]
    if differs and mode != "force":
        raise ConfigError(
            f"{folder} holds an encoder trained with other {' / '.join(differs)}; pass "
            "patch.reuse_encoders=retrain to train it again, or patch.reuse_encoders=force to "
            "use it anyway.")
    return ckpt


def ensure_encoders(cfg: DictConfig, dm, out: Path) -> dict[int, Path]:
    """Checkpoint per patch size: reuse what the fingerprint proves is the same, or train."""
    paths = {}
    p = cfg.patch
    for i, size in enumerate(int(s) for s in p.patch_sizes):
        folder = encoder_folder(cfg, out, size)
        c = encoder_cfg(cfg, size, i, folder)
        fingerprint = encoder_fingerprint(c, dm)
        ckpt = reusable_encoder(cfg, folder, fingerprint)
        if ckpt is not None:
            log.info("Encoder res %d: reusing %s", size, ckpt)
            paths[size] = ckpt
            continue
        if not p.train_encoders:
            raise FileNotFoundError(f"No encoder checkpoint for patch size {size} in {folder} "
                                    "and patch.train_encoders=false; train it with "
                                    f"`make train-simclr RES={size}` or allow training.")
        from experiments.train_simclr import train

        log.info("Encoder res %d: training SimCLR into %s", size, folder)
        result = Path(train(c, datamodule=dm))
        _finish_wandb()  # one W&B run per encoder: train() leaves its run open
        ckpt = result if result.is_file() else find_encoder_checkpoint(folder)
        if ckpt is None:
            raise RuntimeError(f"SimCLR training for size {size} wrote no checkpoint in "
                               f"{folder} (trainer.fast_dev_run saves none)")
        (folder / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2))
        paths[size] = ckpt
    return paths


def _finish_wandb() -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def build_module(cfg: DictConfig, ckpts: dict[int, Path], image_ids: list[str]
                 ) -> PatchDetectorModule:
    from lightning_modules.simclr import load_encoder

    p = cfg.patch
    encoders = {s: load_encoder(ckpts[s]).eval() for s in ckpts}
    det = PatchAnomalyDetector(
        encoders, int(cfg.data.image_size), [int(s) for s in p.patch_sizes],
        [int(d) for d in p.locality], distance=p.distance, shrinkage=p.shrinkage,
        stride_fraction=p.stride_fraction, chunk_size=p.chunk_size,
        feature_batch_size=p.feature_batch_size, cell_normalize=p.cell_normalize,
        features=str(p.features), dense_layers=[str(x) for x in p.dense_layers],
        dense_pool=int(p.dense_pool), intensity_norm=str(p.intensity_norm),
    ).eval()
    return PatchDetectorModule(det, [float(w) for w in p.weights], str(p.fusion),
                               str(p.image_score), float(p.topk_fraction), float(p.threshold),
                               image_ids=image_ids,
                               encoder_sha256={s: file_sha256(c) for s, c in ckpts.items()})


def scoring_trainer(cfg: DictConfig):
    """One epoch over the normal training images, no optimiser, no sanity check."""
    import warnings

    import pytorch_lightning as pl

    # both are intended here: nothing is optimised, and the fixed encoders stay in eval mode
    warnings.filterwarnings("ignore", message=r".*configure_optimizers. returned .None.")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    from experiments.common import AtomicCheckpointIO

    return pl.Trainer(accelerator="gpu" if device_of(cfg).type == "cuda" else "cpu",
                      devices=1, max_epochs=1, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      plugins=[AtomicCheckpointIO()])  # patch_detector.ckpt written atomically


def loader(dm, items) -> DataLoader:
    return DataLoader(ItemDataset(dm, items), batch_size=FEATURE_BATCH, shuffle=False,
                      num_workers=int(dm.cfg.num_workers))


def labelled(dm, split: str) -> list:
    items = [it for it in dm.items(split) if it.label in (0, 1)]
    if not items:
        raise RuntimeError(f"No labelled {split} images.")
    return items


def prepare(cfg: DictConfig, dm=None):
    """Data, encoders and the fitted module (reference databases + Normalize) of a run:
    ``(dm, module, trainer)``; ``module.val_result`` holds the validation scores."""
    if dm is None:
        from datamodules.factory import build_datamodule

        dm = build_datamodule(cfg.data)
    dm.setup()
    train = dm.items("train", "normal")
    if not train:
        raise RuntimeError("No normal training images: the reference database needs them.")
    module = build_module(cfg, ensure_encoders(cfg, dm, Path(cfg.out_dir)),
                          [Path(it.path).name for it in train])
    trainer = scoring_trainer(cfg)
    trainer.fit(module, loader(dm, train), loader(dm, labelled(dm, "val")))
    return dm, module, trainer


# --- outputs ----------------------------------------------------------------------------------
def evaluate(cfg: DictConfig, det, dm, val: SplitScores, test: SplitScores, val_items: list,
             test_items: list) -> dict:
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
    findings = [it.finding for it in test_items]
    if any(findings):
        metrics["per_finding"] = ev.per_finding_metrics(test.labels, test.scores, findings, thr)
    masks = [dm.load_mask(it) for it in test_items]
    if any(m is not None for m in masks):
        shape = next(m for m in masks if m is not None).shape
        # normal test images count with all-negative masks (false alarms on them matter)
        masks = [np.zeros(shape, bool) if m is None and it.label == 0 else m
                 for m, it in zip(masks, test_items)]
        maps = det.upsample(test.final_maps).numpy()
        metrics["pixel_auroc"] = ev.pixel_auroc(masks, list(maps))
        metrics["pixel_auroc_ci"] = list(ev.pixel_auroc_ci(masks, list(maps)))
    metrics["n_reference_images"] = len(dm.items("train", "normal"))
    return metrics


def write_outputs(cfg: DictConfig, out: Path, det, dm, val: SplitScores, test: SplitScores,
                  val_items: list, test_items: list, metrics: dict) -> Path:
    from experiments import evaluation as ev
    from experiments import plots
    from experiments.report import Report

    ev.write_scores_csv(out / "scores.csv", [it.path for it in test_items], test.labels,
                        test.scores, raw_score=list(test.raw),
                        finding=[it.finding for it in test_items])
    ev.write_scores_csv(out / "val_scores.csv", [it.path for it in val_items], val.labels,
                        val.scores, raw_score=list(val.raw))
    ev.write_metrics_json(out / "metrics.json", metrics)

    fig = out / "figures"
    p, n = cfg.patch, det.normalizer
    rep = Report(out, "Multiresolution patch anomaly detection (Kim et al. 2023)")
    rep.add_text(
        f"Patch sizes {list(n.sizes)} on {det.image_size}² images, locality d = "
        f"{[int(d) for d in p.locality]}, {p.distance} distance, weights {list(n.weights)} "
        f"({n.fusion} fusion), grid stride = {p.stride_fraction} × patch size. Normalize (eq. 6) "
        f"fitted on {len(val_items)} validation images; abnormal iff score > {p.threshold}."
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
    if any(it.finding for it in test_items):
        rep.add_figure(plots.plot_roc_per_finding(fig / "roc_per_finding.png", test.labels,
                                                  test.scores, [it.finding for it in test_items],
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
            fig / f"{name}_anomalous.png", [dm.load(test_items[i]) for i in idx],
            [caption(i) for i in idx], title=f"{k} {name} anomalous test images"))
    k = min(int(cfg.eval.n_overlays), len(order))
    idx = order[:k]
    maps = det.upsample(test.final_maps[torch.from_numpy(idx.copy())]).numpy()
    rep.add_figure(plots.plot_overlays(
        fig / "overlays.png", [dm.load(test_items[i]) for i in idx], list(maps),
        [caption(i) for i in idx], masks=[dm.load_mask(test_items[i]) for i in idx],
        vmin=0.0, vmax=1.0, title="A_final on the most anomalous test images",
        map_label="A_final"), "Final anomaly maps (lesion masks outlined where known)")
    return rep.write()


def run_single(cfg: DictConfig, dm=None) -> dict:
    out = prepare_run_dir(cfg)
    torch.manual_seed(int(cfg.seed))
    dm, module, trainer = prepare(cfg, dm)
    record_splits(dm, out)  # OUT/splits.csv + its sha256 in run_info.json
    test_items = labelled(dm, "test")
    trainer.test(module, loader(dm, test_items), verbose=False)
    trainer.save_checkpoint(out / CKPT_FILE)
    val, test = module.val_result, module.test_result
    val_items = [labelled(dm, "val")[i] for i in val.index]
    test_items = [test_items[i] for i in test.index]
    metrics = evaluate(cfg, module.detector, dm, val, test, val_items, test_items)
    report = write_outputs(cfg, out, module.detector, dm, val, test, val_items, test_items,
                           metrics)
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
    from experiments.evaluation import (
        pooled_auroc,
        print_metrics_table,
        summarize_folds,
        write_metrics_json,
    )

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
    import pandas as pd

    tables = [pd.read_csv(out / f"fold{k}" / "scores.csv") for k in range(len(folds))]
    metrics.update(pooled_auroc([(t.label.to_numpy(), t.score.to_numpy()) for t in tables]))
    write_metrics_json(out / "metrics.json", metrics)
    from experiments.report import Report

    rep = Report(out, f"Patch detector: {len(folds)}-fold cross-validation")
    rep.add_metrics({k: v for k, v in summary.items()}, title="Mean ± sd over folds")
    rep.add_metrics({k: metrics[k] for k in ("pooled_auroc", "pooled_auroc_ci", "pooled_n")},
                    title="All folds' test cases pooled (DeLong 95 % CI)")
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
    entry(main)
