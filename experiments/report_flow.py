"""Metrics, figures and report of a flow posterior run (Shibata et al., arXiv:2001.07847):
``OUT/scores.csv``, ``OUT/metrics.json``, ``OUT/report.html`` and ``OUT/figures/``.

Thresholds come from the validation set (``FlowPosteriorModule.validate``: Youden's J, or the
95th percentile of the normal scores when val has no abnormal image) and are applied unchanged
to the test set. Without a validation set (``data.val_fraction=0``, e.g. the paper's 33 + 33
head CTs) they are cross-fitted on the test cases instead
(:func:`experiments.evaluation.cross_fitted_metrics`: every case decided by a threshold chosen
on the other folds).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from experiments.config import ConfigError

log = logging.getLogger(__name__)


# --- evaluation -------------------------------------------------------------------------------

def val_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, str]:
    """Decision threshold chosen on val: Youden's J on val's ROC. With only normal val images,
    the 95th percentile of their scores (specificity 0.95). Never chosen on test."""
    from lightning_modules.thresholds import decision_threshold

    try:
        threshold, how = decision_threshold(labels, scores, specificity=0.95)
    except ValueError:
        raise ConfigError(
            "val has no normal images, so no decision threshold can be chosen (never on test). "
            "For data=folder put normal images in <data.root>/val/normal/."
        ) from None
    if "percentile" in how:
        log.warning("val has no abnormal images: threshold = 95th percentile of val normal "
                    "scores (specificity 0.95 on val) instead of Youden's J.")
    return threshold, how


def _finding_names(items) -> list[str]:
    """Item.finding per item; abnormal items without one are grouped as "unspecified"."""
    return [it.finding for it in items]


def evaluate(y_val: np.ndarray, val, test_items, test, cross_fit_folds: int = 5,
             seed: int = 0) -> dict[str, Any]:
    """Test metrics of the posterior score and of the likelihood-only score, with thresholds
    from val (``y_val``, ``val``: labels and scores); with no val image, cross-fitted on test
    in ``cross_fit_folds`` stratified folds."""
    from experiments.evaluation import (
        binary_metrics,
        cross_fitted_metrics,
        delong_test,
        per_finding_metrics,
        sensitivity_at_specificities,
    )

    y_val = np.asarray(y_val).astype(int)
    y_test = np.array([it.label for it in test_items])
    if len(np.unique(y_test)) < 2:
        raise ConfigError(
            f"S_unknown (test) needs normal and abnormal images for an AUROC; got "
            f"{int((y_test == 0).sum())} normal / {int((y_test == 1).sum())} abnormal."
        )
    findings = _finding_names(test_items)
    if y_val.size == 0:
        log.info("No validation set: thresholds cross-fitted on test (%d folds).",
                 cross_fit_folds)
        metrics: dict[str, Any] = cross_fitted_metrics(y_test, test.score, cross_fit_folds, seed)
        lik = cross_fitted_metrics(y_test, test.score_likelihood, cross_fit_folds, seed)
        threshold = lik_threshold = None  # per case: no single threshold for per-finding rows
        metrics["val/auroc"] = float("nan")
    else:
        threshold, how = val_threshold(y_val, val.score)
        metrics = dict(binary_metrics(y_test, test.score, threshold))
        metrics["threshold_source"] = how
        metrics.update(sensitivity_at_specificities(y_val, val.score, y_test, test.score))
        lik_threshold, _ = val_threshold(y_val, val.score_likelihood)
        lik = binary_metrics(y_test, test.score_likelihood, lik_threshold)
        if len(np.unique(y_val)) == 2:
            metrics["val/auroc"] = float(binary_metrics(y_val, val.score, threshold)["auroc"])
            metrics["val/auroc_likelihood"] = float(
                binary_metrics(y_val, val.score_likelihood, lik_threshold)["auroc"])
        else:
            metrics["val/auroc"] = float("nan")
    metrics["val/threshold"] = metrics["threshold"]
    # Paired DeLong test on the same test cases: is the posterior better than p(x|M0) alone?
    metrics["p_posterior_vs_likelihood"] = delong_test(y_test, test.score,
                                                       test.score_likelihood)
    metrics["auroc_likelihood"] = float(lik["auroc"])
    metrics["likelihood"] = {k: v for k, v in lik.items()}
    metrics["per_finding"] = per_finding_metrics(y_test, test.score, findings,
                                                 metrics["threshold"] if threshold is None
                                                 else threshold)
    metrics["per_finding_likelihood"] = per_finding_metrics(
        y_test, test.score_likelihood, findings,
        lik["threshold"] if lik_threshold is None else lik_threshold)
    metrics["corr_zero_fraction_log_p_m0"] = _corr(test.zero_fraction, test.log_p_m0)
    metrics["corr_zero_fraction_log_posterior"] = _corr(test.zero_fraction, test.log_posterior)
    return metrics


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# --- figures and report -----------------------------------------------------------------------

def display(image: np.ndarray) -> np.ndarray:
    """A 2D view of an item: the image itself, or a volume's middle axial slice."""
    image = np.asarray(image, dtype=np.float32)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def _caption(item, score: float) -> str:
    name = item.finding or ("normal" if item.label == 0 else "abnormal")
    return f"{name[:18]} {score:.1f}"


def write_outputs(cfg: DictConfig, out: Path, dm, test_items, test,
                  metrics: dict, m0, counts: dict[str, int], masks: list | None = None,
                  val=None, val_items: list | None = None) -> Path:
    from experiments import plots
    from experiments.evaluation import write_metrics_json, write_scores_csv
    from experiments.report import Report

    fig = out / "figures"
    fig.mkdir(exist_ok=True)
    y = np.array([it.label for it in test_items])
    findings = _finding_names(test_items)
    is3d = cfg.data.modality == "bct"

    write_scores_csv(out / "scores.csv", [it.path for it in test_items], y, test.score,
                     finding=[it.finding for it in test_items], **test.columns())
    if val is not None:  # the validation scores the threshold came from (as the patch run)
        write_scores_csv(out / "val_scores.csv", [it.path for it in val_items],
                         [it.label for it in val_items], val.score, **val.columns())
    write_metrics_json(out / "metrics.json", metrics)

    scores = {"-log p(normal|x) (posterior)": test.score_global,
              "-log p(x|M0) (likelihood)": test.score_likelihood}
    if metrics.get("score", "global") == "local":
        scores["anomaly map, top part (the run's score)"] = test.score
    plots.plot_roc(fig / "roc.png", y, scores, title="S_unknown (test)")
    plots.plot_roc_per_finding(fig / "roc_per_finding.png", y, test.score, findings,
                               title="-log p(normal|x) per finding")
    plots.plot_roc_per_finding(fig / "roc_per_finding_likelihood.png", y, test.score_likelihood,
                               findings, title="-log p(x|M0) per finding")
    plots.plot_histograms(fig / "hist_log_posterior.png", test.log_posterior, y,
                          xlabel="log p(normal|x) (nats, + const)", title="Log posterior")
    plots.plot_histograms(fig / "hist_log_likelihood.png", test.log_p_m0, y,
                          xlabel="log p(x|M0) (nats)", title="Log likelihood under M0")
    plots.plot_scatter(fig / "zero_fraction_likelihood.png", test.zero_fraction, test.log_p_m0, y,
                       xlabel="fraction of zero pixels", ylabel="log p(x|M0) (nats)",
                       title="Background vs likelihood (Appendix A)")
    plots.plot_scatter(fig / "zero_fraction_posterior.png", test.zero_fraction,
                       test.log_posterior, y, xlabel="fraction of zero pixels",
                       ylabel="log p(normal|x) (nats)", title="Background vs posterior")

    k = min(int(cfg.eval.n_extremes), len(test_items))
    order = np.argsort(-test.score, kind="stable")
    view = "middle axial slice" if is3d else "image"
    for name, idx in (("most_abnormal", order[:k]), ("least_abnormal", order[::-1][:k])):
        plots.plot_image_grid(
            fig / f"{name}.png", [display(dm.load(test_items[i])) for i in idx],
            [_caption(test_items[i], test.score[i]) for i in idx], ncols=6,
            title=f"{name.replace('_', ' ')} ({view}; caption: finding, -log posterior)")

    # Appendix A (Figs. A.21-A.22): the likelihood-only score -log p(x|M0) per label and its
    # top-k most / least likely abnormal images.
    plots.plot_histograms_per_finding(
        fig / "hist_likelihood_per_finding.png", test.score_likelihood, y, findings,
        xlabel="-log p(x|M0) (nats)", title="Likelihood-only score per label (Appendix A)")
    order_lik = np.argsort(-test.score_likelihood, kind="stable")
    for name, idx in (("most_abnormal_likelihood", order_lik[:k]),
                      ("least_abnormal_likelihood", order_lik[::-1][:k])):
        plots.plot_image_grid(
            fig / f"{name}.png", [display(dm.load(test_items[i])) for i in idx],
            [_caption(test_items[i], test.score_likelihood[i]) for i in idx], ncols=6,
            title=f"{name.replace('_', ' ')} ({view}; caption: finding, -log p(x|M0))")
    # Figs. 9-10: the n most likely abnormal test images (posterior) as one mosaic.
    n_mosaic = min(int(cfg.eval.n_mosaic), len(test_items))
    if n_mosaic:
        idx = order[:n_mosaic]
        plots.plot_mosaic(fig / "mosaic_most_abnormal.png",
                          [display(dm.load(test_items[i])) for i in idx], labels=y[idx],
                          title=f"{n_mosaic} most likely abnormal ({view}; frame: "
                                "blue normal, orange abnormal)")

    overlays = False
    if test.anomaly_map is not None:
        n = min(int(cfg.eval.n_overlays), len(test_items))
        idx = order[:n]
        masks = masks or [None] * len(test_items)
        plots.plot_overlays(
            fig / "anomaly_maps.png", [display(dm.load(test_items[i])) for i in idx],
            [display(test.anomaly_map[i]) for i in idx],
            [_caption(test_items[i], test.score[i]) for i in idx],
            masks=[None if masks[i] is None else display(masks[i]) for i in idx],
            title=f"Flow anomaly maps of the {n} most abnormal test images ({view})",
            map_label="log p(x|M1) - log p(x|M0) per pixel (smoothed)")
        overlays = True

    temperature = float(cfg.glow.sample_temperature)
    sampled = False
    if hasattr(m0, "sample"):
        try:
            import torch

            with torch.no_grad():
                n = max(1, int(cfg.glow.n_samples))
                s = m0.sample(n, temperature).float().cpu().numpy()  # (n,1,H,W) | (n,1,D,H,W)
            plots.plot_image_grid(fig / "samples_m0.png", [display(a) for a in s],
                                  [f"T={temperature:g}"] * len(s), ncols=6,
                                  title=f"Samples from M0 at temperature {temperature:g}")
            sampled = True
        except Exception as e:  # sampling is illustrative; never lose the evaluation for it
            log.warning("Sampling from M0 failed (%s: %s); no sample figure.", type(e).__name__, e)

    rep = Report(out, "Flow posterior anomaly detection")
    rep.add_text(
        "Semi-supervised flow posterior (Shibata et al., arXiv:2001.07847). M0 is a Glow "
        "trained on S_normal (normal images), M1 a Glow trained on S_mixture (unlabeled normal "
        "and abnormal images). For every test image, log p(normal|x) = log p(x|M0) - "
        "log p(x|M1) + const (eq. 3); the anomaly score is -log p(normal|x). The likelihood-only "
        "score -log p(x|M0) (Appendix A) is shown alongside: it is dominated by the background "
        "(empty, zero-valued pixels), which the difference of the two models cancels."
    )
    rep.add_table([{"set": k, "items": v} for k, v in counts.items()], title="Sets")
    rep.add_text(
        f"Decision threshold: {metrics['threshold_source']} (= {metrics['threshold']:.4g}), "
        "chosen on the validation set and applied unchanged to the test set. AUROC does not "
        "depend on it. Youden cut-offs marked on the ROC curves below are those of the test "
        "curves themselves (as in the paper's figures), for illustration only."
    )
    rep.add_metrics({k: v for k, v in metrics.items() if not isinstance(v, dict)},
                    title="Test metrics (S_unknown)")
    if "per_finding" in metrics:
        rows = [{"finding": f, "auroc posterior": m.get("auroc"),
                 "auroc likelihood": metrics["per_finding_likelihood"].get(f, {}).get("auroc"),
                 "n_abnormal": m.get("n")} for f, m in metrics["per_finding"].items()]
        rep.add_table(rows, title="AUROC per finding (each finding vs. all normal test images)")
    rep.add_heading("ROC curves")
    rep.add_figure(fig / "roc.png", "Posterior vs likelihood-only score on S_unknown.")
    rep.add_figure(fig / "roc_per_finding.png", "Posterior score, one curve per finding.")
    rep.add_figure(fig / "roc_per_finding_likelihood.png", "Likelihood-only score per finding.")
    rep.add_heading("Score distributions")
    rep.add_figure(fig / "hist_log_posterior.png", "Log posterior per class (higher = normal).")
    rep.add_figure(fig / "hist_log_likelihood.png", "Log likelihood under M0 per class.")
    rep.add_heading("Background and likelihood (Appendix A)")
    rep.add_figure(fig / "zero_fraction_likelihood.png",
                   f"Fraction of zero pixels vs log p(x|M0) (r = "
                   f"{metrics['corr_zero_fraction_log_p_m0']:.2f}).")
    rep.add_figure(fig / "zero_fraction_posterior.png",
                   f"Fraction of zero pixels vs log p(normal|x) (r = "
                   f"{metrics['corr_zero_fraction_log_posterior']:.2f}).")
    rep.add_heading(f"Top {k} most and least likely abnormal")
    rep.add_figure(fig / "most_abnormal.png", f"Highest -log p(normal|x) ({view}).")
    rep.add_figure(fig / "least_abnormal.png", f"Lowest -log p(normal|x) ({view}).")
    if n_mosaic:
        rep.add_heading(f"Mosaic of the {n_mosaic} most likely abnormal (Figs. 9-10)")
        rep.add_figure(fig / "mosaic_most_abnormal.png",
                       f"Highest -log p(normal|x), row by row ({view}; the paper shows 1,000; "
                       "capped at the number of test items); frame colour = true class.")
    rep.add_heading("Likelihood-only score (Appendix A, Figs. A.21-A.22)")
    rep.add_figure(fig / "hist_likelihood_per_finding.png",
                   "-log p(x|M0) for normal images and per finding.")
    rep.add_figure(fig / "most_abnormal_likelihood.png",
                   f"Top {k} highest -log p(x|M0) ({view}).")
    rep.add_figure(fig / "least_abnormal_likelihood.png",
                   f"Top {k} lowest -log p(x|M0) ({view}).")
    if overlays:
        rep.add_heading("Flow anomaly maps (our addition)")
        rep.add_text(
            "Per-pixel contributions to log p(x|M1) - log p(x|M0): each Glow level's latent "
            "log-density and coupling log-determinants at its positions, spread evenly over the "
            "pixels each position covers (unsmoothed, they sum to -log p(normal|x)), smoothed "
            f"by a Gaussian of glow.map_sigma = {float(cfg.glow.map_sigma):g} px. Image score "
            f"with glow.score=local: the mean of the top {float(cfg.glow.map_top_fraction):g} "
            f"of the map (this run: glow.score={metrics['score']}). Lesion masks in green."
            + (f" Pixel AUROC against the masks: {metrics['pixel_auroc']:.3f}."
               if "pixel_auroc" in metrics else ""))
        rep.add_figure(fig / "anomaly_maps.png", "Anomaly maps, one colour scale for all.")
    if sampled:
        rep.add_heading("Fictional images from M0")
        rep.add_figure(fig / "samples_m0.png",
                       f"Samples from M0 at temperature {temperature:g} (glow.sample_temperature).")
    return rep.write()
