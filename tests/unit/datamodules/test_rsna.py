"""RSNA Pneumonia index (the real labels CSV from the torchxrayvision wheel), flow sets, and
the data module on JPEG-Baseline DICOMs like Kaggle's."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from omegaconf import OmegaConf
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from datamodules import common
from datamodules.base import ABNORMAL, NORMAL, UNLABELED
from datamodules.config import DataConfig
from datamodules.rsna import RSNADataModule, load_index
from datamodules.splits import FlowSetSizes, flow_sets


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")


def test_load_index_on_real_labels_csv():
    xrv = pytest.importorskip("torchxrayvision")
    path = Path(xrv.__file__).parent / "data" / "kaggle_stage_2_train_labels.csv.zip"
    if not path.is_file():
        pytest.skip("RSNA labels CSV not shipped in this torchxrayvision")
    # The detailed class CSV does not ship in the wheel: without it, class is known only for
    # Target 1 (Lung Opacity).
    df = load_index(path)
    raw = pd.read_csv(path)
    assert len(raw) > raw.patientId.nunique()  # several rows (boxes) per patient
    assert len(df) == raw.patientId.nunique() and df.patientId.is_unique
    positives = raw.loc[raw.Target == 1, "patientId"].unique()
    assert int(df.Target.sum()) == len(positives)
    assert set(df.loc[df["class"] == "Lung Opacity", "patientId"]) == set(positives)
    assert (df.loc[df.Target == 0, "class"] == "").all()
    boxes = raw.dropna(subset=["x"]).groupby("patientId").size()
    np.testing.assert_array_equal(df.set_index("patientId").loc[boxes.index, "n_boxes"], boxes)


def write_csvs(root: Path, classes: dict[str, str]):
    labels, info = [], []
    for pid, cls in classes.items():
        n_rows = 2 if cls == "Lung Opacity" else 1
        for k in range(n_rows):
            box = (10 + k, 20, 30, 40) if cls == "Lung Opacity" else (None,) * 4
            labels.append((pid, *box, int(cls == "Lung Opacity")))
            info.append((pid, cls))  # repeated like the real file
    pd.DataFrame(labels, columns=["patientId", "x", "y", "width", "height", "Target"]).to_csv(
        root / "stage_2_train_labels.csv", index=False)
    pd.DataFrame(info, columns=["patientId", "class"]).to_csv(
        root / "stage_2_detailed_class_info.csv", index=False)


def write_jpeg_dicom(path: Path, img: np.ndarray):
    """An 8-bit MONOCHROME2 JPEG Baseline DICOM like the Kaggle RSNA files."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "CR", img.shape[0], img.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def test_load_index_deduplicates_classes(tmp_path):
    classes = {"a": "Normal", "b": "Lung Opacity", "c": "No Lung Opacity / Not Normal"}
    write_csvs(tmp_path, classes)
    df = load_index(tmp_path / "stage_2_train_labels.csv",
                    tmp_path / "stage_2_detailed_class_info.csv")
    assert dict(zip(df.patientId, df["class"])) == classes
    assert dict(zip(df.patientId, df.Target)) == {"a": 0, "b": 1, "c": 0}
    pd.DataFrame({"patientId": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad.csv: missing required column\(s\) \['class'\]"):
        load_index(tmp_path / "stage_2_train_labels.csv", tmp_path / "bad.csv")


def test_flow_sets_paper_sizes_on_rsna_sized_data(caplog):
    """Table 1 sizes exceed the stage-2 training images: the sets that must be disjoint are
    scaled down by one factor per class; S_mixture's normals are shared with S_normal (as in
    the paper), never with S_unknown; no S_unknown case is in any training set."""
    # Class sizes of the RSNA stage-2 training set (Normal vs. the two non-normal classes).
    normals = [f"n{i}" for i in range(8851)]
    abnormals = [f"a{i}" for i in range(11821 + 6012)]
    paper = FlowSetSizes(7808, 6553, 6631, 1358, 13863)
    with caplog.at_level(logging.WARNING):
        sets = flow_sets(normals, abnormals, paper, seed=0, mixture_overlap=True)
    unknown_n = set(sets["val_normal"] + sets["test_normal"])
    unknown_a = set(sets["val_abnormal"] + sets["test_abnormal"])
    train = set(sets["normal"]) | set(sets["mixture_normal"]) | set(sets["mixture_abnormal"])
    assert not train & (unknown_n | unknown_a)  # no val/test case in S_normal or S_mixture
    f_n, f_a = 8851 / (7808 + 1358), 17833 / (6631 + 13863)
    assert len(sets["normal"]) == int(7808 * f_n) and len(unknown_n) == int(1358 * f_n)
    assert len(sets["mixture_abnormal"]) == int(6631 * f_a)
    assert len(unknown_a) == int(13863 * f_a)
    assert "normal cases: 9166 asked, 8851 available" in caplog.text
    assert "S_normal 7808 -> 7539" in caplog.text and "S_unknown abnormal 13863 ->" in caplog.text
    # S_mixture keeps its requested normals: the one unused normal, the rest from S_normal.
    assert len(sets["mixture_normal"]) == 6553 == len(set(sets["mixture_normal"]))
    assert len(set(sets["mixture_normal"]) & set(sets["normal"])) == 6553 - 1
    assert len(sets["val_normal"]) == round(0.15 * len(unknown_n))
    # Without overlap all three normal sets share the pool, scaled by one factor.
    strict = flow_sets(normals, abnormals, paper, seed=0, mixture_overlap=False)
    assert not set(strict["mixture_normal"]) & set(strict["normal"])
    n_strict = sum(len(strict[k]) for k in ("normal", "mixture_normal", "val_normal",
                                            "test_normal"))
    assert 8851 - 3 <= n_strict <= 8851
    # Deterministic; folds rotate S_unknown.
    assert flow_sets(normals, abnormals, paper, seed=0, mixture_overlap=True) == sets
    f1 = flow_sets(normals, abnormals, paper, seed=0, fold=1, mixture_overlap=True)
    assert not set(f1["test_normal"]) & set(sets["test_normal"])


def test_rsna_datamodule(tmp_path):
    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = {}
    for i in range(30):
        classes[f"pid{i:02d}"] = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")[i % 3]
    write_csvs(root, classes)
    for pid in list(classes)[:-1]:  # the last one has no image
        write_jpeg_dicom(root / "stage_2_train_images" / f"{pid}.dcm",
                         rng.integers(0, 256, (64, 64), dtype=np.uint8))
    c = OmegaConf.structured(DataConfig)
    c.name, c.root, c.image_size = "rsna", str(root), 32
    c.n_normal, c.n_unknown_normal, c.n_unknown_abnormal = 4, 4, 8
    c.val_fraction = 0.25
    dm = RSNADataModule(c)
    dm.setup()
    assert len(dm.items("train", "normal")) == 4
    assert len(dm.items("val", "normal")) == 1 and len(dm.items("test", "normal")) == 3
    assert len(dm.items("val", "abnormal")) == 2 and len(dm.items("test", "abnormal")) == 6
    mixture = dm.items("train", "mixture")
    assert len(mixture) == 29 - 4 - 4 - 8 and {i.label for i in mixture} == {UNLABELED}
    assert {i.finding for i in mixture} == {""}
    for it in dm.items("test"):
        assert it.finding == classes[it.group_id]
        assert it.label == (NORMAL if it.finding == "Normal" else ABNORMAL)
    used = [i.group_id for s in ("train", "val", "test") for i in dm.items(s)]
    assert len(used) == len(set(used)) == 29
    x = dm.load(dm.items("test")[0])
    assert x.shape == (32, 32) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1


def test_paper_sizes_on_real_rsna_labels_never_leak(tmp_path, monkeypatch):
    """The real stage-2 labels (torchxrayvision wheel) with data=rsna's Table 1 sizes and
    mixture_overlap: check-data on empty placeholder images (data.verify=none) writes a
    splits.csv in which no patient is in two splits and no val/test case is in S_normal or
    S_mixture."""
    xrv = pytest.importorskip("torchxrayvision")
    path = Path(xrv.__file__).parent / "data" / "kaggle_stage_2_train_labels.csv.zip"
    if not path.is_file():
        pytest.skip("RSNA labels CSV not shipped in this torchxrayvision")
    from experiments.check_data import main as check_data

    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    labels = pd.read_csv(path)
    labels.to_csv(root / "stage_2_train_labels.csv", index=False)
    # The detailed class CSV is not in the wheel: Target 1 is Lung Opacity; of the Target-0
    # patients, the real file has 8,851 Normal and 11,821 No Lung Opacity / Not Normal.
    target = labels.groupby("patientId")["Target"].max()
    neg = sorted(target[target == 0].index)
    normal = set(np.random.default_rng(0).permutation(neg)[:8851])
    cls = {p: "Lung Opacity" if t else ("Normal" if p in normal else
                                        "No Lung Opacity / Not Normal")
           for p, t in target.items()}
    pd.DataFrame({"patientId": list(cls), "class": list(cls.values())}).to_csv(
        root / "stage_2_detailed_class_info.csv", index=False)
    for p in cls:
        (root / "stage_2_train_images" / f"{p}.dcm").touch()
    monkeypatch.chdir(tmp_path)
    check_data(["data=rsna", f"data.root={root}", "data.verify=none"])

    m = pd.read_csv(tmp_path / "outputs/check-data/rsna/splits.csv", keep_default_na=False)
    assert list(m.columns) == ["item", "patient", "split", "group", "label"]
    splits_of = m.groupby("patient")["split"].agg(set)
    assert (splits_of.map(len) == 1).all()  # no patient in two splits
    train = set(m.loc[m.split == "train", "patient"])
    held_out = set(m.loc[m.split != "train", "patient"])
    assert not train & held_out
    mix = m[m.group == "mixture"]
    assert (mix.label == "").all() and len(mix) > 10_000
    assert set(m.loc[m.split != "train", "label"]) == {"0", "1"}
    assert m.item.str.startswith("stage_2_train_images/").all()  # relative to data.root
