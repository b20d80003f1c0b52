"""PadChest index (the real CSV from the torchxrayvision wheel) and patient-level splits."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from datamodules import common
from datamodules.config import DataConfig
from datamodules.padchest import PadChestDataModule, load_index, parse_labels
from datamodules.splits import patient_split


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")


def real_csv() -> Path:
    xrv = pytest.importorskip("torchxrayvision")
    path = Path(xrv.__file__).parent / "data" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    if not path.is_file():
        pytest.skip("PadChest CSV not shipped in this torchxrayvision")
    return path


def test_parse_labels():
    assert parse_labels("['normal']") == ["normal"]
    assert parse_labels("['pleural effusion', ' cardiomegaly']") == ["pleural effusion",
                                                                       "cardiomegaly"]
    assert parse_labels("['']") == []
    assert parse_labels("[' normal', '']") == ["normal"]
    assert parse_labels(float("nan")) is None and parse_labels("not a list") is None


def test_load_index_on_real_csv_matches_independent_pandas_queries():
    csv = real_csv()
    df = load_index(csv)
    raw = pd.read_csv(csv, usecols=["MethodLabel", "Projection", "Labels", "ImageID"])
    sel = raw[(raw.MethodLabel == "Physician") & (raw.Projection == "PA")]
    labels = sel.Labels.map(lambda s: [e.strip() for e in ast.literal_eval(s)])
    tags = labels.map(lambda ls: "exclude" in ls or "suboptimal study" in ls)
    kept = labels[~tags]
    assert len(df) == len(kept)
    assert int(df.is_normal.sum()) == int(kept.map(lambda ls: ls == ["normal"]).sum())
    assert set(df.ImageID) == set(sel.ImageID[~tags])
    assert {"ImageID", "ImageDir", "PatientID", "labels", "is_normal"} <= set(df.columns)
    assert all(isinstance(x, list) for x in df.labels.head(100))
    # The patient split on the real patients: no patient in two splits, abnormal never train.
    assign = patient_split(df.PatientID.tolist(), df.is_normal.tolist(), fold=0, seed=0)
    split = pd.Series([s for s, _ in assign])
    per_patient = split.groupby(df.PatientID.values).nunique()
    assert per_patient.max() == 1
    assert not ((split == "train") & ~df.is_normal).any()
    normal_split = split[df.is_normal.values].value_counts(normalize=True)
    assert normal_split["train"] == pytest.approx(0.70, abs=0.03)
    assert normal_split["test"] == pytest.approx(0.15, abs=0.03)


def test_exclude_and_suboptimal_policies(tmp_path):
    rows = make_padchest(tmp_path, n=70)
    sel = rows[(rows.MethodLabel == "Physician") & (rows.Projection == "PA")]
    csv = tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    drop = load_index(csv)
    keep = load_index(csv, exclude_policy="keep", suboptimal_policy="keep")
    n = sel.Labels.value_counts()
    # drop: tagged rows and label-less rows go; keep: tag ignored, rows left without a label go
    assert len(drop) == len(sel) - n["['exclude']"] - n["['suboptimal study', ' nodule']"] \
        - n["['']"]
    assert len(keep) == len(sel) - n["['exclude']"] - n["['']"]
    kept = keep[keep.ImageID.isin(sel[sel.Labels == "['suboptimal study', ' nodule']"].ImageID)]
    assert kept.labels.map(lambda ls: ls == ["nodule"]).all() and not kept.is_normal.any()
    with pytest.raises(ValueError, match="exclude_policy"):
        load_index(csv, exclude_policy="maybe")


def test_missing_column_is_a_clear_error(tmp_path):
    pd.DataFrame({"ImageID": ["a.png"], "PatientID": ["p"]}).to_csv(tmp_path / "x.csv")
    with pytest.raises(ValueError, match=r"x.csv: missing required column\(s\) \['ImageDir'"):
        load_index(tmp_path / "x.csv")


def test_patient_split_properties():
    rng = np.random.default_rng(0)
    patients = [f"p{rng.integers(0, 400)}" for _ in range(1500)]
    normal = list(rng.random(1500) < 0.5)
    folds = [patient_split(patients, normal, fold=k, n_folds=5, seed=1) for k in range(5)]
    assert folds[0] == patient_split(patients, normal, fold=0, n_folds=5, seed=1)  # deterministic
    assert folds[0] != patient_split(patients, normal, fold=0, n_folds=5, seed=2)
    tests = []
    for assign in folds:
        by_patient: dict[str, set] = {}
        for p, (s, g), n in zip(patients, assign, normal):
            by_patient.setdefault(p, set()).add(s)
            assert g == ("normal" if n else "abnormal")
            assert not (s == "train" and not n)
        assert max(len(v) for v in by_patient.values()) == 1
        tests.append({p for p, (s, _) in zip(patients, assign) if s == "test"})
    # Folds rotate: for patients with only normal images (70/15/15) the five test sets are
    # pairwise disjoint; patients with an abnormal image (val/test only) each reach test.
    normal_only = {p for p in patients} - {p for p, n in zip(patients, normal) if not n}
    for i in range(5):
        for j in range(i + 1, 5):
            assert not tests[i] & tests[j] & normal_only
    assert set.union(*tests) >= set(patients) - normal_only


def make_padchest(root: Path, n=60):
    """A small PadChest-like folder: the real CSV's columns, 16-bit PNGs in ImageDir folders
    and a few flat ones; tricky label strings."""
    rng = np.random.default_rng(0)
    rows = []
    labels_cycle = ["['normal']", "[' pleural effusion', 'cardiomegaly']", "['']",
                    "['exclude']", "['suboptimal study', ' nodule']", "['normal']",
                    "['normal', 'normal']"]
    for i in range(n):
        image_id = f"img{i}.png"
        image_dir = i % 3
        rows.append(dict(ImageID=image_id, ImageDir=image_dir, PatientID=f"pat{i // 2}",
                         MethodLabel="Physician" if i % 11 else "RNN_model",
                         Projection="PA" if i % 13 else "L", Labels=labels_cycle[i % 7]))
        if i == 5:
            continue  # listed in the CSV, absent on disk
        folder = root if i % 10 == 0 else root / str(image_dir)  # some flat
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 65535, (40, 36), dtype=np.uint16)).save(folder / image_id)
    pd.DataFrame(rows).to_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
    return pd.DataFrame(rows)


def test_padchest_datamodule(tmp_path, caplog):
    root = tmp_path / "padchest"
    rows = make_padchest(root)
    c = OmegaConf.structured(DataConfig)
    c.name, c.root, c.image_size = "padchest", str(root), 24
    with caplog.at_level(logging.INFO):
        dm = PadChestDataModule(c)
        dm.setup()
    assert "1 of" in caplog.text and "absent" in caplog.text
    items = dm.items("train") + dm.items("val") + dm.items("test")
    names = {Path(i.path).name for i in items}
    sel = rows[(rows.MethodLabel == "Physician") & (rows.Projection == "PA")]
    usable = sel[~sel.Labels.isin(["['']", "['exclude']", "['suboptimal study', ' nodule']"])]
    assert names == set(usable.ImageID) - {"img5.png"}
    assert all(i.label == 0 for i in dm.items("train"))
    for it in dm.items("test", "abnormal"):
        assert it.finding in ("pleural effusion|cardiomegaly", "normal|normal")
    x = dm.load(items[0])
    assert x.shape == (24, 24) and x.dtype == np.float32 and x.max() <= 1
    # exactly ['normal'] is normal; ['normal', 'normal'] is not (not exactly ['normal'])
    dup = usable[usable.Labels == "['normal', 'normal']"].ImageID
    assert all(i.label == 1 for i in items if Path(i.path).name in set(dup))


def test_paper_cohort_on_real_csv():
    """data.cohort=paper: Kim et al.'s 2,574 normal / 4,801 abnormal PA images, sampled by
    patient (whole patients, seeded), then normals 70/15/15 and abnormals split evenly between
    val and test, no patient in two splits."""
    from datamodules.padchest import paper_cohort

    df = load_index(real_csv())
    c = paper_cohort(df, 2574, 4801, seed=0)
    assert int(c.is_normal.sum()) == 2574 and int((~c.is_normal).sum()) == 4801
    assert c.equals(paper_cohort(df, 2574, 4801, seed=0))
    assert not c.ImageID.equals(paper_cohort(df, 2574, 4801, seed=1).ImageID)
    # A patient gives either normals or abnormals, never both.
    assert (c.groupby("PatientID").is_normal.nunique() == 1).all()
    assign = patient_split(c.PatientID.tolist(), c.is_normal.tolist(), seed=0)
    split = pd.Series([s for s, _ in assign], index=c.index)
    assert (split.groupby(c.PatientID).nunique() == 1).all()
    abn = split[~c.is_normal].value_counts()
    assert "train" not in abn and abs(abn["val"] - abn["test"]) < 0.05 * 4801
    nor = split[c.is_normal].value_counts(normalize=True)
    assert nor["train"] == pytest.approx(0.70, abs=0.02)


def test_header_only_csv_is_a_clear_error(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("ImageID,ImageDir,PatientID,MethodLabel,Projection,Labels\n")
    with pytest.raises(ValueError, match="labels.csv: the labels CSV has a header but no rows"):
        load_index(p)


def test_per_finding_groups_on_real_label_rows():
    """Multi-label PadChest rows count for each of their findings, not as one combined group:
    the data module joins findings with "|", which per_finding_metrics splits on."""
    from experiments.evaluation import per_finding_metrics

    df = load_index(real_csv())
    abn = df[~df.is_normal & (df.labels.map(len) > 1)].head(40)
    nor = df[df.is_normal].head(40)
    findings = ["|".join(ls) for ls in abn.labels] + [""] * len(nor)
    y = [1] * len(abn) + [0] * len(nor)
    s = list(range(len(y)))
    groups = per_finding_metrics(y, s, findings, threshold=0.5)
    singles = {f for ls in abn.labels for f in ls}
    assert set(groups) == singles  # every finding alone, no "a, b" combinations
    first = abn.labels.iloc[0][0]
    assert groups[first]["n"] == sum(first in ls for ls in abn.labels)
