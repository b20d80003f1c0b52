"""The patch pipeline end to end on tiny phantoms (fast tier), plus re-use of its outputs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import pipeline
from experiments.config import ConfigError

TINY = [
    "method=patch", "profile=cpu", "data=phantom_cxr", "logger=none",
    "data.image_size=64", "data.phantom_size=64", "data.phantom_count=24", "data.batch_size=32",
    "patch.patch_sizes=[16,32,64]", "patch.locality=[1,0,0]", "patch.weights=[0.5,1.0,1.0]",
    "simclr.input_size=16", "simclr.proj_hidden_dim=32", "simclr.proj_out_dim=16",
    "simclr.val_max_patches=32", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
    "patch.encoder_epochs=null", "eval.n_extremes=4",
    "eval.n_overlays=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("patch_run")
    metrics = pipeline.main([*TINY, f"out_dir={out}"])
    return out, metrics


def test_pipeline_writes_the_contracted_outputs(run_dir):
    out, metrics = run_dir
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns[:3]) == ["path", "label", "score"]
    assert set(scores.label) == {0, 1} and scores.score.between(0, 1).all()
    m = json.loads((out / "metrics.json").read_text())
    for k in ("auroc", "accuracy", "precision", "sensitivity", "specificity", "threshold",
              "val/auroc", "pixel_auroc", "auroc_ci", "pixel_auroc_ci", "sens_at_spec_0.90",
              "sens_at_spec_0.95"):
        assert k in m, k
    lo, hi = m["auroc_ci"]
    assert lo <= m["auroc"] <= hi and 0 <= m["sens_at_spec_0.95"] <= 1
    assert m["threshold"] == 0.5
    assert (out / "report.html").is_file() and list((out / "figures").glob("*.png"))
    # The split manifest: every item once per group, its sha256 in run_info.json.
    import hashlib

    manifest = pd.read_csv(out / "splits.csv", keep_default_na=False)
    assert list(manifest.columns) == ["item", "patient", "split", "group", "label"]
    assert set(manifest.split) == {"train", "val", "test"}
    assert set(scores.path.map(lambda p: Path(p).name)) <= set(manifest.item.map(
        lambda p: Path(p).name))
    info = json.loads((out / "run_info.json").read_text())
    assert info["splits_sha256"] == hashlib.sha256((out / "splits.csv").read_bytes()).hexdigest()
    # One checkpoint holds the fitted detector: databases, normalisation, settings.
    from lightning_modules.patch_detector.lightning_model import PatchDetectorModule

    det = PatchDetectorModule.load(out / "patch_detector.ckpt").detector
    assert det.normalizer.sizes == [16, 32, 64] and sorted(det.dbs) == [16, 32, 64]
    n_train = int(((manifest.split == "train") & (manifest.group == "normal")).sum())
    assert {len(det.dbs[s].image_ids) for s in det.dbs} == {n_train}


def test_val_youden_cut_lands_at_half(run_dir):
    out, _ = run_dir
    val = pd.read_csv(out / "val_scores.csv")
    from lightning_modules.thresholds import youden_cutoff

    c = youden_cutoff(val.label.to_numpy(), val.raw_score.to_numpy())
    assert ((val.score > 0.5) == (val.raw_score > c)).all()


def test_detect_image_scores_a_new_image(run_dir, tmp_path, capsys):
    from experiments import detect_image

    out, _ = run_dir
    test = pd.read_csv(out / "scores.csv")
    row = test.iloc[int(np.argmax(test.score))]
    results = detect_image.main([row.path, f"run_dir={out}", f"out={tmp_path}"])
    assert results[0]["score"] == pytest.approx(row.score, abs=1e-5)
    assert (tmp_path / (results[0]["name"] + "_overlay.png")).is_file()
    assert "abnormal" in capsys.readouterr().out


def test_bad_fusion_fails():
    with pytest.raises(ConfigError, match="patch.fusion"):
        pipeline.main([*TINY, "patch.fusion=sum"])


def test_ablation_table2_reuses_the_run(run_dir, caplog):
    """Ablations re-score only: the run's encoders are reused (the fingerprint matches)."""
    from experiments import ablations

    out, _ = run_dir
    enc = sorted((out / "encoders").rglob("*.ckpt"))
    mtimes = [p.stat().st_mtime for p in enc]
    rows = ablations.main(["configs/ablations/table2.yaml", *TINY, f"out_dir={out}"])
    assert len(rows) == 3 * 4  # sizes x distances
    assert {r["distance"] for r in rows} == {"euclidean", "manhattan", "cosine", "mahalanobis"}
    assert (out / "ablations" / "table2.csv").is_file()
    assert (out / "ablations" / "table2.md").read_text().count("\n|") >= 13
    assert [p.stat().st_mtime for p in enc] == mtimes
    assert "Encoder res 16: reusing" in caplog.text


def test_rerun_with_other_data_refuses_the_old_encoders(run_dir):
    """A rerun into the same out_dir reuses an encoder only when its fingerprint (training
    images, settings, code) matches; otherwise it says how to retrain or force."""
    out, _ = run_dir
    with pytest.raises(ConfigError, match="reuse_encoders=retrain.*reuse_encoders=force"):
        pipeline.main([*TINY, "data.phantom_seed=5", f"out_dir={out}"])
    fp = json.loads((out / "encoders" / "res16" / "fingerprint.json").read_text())
    assert set(fp) == {"items", "settings", "code"}


def test_ablation_grid_expansion():
    from experiments.ablations import expand_grid

    v = expand_grid({"weights": [[1, 1], [0, 1]], "fusion": ["geometric", "product"]},
                    [32, 64], [0.1, 1.2], "mahalanobis", "geometric")
    assert len(v) == 3  # product with a zero weight is skipped
    assert expand_grid({"sizes": "each"}, [32, 64], [0.1, 1.2], "cosine", "geometric") == [
        {"sizes": [32], "weights": [1.0], "distance": "cosine", "fusion": "geometric"},
        {"sizes": [64], "weights": [1.0], "distance": "cosine", "fusion": "geometric"},
    ]


@pytest.mark.slow
def test_cross_validation_reports_mean_and_sd(tmp_path):
    metrics = pipeline.main([*TINY, "patch.n_folds_run=2", f"out_dir={tmp_path}"])
    assert metrics["n_folds"] == 2 and "auroc_sd" in metrics
    lo, hi = metrics["pooled_auroc_ci"]
    assert lo <= metrics["pooled_auroc"] <= hi and metrics["pooled_n"] > 0
    assert (tmp_path / "fold0" / "metrics.json").is_file()
    assert (tmp_path / "fold1" / "report.html").is_file()


def test_detect_image_restores_our_options(run_dir, tmp_path):
    """Every detector option lands in the checkpoint and detect_image scores a test image
    exactly as the pipeline did (the cell_normalize bug must not come back)."""
    from experiments import detect_image

    out = tmp_path / "run"
    opts = ["patch.features=dense", "patch.dense_layers=[layer2]",
            "patch.intensity_norm=percentile", "patch.image_score=topk",
            "patch.topk_fraction=0.05", "patch.cell_normalize=true",
            "patch.cell_zscore=false",  # the cpu profile's z-score excludes cell_normalize
            f"patch.encoder_dir={run_dir[0] / 'encoders'}"]  # reuse: no SimCLR training here
    pipeline.main([*TINY, *opts, f"out_dir={out}"])
    det, _ = detect_image.load_detector(out)
    assert det.normalizer.image_score == "topk"
    assert (det.feature_mode, det.intensity_norm, det.cell_normalize) == ("dense", "percentile",
                                                                          True)
    assert det.normalizer.topk_fraction == 0.05
    test = pd.read_csv(out / "scores.csv")
    row = test.iloc[0]
    results = detect_image.main([row.path, f"run_dir={out}", f"out={tmp_path}"])
    assert results[0]["score"] == pytest.approx(row.score, abs=1e-5)


def test_checkpoint_restores_rank_zscore_and_shift(run_dir, tmp_path):
    """Save -> PatchDetectorModule.load (weights_only=True) -> identical scores with the cpu
    profile's quality options on: the per-cell normal statistics come from the checkpoint
    (not refitted), the shifted reference patches are in the restored databases."""
    from experiments import detect_image
    from lightning_modules.patch_detector.lightning_model import PatchDetectorModule

    out = tmp_path / "run"
    opts = ["patch.features=pooled",  # the shifted references need pooled features
            "patch.intensity_norm=rank", "patch.cell_zscore=true", "patch.reference_shift=0.25",
            "patch.select_weights=true", "patch.weight_candidates=[[0,0,1],[1,1,1]]",
            f"patch.encoder_dir={run_dir[0] / 'encoders'}"]  # reuse: no SimCLR training here
    metrics = pipeline.main([*TINY, *opts, f"out_dir={out}"])
    module = PatchDetectorModule.load(out / "patch_detector.ckpt")
    det = module.detector
    # the checkpoint holds the weights the scores used; with 3 + 3 validation images
    # (< selection.MIN_PER_CLASS) select_weights keeps patch.weights
    assert list(module.hparams.weights) == det.normalizer.weights == metrics["weights"]
    assert metrics["weights"] == [0.5, 1, 1] and module.hparams.select_weights
    assert (det.intensity_norm, det.cell_zscore, det.reference_shift) == ("rank", True, 0.25)
    assert sorted(det.cell_stats) == [16, 32, 64] and len(det.dbs[16]) > 24 * 16
    stats = {s: tuple(v.clone() for v in det.cell_stats[s]) for s in det.cell_stats}
    test = pd.read_csv(out / "scores.csv")
    results = detect_image.main([*test.path[:3], f"run_dir={out}", f"out={tmp_path}"])
    assert [r["score"] for r in results] == pytest.approx(list(test.score[:3]), abs=1e-5)
    # the statistics were read, not recomputed: a changed state changes the scores
    for s, (m, sd) in stats.items():
        assert torch.equal(det.cell_stats[s][0], m) and torch.equal(det.cell_stats[s][1], sd)
    img = torch.from_numpy(detect_image.read_image(test.path[0], det.image_size))[None, None]
    before = float(det(img)["score"][0])
    det.cell_stats[16] = (det.cell_stats[16][0] + 1.0, det.cell_stats[16][1])
    det._prepared.clear()
    assert float(det(img)["score"][0]) != pytest.approx(before, abs=1e-6)


def test_pose_alignment_template_travels_in_the_checkpoint(run_dir, tmp_path):
    """patch.align=similarity: the template of the normal training images is fitted once,
    saved in patch_detector.ckpt and used by detect_image (same scores; another template
    gives other scores); the report's maps are mapped back onto each test image."""
    from experiments import detect_image
    from lightning_modules.patch_detector.lightning_model import PatchDetectorModule

    out = tmp_path / "run"
    metrics = pipeline.main([*TINY, "patch.align=similarity", f"out_dir={out}",
                             f"patch.encoder_dir={run_dir[0] / 'encoders'}"])
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    det = PatchDetectorModule.load(out / "patch_detector.ckpt").detector
    assert det.align_mode == "similarity" and det.template.shape == (1, 1, 64, 64)
    test = pd.read_csv(out / "scores.csv")
    results = detect_image.main([*test.path[:3], f"run_dir={out}", f"out={tmp_path}"])
    assert [r["score"] for r in results] == pytest.approx(list(test.score[:3]), abs=1e-5)
    img = torch.from_numpy(detect_image.read_image(test.path[0], det.image_size))[None, None]
    before = det(img)
    det.template = torch.flip(det.template, dims=[-1, -2])
    assert float(det(img)["score"][0]) != pytest.approx(float(before["score"][0]), abs=1e-6)
    # without a template the aligned detector refuses to score rather than skip the alignment
    det.template = None
    with pytest.raises(RuntimeError, match="patch.align"):
        det(img)


def test_bad_option_values_fail():
    with pytest.raises(ConfigError, match="patch.features"):
        pipeline.main([*TINY, "patch.features=sparse"])
    with pytest.raises(ConfigError, match="patch.image_score"):
        pipeline.main([*TINY, "patch.image_score=mean"])
    with pytest.raises(ConfigError, match="patch.weight_candidates"):
        pipeline.main([*TINY, "patch.weight_candidates=[[1,1]]"])
