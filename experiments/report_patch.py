"""What a patch-detector run writes (Kim et al., Sci Rep 2023): its metrics (with CIs), scores
tables, figures and report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from lightning_modules.patch_detector.anomaly_map import MapNormalizer
from lightning_modules.patch_detector.lightning_model import SplitScores


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
        raw = det.raw_image_scores(test.patch_scores, one, test.poses).numpy()
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
        maps = det.upsample(test.final_maps, test.poses).numpy()
        metrics["pixel_auroc"] = ev.pixel_auroc(masks, list(maps))
        metrics["pixel_auroc_ci"] = list(ev.pixel_auroc_ci(masks, list(maps)))
    metrics["n_reference_images"] = len(dm.items("train", "normal"))
    metrics["weights"] = list(det.normalizer.weights)  # patch.select_weights: the chosen ones
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
        f"fitted on {len(val_items)} validation images; abnormal iff score > {p.threshold}. "
        "From the paper: per-size nearest-reference distances within locality d, the weighted "
        "product of eq. 6 and the image score = max of the final map; ours (documented "
        "choices): how Normalize is defined and fitted, the fusion variant, and the "
        "threshold (paper: 0.5) applied to that Normalize."
    )
    rep.add_metrics(ev.flatten_metrics({k: v for k, v in metrics.items()
                                        if k != "per_finding"}), title="Test metrics")
    if "weight_selection" in val.extra:
        rep.add_table([{"weights": str(r["weights"]), "val_auroc": r["val_auroc"]}
                       for r in val.extra["weight_selection"]],
                      title="patch.select_weights: validation AUROC of each weight candidate")
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
    sel = torch.from_numpy(idx.copy())
    maps = det.upsample(test.final_maps[sel],
                        None if test.poses is None else test.poses[sel]).numpy()
    rep.add_figure(plots.plot_overlays(
        fig / "overlays.png", [dm.load(test_items[i]) for i in idx], list(maps),
        [caption(i) for i in idx], masks=[dm.load_mask(test_items[i]) for i in idx],
        vmin=0.0, vmax=1.0, title="A_final on the most anomalous test images",
        map_label="A_final"), "Final anomaly maps (lesion masks outlined where known)")
    return rep.write()
