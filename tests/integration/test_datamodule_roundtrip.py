"""Round trip: phantoms written in each real on-disk format are read back by the matching data
module with the right labels, sizes, pixels and masks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from datamodules import common, factory
from datamodules.base import ABNORMAL, NORMAL, UNLABELED
from datamodules.brainct import BrainCTDataModule
from datamodules.config import DataConfig
from datamodules.dicom import brain_window
from datamodules.folder import FolderDataModule
from datamodules.padchest import PadChestDataModule
from datamodules.rsna import RSNADataModule

phantoms = pytest.importorskip("datamodules.phantoms")
writers = pytest.importorskip("datamodules.phantoms.writers")
for _name in ("write_folder", "write_padchest", "write_rsna", "write_bct"):
    if not hasattr(phantoms, _name):
        pytest.skip(f"datamodules.phantoms.{_name} not available yet", allow_module_level=True)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(factory, "PHANTOM_DIR", tmp_path / "cache" / "phantoms")


def cfg(**kw):
    c = OmegaConf.structured(DataConfig)
    for k, v in kw.items():
        c[k] = v
    return c


def all_items(dm):
    return [i for s in ("train", "val", "test") for i in dm.items(s)]


def test_folder_cxr_roundtrip(tmp_path):
    root = phantoms.write_folder(tmp_path / "f", modality="cxr", n_train_normal=4,
                                 n_train_mixture=4, n_val=2, n_test=2, size=64, seed=0)
    dm = FolderDataModule(cfg(name="folder", root=str(root), image_size=64))
    dm.setup()
    counts = {(s, g): len(dm.items(s, g)) for s, g in
              [("train", "normal"), ("train", "mixture"), ("val", "normal"),
               ("val", "abnormal"), ("test", "normal"), ("test", "abnormal")]}
    assert counts == {("train", "normal"): 4, ("train", "mixture"): 4, ("val", "normal"): 2,
                      ("val", "abnormal"): 2, ("test", "normal"): 2, ("test", "abnormal"): 2}
    truth = pd.read_csv(root / "phantom_truth.csv")
    truth_label = {str((root / p).resolve()): int(lab) for p, lab in zip(truth.path, truth.label)}
    for it in dm.items("val") + dm.items("test"):
        assert it.label == truth_label[str(Path(it.path).resolve())]
        mask = dm.load_mask(it)
        if it.label == ABNORMAL:
            assert mask is not None and mask.shape == (64, 64) and mask.any()
        else:
            assert mask is None
    assert {i.label for i in dm.items("train", "mixture")} == {UNLABELED}
    # Every item (16-bit PNG, 8-bit PNG, MONOCHROME1 DICOM) comes back as the generated image.
    stream = writers.STREAM_FOLDER_CXR
    for it in dm.items("train", "normal"):
        i = int(Path(it.path).stem.removeprefix("img"))  # train items are numbered in plan order
        img, _ = phantoms.make_cxr(writers.item_rng(0, stream, i), (64, 64), None)
        x = dm.load(it)
        assert x.shape == (64, 64)
        atol = 1 / 255 if Path(it.path).suffix == ".png" else 1 / 4095
        np.testing.assert_allclose(x, np.clip(img, 0, 1), atol=atol + 1e-6)
    assert any(Path(i.path).suffix == ".dcm" for i in dm.items("train", "normal"))
    small = FolderDataModule(cfg(name="folder", root=str(root), image_size=32))
    assert small.load(small.items("test", "abnormal")[0]).shape == (32, 32)


def test_folder_bct_roundtrip(tmp_path):
    shape = (8, 32, 32)
    root = phantoms.write_folder(tmp_path / "f", modality="bct", n_train_normal=2,
                                 n_train_mixture=2, n_val=1, n_test=1, size=shape, seed=1)
    dm = FolderDataModule(cfg(name="folder", root=str(root), modality="bct",
                              volume_size=list(shape)))
    dm.setup()
    assert dm.is_3d
    assert len(dm.items("train", "normal")) == 2 and len(dm.items("test", "abnormal")) == 1
    series = [i for i in all_items(dm) if Path(i.path).is_dir()]
    assert len(series) == 2  # the DICOM series items
    truth = pd.read_csv(root / "phantom_truth.csv")
    finding = {str((root / p).resolve()): f for p, f in zip(truth.path, truth.finding)}
    plan_index = {str((root / p).resolve()): k for k, p in enumerate(truth.path)}
    for it in all_items(dm):
        x = dm.load(it)
        assert x.shape == shape and 0 <= x.min() and x.max() <= 1
        k = plan_index[str(Path(it.path).resolve())]
        lesion = finding[str(Path(it.path).resolve())]
        hu, _ = phantoms.make_head_ct(writers.item_rng(1, writers.STREAM_FOLDER_BCT, k), shape,
                                      lesion if isinstance(lesion, str) and lesion else None)
        # Slice order (reversed InstanceNumber, tilt), padding and LUT all come back exactly.
        np.testing.assert_allclose(x, brain_window(hu) / 127, atol=1e-6)
    m = dm.load_mask(dm.items("test", "abnormal")[0])
    assert m is not None and m.shape == shape and m.any()


def test_padchest_roundtrip(tmp_path, caplog):
    csv = phantoms.write_padchest(tmp_path / "p", n_normal=20, n_abnormal=8, size=64, seed=0,
                                  n_broken=1)
    root = Path(csv).parent
    with caplog.at_level(logging.INFO):
        dm = PadChestDataModule(cfg(name="padchest", root=str(root), image_size=32))
        dm.setup()
    assert "1 of 29 items skipped" in caplog.text  # the truncated PNG: counted, logged
    items = all_items(dm)
    assert sum(i.label == NORMAL for i in items) == 20
    assert sum(i.label == ABNORMAL for i in items) == 8
    assert all(i.label == NORMAL for i in dm.items("train"))
    patients = {}
    for s in ("train", "val", "test"):
        for i in dm.items(s):
            patients.setdefault(i.group_id, set()).add(s)
    assert max(len(v) for v in patients.values()) == 1
    for it in dm.items("test", "abnormal") + dm.items("val", "abnormal"):
        assert it.finding and it.mask_path
        assert dm.load_mask(it).shape == (32, 32) and dm.load_mask(it).any()
    x = dm.load(items[0])
    assert x.shape == (32, 32) and x.dtype == np.float32


def test_rsna_roundtrip(tmp_path):
    root = phantoms.write_rsna(tmp_path / "r", n_normal=12, n_not_normal=6, n_opacity=6,
                               size=64, seed=0)
    dm = RSNADataModule(cfg(name="rsna", root=str(root), image_size=32))
    dm.setup()
    classes = pd.read_csv(Path(root) / "stage_2_detailed_class_info.csv").drop_duplicates()
    cls = dict(zip(classes.patientId, classes["class"]))
    items = all_items(dm)
    assert len(items) == 24 and len({i.group_id for i in items}) == 24
    assert len(dm.items("train", "normal")) == 12 - len(dm.items("val", "normal")) - \
        len(dm.items("test", "normal")) - sum(
            cls[i.group_id] == "Normal" for i in dm.items("train", "mixture"))
    for it in dm.items("val") + dm.items("test"):
        assert it.finding == cls[it.group_id]
        assert it.label == (NORMAL if it.finding == "Normal" else ABNORMAL)
    for it in items:
        x = dm.load(it)  # JPEG Baseline and uncompressed files alike
        assert x.shape == (32, 32) and 0 <= x.min() and x.max() <= 1 and x.std() > 0.01


def test_bct_roundtrip(tmp_path):
    shape = (8, 32, 32)
    root = phantoms.write_bct(tmp_path / "b", n_normal=6, n_haemorrhage=3, n_infarct=3,
                              shape=shape, seed=0)
    dm = BrainCTDataModule(cfg(name="bct", root=str(root), modality="bct",
                               volume_size=list(shape)))
    dm.setup()
    labels = pd.read_csv(Path(root) / "labels.csv", keep_default_na=False)
    truth = {r.case: (r.label, r.finding) for r in labels.itertuples()}
    items = all_items(dm)
    assert len(items) == 12
    for it in dm.items("val") + dm.items("test") + dm.items("train", "normal"):
        label, finding = truth[it.group_id]
        assert it.label == label and it.finding == finding
        assert (it.mask_path is not None) == bool(finding)
    for it in items:
        k = int(it.group_id.removeprefix("case"))
        hu, _ = phantoms.make_head_ct(writers.item_rng(0, writers.STREAM_BCT, k), shape,
                                      truth[it.group_id][1] or None)
        np.testing.assert_allclose(dm.load(it), brain_window(hu) / 127, atol=1e-6)


@pytest.mark.parametrize("name", ["phantom_cxr", "padchest", "rsna", "bct", "phantom_bct"])
def test_factory_generates_each_format(name, caplog):
    c = cfg(name=name, root=None, phantom_count=8, phantom_size=64, image_size=32,
            volume_size=[8, 32, 32])
    if name in ("rsna",):  # the paper's sizes from the YAML must not apply to phantoms
        c.n_normal, c.n_unknown_abnormal = 7808, 13863
    with caplog.at_level(logging.WARNING):
        dm = factory.build_datamodule(c)
        dm.setup()
    assert "PHANTOM" in caplog.text
    assert dm.is_3d == (name in ("bct", "phantom_bct"))
    for s, g in [("train", "normal"), ("val", "normal"), ("val", "abnormal"),
                 ("test", "normal"), ("test", "abnormal")]:
        assert dm.items(s, g), (s, g)
    x = dm.load(dm.items("test", "abnormal")[0])
    assert x.shape == ((8, 32, 32) if dm.is_3d else (32, 32))
