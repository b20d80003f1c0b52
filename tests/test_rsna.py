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
    # Class sizes of the RSNA stage-2 training set (Normal vs. the two non-normal classes).
    normals = [f"n{i}" for i in range(8851)]
    abnormals = [f"a{i}" for i in range(11821 + 6012)]
    paper = FlowSetSizes(7808, 6553, 6631, 1358, 13863)
    with caplog.at_level(logging.WARNING):
        sets = flow_sets(normals, abnormals, paper, seed=0, mixture_overlap=True)
    unknown_n = set(sets["val_normal"] + sets["test_normal"])
    unknown_a = set(sets["val_abnormal"] + sets["test_abnormal"])
    assert len(unknown_n) == 1358 and len(unknown_a) == 13863
    assert not set(sets["normal"]) & unknown_n  # never train on a test case
    assert len(sets["normal"]) == 8851 - 1358  # clipped, with a warning
    assert "S_normal: requested 7808, only 7493 available" in caplog.text
    assert len(sets["mixture_normal"]) == 6553 and len(set(sets["mixture_normal"])) == 6553
    assert len(sets["mixture_abnormal"]) == 6631
    # Mixture abnormals: the 3,970 unused first, then reuse from S_unknown.
    reused = set(sets["mixture_abnormal"]) & unknown_a
    assert len(reused) == 6631 - (17833 - 13863)
    assert len(sets["val_normal"]) == round(0.15 * 1358)
    # Without overlap the mixture is clipped instead.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        strict = flow_sets(normals, abnormals, paper, seed=0, mixture_overlap=False)
    assert len(strict["mixture_abnormal"]) == 17833 - 13863
    assert not set(strict["mixture_abnormal"]) & unknown_a
    assert "S_mixture abnormal: requested 6631" in caplog.text
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
