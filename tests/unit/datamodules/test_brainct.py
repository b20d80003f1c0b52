"""Head-CT data module: labels CSV, series folders and .npy volumes, flow sets, 3D loading."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from pydicom.data import get_testdata_file

from datamodules import common
from datamodules.base import ABNORMAL, NORMAL, UNLABELED, Item
from datamodules.brainct import BrainCTDataModule, load_index
from datamodules.config import DataConfig
from datamodules.dicom import brain_window
from datamodules.images import resize_3d

CT5N = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")


def make_bct(root: Path, n_normal=12, n_abnormal=12):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["case,label,finding,mask"]
    for i in range(n_normal):
        np.save(root / f"n{i}.npy", rng.normal(30, 10, (6, 20, 20)).astype(np.float32))
        lines.append(f"n{i},normal,,")
    for i in range(n_abnormal):
        vol = rng.normal(30, 10, (6, 20, 20)).astype(np.float32)
        vol[2:4, 8:12, 8:12] = 70  # haemorrhage
        np.save(root / f"a{i}.npy", vol)
        mask = np.zeros(vol.shape, bool)
        mask[2:4, 8:12, 8:12] = True
        np.save(root / f"a{i}_mask.npy", mask)
        finding = "haemorrhage" if i % 2 else "infarction"
        lines.append(f"a{i}.npy,1,{finding},a{i}_mask.npy")
    shutil.copytree(CT5N, root / "series_case")  # a real DICOM series as one case
    lines.append("series_case,0,,")
    lines.append("ghost,normal,,")  # listed, absent
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def bct_cfg(root, **kw):
    c = OmegaConf.structured(DataConfig)
    c.name, c.root, c.modality, c.volume_size = "bct", str(root), "bct", [4, 16, 16]
    c.n_normal, c.n_mixture_normal, c.n_mixture_abnormal = 4, 4, 4
    c.n_unknown_normal, c.n_unknown_abnormal, c.val_fraction = 4, 4, 0.25
    for k, v in kw.items():
        c[k] = v
    return c


def test_load_index_and_errors(tmp_path):
    make_bct(tmp_path / "b")
    df = load_index(tmp_path / "b" / "labels.csv")
    assert len(df) == 26 and df.path.isna().sum() == 1
    assert set(df.label) == {0, 1}
    (tmp_path / "bad.csv").write_text("case,diagnosis\nx,normal\n")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['label'\]"):
        load_index(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("case,label\nx,maybe\n")
    with pytest.raises(ValueError, match="normal/abnormal or 0/1"):
        load_index(tmp_path / "bad2.csv")
    # A case (or mask) that walks out of data.root is refused, not read.
    (tmp_path / "b" / "evil.csv").write_text("case,label\n../../../../etc,normal\n")
    with pytest.raises(ValueError, match=r"case '../../../../etc' points outside data.root"):
        load_index(tmp_path / "b" / "evil.csv")
    (tmp_path / "b" / "evil2.csv").write_text("case,label,mask\nx,abnormal,/etc/passwd\n")
    with pytest.raises(ValueError, match="mask '/etc/passwd' points outside"):
        load_index(tmp_path / "b" / "evil2.csv")


def test_bct_datamodule(tmp_path, caplog):
    make_bct(tmp_path / "b")
    with caplog.at_level(logging.WARNING):
        dm = BrainCTDataModule(bct_cfg(tmp_path / "b"))
        dm.setup()
    assert "1 of 26 cases" in caplog.text
    assert dm.is_3d
    assert len(dm.items("train", "normal")) == 4
    assert len(dm.items("train", "mixture")) == 8
    assert {i.label for i in dm.items("train", "mixture")} == {UNLABELED}
    assert len(dm.items("val", "normal")) == 1 and len(dm.items("test", "abnormal")) == 3
    used = [i.group_id for s in ("train", "val", "test") for i in dm.items(s)]
    assert len(used) == len(set(used))
    for it in dm.items("test", "abnormal"):
        assert it.label == ABNORMAL and it.finding in ("haemorrhage", "infarction")
        m = dm.load_mask(it)
        assert m.shape == (4, 16, 16) and m.any()
    a = dm.items("test", "abnormal")[0]
    x = dm.load(a)
    expected = resize_3d(brain_window(np.load(a.path)).astype(np.float32), (4, 16, 16)) / 127
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert dm.dataset("val", "normal")[0]["image"].shape == (1, 4, 16, 16)
    # The DICOM series case loads through the same path.
    vol = dm.load(Item(path=str(tmp_path / "b" / "series_case"), label=NORMAL))
    assert vol.shape == (4, 16, 16) and 0 <= vol.min() and vol.max() <= 1
    # Default shares on tiny data still give every val/test group a case.
    c = bct_cfg(tmp_path / "b", n_normal=None, n_mixture_normal=None, n_mixture_abnormal=None,
                n_unknown_normal=None, n_unknown_abnormal=None)
    dm_all = BrainCTDataModule(c)
    dm_all.setup()
    assert all(dm_all.items(s, g) for s in ("val", "test") for g in ("normal", "abnormal"))


def test_case_folder_with_two_series_needs_series_uid(tmp_path, caplog):
    import pydicom

    make_bct(tmp_path / "b")
    root = tmp_path / "b"
    ct2 = CT5N.parent.parent / "77654033" / "CT2"
    for src in (CT5N, ct2):
        shutil.copytree(src, root / "two" / src.name)
    uid = pydicom.dcmread(next(ct2.iterdir())).SeriesInstanceUID
    csv = (root / "labels.csv").read_text().replace("case,label,finding,mask",
                                                   "case,label,finding,mask,series_uid")
    lines = [ln + "," if i else ln for i, ln in enumerate(csv.strip().split("\n"))]
    (root / "labels.csv").write_text("\n".join(lines + ["two,normal,,,"]) + "\n")
    c = bct_cfg(root, n_normal=None, n_mixture_normal=None, n_mixture_abnormal=None,
                n_unknown_normal=None, n_unknown_abnormal=None)
    with caplog.at_level(logging.WARNING):
        dm = BrainCTDataModule(c)
        dm.setup()
    assert "two: holds 2 image series" in caplog.text
    assert "two" not in {i.group_id for s in ("train", "val", "test") for i in dm.items(s)}
    (root / "labels.csv").write_text("\n".join(lines + [f"two,normal,,,{uid}"]) + "\n")
    dm = BrainCTDataModule(c)
    dm.setup()
    two = [i for s in ("train", "val", "test") for i in dm.items(s) if i.group_id == "two"]
    assert len(two) == 1
    assert dm.load(two[0]).shape == (4, 16, 16)
    assert dm.series_uid[two[0].path] == uid
