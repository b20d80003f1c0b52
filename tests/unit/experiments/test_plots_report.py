"""Figures are real, readable PNGs; the HTML report links them, escapes text, shows metrics."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import plots
from experiments.evaluation import binary_metrics, per_finding_metrics, summarize_folds
from experiments.report import Report


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(50, int)]
    s = np.r_[rng.normal(0, 1, 40), rng.normal(1.5, 1, 50)]
    findings = [""] * 40 + list(rng.choice(["opacity", "effusion|opacity", "nodule"], 50))
    return y, s, findings


def assert_png(path: Path, min_kb: float = 5.0) -> Image.Image:
    assert path.is_file(), path
    assert path.stat().st_size > min_kb * 1024, f"{path} is only {path.stat().st_size} bytes"
    im = Image.open(path)
    im.load()
    assert im.format == "PNG" and im.mode in ("RGB", "RGBA")
    return im


def non_white_fraction(im: Image.Image) -> float:
    a = np.asarray(im.convert("L"))
    return float((a < 250).mean())


def test_plot_roc(out_dir, data):
    y, s, _ = data
    p = plots.plot_roc(out_dir / "figures" / "roc.png", y, {"posterior": s, "likelihood": -s},
                       title="ROC")
    im = assert_png(p, 15)
    assert non_white_fraction(im) > 0.02
    # a single array is accepted too
    assert_png(plots.plot_roc(out_dir / "roc1.png", y, s))


def test_plot_roc_per_finding(out_dir, data):
    y, s, f = data
    assert_png(plots.plot_roc_per_finding(out_dir / "roc_f.png", y, s, f, title="per finding"),
               15)


def test_plot_histograms_and_scatter(out_dir, data):
    y, s, _ = data
    s_inf = np.r_[s, np.inf]  # non-finite values are left out, not a crash
    y_inf = np.r_[y, 1]
    assert_png(plots.plot_histograms(out_dir / "h.png", s_inf, y_inf, "-log p(normal|x)",
                                     thresholds={"threshold": 0.5, "Youden": 0.7}))
    assert_png(plots.plot_scatter(out_dir / "sc.png", np.abs(s) / 4, s, y,
                                  "fraction of zero pixels", "score"))


def test_image_grid_overlays_montage(out_dir):
    rng = np.random.default_rng(0)
    imgs = [rng.random((32, 32)).astype(np.float32) for _ in range(7)]
    caps = [f"<case {i}>" for i in range(7)]
    im = assert_png(plots.plot_image_grid(out_dir / "grid.png", imgs, caps, ncols=3, title="t"))
    assert im.size[0] > 300 and im.size[1] > 300
    maps = [rng.random((4, 4)) for _ in range(7)]  # coarse patch maps: resized to the image
    masks = [rng.random((32, 32)) > 0.7 if i % 2 else None for i in range(7)]
    assert_png(plots.plot_overlays(out_dir / "ov.png", imgs, maps, caps, masks=masks,
                                   title="maps"), 20)
    vol = rng.random((10, 16, 12)).astype(np.float32)
    mont = plots.middle_slice_montage(vol, n=6)
    assert mont.shape == (2 * 16, 3 * 12)
    # the tiles are slices of the middle half of the volume
    np.testing.assert_array_equal(mont[:16, :12], vol[2])
    np.testing.assert_array_equal(mont[16:, 24:], vol[7])
    assert_png(plots.plot_image_grid(out_dir / "mont.png", [mont], ["3D"], ncols=1), 2)
    with pytest.raises(ValueError, match="middle_slice_montage"):
        plots.plot_image_grid(out_dir / "bad.png", [vol], ["3D"])


def test_metric_table_png(out_dir):
    assert_png(plots.plot_metric_table(out_dir / "t.png", [{"fold": 1, "auroc": 0.75}]), 2)


def test_report_html(out_dir, data, tmp_path_factory):
    y, s, f = data
    figs = out_dir / "figures"
    roc = plots.plot_roc(figs / "roc.png", y, {"score": s})
    elsewhere = tmp_path_factory.mktemp("other") / "hist.png"
    plots.plot_histograms(elsewhere, s, y, "score")
    m = binary_metrics(y, s, 0.5)
    m["pixel_auroc"] = float("nan")
    rep = Report(out_dir, "Run <1> & co")
    rep.add_heading("Test <set>")
    rep.add_text("Threshold fixed on validation <b>not</b> test.\n\nSecond paragraph & more.")
    rep.add_metrics(m, title="Test metrics")
    rep.add_metrics(per_finding_metrics(y, s, f), title="Per finding")
    rep.add_metrics(summarize_folds([m, binary_metrics(y, s + 0.1, 0.5)]), title="Folds")
    rep.add_table([{"name": "a<b", "auroc": 0.5}, {"name": "c", "n": 3}], title="Table")
    rep.add_figure(roc, caption="ROC <curve>")
    rep.add_figure(elsewhere, caption="Histogram")
    path = rep.write()
    assert path == out_dir / "report.html"
    text = path.read_text()
    # escaped, not interpreted
    assert "Run &lt;1&gt; &amp; co" in text and "<b>not</b>" not in text
    assert "&lt;b&gt;not&lt;/b&gt;" in text and "Test &lt;set&gt;" in text
    assert "a&lt;b" in text and "ROC &lt;curve&gt;" in text
    # metrics table: values formatted, NaN shown as n/a, per-finding rows, mean ± sd
    assert f"{m['auroc']:.4g}" in text and "n/a" in text
    assert "opacity" in text and "nodule" in text and "±" in text
    assert "How to read these numbers" in text and "TP / (TP + FP)" in text
    # figures: relative links that exist; outside files copied into figures/
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs == ["figures/roc.png", "figures/hist.png"]
    for src in srcs:
        assert not Path(src).is_absolute() and (out_dir / html.unescape(src)).is_file()
    # self-contained: no external resources, no scripts
    assert not re.search(r"(https?:)?//[a-z]", text.replace("</", ""))
    assert "<script" not in text and "<link" not in text
    assert "git commit" in text and "Generated" in text
    # single-file variant
    text2 = rep.write(embed_images=True).read_text()
    assert 'src="data:image/png;base64,' in text2


def test_report_missing_figure(out_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Report(out_dir, "x").add_figure(out_dir / "nope.png")
