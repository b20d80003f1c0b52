"""Flow posterior pipeline: configuration, val threshold, evaluation, and end to end on phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datamodules.base import Item
from experiments import flow_models, pipeline_flow, report_flow
from experiments.config import ConfigError
from lightning_modules.flow_posterior import FlowScores
from tests.support import write_folder_phantoms


def _items(labels, findings=None):
    findings = findings or [""] * len(labels)
    return [Item(f"img{i}.png", y, f) for i, (y, f) in enumerate(zip(labels, findings))]


def test_resolve_job_chooses_the_yaml_files_of_every_entry_point():
    from experiments.config import resolve_job

    job = resolve_job("pipeline", ["method=flow", "--config=flow_bct_paper", "a=1"])
    assert job.yamls == ("glow_bct", "flow") and job.presets == ("flow_bct_paper",)
    assert job.method == "flow" and job.modality == "bct"
    assert job.argv == ("data=bct", "a=1", "data.modality=bct")  # the preset's data set
    assert resolve_job("pipeline", ["method=flow", "data.modality=bct"]).yamls[0] == "glow_bct"
    assert resolve_job("pipeline", ["method=flow", "data=bct"]).modality == "bct"  # data YAML
    # the command line wins over the preset
    assert resolve_job("pipeline", ["method=flow", "config=flow_bct_paper",
                                    "data.modality=cxr"]).modality == "cxr"
    assert resolve_job("pipeline", ["method=flow"]).modality == "cxr"
    assert resolve_job("pipeline", []).yamls == ("simclr", "patch")  # method=patch default
    assert resolve_job("train_simclr", ["a=1"]).yamls == ("simclr",)
    assert resolve_job("sample_glow", ["modality=bct"]).yamls == ("glow_bct", "glow_sample_bct")
    for bad, what in ((["method=flow", "config=flow_nope"], "flow_nope"),
                      (["method=flow", "data.modality=mri"], "modality"),
                      (["method=gan"], "method"), (["config=flow_bct_paper"], "method=flow")):
        with pytest.raises(ConfigError, match=what):
            resolve_job("pipeline", bad)


def test_threshold_is_youden_on_val_never_test():
    y_val = np.array([0, 0, 0, 1, 1, 1])
    s_val = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    thr, how = report_flow.val_threshold(y_val, s_val)
    assert 2.0 < thr < 3.0 and "Youden" in how
    val = FlowScores(-s_val, np.zeros(6), np.zeros(6))  # score = -log_p_m0 + log_p_m1 = s_val
    # On test, the best cut-off lies elsewhere (between 10 and 11): the val one must be used.
    s_test = np.array([9.0, 10.0, 11.0, 12.0])
    test = FlowScores(-s_test, np.zeros(4), np.zeros(4))
    m = report_flow.evaluate(y_val, val, _items([0, 0, 1, 1]), test)
    assert m["threshold"] == pytest.approx(thr) and m["val/threshold"] == pytest.approx(thr)
    assert m["auroc"] == 1.0 and m["specificity"] == 0.0 and m["sensitivity"] == 1.0
    assert m["val/auroc"] == 1.0


def test_threshold_without_val_abnormals_is_a_val_percentile():
    thr, how = report_flow.val_threshold(np.zeros(100, int), np.arange(100.0))
    assert thr == pytest.approx(94.05) and "95th" in how
    with pytest.raises(ConfigError, match="val/normal"):
        report_flow.val_threshold(np.ones(3, int), np.arange(3.0))


def test_evaluate_reports_likelihood_and_per_finding_aurocs():
    rng = np.random.default_rng(0)
    labels = [0] * 20 + [1] * 20
    findings = [""] * 20 + ["Lung Opacity"] * 10 + ["No Lung Opacity / Not Normal"] * 10
    # posterior separates only 'Lung Opacity'; the likelihood ranks the classes backwards
    post = np.r_[rng.normal(0, 1, 20), rng.normal(5, 1, 10), rng.normal(0, 1, 10)]
    lik = np.r_[np.full(20, 10.0), np.full(20, 0.0)] + rng.normal(0, 0.1, 40)
    scores = FlowScores(log_p_m0=-lik, log_p_m1=-lik + post, zero_fraction=np.zeros(40))
    np.testing.assert_allclose(scores.score, post)
    m = report_flow.evaluate(np.array(labels), scores, _items(labels, findings), scores)
    assert m["auroc_likelihood"] == 0.0
    assert m["per_finding"]["Lung Opacity"]["auroc"] == 1.0
    assert 0.2 < m["per_finding"]["No Lung Opacity / Not Normal"]["auroc"] < 0.8
    assert m["per_finding_likelihood"]["Lung Opacity"]["auroc"] == 0.0
    assert m["per_finding"]["Lung Opacity"]["n"] == 10


def test_evaluate_needs_both_classes_in_test():
    s = FlowScores(np.zeros(3), np.zeros(3), np.zeros(3))
    with pytest.raises(ConfigError, match="S_unknown"):
        report_flow.evaluate(np.array([0, 1, 1]), s, _items([1, 1, 1]), s)


# --- end to end on tiny phantoms (fast tier) ---------------------------------------------------


TINY = {
    "cxr": ["data.image_size=16", "glow.levels=2"],
    "bct": ["data.volume_size=[8,16,16]", "glow.levels=2", "glow.m0_epochs=null"],
}


def _argv(root, out, modality, *extra):
    return ["method=flow", "data=folder", f"data.root={root}", f"data.modality={modality}",
            "profile=cpu", f"out_dir={out}", "logger=none", "trainer.progress_bar=false",
            "glow.steps=2", "glow.hidden_channels=16", "data.batch_size=16",
            "trainer.max_epochs=3", "eval.n_extremes=6", "glow.n_samples=1", *TINY[modality],
            *extra]


def _run(root, out, modality, *extra):
    from experiments.pipeline import main

    return main(_argv(root, out, modality, *extra))


@pytest.mark.parametrize("modality", ["cxr", "bct"])
def test_pipeline_end_to_end(out_dir, modality, monkeypatch, one_thread):
    import csv
    import json

    from lightning_modules.flow_posterior import PreprocessingMismatch

    root, out = out_dir / "data", out_dir / "run"
    write_folder_phantoms(root, modality)
    metrics = _run(root, out, modality)

    for f in ("scores.csv", "metrics.json", "report.html", "config.yaml", "splits.csv",
              "m0/fingerprint.json", "m1/fingerprint.json", "flow_posterior.ckpt",
              "figures/roc.png", "figures/hist_log_posterior.png",
              "figures/hist_log_likelihood.png", "figures/most_abnormal.png",
              "figures/least_abnormal.png", "figures/zero_fraction_likelihood.png",
              "figures/roc_per_finding.png", "figures/samples_m0.png",
              # Figs. 9-10 (mosaic) and Appendix A, Figs. A.21-A.22 (likelihood-only score)
              "figures/mosaic_most_abnormal.png", "figures/hist_likelihood_per_finding.png",
              "figures/most_abnormal_likelihood.png", "figures/least_abnormal_likelihood.png"):
        assert (out / f).is_file(), f
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16
    assert list(rows[0])[:3] == ["path", "label", "score"]
    assert {"log_p_m0", "log_p_m1", "log_posterior", "score_likelihood", "finding",
            "zero_fraction"} <= set(rows[0])
    # cxr (cpu): score = -log posterior = log p(x|M1) - log p(x|M0); bct (cpu): the local score
    # of M0's z map (our choice), with the paper's score in score_global
    paper = "score" if modality == "cxr" else "score_global"
    for r in rows:
        assert float(r[paper]) == pytest.approx(-float(r["log_posterior"]))
        assert float(r["log_posterior"]) == pytest.approx(
            float(r["log_p_m0"]) - float(r["log_p_m1"]), rel=1e-9, abs=1e-6)
        assert float(r["score_likelihood"]) == pytest.approx(-float(r["log_p_m0"]))
    # the map's image score is a column whichever score is the run's
    assert ("score_local" if modality == "cxr" else "score") in rows[0]
    # the validation scores the decision threshold was chosen on (as the patch pipeline writes)
    with open(out / "val_scores.csv") as fh:
        val = list(csv.DictReader(fh))
    assert val and {"/val/" in r["path"] for r in val} == {True}
    assert {"log_p_m0", "log_p_m1", "score_likelihood"} <= set(val[0])
    saved = json.loads((out / "metrics.json").read_text())
    for k in ("auroc", "accuracy", "precision", "sensitivity", "specificity", "threshold",
              "auroc_likelihood", "val/auroc", "per_finding", "auroc_ci", "sens_at_spec_0.90",
              "sens_at_spec_0.95", "p_posterior_vs_likelihood"):
        assert k in saved, k
    assert saved["auroc_ci"][0] <= saved["auroc"] <= saved["auroc_ci"][1]
    assert 0.0 <= saved["p_posterior_vs_likelihood"] <= 1.0
    assert 0.0 <= metrics["auroc"] <= 1.0 and metrics["threshold_source"] == "Youden's J on val"
    html = (out / "report.html").read_text()
    assert "figures/roc.png" in html and "Youden" in html
    assert "figures/mosaic_most_abnormal.png" in html and "Appendix A" in html
    assert "Mosaic of the 16 most likely abnormal" in html  # capped at the 16 test items

    # The saved detector gives the same scores as the run (M0, M1 and thresholds in one file).
    import torch

    from datamodules.factory import build_datamodule
    from lightning_modules.flow_posterior.lightning_model import FlowPosteriorModule

    det = FlowPosteriorModule.load(out / "flow_posterior.ckpt")
    assert det.threshold == pytest.approx(saved["threshold"], abs=1e-4)  # json: 4 decimals
    cfg = pipeline_flow.load(_argv(root, out, modality))
    dm = build_datamodule(cfg.data)
    dm.setup()
    test_items = pipeline_flow.labelled(dm, "test")
    x = torch.stack([torch.from_numpy(dm.load(it)).float()[None] for it in test_items[:3]])
    got = det.predict_step({"image": x}, 0)["score"]
    want = [float(r["score"]) for r in rows[:3]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # detect_image on a flow run: the same score, the verdict at the saved threshold, a map
    from experiments import detect_image

    res = detect_image.main([rows[0]["path"], f"run_dir={out}", f"out={out_dir / 'det'}"])
    assert res[0]["score"] == pytest.approx(float(rows[0]["score"]), rel=1e-5, abs=1e-4)
    assert res[0]["verdict"] == ("abnormal" if res[0]["score"] > det.threshold else "normal")
    assert Path(res[0]["overlay"]).is_file()

    # A second run reuses both models (no retraining): the fingerprint matches ...
    def no_training(cfg, datamodule=None, **kw):
        raise AssertionError("M0/M1 should have been reused, not retrained")

    monkeypatch.setattr("experiments.train_glow.train", no_training)
    # (cxr, cpu: glow.select_align trains an unaligned pair in OUT and an aligned one below it)
    cands = pipeline_flow.align_candidates(cfg, out)
    assert [m for m, _, _ in cands] == (["none", "similarity"] if modality == "cxr" else ["none"])
    if len(cands) > 1:  # the pair with the higher validation AUROC; the unaligned one on a tie
        from lightning_modules.selection import MIN_PER_CLASS  # or with too few to choose on

        sel = saved["align_selection"]
        assert set(sel) == {"val_auroc_none", "val_auroc_similarity"}
        few = min(sum(r["label"] == k for r in val) for k in ("0", "1")) < MIN_PER_CLASS
        assert saved["align"] == ("similarity" if sel["val_auroc_similarity"]
                                  > sel["val_auroc_none"] and not few else "none")
    else:
        assert saved["align"] == "none" and "align_selection" not in saved
    for _, c, folder in cands:
        ckpt = flow_models.train_models(c, folder, dm)["m0"]
        fp = json.loads((folder / "m0" / "fingerprint.json").read_text())
        assert not Path(fp["ckpt"]).is_absolute() and ckpt == folder / "m0" / fp["ckpt"]
    # ... a copied run folder uses its own files, not the original's ...
    import shutil

    copy = out_dir / "copy"
    shutil.copytree(out, copy)
    for _, c, folder in pipeline_flow.align_candidates(
            pipeline_flow.load(_argv(root, copy, modality)), copy):
        fp = json.loads((folder / "m0" / "fingerprint.json").read_text())
        assert flow_models.train_models(c, folder, dm)["m0"] == folder / "m0" / fp["ckpt"]
        assert folder.is_relative_to(copy)
    # ... other settings are refused with the way out named ...
    other = ["data.image_size=32"] if modality == "cxr" else ["data.volume_size=[16,16,16]"]
    with pytest.raises(ConfigError, match="reuse_models=retrain"):
        _run(root, out, modality, *other)
    # ... and forced reuse still refuses to combine the models with other preprocessing.
    key = "image_size" if modality == "cxr" else "volume_size"
    with pytest.raises(PreprocessingMismatch, match=key):
        _run(root, out, modality, *other, "glow.reuse_models=force")


def test_flow_model_fingerprint_follows_data_settings_and_start(out_dir, monkeypatch):
    from types import SimpleNamespace

    calls = []

    def fake_train(cfg, datamodule=None, init_ckpt=None, **kw):
        calls.append(cfg.glow.model)
        path = Path(cfg.out_dir) / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights of " + str(len(calls)).encode())
        return path

    def dm_of(paths):
        return SimpleNamespace(items=lambda split, group=None: [Item(p, 0) for p in paths])

    monkeypatch.setattr("experiments.train_glow.train", fake_train)
    cfg = pipeline_flow.load(["data=folder", "profile=cpu", "glow.m1_init=m0"])
    dm = dm_of(["a.png", "b.png"])
    m0 = flow_models.ensure_model(cfg, "m0", out_dir, dm)
    assert flow_models.ensure_model(cfg, "m0", out_dir, dm) == m0 and calls == ["m0"]
    # scoring-only options do not invalidate a trained model
    scored = pipeline_flow.load(["data=folder", "profile=cpu", "glow.m1_init=m0",
                                 "glow.score=local", "glow.map_sigma=2"])
    assert flow_models.ensure_model(scored, "m0", out_dir, dm) == m0 and calls == ["m0"]
    for changed_cfg, changed_dm, what in (
            (cfg, dm_of(["a.png", "c.png"]), "items"),
            (pipeline_flow.load(["data=folder", "profile=cpu", "glow.steps=3"]), dm, "settings")):
        with pytest.raises(ConfigError, match=what):
            flow_models.ensure_model(changed_cfg, "m0", out_dir, changed_dm)
    m1 = flow_models.ensure_model(cfg, "m1", out_dir, dm, init_ckpt=m0)
    # M1 depends on the checkpoint it started from: a retrained M0 invalidates it
    retrain = pipeline_flow.load(["data=folder", "profile=cpu", "glow.m1_init=m0",
                                  "glow.reuse_models=retrain"])
    m0b = flow_models.ensure_model(retrain, "m0", out_dir, dm)
    assert m0b == m0 and m1.is_file() and calls == ["m0", "m1", "m0"]
    with pytest.raises(ConfigError, match="init"):
        flow_models.ensure_model(cfg, "m1", out_dir, dm, init_ckpt=m0b)


def test_evaluate_without_val_cross_fits_the_threshold_on_test():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(33, int), np.ones(33, int)]
    s = np.r_[rng.normal(0, 1, 33), rng.normal(2, 1, 33)]
    test = FlowScores(-s, np.zeros(66), np.zeros(66))
    m = report_flow.evaluate(np.zeros(0, int), None, _items(list(y)), test, cross_fit_folds=3)
    assert "cross-fitted" in m["threshold_source"] and m["tp"] + m["fn"] == 33
    # every case decided by a threshold from the other folds: recompute by hand
    from lightning_modules.thresholds import decision_threshold, stratified_folds

    folds = stratified_folds(y, 3, 0)
    pred = np.empty(66, bool)
    for f in range(3):
        held = folds == f
        pred[held] = s[held] > decision_threshold(y[~held], s[~held])[0]
    assert m["tp"] == int((pred & (y == 1)).sum()) and m["fp"] == int((pred & (y == 0)).sum())
    assert m["auroc"] == pytest.approx(report_flow.evaluate(
        y, test, _items(list(y)), test)["auroc"])  # AUROC does not depend on thresholds
    assert 0.0 <= m["sens_at_spec_0.90"] <= 1.0


@pytest.mark.parametrize("modality", ["cxr", "bct"])
def test_load_stacks_glow_of_the_modality_and_flow(modality):
    cfg = pipeline_flow.load(["method=flow", "data=folder", f"data.modality={modality}",
                              "profile=cpu"])
    assert cfg.method == "flow" and cfg.job == "pipeline" and cfg.data.modality == modality
    assert cfg.glow.n_bits == (8 if modality == "cxr" else 7)  # from glow_<modality>.yaml
    assert cfg.eval.n_extremes == 36  # from flow.yaml
    assert cfg.out_dir == f"outputs/flow/{modality}"
    # the image score: the paper's for cxr (its map, a candidate of select_score, read as z per
    # pixel); head CT's cpu default is M0's z map over the brain (our choice, glow_bct.yaml);
    # profile=paper keeps the paper's global posterior
    g = cfg.glow
    want = (("local", "likelihood", "position", "interior") if modality == "bct"
            else ("global", "posterior", "position", "all"))
    assert (g.score, g.map_source, g.map_norm, g.map_region) == want
    p = pipeline_flow.load(["data=folder", f"data.modality={modality}", "profile=paper"]).glow
    assert (p.score, p.map_source, p.map_norm, p.map_region, p.matched_start) == (
        "global", "posterior", "none", "all", "normal")


def _fake_dm(n: int):
    from types import SimpleNamespace

    return SimpleNamespace(items=lambda split, group=None: [Item(f"{group}{i}.png", 0)
                                                            for i in range(n)])


def test_m1_init_is_validated_and_m1_starts_from_m0(out_dir, monkeypatch):
    with pytest.raises(ConfigError, match="glow.m1_init"):
        pipeline_flow.load(["data=folder", "profile=cpu", "glow.m1_init=m2"])
    calls = []

    def fake_train(cfg, datamodule=None, init_ckpt=None):
        calls.append((cfg.glow.model, init_ckpt))
        path = Path(cfg.out_dir) / "checkpoints" / "best.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path

    monkeypatch.setattr("experiments.train_glow.train", fake_train)
    cfg = pipeline_flow.load(["data=folder", "profile=cpu", "glow.m1_init=m0"])
    dm = _fake_dm(4)
    m0 = flow_models.ensure_model(cfg, "m0", out_dir, dm)
    flow_models.ensure_model(cfg, "m1", out_dir, dm, init_ckpt=m0)
    assert calls == [("m0", None), ("m1", m0)]


@pytest.mark.parametrize("preset,sizes", [
    ("flow_rsna_paper", (7808, 6553, 6631, 1358, 13863)),
    ("flow_bct_paper", (250, 250, 250, 33, 33)),
])
def test_paper_presets_give_the_papers_set_sizes(preset, sizes):
    cfg = pipeline_flow.load([f"config={preset}", "profile=paper"])
    d = cfg.data
    assert (d.n_normal, d.n_mixture_normal, d.n_mixture_abnormal, d.n_unknown_normal,
            d.n_unknown_abnormal) == sizes
    assert d.modality == ("cxr" if "rsna" in preset else "bct")
    # head CT: all 33 + 33 are test cases (no val: thresholds cross-fitted); RSNA keeps its val
    assert d.val_fraction == (0.15 if "rsna" in preset else 0.0)
    assert d.name == ("rsna" if "rsna" in preset else "bct")
    # the paper's Glow of that modality (Appendix B for CT)
    assert (cfg.glow.levels, cfg.glow.steps) == ((7, 32) if "rsna" in preset else (4, 32))
    # the command line still wins
    assert pipeline_flow.load([f"config={preset}", "data.n_normal=10"]).data.n_normal == 10


def test_matched_schedule_trains_m0_and_m1_for_equal_steps_from_a_shared_start(out_dir,
                                                                               monkeypatch):
    for bad in ("glow.schedule=paired", "glow.score=max", "glow.intensity_norm=z"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            pipeline_flow.load(["data=folder", "profile=cpu", bad])
    calls = []

    def fake_train(cfg, datamodule=None, init_ckpt=None, max_steps=None, select="best"):
        calls.append((Path(cfg.out_dir).name, cfg.glow.model, init_ckpt, max_steps, select,
                      cfg.trainer.max_epochs))
        path = Path(cfg.out_dir) / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path

    monkeypatch.setattr("experiments.train_glow.train", fake_train)
    cfg = pipeline_flow.load(["data=folder", "profile=cpu", "glow.schedule=matched",  # fake
                              "glow.matched_steps=7", "trainer.max_epochs=5", "glow.align=none"])
    ckpts = flow_models.train_models(cfg, out_dir, _fake_dm(4))
    start = ckpts["start"]
    assert calls == [("start", "m0", None, None, "last", 5),
                     ("m0", "m0", start, 7, "last", -1),
                     ("m1", "m1", start, 7, "last", -1)]


def test_matched_start_all_trains_the_shared_start_on_every_training_item(out_dir,
                                                                         monkeypatch):
    """glow.matched_start=all: the shared start sees S_normal and S_mixture (group "all"),
    M0 / M1 still continue on their own sets; the start's fingerprint lists both sets."""
    import json

    from experiments.train_glow import build_loaders

    calls = []

    def fake_train(cfg, datamodule=None, init_ckpt=None, max_steps=None, select="best",
                   group=None):
        calls.append((Path(cfg.out_dir).name, group))
        path = Path(cfg.out_dir) / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path

    monkeypatch.setattr("experiments.train_glow.train", fake_train)
    with pytest.raises(ConfigError, match="glow.matched_start"):
        pipeline_flow.load(["data=folder", "glow.matched_start=mixture"])
    cfg = pipeline_flow.load(["data=folder", "profile=cpu", "glow.schedule=matched",  # fake
                              "glow.matched_start=all", "glow.matched_steps=3", "glow.align=none"])
    groups = {"normal": ["n0.png", "n1.png"], "mixture": ["x0.png", "x1.png", "x2.png"]}

    def items(split, group=None):
        names = [n for g in groups for n in groups[g]] if group is None else groups[group]
        return [Item(n, 0) for n in names]

    from types import SimpleNamespace

    dm = SimpleNamespace(items=items)
    flow_models.train_models(cfg, out_dir, dm)
    assert calls == [("start", "all"), ("m0", None), ("m1", None)]
    fp = json.loads((out_dir / "start" / flow_models.FINGERPRINT).read_text())
    from experiments.config import json_digest

    assert fp["items"] == json_digest([[n, 0] for n in groups["normal"] + groups["mixture"]])
    # the loader of the start holds all five training items, M0's only S_normal
    dm.load = lambda it: np.zeros((4, 4), dtype=np.float32)
    cfg.glow.model = "m0"
    assert len(build_loaders(cfg, dm, "last", "all")[0].dataset) == 5
    assert len(build_loaders(cfg, dm, "last")[0].dataset) == 2


def test_pipeline_matched_local_score_writes_anomaly_maps(out_dir, one_thread):
    import csv

    root, out = out_dir / "data", out_dir / "run"
    write_folder_phantoms(root, "cxr", n_train=16, n_eval=4)
    metrics = _run(root, out, "cxr", "glow.schedule=matched", "glow.matched_steps=2",
                   "trainer.max_epochs=1", "glow.score=local", "glow.intensity_norm=rank")
    assert metrics["score"] == "local"
    assert (out / "figures" / "anomaly_maps.png").is_file()
    assert "anomaly maps" in (out / "report.html").read_text().lower()
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:  # the global posterior stays available next to the local score
        assert float(r["score_global"]) == pytest.approx(-float(r["log_posterior"]))


def test_pipeline_without_val_cross_fits_thresholds_and_saves_them(out_dir, one_thread):
    import json
    import shutil

    from lightning_modules.flow_posterior.lightning_model import FlowPosteriorModule

    root, out = out_dir / "data", out_dir / "run"
    write_folder_phantoms(root, "bct", n_train=8, n_eval=6)
    shutil.rmtree(root / "val")
    with pytest.raises(Exception, match="data.val_fraction=0"):  # no val: asked for, not silent
        _run(root, out, "bct", "trainer.max_epochs=1")
    metrics = _run(root, out, "bct", "trainer.max_epochs=1", "eval.cross_fit_folds=3",
                   "data.val_fraction=0")
    assert "cross-fitted" in metrics["threshold_source"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_normal"] + saved["n_abnormal"] == 12  # every test case decided
    det = FlowPosteriorModule.load(out / "flow_posterior.ckpt")
    assert det.threshold == pytest.approx(saved["threshold"], abs=1e-4)  # json: 4 decimals
    assert "cross-fitted" in det.threshold_source


@pytest.mark.slow
def test_flow_pipeline_writes_one_wandb_run_per_model_and_one_for_the_evaluation(out_dir,
                                                                                one_thread):
    root, out = out_dir / "data", out_dir / "run"
    write_folder_phantoms(root, "bct", n_train=8, n_eval=4)
    argv = [a for a in _argv(root, out, "bct", "trainer.max_epochs=1") if a != "logger=none"]
    _run_argv = argv + ["logger.name=wandb", "logger.mode=offline"]
    from experiments.pipeline import main

    main(_run_argv)
    for folder in (out / "m0", out / "m1", out):
        runs = list((folder / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, (folder, runs)
