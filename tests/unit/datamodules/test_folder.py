"""Generic folder layout (2D and 3D), skipping of unreadable items, and the factory."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from pydicom.data import get_testdata_file

from datamodules import common, factory
from datamodules.base import ABNORMAL, NORMAL, UNLABELED
from datamodules.common import EmptySplitError
from datamodules.config import DataConfig
from datamodules.folder import FolderDataModule
from tests.support import REPO_ROOT

CT5N = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(factory, "PHANTOM_DIR", tmp_path / "cache" / "phantoms")


def cfg(root, **kw):
    c = OmegaConf.structured(DataConfig)
    c.root = str(root) if root else None
    c.image_size = 32
    for k, v in kw.items():
        c[k] = v
    return c


def png(path, size, value, bits=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        Image.fromarray(np.full(size, value, np.uint16)).save(path)
    else:
        Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def make_2d(root: Path):
    """Mixed sizes and bit depths; one DICOM; masks for abnormal val/test images."""
    png(root / "train/normal/n0.png", (40, 50), 1000)
    png(root / "train/normal/n1.png", (300, 300), 200, bits=8)
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "train/normal/n2.dcm")
    png(root / "train/mixture/m0.png", (28, 28), 5)
    png(root / "val/normal/v0.png", (64, 64), 10)
    png(root / "val/abnormal/va.png", (64, 64), 20)
    png(root / "test/normal/t0.png", (64, 64), 30)
    png(root / "test/abnormal/ta.png", (64, 64), 40)
    mask = np.zeros((64, 64), np.uint8)
    mask[0:16, 0:32] = 255
    (root / "val/masks").mkdir(parents=True)
    (root / "test/masks").mkdir(parents=True)
    Image.fromarray(mask).save(root / "val/masks/va.png")
    Image.fromarray(mask).save(root / "test/masks/ta.png")
    (root / "train/normal/notes.txt").write_text("not an image")


def test_folder_2d_labels_sizes_masks(tmp_path, caplog):
    make_2d(tmp_path / "d")
    dm = FolderDataModule(cfg(tmp_path / "d"))
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "1 entries" in caplog.text and "notes.txt" in caplog.text  # ignored, not silent
    assert [Path(i.path).name for i in dm.items("train", "normal")] == ["n0.png", "n1.png",
                                                                        "n2.dcm"]
    assert {i.label for i in dm.items("train", "normal")} == {NORMAL}
    assert dm.items("train", "mixture")[0].label == UNLABELED
    assert dm.items("test", "abnormal")[0].label == ABNORMAL
    for it in dm.items("train") + dm.items("val") + dm.items("test"):
        x = dm.load(it)
        assert x.shape == (32, 32) and x.dtype == np.float32
        assert 0 <= x.min() and x.max() <= 1
    n0 = dm.load(dm.items("train", "normal")[0])
    np.testing.assert_allclose(n0, 1000 / 65535, atol=1e-6)  # 16-bit, not clipped
    np.testing.assert_allclose(dm.load(dm.items("train", "normal")[1]), 200 / 255, atol=1e-6)
    ta = dm.items("test", "abnormal")[0]
    mask = dm.load_mask(ta)
    assert mask.dtype == bool and mask.shape == (32, 32)
    assert mask[:8, :16].all() and mask.sum() == 8 * 16
    assert dm.load_mask(dm.items("test", "normal")[0]) is None
    batch = dm.dataset("val")[1]
    assert batch["image"].shape == (1, 32, 32) and batch["label"] == ABNORMAL


def test_unreadable_items_skipped_counted_and_logged(tmp_path, caplog, monkeypatch):
    root = tmp_path / "d"
    make_2d(root)
    good = png(root / "test/normal/t1.png", (64, 64), 7)
    data = good.read_bytes()
    (root / "test/normal/broken.png").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        dm = FolderDataModule(cfg(root))
        dm.setup()
    assert "1 of 10 items skipped" in caplog.text and "broken.png" in caplog.text
    assert [Path(i.path).name for i in dm.items("test", "normal")] == ["t0.png", "t1.png"]
    assert len(dm.skipped) == 1
    # Verification results are cached (size + mtime): nothing is read again unless changed.
    calls = []
    real = common.verify_item
    monkeypatch.setattr(common, "verify_item", lambda p, *a: (calls.append(p), real(p, *a)))
    dm2 = FolderDataModule(cfg(root))
    dm2.setup()
    assert calls == [] and len(dm2.items("test", "normal")) == 2 and len(dm2.skipped) == 1
    st = good.stat()
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched -> checked again
    FolderDataModule(cfg(root)).setup()
    assert calls == [str(good)]


def test_empty_split_is_an_error(tmp_path):
    root = tmp_path / "d"
    make_2d(root)
    shutil.rmtree(root / "test/abnormal")
    with pytest.raises(EmptySplitError, match="test/abnormal"):
        FolderDataModule(cfg(root)).setup()
    # A split whose only item is unreadable is an error too.
    make_2d(tmp_path / "e")
    (tmp_path / "e/test/abnormal/ta.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(EmptySplitError, match="test/abnormal"):
        FolderDataModule(cfg(tmp_path / "e")).setup()


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/normal"):
        FolderDataModule(cfg(tmp_path / "nowhere")).setup()


def test_folder_3d_npy_and_dicom_series(tmp_path, caplog, monkeypatch):
    root = tmp_path / "v"
    rng = np.random.default_rng(0)
    for split, group in [("train", "normal"), ("train", "mixture"), ("val", "normal"),
                         ("val", "abnormal"), ("test", "normal"), ("test", "abnormal")]:
        d = root / split / group
        d.mkdir(parents=True)
        np.save(d / f"{split}_{group}.npy", rng.normal(30, 20, (6, 20, 24)).astype(np.float32))
    shutil.copytree(CT5N, root / "train/normal/series1")  # a real DICOM series as one item
    for src in (CT5N, CT5N.parent.parent / "77654033" / "CT2"):  # two series in one folder
        shutil.copytree(src, root / "train/normal/two_series" / src.name)
    bad = np.zeros((6, 20, 24), np.float32)
    bad[0, 0, 0] = np.inf
    np.save(root / "train/normal/bad.npy", bad)
    (root / "test/masks").mkdir()
    m = np.zeros((6, 20, 24), bool)
    m[2:4, 5:15, 6:18] = True
    np.save(root / "test/masks/test_abnormal.npy", m)

    c = cfg(root, modality="bct", volume_size=[4, 8, 8])
    with caplog.at_level(logging.WARNING):
        dm = FolderDataModule(c)
        dm.setup()
    assert dm.is_3d
    assert "2 of 9 items skipped (1 NaN/Inf, 1 series)" in caplog.text
    assert "two_series: holds 2 image series" in caplog.text
    names = sorted(Path(i.path).name for i in dm.items("train", "normal"))
    assert names == ["series1", "train_normal.npy"]
    for it in dm.items("train", "normal"):
        x = dm.load(it)
        assert x.shape == (4, 8, 8) and 0 <= x.min() and x.max() <= 1
    x = dm.dataset("test", "abnormal")[0]["image"]
    assert x.shape == (1, 4, 8, 8)
    mask = dm.load_mask(dm.items("test", "abnormal")[0])
    assert mask.shape == (4, 8, 8) and mask.dtype == bool and mask.any()
    # Series folders are cached too (keyed by their files' sizes and mtimes).
    calls = []
    real = common.verify_item
    monkeypatch.setattr(common, "verify_item", lambda p, *a: (calls.append(p), real(p, *a)))
    FolderDataModule(c).setup()
    assert calls == []
    slice0 = sorted((root / "train/normal/series1").iterdir())[0]
    st = slice0.stat()
    os.utime(slice0, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    FolderDataModule(c).setup()
    assert calls == [str(root / "train/normal/series1")]


# --- factory --------------------------------------------------------------------------------


def test_factory_real_root_picks_class(tmp_path):
    make_2d(tmp_path / "d")
    for name in ("folder", "phantom_cxr"):
        dm = factory.build_datamodule(cfg(tmp_path / "d", name=name))
        assert isinstance(dm, FolderDataModule) and not dm.is_3d
    with pytest.raises(ValueError, match="data.name"):
        factory.build_datamodule({"name": "mnist", "root": str(tmp_path)})


def test_factory_generates_phantoms_once_and_warns(tmp_path, monkeypatch, caplog):
    calls = []

    def write_folder(root, modality="cxr", n_train_normal=4, n_train_mixture=2, n_val=2,
                     n_test=2, size=32, seed=0):
        calls.append(dict(modality=modality, size=size, seed=seed, n=n_train_normal))
        make_2d(Path(root))

    fake = types.ModuleType("datamodules.phantoms")
    fake.write_folder = write_folder
    monkeypatch.setitem(sys.modules, "datamodules.phantoms", fake)
    monkeypatch.setattr("datamodules.phantoms", fake, raising=False)
    c = cfg(None, name="folder", phantom_count=8, phantom_size=48, phantom_seed=3)
    with caplog.at_level(logging.WARNING):
        dm = factory.build_datamodule(c)
    assert "PHANTOM" in caplog.text
    root = Path(dm.root)
    assert root.name == "folder-cxr-48-8-3" and (root / factory.MARKER).is_file()
    assert calls == [dict(modality="cxr", size=48, seed=3, n=8)]
    dm.setup()
    assert len(dm.items("train", "normal")) == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        factory.build_datamodule(c)  # reused: the writer is not called again
    assert len(calls) == 1 and "PHANTOM" in caplog.text
    # A half-written folder (no marker) is never reused.
    assert not list(root.parent.glob("folder-cxr-48-8-3.*"))


def test_missing_decoder_skips_item_and_is_not_cached(tmp_path, monkeypatch, caplog):
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import JPEGLSLossless

    root = tmp_path / "d"
    make_2d(root)
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), root / "val/normal/ls.dcm")
    with monkeypatch.context() as m:
        decoder = get_decoder(JPEGLSLossless)
        m.setattr(decoder, "_available", {})
        m.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0",
                                                          "pylibjpeg-libjpeg>=2.1")})
        with caplog.at_level(logging.WARNING):
            dm = FolderDataModule(cfg(root))
            dm.setup()
        assert "1 of 9 items skipped (1 no decoder)" in caplog.text
        assert "pylibjpeg-libjpeg" in caplog.text and "ls.dcm" in caplog.text
        assert len(dm.items("val", "normal")) == 1
    # Decoder installed again: the item is back (the failure was not cached).
    dm = FolderDataModule(cfg(root))
    dm.setup()
    assert len(dm.items("val", "normal")) == 2
    assert dm.load(dm.items("val", "normal")[0]).shape == (32, 32)


def test_item_cache_returns_the_same_pixels(tmp_path):
    root = tmp_path / "d"
    make_2d(root)
    plain = FolderDataModule(cfg(root))
    cached = FolderDataModule(cfg(root, cache_items=True))
    for it in plain.items("train"):
        ref = plain.load(it)
        np.testing.assert_allclose(cached.load(it), ref, atol=1e-7)  # first load: computed
        np.testing.assert_allclose(cached.load(it), ref, atol=1 / 65535)  # from the cache
    assert len(list((tmp_path / "cache" / "items").glob("*.npy"))) == 4


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "configs" /
                                                           "data").glob("*.yaml")))
def test_data_yaml_loads_and_builds(name, tmp_path):
    from experiments.config import load_config

    c = load_config("base", [f"data={name}", f"data.root={tmp_path}"])
    assert c.data.name == name and c.data.verify in common.VERIFY_MODES
    dm = factory.build_datamodule(c.data)  # the class is chosen; nothing is read yet
    assert dm.is_3d == (factory.modality_of(c.data) == "bct")
    if name == "rsna":  # the paper's Table 1 sizes
        assert (c.data.n_normal, c.data.n_mixture_normal, c.data.n_mixture_abnormal,
                c.data.n_unknown_normal, c.data.n_unknown_abnormal) == (7808, 6553, 6631,
                                                                        1358, 13863)
    if name == "bct":
        assert (c.data.n_normal, c.data.n_mixture_normal, c.data.n_unknown_abnormal) == \
            (250, 250, 33) and list(c.data.volume_size) == [32, 128, 128]


def test_a_test_file_linked_into_train_is_a_leak_error(tmp_path):
    """Disjointness is checked when the index is built: the same file under train/normal and
    test/normal (a symlink) is an error naming both paths."""
    from datamodules.folder import FolderDataModule
    from datamodules.phantoms import write_folder
    from datamodules.splits import SplitLeakError

    root = write_folder(tmp_path / "f", "cxr", n_train_normal=4, n_train_mixture=0, n_val=2,
                        n_test=2, size=32, with_dicom=False)
    victim = sorted((root / "test" / "normal").glob("*.png"))[0]
    (root / "train" / "normal" / "copy.png").symlink_to(victim)
    cfg = {"name": "folder", "root": str(root), "modality": "cxr", "image_size": 32,
           "verify": "none", "batch_size": 2, "num_workers": 0}
    with pytest.raises(SplitLeakError, match=r"1 file\(s\) in both train and test.*copy.png"):
        FolderDataModule(cfg).setup()


def test_check_disjoint_by_patient():
    from datamodules.base import Item
    from datamodules.splits import SplitLeakError, check_disjoint

    a = Item("/d/p1_a.png", 0, group_id="p1")
    b = Item("/d/p1_b.png", 1, group_id="p1")  # same patient, another image
    c = Item("/d/p2.png", 0, group_id="p2")
    check_disjoint({("train", "normal"): [a], ("train", "mixture"): [a, c],
                    ("test", "normal"): [Item("/d/p3.png", 0, group_id="p3")]})
    with pytest.raises(SplitLeakError, match="p1_a.png .train/normal. and /d/p1_b.png"):
        check_disjoint({("train", "normal"): [a, c], ("test", "abnormal"): [b]})
    with pytest.raises(SplitLeakError, match="val and test"):
        check_disjoint({("val", "normal"): [a], ("test", "abnormal"): [b]})


def test_bad_masks_cost_the_mask_not_the_image(tmp_path, caplog):
    """A mask with the wrong shape is refused (not stretched), an unreadable one is dropped
    (its image kept), and a mask that matches no item by name is reported."""
    import logging

    root = tmp_path / "d"
    make_2d(root)
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(root / "val/masks/va.png")  # wrong shape
    (root / "test/masks/ta.png").write_bytes(b"\x89PNG broken")  # unreadable
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "test/masks/tA.png")  # no item
    with caplog.at_level(logging.WARNING):
        dm = FolderDataModule(cfg(root))
        dm.setup()
    assert [it.mask_path for it in dm.items("val", "abnormal")] == [None]
    assert [it.mask_path for it in dm.items("test", "abnormal")] == [None]
    assert len(dm.items("test", "abnormal")) == 1  # the image itself is kept
    assert "2 lesion masks are unreadable or do not match their image" in caplog.text
    assert "mask shape (32, 64) differs from its image's (64, 64)" in caplog.text
    assert "1 masks match no test item by name" in caplog.text and "tA.png" in caplog.text
