"""The detection benchmark (issue 11): its table and last line on tiny sets, the digits set's
layout, and a quality guard for the two references on hard phantoms."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from datamodules.phantoms import make_cxr
from experiments.baselines import cnn_nn_scores, zscore_scores
from experiments.benchmarks import detection
from experiments.evaluation import auroc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick`` on the 3D phantoms (flow) and the digits (patch and flow)."""
    tmp = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setattr(detection, "CACHE", tmp / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast and avoids oversubscription
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            margin = detection.main(["--quick", "--sets", "bct,digits", "--out",
                                     str(tmp / "out")])
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return tmp, margin, buf.getvalue()


def test_quick_benchmark_table_and_last_line(quick_run):
    tmp, margin, text = quick_run
    lines = text.strip().splitlines()
    m = re.fullmatch(r"min_margin_over_baselines=(-?\d+\.\d{3}|nan)", lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) == pytest.approx(margin, abs=5e-4)
    table = [ln for ln in lines if re.match(r"(bct|digits)\s", ln)]
    assert [ln.split()[0] for ln in table] == ["bct", "digits", "digits"]
    assert [ln.split()[3] for ln in table] == ["flow", "patch", "flow"]
    assert all(re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", ln) for ln in table)
    assert any(ln.startswith("gate bct") for ln in lines)
    d = json.loads((tmp / "out" / "detection.json").read_text())
    assert len(d["rows"]) == 3 and d["quick"] is True
    for r in d["rows"]:
        assert r["error"] == ""
        assert r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1]
        assert r["margin"] == pytest.approx(r["auroc"] - max(r["zscore_auroc"],
                                                             r["cnn_auroc"]), abs=1e-3)
        assert r["time_s"] > 0 and r["n_test"] == "6+6"
    assert min(r["margin"] for r in d["rows"]) == pytest.approx(margin, abs=1e-3)
    assert set(d["gates"]) == {"bct 8x16x16"}
    rows = list(csv.DictReader((tmp / "out" / "detection.csv").open()))
    assert len(rows) == 3 and {"auroc_ci_low", "auroc_ci_high", "margin"} <= set(rows[0])
    # per finding: each set's abnormal test images by what they show, each against all test
    # normals, for every method and both references (bct: the phantom's lesions; digits: digit)
    found = list(csv.DictReader((tmp / "out" / "detection_findings.csv").open()))
    assert {r["method"] for r in found} == {"patch", "flow", "z-score", "random-CNN"}
    for r in d["rows"]:
        assert sum(v["n"] for v in r["by_finding"].values()) == 6, r["data"]
    bct = {r["finding"] for r in found if r["set"] == "bct"}
    assert bct and bct <= {"haemorrhage", "infarct"}, bct
    assert all(r["finding"].startswith("digit ") and r["finding"] != "digit 3"
               for r in found if r["set"] == "digits")
    # the per-finding AUROC is the pooled one when a set has a single finding, so check the
    # arithmetic on a made-up set: finding a's images score high, b's low
    ref = detection.Scored(list("nnnab"), np.array([0, 0, 0, 1, 1]),
                           {"z-score": np.array([0.0, 1, 2, 3, -1]),
                            "random-CNN": np.array([0.0, 1, 2, 3, 4])}, ["", "", "", "a", "b"])
    got = detection.by_finding(ref, np.array([0.0, 1, 2, 5, 1.5]))
    assert got["a"] == {"n": 1, "auroc": 1.0, "zscore_auroc": 1.0, "cnn_auroc": 1.0}
    assert got["b"]["auroc"] == pytest.approx(2 / 3) and got["b"]["zscore_auroc"] == 0.0
    assert any(ln.startswith("Per finding") for ln in lines)
    # each method ran through the user's entry point and wrote its contracted outputs
    for run in ("bct_8x16x16_flow", "digits_8px_patch", "digits_8px_flow"):
        metrics = json.loads((tmp / "out" / "runs" / run / "metrics.json").read_text())
        assert "auroc_ci" in metrics
    assert (tmp / "cache").is_dir() and len(list((tmp / "cache").glob("*/.complete"))) == 2


def test_digits_set_layout_and_no_test_case_in_training(tmp_path):
    root = detection.write_digits(tmp_path, train_normal=20, val=5, test=10,
                                  mixture_normal=160, mixture_abnormal=12, seed=9003)
    n = {g: len(list((root / g).glob("*.png")))
         for g in ("train/normal", "train/mixture", "val/normal", "val/abnormal",
                   "test/normal", "test/abnormal")}
    # 183 threes: 35 to train/val/test, the other 148 + 12 of train/normal again to the mixture
    assert n == {"train/normal": 20, "train/mixture": 160 + 12,
                 "val/normal": 5, "val/abnormal": 5, "test/normal": 10, "test/abnormal": 10}
    rows = list(csv.DictReader((root / "digits_truth.csv").open()))
    digit = {r["path"]: int(r["digit"]) for r in rows}
    assert all(digit[p] == 3 for p in digit if "/normal/" in p)
    assert all(digit[p] != 3 for p in digit if "/abnormal/" in p)
    from datamodules.images import read_png

    def images(group):
        return {read_png(p).tobytes() for p in (root / group).glob("*.png")}

    train = images("train/normal") | images("train/mixture")
    for g in ("val/normal", "val/abnormal", "test/normal", "test/abnormal"):
        assert not (images(g) & train), g  # no val/test image reaches training (DESIGN §5)


def test_dev_seed_refused(tmp_path):
    with pytest.raises(SystemExit, match="development seed"):
        detection.main(["--seed", "123", "--out", str(tmp_path)])


def _hard_cxr_set(rng, n_train=40, n_test=40, size=64, amp=0.6, radius=8):
    """Hard chest phantoms (pose, exposure, habitus); abnormal = + a strong bright disc."""
    train = np.stack([make_cxr(rng, size, style="hard")[0] for _ in range(n_train)])
    yy, xx = np.ogrid[:size, :size]
    test, y = [], np.arange(n_test) % 2
    for label in y:
        img = make_cxr(rng, size, style="hard")[0].copy()
        if label:
            cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] += amp
        test.append(np.clip(img, 0.0, 1.0))
    return train, np.stack(test), y


def test_quality_guard_baselines_on_hard_phantoms():
    """The references detect a strong lesion despite pose / exposure nuisance (sanity of the
    benchmark's yardstick), and a control whose images are replaced by noise does not."""
    rng = np.random.default_rng(9050)
    train, test, y = _hard_cxr_set(rng)
    z, _ = zscore_scores(train, test)
    c, _ = cnn_nn_scores(train, test, input_size=64)
    assert auroc(y, z) > 0.8 and auroc(y, c) > 0.8
    noise_train = rng.random(train.shape).astype(np.float32)
    noise_test = rng.random(test.shape).astype(np.float32)
    z0, _ = zscore_scores(noise_train, noise_test)
    c0, _ = cnn_nn_scores(noise_train, noise_test, input_size=64)
    assert abs(auroc(y, z0) - 0.5) < 0.2 and abs(auroc(y, c0) - 0.5) < 0.2
