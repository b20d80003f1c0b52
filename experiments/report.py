"""A self-contained HTML report: headings, text, metric tables and figures.

The page uses inline CSS only: no JavaScript, fonts, scripts or styles from the internet, so it
opens on a hospital workstation without network access. Figures live in ``out_dir/figures/``
and are linked relatively (copy the whole ``out_dir`` to move the report), or embedded as
base64 with ``write(embed_images=True)`` for a single file that can be e-mailed.

Usage::

    rep = Report(out_dir, "Patch detector, PadChest test set")
    rep.add_metrics(metrics, title="Test set")
    rep.add_figure(plots.plot_roc(out_dir / "figures/roc.png", labels, {"score": s}), "ROC")
    rep.write()  # -> out_dir/report.html
"""

from __future__ import annotations

import base64
import html
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from experiments.evaluation import flatten_metrics, format_value

# Plain-language definitions shown under the tables (Kim et al. 2023, eqs. 7-10).
GLOSSARY = {
    "auroc": "Area under the ROC curve: the probability that a randomly chosen abnormal image "
             "scores higher than a randomly chosen normal one (0.5 = chance, 1 = perfect). "
             "Independent of the threshold.",
    "accuracy": "(TP + TN) / all images: fraction classified correctly at the threshold (eq. 7).",
    "precision": "TP / (TP + FP): of the images flagged abnormal, the fraction that are "
                 "abnormal (positive predictive value, eq. 8).",
    "sensitivity": "TP / (TP + FN): of the abnormal images, the fraction flagged (recall, "
                   "true positive rate, eq. 9).",
    "specificity": "TN / (TN + FP): of the normal images, the fraction not flagged (eq. 10).",
    "threshold": "An image is flagged abnormal when its anomaly score is strictly greater "
                 "than this value.",
    "youden_threshold": "The threshold maximising Youden's J = sensitivity + specificity - 1 "
                        "on this set (chosen on the data it is reported on: optimistic).",
    "pixel_auroc": "AUROC over all pixels (voxels) of the images with lesion masks: how well "
                   "the anomaly map localises the lesion.",
}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1a1a1a;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45;
       background: #fff; }
h1 { font-size: 1.7em; border-bottom: 3px solid #0072B2; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
p { margin: .6em 0; }
table { border-collapse: collapse; margin: .8em 0 1.2em; font-size: .95em; }
th, td { border: 1px solid #d0d0d0; padding: .35em .8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef3f8; }
tr:nth-child(even) td { background: #fafafa; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1.2em 0 1.8em; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #444; font-size: .92em; margin-top: .35em; }
.missing { color: #b00020; }
dl.glossary dt { font-weight: 600; margin-top: .5em; }
dl.glossary dd { margin-left: 1.2em; color: #333; }
footer { margin-top: 3em; padding-top: .6em; border-top: 1px solid #ccc; color: #666;
         font-size: .85em; }
@media print { body { max-width: none; } figure { break-inside: avoid; } }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cell(v: Any, ci: Any = None) -> str:
    cls = ' class="num"' if _is_num(v) or (isinstance(v, Mapping) and "mean" in v) else ""
    text = format_value(v) + (f" {format_value(ci)}" if ci is not None else "")
    return f"<td{cls}>{_esc(text)}</td>"


class Report:
    """Collects blocks and writes ``out_dir/report.html`` (see module docstring)."""

    def __init__(self, out_dir: str | Path, title: str):
        self.out_dir = Path(out_dir)
        self.figures_dir = self.out_dir / "figures"
        self.title = title
        self._blocks: list[str | tuple[str, Path, str]] = []
        self._glossary_keys: set[str] = set()
        self._figures: list[Path] = []

    # --- blocks -----------------------------------------------------------------------------
    def add_heading(self, text: str, level: int = 2) -> Report:
        level = min(max(level, 2), 4)
        self._blocks.append(f"<h{level}>{_esc(text)}</h{level}>")
        return self

    def add_text(self, text: str) -> Report:
        """Plain text; blank lines separate paragraphs; HTML is escaped, not interpreted."""
        for para in str(text).strip().split("\n\n"):
            if para.strip():
                body = "<br>".join(_esc(line) for line in para.strip().splitlines())
                self._blocks.append(f"<p>{body}</p>")
        return self

    def add_metrics(self, metrics: Mapping[str, Any], title: str = "") -> Report:
        """A metric/value table. Nested dicts are flattened (``a/b``); fold summaries
        ``{"mean", "sd"}`` print as ``mean ± sd``; a dict of dicts (e.g. per-finding metrics)
        becomes one row per key."""
        if metrics and all(isinstance(v, Mapping) and not {"mean", "sd"} <= set(v)
                           for v in metrics.values()):
            rows = [{"": k, **dict(v)} for k, v in metrics.items()]
            return self.add_table(rows, title=title)
        flat = flatten_metrics(metrics, split_intervals=False)
        self._glossary_keys.update(k.rsplit("/", 1)[-1] for k in flat)
        # an interval <key>_ci = [low, high] is shown next to <key>'s value
        rows = [(k, v, flat.get(f"{k}_ci")) for k, v in flat.items()
                if not (k.endswith("_ci") and k[:-3] in flat)]
        body = "".join(f"<tr><th scope='row'>{_esc(k)}</th>{_cell(v, ci)}</tr>"
                       for k, v, ci in rows)
        cap = f"<caption>{_esc(title)}</caption>" if title else ""
        self._blocks.append(
            f"<table class='metrics'>{cap}<thead><tr><th>metric</th><th>value [95 % CI]</th>"
            f"</tr></thead><tbody>{body}</tbody></table>"
        )
        return self

    def add_table(self, rows: Sequence[Mapping[str, Any]], title: str = "") -> Report:
        """A table with one row per dict; columns in order of first appearance."""
        cols = list(dict.fromkeys(k for r in rows for k in r))
        self._glossary_keys.update(str(c) for c in cols)
        head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(_cell(r[c]) if c in r else "<td></td>" for c in cols) + "</tr>"
            for r in rows
        )
        cap = f"<caption>{_esc(title)}</caption>" if title else ""
        empty = "" if rows else "<tr><td>(no rows)</td></tr>"
        self._blocks.append(
            f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}{empty}</tbody></table>"
        )
        return self

    def add_figure(self, png_path: str | Path, caption: str = "") -> Report:
        """Link a PNG. Files outside ``out_dir`` are copied into ``out_dir/figures/``."""
        src = Path(png_path)
        if not src.is_file():
            raise FileNotFoundError(
                f"Report.add_figure: {src} does not exist; save the figure before adding it"
            )
        out = self.out_dir.resolve()
        try:
            src.resolve().relative_to(out)
            dst = src
        except ValueError:
            self.figures_dir.mkdir(parents=True, exist_ok=True)
            dst = self.figures_dir / src.name
            if dst.exists() and dst.resolve() != src.resolve():
                dst = self.figures_dir / f"{src.stem}_{len(self._figures)}{src.suffix}"
            shutil.copyfile(src, dst)
        self._figures.append(dst)
        self._blocks.append(("figure", dst, caption))  # rendered in write()
        return self

    # --- output -----------------------------------------------------------------------------
    def _figure_html(self, dst: Path, caption: str, embed: bool) -> str:
        rel = dst.resolve().relative_to(self.out_dir.resolve()).as_posix()
        if embed:
            data = base64.b64encode(dst.read_bytes()).decode("ascii")
            src = f"data:image/png;base64,{data}"
        else:
            src = _esc(rel)
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        return f"<figure><img src=\"{src}\" alt=\"{_esc(caption or rel)}\">{cap}</figure>"

    def _glossary_html(self) -> str:
        keys = [k for k in GLOSSARY if k in self._glossary_keys]
        if not keys:
            return ""
        items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(GLOSSARY[k])}</dd>" for k in keys)
        return ("<h2>How to read these numbers</h2>"
                "<p>Label 1 = abnormal; a higher anomaly score means more anomalous. "
                "TP/FP/TN/FN: true/false positives/negatives, abnormal = positive.</p>"
                f"<dl class='glossary'>{items}</dl>")

    def write(self, embed_images: bool = False, glossary: bool = True) -> Path:
        """Write ``out_dir/report.html`` and return its path."""
        from experiments.config import git_commit

        self.out_dir.mkdir(parents=True, exist_ok=True)
        parts = []
        for block in self._blocks:
            if isinstance(block, tuple):
                parts.append(self._figure_html(block[1], block[2], embed_images))
            else:
                parts.append(block)
        if glossary:
            parts.append(self._glossary_html())
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        footer = (f"<footer>Generated {_esc(now)} &middot; git commit "
                  f"<code>{_esc(git_commit())}</code> &middot; medanomaly</footer>")
        page = (
            "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
            f"<title>{_esc(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{_esc(self.title)}</h1>\n" + "\n".join(parts) + f"\n{footer}\n</body>\n</html>\n"
        )
        path = self.out_dir / "report.html"
        path.write_text(page, encoding="utf-8")
        return path
