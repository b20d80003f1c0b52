"""PadChest (Bustos et al. 2020) for the multiresolution patch detector (Kim et al. 2023).

Index: the labels CSV ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)``, rows with
``MethodLabel == 'Physician'`` and ``Projection == 'PA'``. ``Labels`` is a Python-list string,
parsed with :func:`ast.literal_eval`; each element is stripped and empty elements are removed.
A row is normal iff its labels are exactly ``['normal']``.

Policy for the two quality tags (``data.exclude_policy`` / ``data.suboptimal_policy``):

- ``drop`` (default): rows carrying the tag are removed (counted in the log).
- ``keep``: the row stays and the tag is ignored when deciding normal / abnormal; a row whose
  only label was the tag has no finding left and is removed as unlabeled (counted).

Rows without any label are removed (counted). Images: ``<root>/<ImageDir>/<ImageID>`` or flat
``<root>/<ImageID>``; rows whose image is absent are dropped with a logged count. Splits:
:func:`datamodules.splits.patient_split` (normal 70/15/15 by patient, abnormal only in
val/test, ``data.fold`` of ``data.n_folds``). Images are 16-bit PNGs, read without clipping
and resized to ``data.image_size`` (paper: 1024) with no intensity normalisation.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.base import ABNORMAL, NORMAL, Item
from datamodules.common import FileDataModule
from datamodules.splits import patient_split

log = logging.getLogger(__name__)

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
REQUIRED_COLUMNS = ("ImageID", "ImageDir", "PatientID", "MethodLabel", "Projection", "Labels")
OPTIONAL_COLUMNS = ("StudyID", "StudyDate_DICOM", "PatientSex_DICOM", "PatientBirth")
EXCLUDE_TAG = "exclude"
SUBOPTIMAL_TAG = "suboptimal study"
POLICIES = ("drop", "keep")
# Optional lesion masks <root>/masks/<ImageID> (not part of PadChest; the phantoms write them).
MASK_DIR = "masks"


def parse_labels(value) -> list[str] | None:
    """``"['normal', ' pleural effusion']"`` -> ``['normal', 'pleural effusion']``;
    None if the value is not a list literal."""
    if not isinstance(value, str):
        return None
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(parsed, (list, tuple)):
        return None
    return [s for s in (str(e).strip() for e in parsed) if s]


def read_csv(csv_path: str | Path, required=REQUIRED_COLUMNS) -> pd.DataFrame:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: labels CSV not found.")
    try:
        # Only the columns used: skips parsing the free-text reports (4x faster).
        df = pd.read_csv(csv_path, low_memory=False,  # .csv or .csv.gz (inferred)
                         usecols=lambda c: c in required or c in OPTIONAL_COLUMNS)
    except Exception as e:
        raise ValueError(f"{csv_path}: cannot read CSV ({type(e).__name__}: {e}).") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{csv_path}: missing required column(s) {missing}; found {list(df.columns)[:12]}"
            f"{' ...' if len(df.columns) > 12 else ''}. Is this the PadChest labels CSV?"
        )
    return df


def load_index(
    csv_path: str | Path, exclude_policy: str = "drop", suboptimal_policy: str = "drop"
) -> pd.DataFrame:
    """Selected PadChest rows (Physician-labelled, PA) with parsed labels.

    Returns a DataFrame with ``ImageID``, ``ImageDir`` (int), ``PatientID``, ``labels`` (list
    of str) and ``is_normal`` (bool), in CSV order.
    """
    for name, policy in (("exclude_policy", exclude_policy),
                         ("suboptimal_policy", suboptimal_policy)):
        if policy not in POLICIES:
            raise ValueError(f"data.{name}={policy!r} is not one of {list(POLICIES)}")
    df = read_csv(csv_path)
    n_all = len(df)
    if n_all == 0:
        raise ValueError(f"{csv_path}: the labels CSV has a header but no rows; use the full "
                         "PadChest labels CSV.")
    df = df[(df["MethodLabel"] == "Physician") & (df["Projection"] == "PA")].copy()
    n_sel = len(df)
    df["labels"] = df["Labels"].map(parse_labels)
    dropped: dict[str, int] = {}
    bad = df["labels"].isna()
    dropped["unparseable Labels"] = int(bad.sum())
    df = df[~bad]

    for tag, policy in ((EXCLUDE_TAG, exclude_policy), (SUBOPTIMAL_TAG, suboptimal_policy)):
        has = df["labels"].map(lambda ls, t=tag: t in ls)
        if policy == "drop":
            dropped[f"'{tag}' (policy drop)"] = int(has.sum())
            df = df[~has]
        else:
            df["labels"] = df["labels"].map(lambda ls, t=tag: [s for s in ls if s != t])
    empty = df["labels"].map(len) == 0
    dropped["no label"] = int(empty.sum())
    df = df[~empty].copy()

    df["is_normal"] = df["labels"].map(lambda ls: ls == ["normal"])
    df["ImageDir"] = pd.to_numeric(df["ImageDir"], errors="coerce").astype("Int64")
    df["PatientID"] = df["PatientID"].astype(str)
    log.info(
        "PadChest: %d of %d rows are Physician-labelled PA; %s; kept %d (%d normal, %d abnormal)",
        n_sel, n_all, ", ".join(f"{n} dropped: {k}" for k, n in dropped.items() if n) or
        "none dropped", len(df), int(df["is_normal"].sum()), int((~df["is_normal"]).sum()),
    )
    cols = ["ImageID", "ImageDir", "PatientID", "labels", "is_normal"]
    return df[cols + [c for c in df.columns if c not in cols]].reset_index(drop=True)


def find_csv(root: Path) -> Path:
    for name in (CSV_NAME, CSV_NAME + ".gz"):
        if (root / name).is_file():
            return root / name
    hits = sorted(root.glob("PADCHEST*labels*.csv*"))
    if hits:
        return hits[0]
    raise FileNotFoundError(
        f"No PadChest labels CSV in {root}; expected {CSV_NAME}[.gz] there, or set "
        "data.labels_csv=PATH."
    )


def _listing(folder: Path) -> set[str]:
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it}
    except OSError:
        return set()


def resolve_images(df: pd.DataFrame, root: Path) -> pd.Series:
    """Path of each row's image (``<root>/<ImageDir>/<ImageID>`` first, then flat), or None."""
    listings = {d: _listing(root / str(d)) for d in df["ImageDir"].dropna().unique()}
    flat = _listing(root)

    def path(row) -> str | None:
        d = row.ImageDir
        if d is not pd.NA and row.ImageID in listings.get(d, ()):
            return str(root / str(d) / row.ImageID)
        if row.ImageID in flat:
            return str(root / row.ImageID)
        return None

    return df.apply(path, axis=1)


def paper_cohort(df: pd.DataFrame, n_normal: int, n_abnormal: int, seed: int = 0
                 ) -> pd.DataFrame:
    """Kim et al.'s cohort size: ``n_normal`` normal and ``n_abnormal`` abnormal PA images
    (paper: 2,574 / 4,801), sampled by patient with a fixed seed.

    Patients with only normal images give the normals; patients with an abnormal image give
    the abnormals (their normal images are left out, so the counts are exact). Patients are
    taken in a seeded random order, whole, until the count is reached; the last patient's
    images are cut to the exact count. No single CSV filter reproduces the paper's cohort
    (README: "The paper's PadChest experiment"): this is a same-sized, patient-level sample, not the same images.
    """
    has_abn = df.groupby("PatientID")["is_normal"].agg(lambda v: not v.all())
    rng = np.random.default_rng(seed)
    keep = []
    for abnormal, n in ((False, n_normal), (True, n_abnormal)):
        patients = sorted(has_abn.index[has_abn == abnormal])
        rows = df[df["PatientID"].isin(patients) & (df["is_normal"] != abnormal)]
        by_patient = rows.groupby("PatientID").indices
        taken: list[int] = []
        for p in (patients[i] for i in rng.permutation(len(patients))):
            if len(taken) >= n:
                break
            taken.extend(rows.index[by_patient[p]].tolist())
        if len(taken) < n:
            log.warning("PadChest paper cohort: %d %s images asked, %d available (all taken)",
                        n, "abnormal" if abnormal else "normal", len(taken))
        keep.extend(taken[:n])
    log.info("PadChest paper cohort (data.cohort=paper): %d normal + %d abnormal images",
             int(df.loc[keep, "is_normal"].sum()), int((~df.loc[keep, "is_normal"]).sum()))
    return df.loc[sorted(keep)]


class PadChestDataModule(FileDataModule):
    """PadChest PA radiographs; normal 70/15/15 by patient, abnormal in val/test only."""

    expect_16bit = True
    root_holds = "the PadChest image folder"

    def index_items(self) -> dict[tuple[str, str], list[Item]]:
        csv = self.cfg.labels_csv or ""
        csv_path = (self.root / csv if not Path(csv).is_absolute() else Path(csv)) if csv \
            else find_csv(self.root)
        df = load_index(csv_path, str(self.cfg.exclude_policy),
                        str(self.cfg.suboptimal_policy))
        df["path"] = resolve_images(df, self.root)
        absent = df["path"].isna()
        if absent.any():
            log.warning(
                "PadChest: %d of %d selected images are absent under %s and were dropped "
                "(looked for <root>/<ImageDir>/<ImageID> and <root>/<ImageID>).",
                int(absent.sum()), len(df), self.root,
            )
        df = df[~absent]
        if str(self.cfg.cohort) == "paper":
            df = paper_cohort(df, int(self.cfg.cohort_normal),
                              int(self.cfg.cohort_abnormal),
                              int(self.cfg.split_seed))
        elif str(self.cfg.cohort) != "all":
            raise ValueError(f"data.cohort={self.cfg.cohort!r} is not one of "
                             "['all', 'paper']")
        assign = patient_split(
            df["PatientID"].tolist(), df["is_normal"].tolist(),
            fold=int(self.cfg.fold), n_folds=int(self.cfg.n_folds),
            seed=int(self.cfg.split_seed),
        )
        masks = _listing(self.root / MASK_DIR)
        index: dict[tuple[str, str], list[Item]] = {}
        for (split, group), row in zip(assign, df.itertuples(index=False)):
            index.setdefault((split, group), []).append(Item(
                path=row.path, label=NORMAL if row.is_normal else ABNORMAL,
                finding="" if row.is_normal else "|".join(row.labels),  # split by metrics
                mask_path=str(self.root / MASK_DIR / row.ImageID)
                if row.ImageID in masks else None,
                group_id=row.PatientID,
            ))
        return index
