"""RSNA Pneumonia Detection Challenge for the semi-supervised flow posterior (Shibata et al.
2021, section 3.1).

Files under ``data.root``::

    stage_2_train_labels.csv          patientId,x,y,width,height,Target  (one row per box)
    stage_2_detailed_class_info.csv   patientId,class  (Normal | No Lung Opacity / Not Normal |
                                      Lung Opacity; rows repeated like the labels)
    stage_2_train_images/<patientId>.dcm   JPEG Baseline, 1024x1024, 8-bit, MONOCHROME2

Normal = class ``Normal``; the two other classes are non-normal (abnormal). Sets (paper
Table 1, sizes from ``data.n_*``; see :func:`datamodules.splits.flow_sets` for how sizes larger
than the data set are handled): S_normal -> train/normal, S_mixture -> train/mixture
(unlabeled), S_unknown -> val + test (``data.val_fraction`` to val). Each val/test item keeps
its class in ``Item.finding`` for per-label ROC curves. Images are resized to
``data.image_size`` (paper: 512).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from datamodules.base import Item
from datamodules.common import FileDataModule
from datamodules.splits import flow_index

log = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
NORMAL_CLASS = "Normal"
# Optional lesion masks <root>/masks/<patientId>.png (not part of RSNA; the phantoms write them).
MASK_DIR = "masks"


def _read(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV not found.")
    try:
        df = pd.read_csv(path)  # plain, .gz or single-file .zip
    except Exception as e:
        raise ValueError(f"{path}: cannot read CSV ({type(e).__name__}: {e}).") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; found {list(df.columns)}.")
    return df


def load_index(labels_csv: str | Path, class_csv: str | Path | None = None) -> pd.DataFrame:
    """One row per patient: ``patientId``, ``Target`` (1 if any box), ``class``, ``n_boxes``.

    Without ``class_csv`` the class is derived where it can be: ``Lung Opacity`` for Target 1,
    and "" (unknown: Normal or No Lung Opacity / Not Normal) for Target 0.
    """
    labels = _read(Path(labels_csv), ("patientId", "Target"))
    per_patient = labels.groupby("patientId", sort=False).agg(
        Target=("Target", "max"), n_boxes=("Target", "sum")
    ).reset_index()
    if class_csv is None:
        per_patient["class"] = per_patient["Target"].map({1: "Lung Opacity"}).fillna("")
        return per_patient[["patientId", "Target", "class", "n_boxes"]]

    classes = _read(Path(class_csv), ("patientId", "class"))
    unknown = sorted(set(classes["class"]) - set(CLASSES))
    if unknown:
        raise ValueError(f"{class_csv}: unknown class value(s) {unknown}; expected {CLASSES}.")
    per_class = classes.drop_duplicates()
    conflict = per_class["patientId"].duplicated(keep=False)
    if conflict.any():
        raise ValueError(
            f"{class_csv}: {int(per_class[conflict]['patientId'].nunique())} patients have "
            "more than one class."
        )
    df = per_patient.merge(per_class, on="patientId", how="outer", indicator=True)
    only = df["_merge"] != "both"
    if only.any():
        log.warning("RSNA: %d patients are in only one of the two CSVs and were dropped.",
                    int(only.sum()))
    df = df[~only].drop(columns="_merge")
    df["Target"] = df["Target"].astype(int)
    bad = (df["Target"] == 1) != (df["class"] == "Lung Opacity")
    if bad.any():
        log.warning("RSNA: %d patients have Target inconsistent with their class.", int(bad.sum()))
    return df[["patientId", "Target", "class", "n_boxes"]].reset_index(drop=True)


class RSNADataModule(FileDataModule):
    """S_normal / S_mixture / S_unknown from the RSNA Pneumonia training set."""

    root_holds = "the Kaggle RSNA folder"

    def _path(self, key: str, default: str) -> Path:
        value = self.cfg[key] or default
        return Path(value) if Path(value).is_absolute() else self.root / value

    def _with_images(self, df: pd.DataFrame, image_dir: Path) -> pd.DataFrame:
        """Rows whose ``<patientId>.dcm`` is in ``image_dir`` (file names only: no reads)."""
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{image_dir}: RSNA image folder not found (data.image_dir"
                                    " / data.extra_image_dir).")
        present = {p.stem for p in image_dir.glob("*.dcm")}
        absent = ~df["patientId"].isin(present)
        if absent.any():
            log.warning("RSNA: %d of %d patients have no image in %s and were dropped.",
                        int(absent.sum()), len(df), image_dir)
        return df[~absent].assign(image_dir=str(image_dir))

    def index_items(self) -> dict[tuple[str, str], list[Item]]:
        df = load_index(self._path("labels_csv", LABELS_CSV), self._path("class_csv", CLASS_CSV))
        df = self._with_images(df, self._path("image_dir", IMAGE_DIR))
        if self.cfg.extra_class_csv:
            extra = _read(self._path("extra_class_csv", ""), ("patientId", "class"))
            extra = extra[["patientId", "class"]].drop_duplicates()
            unknown = sorted(set(extra["class"]) - set(CLASSES))
            if unknown:
                raise ValueError(f"data.extra_class_csv: unknown class value(s) {unknown}; "
                                 f"expected {CLASSES}.")
            if extra["patientId"].duplicated().any() or extra["patientId"].isin(
                    df["patientId"]).any():
                raise ValueError("data.extra_class_csv: patients listed twice or also in the "
                                 "training labels; give each extra image one row.")
            extra = self._with_images(extra, self._path("extra_image_dir",
                                                        "stage_2_test_images"))
            log.info("RSNA: %d extra labelled images from data.extra_class_csv", len(extra))
            df = pd.concat([df, extra], ignore_index=True)
        cls = dict(zip(df["patientId"], df["class"]))
        folder = dict(zip(df["patientId"], df["image_dir"]))
        masks = {p.stem for p in (self.root / MASK_DIR).glob("*.png")}

        def items(ids, label, labelled):
            return [Item(path=str(Path(folder[p]) / f"{p}.dcm"), label=label,
                         finding=cls[p] if labelled else "",
                         mask_path=str(self.root / MASK_DIR / f"{p}.png")
                         if labelled and p in masks else None,
                         group_id=p) for p in ids]

        return flow_index(df.loc[df["class"] == NORMAL_CLASS, "patientId"].tolist(),
                          df.loc[df["class"] != NORMAL_CLASS, "patientId"].tolist(),
                          self.cfg, items)
