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
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from datamodules.base import ItemDataset
from datamodules.manifest import record_splits
from experiments.cli import entry
from experiments.common import finish_wandb, setup_logging
from experiments.config import ConfigError, load_job, prepare_run_dir, resolve_job
from experiments.patch_encoders import ensure_encoders
from lightning_modules.checkpoint import file_sha256
from lightning_modules.devices import pick_device
from lightning_modules.patch_detector.anomaly_map import FUSIONS
from lightning_modules.patch_detector.detector import PatchAnomalyDetector
from lightning_modules.patch_detector.lightning_model import PatchDetectorModule

log = logging.getLogger(__name__)

CKPT_FILE = "patch_detector.ckpt"
FEATURE_BATCH = 8  # images per forward pass when scoring


def load(argv: list[str] | None = None) -> DictConfig:
    cfg = load_job(resolve_job("pipeline", ["method=patch", *(argv or [])]))
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
    for w in p.weight_candidates or []:
        if len(w) != len(p.patch_sizes) or not all(x >= 0 for x in w) or not any(w):
            raise ConfigError(f"patch.weight_candidates: {list(w)} needs one number >= 0 per "
                              f"patch size ({len(p.patch_sizes)}), not all zero")
    if p.features == "dense" and p.stride_fraction != 1:
        raise ConfigError("patch.features=dense needs patch.stride_fraction=1")
    if p.cell_zscore and p.cell_normalize:
        raise ConfigError("patch.cell_zscore and patch.cell_normalize: choose one")
    if not 0 <= p.reference_shift < 1 or (p.reference_shift and p.features != "pooled"):
        raise ConfigError(f"patch.reference_shift={p.reference_shift} must lie in [0, 1) "
                          "(and needs patch.features=pooled)")
    if not 0 < p.stride_fraction <= 1:
        raise ConfigError(f"patch.stride_fraction={p.stride_fraction} must lie in (0, 1]")
    if p.n_folds_run < 1 or p.n_folds_run > cfg.data.n_folds:
        raise ConfigError(f"patch.n_folds_run={p.n_folds_run} must lie in 1..data.n_folds")


def device_of(cfg: DictConfig) -> torch.device:
    """``patch.device`` (auto: the GPU unless ``trainer.accelerator=cpu``)."""
    want = cfg.patch.device
    return pick_device("cpu" if want == "auto" and cfg.trainer.accelerator == "cpu" else want)


def build_module(cfg: DictConfig, ckpts: dict[int, Path], image_ids: list[str]
                 ) -> PatchDetectorModule:
    from lightning_modules.simclr import load_encoder

    p = cfg.patch
    encoders = {s: load_encoder(ckpts[s]).eval() for s in ckpts}
    det = PatchAnomalyDetector(
        encoders, int(cfg.data.image_size), [int(s) for s in p.patch_sizes],
        [int(d) for d in p.locality], distance=p.distance, shrinkage=p.shrinkage,
        stride_fraction=p.stride_fraction, chunk_size=p.chunk_size, db_dtype=p.db_dtype,
        feature_batch_size=p.feature_batch_size, cell_normalize=p.cell_normalize,
        features=str(p.features), dense_layers=[str(x) for x in p.dense_layers],
        dense_pool=int(p.dense_pool), intensity_norm=str(p.intensity_norm),
        cell_zscore=bool(p.cell_zscore), reference_shift=float(p.reference_shift),
        align=str(p.align),
    ).eval()
    return PatchDetectorModule(det, [float(w) for w in p.weights], str(p.fusion),
                               str(p.image_score), float(p.topk_fraction), float(p.threshold),
                               image_ids=image_ids,
                               encoder_sha256={s: file_sha256(c) for s, c in ckpts.items()},
                               select_weights=bool(p.select_weights),
                               weight_candidates=None if p.weight_candidates is None
                               else [[float(x) for x in w] for w in p.weight_candidates])


def scoring_trainer(cfg: DictConfig):
    """One epoch over the normal training images, no optimiser, no sanity check."""
    from experiments.common import scoring_trainer as trainer

    return trainer(device_of(cfg), progress=bool(cfg.trainer.progress_bar))


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


def run_single(cfg: DictConfig, dm=None) -> dict:
    from experiments.common import log_test_metrics
    from experiments.report_patch import evaluate, write_outputs

    out = prepare_run_dir(cfg)
    torch.manual_seed(int(cfg.seed))
    dm, module, trainer = prepare(cfg, dm)
    record_splits(dm, out)  # OUT/splits.csv + its sha256 in run_info.json
    test_items = labelled(dm, "test")
    trainer.test(module, loader(dm, test_items), verbose=False)
    trainer.save_checkpoint(out / CKPT_FILE, weights_only=True)  # no optimiser: model state only
    val, test = module.val_result, module.test_result
    val_all = labelled(dm, "val")
    val_items = [val_all[i] for i in val.index]
    test_items = [test_items[i] for i in test.index]
    metrics = evaluate(cfg, module.detector, dm, val, test, val_items, test_items)
    report = write_outputs(cfg, out, module.detector, dm, val, test, val_items, test_items,
                           metrics)
    log.info("Report: %s", report)
    finish_wandb()
    log_test_metrics(cfg, out, metrics, name="patch-pipeline")
    return metrics


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
