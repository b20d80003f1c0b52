"""Figures for the evaluation report (PNG, no display needed).

Uses matplotlib's object API (``Figure``, saved through the Agg canvas) rather than ``pyplot``:
no display or GUI backend is touched, no global figure list to leak (each figure is cleared after
saving), safe on headless servers and in DataLoader workers. Every function
takes the output ``path`` first, writes one PNG (dpi 110) and returns the path.

Conventions as in :mod:`experiments.evaluation`: label 1 = abnormal, 0 = normal, -1 = unlabeled;
higher score = more anomalous. Colours are colour-blind safe (Okabe-Ito).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from experiments.evaluation import (
    _as_numpy,
    _split_findings,
    auroc,
    delong_ci,
    format_value,
    roc_band,
    roc_with_youden,
)

log = logging.getLogger(__name__)

DPI = 110
CLASS_NAMES = {0: "normal", 1: "abnormal", -1: "unlabeled"}
CLASS_COLORS = {0: "#0072B2", 1: "#D55E00", -1: "#7F7F7F"}  # blue, vermillion, grey
CURVE_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
                "#000000"]
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9.5}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    fig.clf()
    return path


def _finite(x: np.ndarray, what: str) -> np.ndarray:
    keep = np.isfinite(x)
    if not keep.all():
        log.warning("%s: %d non-finite values left out of the plot", what, int((~keep).sum()))
    return keep


# --- ROC ------------------------------------------------------------------------------------
def _roc_axes(fig: Figure, title: str):
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="#999999", label="chance (AUROC 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


def _draw_roc(ax, y: np.ndarray, s: np.ndarray, name: str, color: str, mark_youden: bool = True,
              band: bool = False):
    fpr, tpr, thr, youden = roc_with_youden(y, s)
    if np.isnan(youden):
        return
    auc = auroc(y, s)
    label = f"{name}  AUROC {auc:.3f}"
    if band:  # 95 % CI: DeLong for the AUROC, a stratified bootstrap for the curve
        ci = delong_ci(y, s)
        lo, hi = ci.low, ci.high
        label += f" [{lo:.2f}, {hi:.2f}]"
        grid, t_lo, t_hi = roc_band(y, s)
        ax.fill_between(grid, t_lo, t_hi, color=color, alpha=0.15, lw=0)
    ax.plot(fpr, tpr, lw=2, color=color, label=label)
    if mark_youden:
        i = int(np.argmax(tpr - fpr))
        ax.plot(fpr[i], tpr[i], "o", ms=8, mfc="white", mec=color, mew=2)
        right = fpr[i] > 0.55  # keep the label inside the axes
        ax.annotate(
            f"Youden: sens {tpr[i]:.2f}, spec {1 - fpr[i]:.2f}\n(score > {format_value(youden)})",
            (fpr[i], tpr[i]), xytext=(-8 if right else 8, -26 if tpr[i] > 0.3 else 10),
            textcoords="offset points", fontsize=8.5, color=color,
            ha="right" if right else "left",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
        )


def plot_roc(
    path: str | Path, labels: Any, scores: Mapping[str, Any] | Any, title: str = ""
) -> Path:
    """ROC curve of each score (``{name: scores}``; one array is named "score"), AUROC with its
    95 % CI (DeLong) in the legend, the curve's pointwise 95 % band (stratified bootstrap)
    shaded, Youden's cut-off (max TPR - FPR) marked with a circle, chance diagonal."""
    if not isinstance(scores, Mapping):
        scores = {"score": scores}
    y = _as_numpy(labels).reshape(-1)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.2, 6.2))
        ax = _roc_axes(fig, title)
        for k, (name, s) in enumerate(scores.items()):
            _draw_roc(ax, y, _as_numpy(s).reshape(-1), name, CURVE_COLORS[k % len(CURVE_COLORS)],
                      band=True)
        ax.plot([], [], "o", mfc="white", mec="k", label="Youden cut-off")
        ax.legend(loc="lower right")
        return _save(fig, path)


def plot_roc_per_finding(
    path: str | Path,
    labels: Any,
    scores: Any,
    findings: Sequence[Any],
    title: str = "",
    sep: str | None = "|",
    min_n: int = 1,
) -> Path:
    """ROC of each finding's abnormal items against all normal items (as in
    :func:`experiments.evaluation.per_finding_metrics`), plus "all abnormal" in black.
    Findings with fewer than ``min_n`` abnormal items are left out (counted in the title)."""
    y = _as_numpy(labels).reshape(-1)
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(y == 1):
        for name in dict.fromkeys(_split_findings(findings[i], sep) or ["unspecified"]):
            groups.setdefault(name, []).append(int(i))
    normal = np.flatnonzero(y == 0)
    shown = {k: v for k, v in groups.items() if len(v) >= min_n}
    dropped = len(groups) - len(shown)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.2, 6.2))
        full_title = title + (f"\n({dropped} findings with < {min_n} cases not shown)"
                              if dropped else "")
        ax = _roc_axes(fig, full_title)
        _draw_roc(ax, y, s, f"all abnormal (n={int((y == 1).sum())})", "#000000")
        order = sorted(shown, key=lambda k: -len(shown[k]))
        for k, name in enumerate(order):
            sel = np.concatenate([normal, shown[name]])
            _draw_roc(ax, y[sel], s[sel], f"{name} (n={len(shown[name])})",
                      CURVE_COLORS[k % (len(CURVE_COLORS) - 1)], mark_youden=False)
        ax.legend(loc="lower right")
        return _save(fig, path)


# --- distributions --------------------------------------------------------------------------
def _finish_density(fig, ax, xlabel: str, title: str, path) -> Path:
    """Labels, grid, legend and title of a density plot; saves it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_histograms(
    path: str | Path,
    scores: Any,
    labels: Any,
    xlabel: str,
    title: str = "",
    thresholds: Mapping[str, float] | None = None,
    bins: int | str = "auto",
) -> Path:
    """Score histograms per class on shared bins, as densities (classes of different size
    compare), with optional vertical threshold lines ``{"name": value}``."""
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    y = _as_numpy(labels).reshape(-1)
    keep = _finite(s, "plot_histograms")
    s, y = s[keep], y[keep]
    edges = np.histogram_bin_edges(s, bins=bins) if s.size else np.linspace(0, 1, 11)
    if len(edges) > 61:  # 'auto' can give hundreds of bins on large sets
        edges = np.linspace(edges[0], edges[-1], 61)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(7.5, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        for c in (0, 1, -1):
            sc = s[y == c]
            if sc.size == 0:
                continue
            kw = {"bins": edges, "density": True, "color": CLASS_COLORS[c]}
            ax.hist(sc, histtype="stepfilled", alpha=0.35, **kw)
            ax.hist(sc, histtype="step", lw=1.8, label=f"{CLASS_NAMES[c]} (n={sc.size})", **kw)
        for k, (name, t) in enumerate((thresholds or {}).items()):
            if t is not None and math.isfinite(t):
                ax.axvline(t, color="k", ls=("--", ":", "-.")[k % 3], lw=1.3,
                           label=f"{name} = {format_value(float(t))}")
        return _finish_density(fig, ax, xlabel, title, path)


def plot_scatter(
    path: str | Path,
    x: Any,
    y: Any,
    labels: Any,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """Scatter of ``y`` against ``x`` coloured by class (e.g. fraction of zero pixels vs score)."""
    xa = _as_numpy(x).astype(np.float64).reshape(-1)
    ya = _as_numpy(y).astype(np.float64).reshape(-1)
    lab = _as_numpy(labels).reshape(-1)
    if not (xa.size == ya.size == lab.size):
        raise ValueError(f"plot_scatter: x, y, labels differ in length: {xa.size}, {ya.size}, "
                         f"{lab.size}")
    keep = _finite(xa, "plot_scatter x") & _finite(ya, "plot_scatter y")
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.5, 5))
        ax = fig.add_subplot(1, 1, 1)
        for c, marker in ((0, "o"), (1, "^"), (-1, "s")):
            sel = keep & (lab == c)
            if sel.any():
                ax.scatter(xa[sel], ya[sel], s=18, alpha=0.65, marker=marker,
                           color=CLASS_COLORS[c], label=f"{CLASS_NAMES[c]} (n={int(sel.sum())})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title)
        return _save(fig, path)


# --- images ---------------------------------------------------------------------------------
def middle_slice_montage(volume: Any, n: int = 6, ncols: int | None = None) -> np.ndarray:
    """(D, H, W) volume -> 2D montage of ``n`` axial slices evenly spaced over the middle half
    (25 %-75 % of D), tiled row-major into ``ncols`` (default ceil(n/2)) columns; blank tiles 0.
    """
    v = _as_numpy(volume)
    if v.ndim == 4 and v.shape[0] == 1:
        v = v[0]  # (1, D, H, W) -> (D, H, W)
    if v.ndim != 3:
        raise ValueError(f"middle_slice_montage: expected (D, H, W), got shape {v.shape}")
    d, h, w = v.shape
    n = max(1, min(n, d))
    idx = np.unique(np.round(np.linspace(0.25 * (d - 1), 0.75 * (d - 1), n)).astype(int))
    ncols = ncols or max(1, math.ceil(len(idx) / 2))
    nrows = math.ceil(len(idx) / ncols)
    out = np.zeros((nrows * h, ncols * w), dtype=v.dtype)  # (rows*H, cols*W)
    for k, z in enumerate(idx):
        r, c = divmod(k, ncols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = v[z]
    return out


def _as_2d(img: Any, what: str, i: int) -> np.ndarray:
    a = _as_numpy(img).astype(np.float32)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]  # (1, H, W) -> (H, W)
    if a.ndim != 2:
        raise ValueError(
            f"{what}: item {i} has shape {a.shape}; pass 2D arrays (for 3D volumes use "
            "middle_slice_montage(), or one slice: volume[D // 2])"
        )
    return a


def _downsample(a: np.ndarray, target: int = 320) -> np.ndarray:
    """Block-mean an image to about the panel's pixel size before drawing: a 1024² radiograph
    shown in a 250-pixel panel needs no more, and matplotlib's resampling of full-size images
    takes ~1.5 s each (a 36-image grid took a minute)."""
    f = max(a.shape) // target
    if f < 2:
        return a
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _grid_shape(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def plot_image_grid(
    path: str | Path,
    images: Sequence[Any],
    captions: Sequence[str],
    ncols: int = 6,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Grayscale images with a caption each (e.g. the 36 most / least anomalous test items).

    Intensities are shown on one scale for all images: [0, 1] when every image lies in it (the
    data modules' output), else the pooled min/max, unless ``vmin``/``vmax`` are given.
    """
    if len(images) != len(captions):
        raise ValueError(f"plot_image_grid: {len(images)} images, {len(captions)} captions")
    imgs = [_downsample(_as_2d(im, "plot_image_grid", i)) for i, im in enumerate(images)]
    vmin, vmax = _intensity_range(imgs, vmin, vmax)
    n = max(1, len(imgs))
    nrows, ncols = _grid_shape(n, ncols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(2.3 * ncols, 2.45 * nrows + (0.5 if title else 0)))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if k < len(imgs):
                ax.imshow(imgs[k], cmap="gray", vmin=vmin, vmax=vmax, interpolation="antialiased")
                ax.set_title(str(captions[k]), fontsize=8.5)
        if not imgs:
            axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
        if title:
            fig.suptitle(title, fontsize=13)
        fig.tight_layout()
        return _save(fig, path)


def _intensity_range(imgs, vmin, vmax) -> tuple[float, float]:
    if vmin is not None and vmax is not None or not imgs:
        return vmin, vmax
    lo = min(float(np.nanmin(a)) for a in imgs)
    hi = max(float(np.nanmax(a)) for a in imgs)
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    return (lo if vmin is None else vmin), (hi if vmax is None else vmax)


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an anomaly map to the image size (a patch map is piecewise constant:
    bilinear keeps its levels and avoids a blocky look only at the edges)."""
    if a.shape == shape:
        return a
    from scipy.ndimage import zoom

    out = zoom(a, (shape[0] / a.shape[0], shape[1] / a.shape[1]), order=1)
    return out[: shape[0], : shape[1]]


def _heat_rgba(a: np.ndarray, cmap, norm, alpha: float) -> np.ndarray:
    """Heat map as RGBA whose opacity grows with the score (from 0.2*alpha at vmin to alpha at
    vmax): low scores only tint the anatomy, high scores stand out."""
    v = np.nan_to_num(np.clip(np.ma.filled(norm(a), 0.0), 0.0, 1.0))  # (H, W) in [0, 1]
    rgba = cmap(v)  # (H, W, 4)
    rgba[..., 3] = alpha * (0.2 + 0.8 * v)
    return rgba


def plot_overlays(
    path: str | Path,
    images: Sequence[Any],
    maps: Sequence[Any],
    captions: Sequence[str],
    title: str = "",
    masks: Sequence[Any] | None = None,
    ncases: int = 4,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.6,
    cmap: str = "jet",
    map_label: str = "anomaly score",
) -> Path:
    """Each case as two panels: the grayscale image, and the image with its anomaly map as a
    semi-transparent heat map (``cmap``; opacity grows with the score up to ``alpha``); ``ncases`` cases per row.

    All maps share ONE colour scale (pooled min/max unless ``vmin``/``vmax``), shown by one
    colorbar, so a hot region means the same score in every case. Maps of another shape are
    resized to the image. Optional ``masks`` (None entries allowed) are outlined in green.
    """
    if not (len(images) == len(maps) == len(captions)):
        raise ValueError(f"plot_overlays: {len(images)} images, {len(maps)} maps, "
                         f"{len(captions)} captions")
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"plot_overlays: {len(masks)} masks for {len(images)} images")
    imgs = [_downsample(_as_2d(im, "plot_overlays", i)) for i, im in enumerate(images)]
    raw_maps = [_as_2d(m, "plot_overlays map", i) for i, m in enumerate(maps)]
    amaps = [_resize(_downsample(a), imgs[i].shape) for i, a in enumerate(raw_maps)]
    if raw_maps:  # colour scale from the full-resolution maps (block means shave the peaks)
        finite = np.concatenate([a[np.isfinite(a)].ravel() for a in raw_maps])
        if vmin is None:
            vmin = float(finite.min()) if finite.size else 0.0
        if vmax is None:
            vmax = float(finite.max()) if finite.size else 1.0
    ivmin, ivmax = _intensity_range(imgs, None, None)
    n = max(1, len(imgs))
    nrows, nc = _grid_shape(n, ncases)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(2.6 * 2 * nc + 1.2, 2.6 * nrows + (0.5 if title else 0)))
        axes = fig.subplots(nrows, 2 * nc, squeeze=False)
        norm = Normalize(vmin=vmin, vmax=vmax)
        cmap_obj = matplotlib.colormaps[cmap]
        for ax in axes.flat:
            ax.set_axis_off()
        for k in range(len(imgs)):
            r, c = divmod(k, nc)
            a0, a1 = axes[r, 2 * c], axes[r, 2 * c + 1]
            a0.imshow(imgs[k], cmap="gray", vmin=ivmin, vmax=ivmax)
            a0.set_title(str(captions[k]), fontsize=8.5, loc="left")
            a1.imshow(imgs[k], cmap="gray", vmin=ivmin, vmax=ivmax)
            a1.imshow(_heat_rgba(amaps[k], cmap_obj, norm, alpha), interpolation="bilinear")
            a1.set_title("anomaly map", fontsize=8.5)
            m = None if masks is None else masks[k]
            if m is not None:
                m = _downsample(_as_2d(m, "plot_overlays mask", k).astype(np.float32))
                m = _resize(m, imgs[k].shape)
                if (m > 0.5).any() and (m <= 0.5).any():
                    for ax in (a0, a1):
                        ax.contour(m, levels=[0.5], colors="#00FF00", linewidths=1.2)
        if imgs:
            cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap_obj),
                              ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
            cb.set_label(map_label + ("\n(green outline: lesion mask)" if masks is not None
                                      else ""))
        if title:
            fig.suptitle(title, fontsize=13)
        return _save(fig, path)


def plot_metric_table(path: str | Path, rows: Sequence[Mapping[str, Any]], title: str = "") -> Path:
    """A table of dicts (one row each) as an image, e.g. for slides."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[format_value(r.get(c)) if c in r else "" for c in cols] for r in rows]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(4.0, 1.5 * len(cols)), 0.45 * (len(rows) + 1) + 0.6))
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        if cells:
            tab = ax.table(cellText=cells, colLabels=cols, loc="center", cellLoc="center")
            tab.auto_set_font_size(False)
            tab.set_fontsize(10)
            tab.scale(1, 1.4)
        if title:
            ax.set_title(title)
        return _save(fig, path)


def plot_mosaic(
    path: str | Path,
    images: Sequence[Any],
    labels: Sequence[int] | None = None,
    ncols: int = 40,
    tile: int = 32,
    title: str = "",
) -> Path:
    """Many images as one mosaic of ``tile``-pixel thumbnails in the given order, row by row
    (e.g. the 1,000 most likely abnormal test images, Shibata et al. Figs. 9-10), no captions;
    with ``labels`` each thumbnail gets a 1-pixel frame in its class colour. One intensity
    scale for all ([0, 1] when every image lies in it)."""
    imgs = [_as_2d(im, "plot_mosaic", i) for i, im in enumerate(images)]
    thumbs = [_resize(_downsample(im, 2 * tile).astype(np.float64), (tile, tile)) for im in imgs]
    vmin, vmax = _intensity_range(thumbs, None, None)
    n = max(1, len(thumbs))
    nrows, ncols = _grid_shape(n, ncols)
    canvas = np.ones((nrows * tile, ncols * tile, 3))  # white where there is no image
    for k, t in enumerate(thumbs):
        g = np.clip((t - vmin) / max(vmax - vmin, 1e-12), 0, 1)
        rgb = np.repeat(g[..., None], 3, axis=2)
        if labels is not None:
            c = CLASS_COLORS.get(int(labels[k]), CLASS_COLORS[-1])
            color = [int(c[j:j + 2], 16) / 255 for j in (1, 3, 5)]
            rgb[0, :], rgb[-1, :], rgb[:, 0], rgb[:, -1] = color, color, color, color
        r, c0 = divmod(k, ncols)
        canvas[r * tile:(r + 1) * tile, c0 * tile:(c0 + 1) * tile] = rgb
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(4.0, ncols * tile / 64), max(2.0, nrows * tile / 64 + 0.6)))
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(canvas, interpolation="nearest")
        ax.set_axis_off()
        if title:
            ax.set_title(title)
        fig.tight_layout()
        return _save(fig, path)


def plot_histograms_per_finding(
    path: str | Path,
    scores: Any,
    labels: Any,
    findings: Sequence[str],
    xlabel: str,
    title: str = "",
) -> Path:
    """Density histograms of a score for the normal items and for each finding's abnormal
    items, on shared bins (e.g. the likelihood-only score per label, Shibata et al.
    Appendix A, Fig. A.21)."""
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    y = _as_numpy(labels).reshape(-1)
    f = np.asarray([str(x or "") for x in findings], dtype=object)
    keep = _finite(s, "plot_histograms_per_finding")
    s, y, f = s[keep], y[keep], f[keep]
    groups = [("normal", s[y == 0])]
    f = np.where(f == "", "abnormal", f)  # abnormal items without a finding
    for name in sorted(set(f[y == 1])):
        groups.append((name, s[(y == 1) & (f == name)]))
    edges = np.histogram_bin_edges(s, bins="auto") if s.size else np.linspace(0, 1, 11)
    if len(edges) > 61:
        edges = np.linspace(edges[0], edges[-1], 61)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(7.5, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        for k, (name, sc) in enumerate(groups):
            if sc.size == 0:
                continue
            color = CLASS_COLORS[0] if k == 0 else CURVE_COLORS[1 + (k - 1) % 7]
            ax.hist(sc, bins=edges, density=True, histtype="step", lw=1.8, color=color,
                    label=f"{name[:28]} (n={sc.size})")
        return _finish_density(fig, ax, xlabel, title, path)
