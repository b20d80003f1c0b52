"""Flow posterior pipeline (Shibata et al., https://arxiv.org/abs/2001.07847): build, fit,
test, write.

    python -m experiments.pipeline method=flow data=... out_dir=OUT [profile=cpu|paper]
        [data.modality=cxr|bct] [config=flow_rsna_paper|flow_bct_paper]

1. M0 on S_normal (train/normal) and M1 on S_mixture (train/mixture, unlabeled): trained by
   ``experiments.train_glow.train`` into OUT/m0 and OUT/m1, or reused when their
   ``fingerprint.json`` proves the same data, settings and code (:mod:`experiments.flow_models`);
2. :class:`~lightning_modules.flow_posterior.lightning_model.FlowPosteriorModule` wraps both
   (their preprocessing checked against each other and the data): validate = the decision
   threshold on **val** (Youden's J; never on test; without val, cross-fitted on test), test =
   log p(x|M0), log p(x|M1), log p(normal|x) (eq. 3; anomaly score -log p(normal|x)), the
   likelihood-only score -log p(x|M0) (Appendix A) and the anomaly maps;
   With ``glow.select_align=true`` (ours) this is done twice, without pose alignment (OUT/m0,
   OUT/m1) and with ``glow.align`` (OUT/align_<align>/), and the pair with the higher
   validation AUROC is kept;
3. OUT/scores.csv, OUT/metrics.json, OUT/report.html (+ figures) (README "Evaluation outputs";
   :mod:`experiments.report_flow`) and OUT/flow_posterior.ckpt (M0, M1, thresholds).

The base configuration is ``configs/glow_<modality>.yaml`` (the Glow of that modality) with
``configs/flow.yaml`` on top, then ``configs/<config>.yaml`` if ``config=`` is given (the papers'
set compositions), then data/profile/command line as usual.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from datamodules.base import ItemDataset
from experiments.cli import entry
from experiments.common import log_test_metrics, setup_logging
from experiments.config import ConfigError, PrintConfig, load_job, prepare_run_dir, resolve_job
from experiments.flow_models import resolved_model_configs, train_models
from lightning_modules.flow_posterior.lightning_model import FlowPosteriorModule

log = logging.getLogger(__name__)

CKPT_FILE = "flow_posterior.ckpt"  # FlowPosteriorModule: M0, M1 and the decision thresholds


# --- configuration ----------------------------------------------------------------------------

def load(argv: list[str] | None = None) -> DictConfig:
    """The pipeline's configuration (``config.resolve_job("pipeline", ...)`` chooses the YAML
    files); with ``print_config=true`` raises :class:`PrintConfig` holding the configurations
    M0 and M1 are trained with."""
    argv = sys.argv[1:] if argv is None else list(argv)
    shown = [a for a in argv if a.lstrip("-").split("=", 1)[0] == "print_config"]
    argv = [a for a in argv if a not in shown]
    cfg = load_job(resolve_job("pipeline", ["method=flow", *argv]))
    if shown and shown[-1].split("=", 1)[-1].lower() in ("true", "1", "yes"):
        raise PrintConfig(cfg, "".join(f"# --- {name.upper()} ---\n"
                                       f"{OmegaConf.to_yaml(sub, resolve=True)}\n"
                                       for name, sub in resolved_model_configs(cfg).items()))
    return cfg  # choices and ranges of glow.* are checked by load_config


# --- the pipeline -----------------------------------------------------------------------------

def set_counts(dm) -> dict[str, int]:
    return {
        "S_normal (train/normal)": len(dm.items("train", "normal")),
        "S_mixture (train/mixture)": len(dm.items("train", "mixture")),
        "val/normal": len(dm.items("val", "normal")),
        "val/abnormal": len(dm.items("val", "abnormal")),
        "S_unknown normal (test/normal)": len(dm.items("test", "normal")),
        "S_unknown abnormal (test/abnormal)": len(dm.items("test", "abnormal")),
    }


def build_module(cfg: DictConfig, ckpts: dict[str, Path]) -> FlowPosteriorModule:
    from lightning_modules.glow import load_glow

    g = cfg.glow
    return FlowPosteriorModule(load_glow(ckpts["m0"]), load_glow(ckpts["m1"]),
                               n_bits=int(g.n_bits), score=str(g.score), maps=True,
                               map_sigma=float(g.map_sigma),
                               map_top_fraction=float(g.map_top_fraction),
                               map_source=str(g.map_source), map_norm=str(g.map_norm),
                               map_region=str(g.map_region), map_frame=str(g.map_frame),
                               select_score=bool(g.select_score))


def loader(cfg: DictConfig, dm, items: list) -> DataLoader:
    return DataLoader(ItemDataset(dm, items), batch_size=int(cfg.data.batch_size),
                      shuffle=False, num_workers=int(cfg.data.num_workers))


def labelled(dm, split: str) -> list:
    items = [it for it in dm.items(split) if it.label in (0, 1)]
    if split == "test" and not items:
        raise ConfigError("S_unknown (test) is empty: nothing to score. For data=folder put "
                          "images in <data.root>/test/{normal,abnormal}/.")
    if items and not any(it.label == 0 for it in items):
        raise ConfigError(f"{split} has no normal images, so no decision threshold can be "
                          "chosen (never on test). For data=folder put normal images in "
                          f"<data.root>/{split}/normal/, or set data.val_fraction=0 to "
                          "cross-fit the threshold on test.")
    return items


def align_candidates(cfg: DictConfig, out: Path) -> list[tuple[str, DictConfig, Path]]:
    """(glow.align, configuration, models' folder) of each pair of Glows to train: one, or with
    glow.select_align and glow.align != none two, unaligned first (it wins a tie: the paper's
    way) in OUT itself, as with glow.align=none, then aligned in OUT/align_<align>."""
    if not cfg.glow.select_align or str(cfg.glow.align) == "none":
        return [(str(cfg.glow.align), cfg, out)]
    result = []
    for mode in ("none", str(cfg.glow.align)):
        sub = copy.deepcopy(cfg)
        sub.glow.align = mode
        result.append((mode, sub, out if mode == "none" else out / f"align_{mode}"))
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or reuse) M0 and M1, validate (threshold), test, write."""
    import torch

    from datamodules.factory import build_datamodule
    from datamodules.manifest import record_splits
    from experiments.common import scoring_trainer
    from experiments.report_flow import evaluate, write_outputs
    from lightning_modules.devices import pick_device
    from lightning_modules.flow_posterior.scoring import check_models

    out = prepare_run_dir(cfg)
    if cfg.logger.group is None:
        cfg.logger.group = out.name  # M0's, M1's and the evaluation's W&B runs, grouped
    torch.manual_seed(cfg.seed)
    dm = build_datamodule(cfg.data)
    dm.setup()
    record_splits(dm, out)  # OUT/splits.csv + its sha256 in run_info.json
    counts = set_counts(dm)
    log.info("Sets: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    test_items, val_items = labelled(dm, "test"), labelled(dm, "val")

    device = pick_device(cfg.trainer.accelerator, "trainer.accelerator")
    cands = align_candidates(cfg, out)
    if len(cands) > 1 and not val_items:
        raise ConfigError("glow.select_align=true chooses on the labelled validation set, "
                          "which is empty here; set glow.select_align=false.")
    fitted = []  # (align mode, module, trainer) per candidate, validated
    shape = (1, *np.shape(dm.load(test_items[0])))  # what the models will be given
    for mode, c, folder in cands:
        module = build_module(c, train_models(c, folder, dm))
        check_models(module.m0, module.m1, cfg.data, cfg.glow.n_bits, shape)
        if module.hparams.map_norm == "position":  # fitted on the training normals, never test
            module.to(device).eval().fit_map_statistics(
                loader(cfg, dm, dm.items("train", "normal")))
        trainer = scoring_trainer(device, progress=bool(cfg.trainer.progress_bar))
        log.info("Scoring %d val and %d test items on %s%s", len(val_items), len(test_items),
                 device, f" (glow.align={mode})" if len(cands) > 1 else "")
        if val_items:
            trainer.validate(module, loader(cfg, dm, val_items), verbose=False)
        fitted.append((mode, module, trainer))
    align_selection = {}
    if len(fitted) > 1:
        from lightning_modules.selection import choose_on_validation

        y = fitted[0][1].val_labels
        best, aucs = choose_on_validation(y, [m.val_result.score for _, m, _ in fitted],
                                          "glow.select_align")
        align_selection = {f"val_auroc_{mode}": a for (mode, _, _), a in zip(fitted, aucs,
                                                                             strict=True)}
        log.info("glow.select_align: glow.align=%s (validation AUROC %s)", fitted[best][0],
                 ", ".join(f"{mode} {a:.3f}" for (mode, _, _), a in zip(fitted, aucs,
                                                                         strict=True)))
        fitted = [fitted[best]]
    align, module, trainer = fitted[0]
    val, y_val = None, np.zeros(0, dtype=int)
    if val_items:
        val, y_val = module.val_result, module.val_labels
    trainer.test(module, loader(cfg, dm, test_items), verbose=False)
    test = module.test_result

    metrics = evaluate(y_val, val, test_items, test, int(cfg.eval.cross_fit_folds),
                       int(cfg.seed))
    if not val_items:  # the cross-fitted thresholds' median, for detect_image
        module.threshold = float(metrics["threshold"])
        module.threshold_source = str(metrics["threshold_source"])
        module.likelihood_threshold = float(metrics["likelihood"]["threshold"])
    # M0, M1 and the thresholds in one file; nothing is trained here, so no optimiser state
    trainer.save_checkpoint(out / CKPT_FILE, weights_only=True)
    metrics["score"] = str(module.hparams.score)  # glow.select_score: the chosen one
    if module.score_selection:
        metrics["score_selection"] = {f"val_auroc_{k}": v for k, v in module.score_selection.items()}
    metrics["map"] = {k: str(cfg.glow[k]) for k in ("map_source", "map_norm", "map_region",
                                                    "map_frame")}
    metrics["align"] = align  # glow.select_align: the chosen one
    if align_selection:
        metrics["align_selection"] = align_selection
    masks = [dm.load_mask(it) for it in test_items]
    if test.anomaly_map is not None and any(m is not None for m in masks):
        from experiments.evaluation import pixel_auroc, pixel_auroc_ci

        metrics["pixel_auroc"] = float(pixel_auroc(masks, list(test.anomaly_map)))
        metrics["pixel_auroc_ci"] = list(pixel_auroc_ci(masks, list(test.anomaly_map)))
    metrics["n_train_normal"] = counts["S_normal (train/normal)"]
    metrics["n_train_mixture"] = counts["S_mixture (train/mixture)"]
    report = write_outputs(cfg, out, dm, test_items, test, metrics, module.m0, counts, masks,
                           val, val_items)
    log_test_metrics(cfg, out, metrics, name="flow_pipeline")
    log.info("AUROC posterior %.3f, likelihood-only %.3f, val %.3f; report: %s",
             metrics["auroc"], metrics["auroc_likelihood"], metrics["val/auroc"], report)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """``--print-config`` (= ``print_config=true``): print the resolved configurations of M0
    and M1 and stop."""
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    if "--print-config" in argv:
        try:
            load([a for a in argv if a != "--print-config"] + ["print_config=true"])
        except PrintConfig as request:
            print(request.yaml, end="")
        return None
    return run(load(argv))


if __name__ == "__main__":
    entry(main)
