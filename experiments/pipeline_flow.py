"""Flow posterior pipeline (Shibata et al., https://arxiv.org/abs/2001.07847): train -> score ->
evaluate -> report.

    python -m experiments.pipeline method=flow data=... out_dir=OUT [profile=cpu|paper]
        [data.modality=cxr|bct] [config=flow_rsna_paper|flow_bct_paper]

1. Trains the Glow M0 on S_normal (train/normal) and M1 on S_mixture (train/mixture, unlabeled)
   with ``experiments.train_glow.train`` into OUT/m0 and OUT/m1, unless a finished model is
   already there (OUT/<m>/flow_model.json names its checkpoint; delete the folder to retrain;
   an interrupted training resumes from OUT/<m>/checkpoints/last.ckpt).
2. Checks that M0, M1 and the data configuration share their preprocessing.
3. Scores val and S_unknown (test) with log p(x|M0), log p(x|M1), log p(normal|x) (eq. 3);
   anomaly score = -log p(normal|x); the likelihood-only baseline -log p(x|M0) (Appendix A)
   alongside.
4. The decision threshold is the Youden point of the posterior score's ROC on **val** (never on
   test); test metrics use it.
5. Writes OUT/scores.csv, OUT/metrics.json, OUT/report.html (+ figures) (DESIGN.md §3).

The base configuration is ``configs/glow_<modality>.yaml`` (the Glow of that modality) with
``configs/flow.yaml`` on top, then ``configs/<config>.yaml`` if ``config=`` is given (the papers'
set compositions), then data/profile/command line as usual.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from experiments.cli import entry
from experiments.common import log_test_metrics, setup_logging
from experiments.config import (
    CONFIG_DIR,
    ConfigError,
    PrintConfig,
    load_config,
    parse_overrides,
    prepare_run_dir,
)

log = logging.getLogger(__name__)

MODELS = {"m0": ("train", "normal", "S_normal"), "m1": ("train", "mixture", "S_mixture"),
          # glow.schedule=matched: the shared start of M0 and M1, trained on S_normal
          "start": ("train", "normal", "S_normal")}
MARKER = "flow_model.json"  # written after a finished training: {"ckpt": ...}


# --- configuration ----------------------------------------------------------------------------

def _yaml_modality(path: Path) -> str | None:
    if not path.is_file():
        return None
    y = OmegaConf.load(path)
    return OmegaConf.select(y, "data.modality", default=None) or OmegaConf.select(
        y, "modality", default=None)


def split_argv(argv: list[str]) -> tuple[list[str], str | None, str]:
    """Take ``config=<name>`` out of argv; find the modality (command line > config= YAML >
    data= YAML > cxr) that selects ``configs/glow_<modality>.yaml``."""
    rest, preset, modality, data_name = [], None, None, None
    for arg, item in zip(argv, parse_overrides(argv), strict=True):
        key, value = item.split("=", 1)
        if key == "config":
            preset = value
            continue
        if key == "data.modality":
            modality = value
        elif key == "data":
            data_name = value
        rest.append(arg)
    if preset is not None and not (CONFIG_DIR / f"{preset}.yaml").is_file():
        avail = sorted(p.stem for p in CONFIG_DIR.glob("flow*.yaml"))
        raise ConfigError(f"config={preset}: {CONFIG_DIR / preset}.yaml does not exist. "
                          f"Available: {avail}")
    if modality is None and preset is not None:
        modality = _yaml_modality(CONFIG_DIR / f"{preset}.yaml")
    if modality is None and data_name is not None:
        modality = _yaml_modality(CONFIG_DIR / "data" / f"{data_name}.yaml")
    modality = modality or "cxr"
    if modality not in ("cxr", "bct"):
        raise ConfigError(f"data.modality={modality!r} is not one of ['cxr', 'bct']")
    return rest, preset, modality


def load(argv: list[str] | None = None) -> DictConfig:
    """The pipeline's configuration; with ``print_config=true`` raises :class:`PrintConfig`
    holding the configurations M0 and M1 are trained with (after every step below)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    shown = [a for a in argv if a.lstrip("-").split("=", 1)[0] == "print_config"]
    argv = [a for a in argv if a not in shown]
    rest, preset, modality = split_argv(argv)
    jobs = [f"glow_{modality}", "flow"] + ([preset] if preset else [])
    if preset and not any(a.lstrip("-").startswith("data=") for a in rest):
        data_name = OmegaConf.select(OmegaConf.load(CONFIG_DIR / f"{preset}.yaml"), "data.name")
        if data_name and (CONFIG_DIR / "data" / f"{data_name}.yaml").is_file():
            rest = [f"data={data_name}", *rest]
    cfg = load_config(jobs, [*rest, f"data.modality={modality}"])
    if preset:
        # The paper's set sizes win over a data YAML (merged after the job YAMLs) but not
        # over the command line.
        sizes = OmegaConf.select(OmegaConf.load(CONFIG_DIR / f"{preset}.yaml"), "data")
        cli = {i.split("=", 1)[0] for i in parse_overrides(rest)}
        for key, value in (sizes or {}).items():
            if key.startswith("n_") and f"data.{key}" not in cli:
                cfg.data[key] = value
    cfg.method = "flow"
    cfg.job = "pipeline"
    if shown and shown[-1].split("=", 1)[-1].lower() in ("true", "1", "yes"):
        raise PrintConfig(cfg, "".join(f"# --- {name.upper()} ---\n"
                                       f"{OmegaConf.to_yaml(sub, resolve=True)}\n"
                                       for name, sub in resolved_model_configs(cfg).items()))
    return cfg  # choices and ranges of glow.* are checked by load_config


# --- training ---------------------------------------------------------------------------------

def model_cfg(cfg: DictConfig, name: str, out_dir: Path) -> DictConfig:
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(sub, True)
    sub.glow.model = "m0" if name == "start" else name
    if name != "start":  # the matched schedule's shared start keeps trainer.max_epochs
        from experiments.train_glow import model_epochs

        sub.trainer.max_epochs = model_epochs(sub)  # glow.m0_epochs / glow.m1_epochs
    sub.out_dir = str(out_dir)
    sub.job = "train_glow"
    sub.ckpt_path = "last" if (out_dir / "checkpoints" / "last.ckpt").is_file() else None
    return sub


def ensure_model(cfg: DictConfig, name: str, out: Path, n_items: int, dm=None,
                 init_ckpt: Path | None = None, max_steps: int | None = None) -> Path:
    """The checkpoint of M0, M1 (or the matched schedule's shared start) under OUT/<name>:
    reused when a finished one is there, otherwise trained (resumed from last.ckpt after an
    interruption). ``init_ckpt``: start the training from these weights (M1 from M0 with
    ``glow.m1_init=m0``; M0 and M1 from the shared start with ``glow.schedule=matched``).
    ``max_steps``: train for exactly this many optimiser steps and keep the last checkpoint."""
    folder = out / name
    marker = folder / MARKER
    if marker.is_file():
        ckpt = Path(json.loads(marker.read_text())["ckpt"])
        if not ckpt.is_absolute():
            ckpt = folder / ckpt
        if ckpt.is_file():
            log.info("Reusing %s = %s (delete %s to retrain)", name.upper(), ckpt, folder)
            return ckpt
        log.warning("%s names %s, which does not exist: retraining.", marker, ckpt)
    split, group, set_name = MODELS[name]
    if n_items == 0:
        raise ConfigError(
            f"{set_name} ({split}/{group}) is empty: {name.upper()} cannot be trained. For "
            f"data=folder put the images in <data.root>/{split}/{group}/ (DESIGN.md §3)."
        )
    from experiments.train_glow import train

    sub = model_cfg(cfg, name, folder)
    select = str(sub.glow.select)  # best: on a held-out part of the model's own training set
    if max_steps is not None:
        sub.trainer.max_epochs = -1  # the step count decides
        select = "last"
    elif name == "start":
        select = "last"  # the shared start: a fixed length
    log.info("Training %s on %s (%s/%s, %d items) into %s%s%s%s", name.upper(), set_name, split,
             group, n_items, folder, " (resuming from last.ckpt)" if sub.ckpt_path else "",
             f", starting from {init_ckpt}" if init_ckpt is not None else "",
             f", {max_steps} steps" if max_steps else "")
    kw = {"max_steps": max_steps} if max_steps else {}
    if select != "best":
        kw["select"] = select
    log.info("%s: %d epochs, optim %s lr %g (%s, %g warm-up epochs), checkpoint %s",
             name.upper(), int(sub.trainer.max_epochs), sub.optim.name, float(sub.optim.lr),
             sub.optim.scheduler, float(sub.optim.warmup_epochs), select)
    ckpt = Path(train(sub, datamodule=dm, init_ckpt=init_ckpt, **kw))
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"ckpt": str(ckpt.resolve())}, indent=2))
    return ckpt


def train_models(cfg: DictConfig, out: Path, dm, n_normal: int, n_mixture: int) -> dict:
    """M0 and M1 per ``glow.schedule``.

    independent (paper): M0 on S_normal for trainer.max_epochs; M1 on S_mixture for
    trainer.max_epochs, from scratch or from M0 (``glow.m1_init``).
    matched (ours): a shared start on S_normal for trainer.max_epochs (OUT/start), then M0
    continues on S_normal and M1 on S_mixture, each for exactly ``glow.matched_steps``
    optimiser steps (``glow.m1_init`` is then irrelevant: both start from the shared start).
    """
    if cfg.glow.schedule == "matched":
        start = ensure_model(cfg, "start", out, n_normal, dm)
        steps = int(cfg.glow.matched_steps)
        return {"start": start,
                "m0": ensure_model(cfg, "m0", out, n_normal, dm, init_ckpt=start,
                                   max_steps=steps),
                "m1": ensure_model(cfg, "m1", out, n_mixture, dm, init_ckpt=start,
                                   max_steps=steps)}
    ckpts = {"m0": ensure_model(cfg, "m0", out, n_normal, dm)}
    ckpts["m1"] = ensure_model(cfg, "m1", out, n_mixture, dm,
                               init_ckpt=ckpts["m0"] if cfg.glow.m1_init == "m0" else None)
    return ckpts


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


def evaluate(val_items, val, test_items, test) -> dict[str, Any]:
    from experiments.evaluation import (
        binary_metrics,
        delong_test,
        per_finding_metrics,
        sensitivity_at_specificities,
    )

    y_val = np.array([it.label for it in val_items])
    y_test = np.array([it.label for it in test_items])
    if len(np.unique(y_test)) < 2:
        raise ConfigError(
            f"S_unknown (test) needs normal and abnormal images for an AUROC; got "
            f"{int((y_test == 0).sum())} normal / {int((y_test == 1).sum())} abnormal."
        )
    threshold, how = val_threshold(y_val, val.score)
    metrics: dict[str, Any] = dict(binary_metrics(y_test, test.score, threshold))
    metrics["threshold_source"] = how
    metrics.update(sensitivity_at_specificities(y_val, val.score, y_test, test.score))
    # Paired DeLong test on the same test cases: is the posterior better than p(x|M0) alone?
    metrics["p_posterior_vs_likelihood"] = delong_test(y_test, test.score,
                                                       test.score_likelihood)
    lik_threshold, _ = val_threshold(y_val, val.score_likelihood)
    lik = binary_metrics(y_test, test.score_likelihood, lik_threshold)
    metrics["auroc_likelihood"] = float(lik["auroc"])
    metrics["likelihood"] = {k: v for k, v in lik.items()}
    findings = _finding_names(test_items)
    metrics["per_finding"] = per_finding_metrics(y_test, test.score, findings, threshold)
    metrics["per_finding_likelihood"] = per_finding_metrics(
        y_test, test.score_likelihood, findings, lik_threshold)
    if len(np.unique(y_val)) == 2:
        metrics["val/auroc"] = float(binary_metrics(y_val, val.score, threshold)["auroc"])
        metrics["val/auroc_likelihood"] = float(
            binary_metrics(y_val, val.score_likelihood, lik_threshold)["auroc"])
    else:
        metrics["val/auroc"] = float("nan")
    metrics["val/threshold"] = threshold
    metrics["corr_zero_fraction_log_p_m0"] = _corr(test.zero_fraction, test.log_p_m0)
    metrics["corr_zero_fraction_log_posterior"] = _corr(test.zero_fraction, test.log_posterior)
    return metrics


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# --- figures and report -----------------------------------------------------------------------

def _display(image: np.ndarray) -> np.ndarray:
    """A 2D view of an item: the image itself, or a volume's middle axial slice."""
    image = np.asarray(image, dtype=np.float32)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def _caption(item, score: float) -> str:
    name = item.finding or ("normal" if item.label == 0 else "abnormal")
    return f"{name[:18]} {score:.1f}"


def write_outputs(cfg: DictConfig, out: Path, dm, val_items, val, test_items, test,
                  metrics: dict, m0, counts: dict[str, int], masks: list | None = None) -> Path:
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
    write_metrics_json(out / "metrics.json", metrics)

    scores = {"-log p(normal|x) (posterior)": test.score,
              "-log p(x|M0) (likelihood)": test.score_likelihood}
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
            fig / f"{name}.png", [_display(dm.load(test_items[i])) for i in idx],
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
            fig / f"{name}.png", [_display(dm.load(test_items[i])) for i in idx],
            [_caption(test_items[i], test.score_likelihood[i]) for i in idx], ncols=6,
            title=f"{name.replace('_', ' ')} ({view}; caption: finding, -log p(x|M0))")
    # Figs. 9-10: the n most likely abnormal test images (posterior) as one mosaic.
    n_mosaic = min(int(cfg.eval.n_mosaic), len(test_items))
    if n_mosaic:
        idx = order[:n_mosaic]
        plots.plot_mosaic(fig / "mosaic_most_abnormal.png",
                          [_display(dm.load(test_items[i])) for i in idx], labels=y[idx],
                          title=f"{n_mosaic} most likely abnormal ({view}; frame: "
                                "blue normal, orange abnormal)")

    overlays = False
    if test.anomaly_map is not None:
        n = min(int(cfg.eval.n_overlays), len(test_items))
        idx = order[:n]
        masks = masks or [None] * len(test_items)
        plots.plot_overlays(
            fig / "anomaly_maps.png", [_display(dm.load(test_items[i])) for i in idx],
            [_display(test.anomaly_map[i]) for i in idx],
            [_caption(test_items[i], test.score[i]) for i in idx],
            masks=[None if masks[i] is None else _display(masks[i]) for i in idx],
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
            plots.plot_image_grid(fig / "samples_m0.png", [_display(a) for a in s],
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
            f"of the map (this run: glow.score={cfg.glow.score}). Lesion masks in green."
            + (f" Pixel AUROC against the masks: {metrics['pixel_auroc']:.3f}."
               if "pixel_auroc" in metrics else ""))
        rep.add_figure(fig / "anomaly_maps.png", "Anomaly maps, one colour scale for all.")
    if sampled:
        rep.add_heading("Fictional images from M0")
        rep.add_figure(fig / "samples_m0.png",
                       f"Samples from M0 at temperature {temperature:g} (glow.sample_temperature).")
    return rep.write()


# --- the pipeline -----------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict[str, Any]:
    import torch

    from datamodules.factory import build_datamodule
    from datamodules.manifest import record_splits
    from lightning_modules.devices import pick_device
    from lightning_modules.flow_posterior.scoring import check_models, score_items
    from lightning_modules.glow import load_glow

    out = prepare_run_dir(cfg)
    torch.manual_seed(cfg.seed)
    dm = build_datamodule(cfg.data)
    dm.setup()
    record_splits(dm, out)  # OUT/splits.csv + its sha256 in run_info.json
    counts = {
        "S_normal (train/normal)": len(dm.items("train", "normal")),
        "S_mixture (train/mixture)": len(dm.items("train", "mixture")),
        "val/normal": len(dm.items("val", "normal")),
        "val/abnormal": len(dm.items("val", "abnormal")),
        "S_unknown normal (test/normal)": len(dm.items("test", "normal")),
        "S_unknown abnormal (test/abnormal)": len(dm.items("test", "abnormal")),
    }
    log.info("Sets: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))

    ckpts = train_models(cfg, out, dm, counts["S_normal (train/normal)"],
                         counts["S_mixture (train/mixture)"])
    m0, m1 = load_glow(ckpts["m0"]), load_glow(ckpts["m1"])
    test_items, val_items = dm.items("test"), dm.items("val")
    if not test_items:
        raise ConfigError("S_unknown (test) is empty: nothing to score. For data=folder put "
                          "images in <data.root>/test/{normal,abnormal}/.")
    input_shape = (1, *np.shape(dm.load(test_items[0])))
    check_models(m0, m1, cfg.data, cfg.glow.n_bits, input_shape)

    device = pick_device(cfg.trainer.accelerator, "trainer.accelerator")
    kw = dict(batch_size=int(cfg.data.batch_size), num_workers=int(cfg.data.num_workers),
              device=device, n_bits=int(cfg.glow.n_bits), progress=bool(cfg.trainer.progress_bar),
              maps=True, score=str(cfg.glow.score), map_sigma=float(cfg.glow.map_sigma),
              map_top_fraction=float(cfg.glow.map_top_fraction))
    log.info("Scoring %d val and %d test items on %s", len(val_items), len(test_items), device)
    val = score_items(m0, m1, dm, val_items, description="Scoring val", **kw)
    test = score_items(m0, m1, dm, test_items, description="Scoring S_unknown (test)", **kw)

    metrics = evaluate(val_items, val, test_items, test)
    metrics["score"] = str(cfg.glow.score)
    masks = [dm.load_mask(it) for it in test_items]
    if test.anomaly_map is not None and any(m is not None for m in masks):
        from experiments.evaluation import pixel_auroc, pixel_auroc_ci

        metrics["pixel_auroc"] = float(pixel_auroc(masks, list(test.anomaly_map)))
        metrics["pixel_auroc_ci"] = list(pixel_auroc_ci(masks, list(test.anomaly_map)))
    metrics["n_train_normal"] = counts["S_normal (train/normal)"]
    metrics["n_train_mixture"] = counts["S_mixture (train/mixture)"]
    report = write_outputs(cfg, out, dm, val_items, val, test_items, test, metrics, m0, counts,
                           masks)
    log_test_metrics(cfg, out, metrics, name="flow_pipeline")
    log.info("AUROC posterior %.3f, likelihood-only %.3f, val %.3f; report: %s",
             metrics["auroc"], metrics["auroc_likelihood"], metrics["val/auroc"], report)
    return metrics


def resolved_model_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configurations M0 and M1 are trained with (glow.m0_epochs / glow.m1_epochs
    resolved into trainer.max_epochs), as :func:`ensure_model` builds them."""
    out = Path(cfg.out_dir)
    return {name: model_cfg(cfg, name, out / name) for name in ("m0", "m1")}


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
