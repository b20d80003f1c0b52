"""Head CT (BCT) volumes for the 3D flow posterior (Shibata et al. 2021, section 3.2).

Layout under ``data.root``::

    labels.csv                  case,label[,finding][,mask][,series_uid]
    <case>/                     one DICOM series per folder (slices in any order / names), or
    <case>.npy                  a (D, H, W) volume in HU

``case`` is a folder or file name relative to the root (``.npy`` may be omitted). ``label``
is ``normal`` / ``abnormal`` (or 0 / 1); ``finding`` (e.g. ``haemorrhage``, ``infarction``)
is kept for per-finding ROC curves; ``mask`` is an optional (D, H, W) ``.npy`` lesion mask
(default: ``masks/<case>.npy`` when present); ``series_uid`` picks one SeriesInstanceUID in a
case folder that holds several series (otherwise such a case is skipped with its series
listed).
Preprocessing: modality LUT -> HU -> I = clip(HU + 14, 0, 127) (the paper's 7-bit brain
window, eq. 4) -> trilinear resample to ``data.volume_size`` -> /127. The paper's input size is
32x128x128 (Appendix B); the trilinear resampling of every series to 32 slices is ours, not
the paper's: it does not say how its volumes were brought to 32 slices. Sets: S_normal 250 /
S_mixture 250 + 250 / S_unknown 33 + 33 in the paper (``configs/data/bct.yaml``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from datamodules.base import ABNORMAL, NORMAL, Item
from datamodules.common import FileDataModule
from datamodules.splits import flow_index

log = logging.getLogger(__name__)

LABELS_CSV = "labels.csv"
_LABEL_VALUES = {"normal": NORMAL, "0": NORMAL, "abnormal": ABNORMAL, "1": ABNORMAL}


def _text(value) -> str:
    """A CSV cell as str ("" for missing / NaN)."""
    return value if isinstance(value, str) else ""


def load_index(csv_path: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """Rows ``case, label (0/1), finding, path, mask_path, series_uid`` (path None when
    absent)."""
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: BCT labels CSV not found (columns case,label).")
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [c for c in ("case", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing required column(s) {missing}; found "
                         f"{list(df.columns)}. Expected case,label[,finding][,mask][,series_uid].")
    labels = df["label"].str.strip().str.lower().map(_LABEL_VALUES)
    if labels.isna().any():
        bad = sorted(set(df.loc[labels.isna(), "label"]))[:5]
        raise ValueError(f"{csv_path}: label must be normal/abnormal or 0/1; found {bad}.")
    root_resolved = root.resolve()
    for col in [c for c in ("case", "mask") if c in df.columns]:
        for value in df[col]:
            if value and not (root / value).resolve().is_relative_to(root_resolved):
                raise ValueError(f"{csv_path}: {col} {value!r} points outside data.root; "
                                 "give paths relative to the root, inside it.")
    if df["case"].duplicated().any():
        raise ValueError(f"{csv_path}: duplicate case(s) {df.loc[df['case'].duplicated(), 'case'].tolist()[:5]}.")

    def resolve(case: str) -> str | None:
        for p in (root / case, root / f"{case}.npy"):
            if p.is_dir() or (p.is_file() and p.suffix.lower() == ".npy"):
                return str(p)
        return None

    def mask_of(row) -> str | None:
        if "mask" in df.columns and row["mask"]:
            return str(root / row["mask"])
        default = root / "masks" / f"{Path(row['case']).name.removesuffix('.npy')}.npy"
        return str(default) if default.is_file() else None

    out = pd.DataFrame({
        "case": df["case"],
        "label": labels.astype(int),
        "finding": df["finding"].str.strip() if "finding" in df.columns else "",
        "path": df["case"].map(resolve),
        "mask_path": df.apply(mask_of, axis=1) if len(df) else [],
        "series_uid": df["series_uid"].str.strip() if "series_uid" in df.columns else "",
    })
    return out


class BrainCTDataModule(FileDataModule):
    """One case = one DICOM series folder or one ``.npy`` HU volume."""

    is_3d = True
    root_holds = "the folder holding labels.csv"

    def index_items(self) -> dict[tuple[str, str], list[Item]]:
        csv = self.cfg.labels_csv or LABELS_CSV
        csv_path = Path(csv) if Path(csv).is_absolute() else self.root / csv
        df = load_index(csv_path, self.root)
        absent = df["path"].isna()
        if absent.any():
            log.warning("BCT: %d of %d cases listed in %s have no folder/.npy under %s and were "
                        "dropped.", int(absent.sum()), len(df), csv_path.name, self.root)
        df = df[~absent]
        rows = {r.case: r for r in df.itertuples(index=False)}
        self.series_uid.update({r.path: r.series_uid for r in rows.values() if r.series_uid})
        def items(cases, label, labelled):
            return [Item(path=rows[k].path, label=label,
                         finding=_text(rows[k].finding) if labelled else "",
                         mask_path=(_text(rows[k].mask_path) or None) if labelled else None,
                         group_id=k) for k in cases]

        return flow_index(df.loc[df["label"] == NORMAL, "case"].tolist(),
                          df.loc[df["label"] == ABNORMAL, "case"].tolist(), self.cfg, items)
