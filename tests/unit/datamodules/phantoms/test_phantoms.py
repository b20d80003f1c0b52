"""Phantom data: generators (determinism, lesions) and writers (real on-disk formats)."""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut

from datamodules.phantoms import (
    CT_LESIONS,
    CXR_LESIONS,
    PADCHEST_COLUMNS,
    PADCHEST_CSV,
    RSNA_CLASSES,
    item_rng,
    make_cxr,
    make_head_ct,
    write_bct,
    write_folder,
    write_padchest,
    write_rsna,
)
from datamodules.phantoms.__main__ import main as cli_main
from datamodules.phantoms.writers import STREAM_BCT, STREAM_FOLDER_CXR, bct_series_options

REAL_PADCHEST = (Path(pytest.importorskip("torchxrayvision").__file__).parent / "data"
                 / PADCHEST_CSV)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# --- generators -----------------------------------------------------------------------------


@pytest.mark.parametrize("lesion", [None, *CXR_LESIONS])
def test_make_cxr_deterministic_range_and_varies(lesion):
    a, ma = make_cxr(rng(3), 96, lesion)
    b, mb = make_cxr(rng(3), 96, lesion)
    c, _ = make_cxr(rng(4), 96, lesion)
    assert a.dtype == np.float32 and a.shape == (96, 96) and ma.dtype == bool
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.abs(a - c).mean() > 0.01  # anatomy varies per seed


def test_make_cxr_polarity_lungs_darker_than_mediastinum():
    img, _ = make_cxr(rng(0), 128, background=0.0)
    lungs = img[40:80, [30, 34, 94, 98]].mean()  # mid lung fields, both sides
    spine = img[40:80, 62:66].mean()
    assert lungs < spine - 0.1  # MONOCHROME2: air dark, bone/soft tissue bright


@pytest.mark.parametrize("lesion", CXR_LESIONS)
def test_cxr_lesion_changes_pixels_under_its_mask(lesion):
    for seed in range(4):
        normal, m0 = make_cxr(rng(seed), 128)
        img, mask = make_cxr(rng(seed), 128, lesion)
        assert not m0.any()
        assert mask.sum() > 20, f"{lesion} seed {seed}: mask too small ({mask.sum()})"
        diff = img - normal  # same seed -> same anatomy and noise: the lesion only
        assert diff[mask].mean() > 0.05, (lesion, seed, diff[mask].mean())
        assert np.abs(diff[~mask]).mean() < 0.2 * diff[mask].mean()


@pytest.mark.parametrize("lesion", CXR_LESIONS)
def test_hard_style_lesions_are_fainter_but_only_under_their_mask(lesion):
    """style="hard" (the detection benchmark's phantoms): same-seed pairs still differ only at
    the lesion, with less contrast than the default style's lesion."""
    for seed in range(3):
        normal, _ = make_cxr(rng(seed), 128, style="hard")
        img, mask = make_cxr(rng(seed), 128, lesion, style="hard")
        d_hard = (img - normal)[mask].mean()
        easy_n, _ = make_cxr(rng(seed), 128)
        easy, easy_mask = make_cxr(rng(seed), 128, lesion)
        assert mask.sum() > 5
        assert 0.01 < d_hard < (easy - easy_n)[easy_mask].mean(), (lesion, seed, d_hard)
        assert np.abs(img - normal)[~mask].mean() < 0.2 * d_hard


def test_hard_style_varies_pose_and_exposure_more():
    def spread(style):
        imgs = np.stack([make_cxr(rng(s), 64, style=style)[0] for s in range(24)])
        return imgs.mean((1, 2)).std(), imgs.std(0).mean()

    (b_def, p_def), (b_hard, p_hard) = spread("default"), spread("hard")
    assert b_hard > 1.3 * b_def and p_hard > p_def  # brightness and per-pixel spread
    with pytest.raises(ValueError, match="unknown phantom style"):
        make_cxr(rng(0), 64, style="easy")


@pytest.mark.parametrize("lesion", CT_LESIONS)
def test_hard_head_ct_lesions_have_the_benchmark_hu(lesion):
    for seed in range(3):
        normal, _ = make_head_ct(rng(seed), (16, 64, 64), style="hard")
        hu, mask = make_head_ct(rng(seed), (16, 64, 64), lesion, style="hard")
        assert mask.sum() > 10
        lo, hi = (45, 80) if lesion == "haemorrhage" else (12, 30)  # noise + blended rim
        assert lo <= np.median(hu[mask]) <= hi, (lesion, seed, np.median(hu[mask]))
        assert np.abs(hu - normal)[~mask].mean() < 1.0


def test_make_cxr_background_fraction():
    for bg in (0.0, 0.3, 0.5):
        img, _ = make_cxr(rng(1), 200, background=bg)
        assert abs((img == 0).mean() - bg) < 0.03
    # The abnormal image with less background than the normal one (flow paper, Appendix A).
    normal, _ = make_cxr(rng(2), 128, background=0.4)
    abnormal, _ = make_cxr(rng(2), 128, "nodule", background=0.0)
    assert (normal == 0).mean() > (abnormal == 0).mean() + 0.3


def test_make_cxr_rejects_unknown_lesion():
    with pytest.raises(ValueError, match="unknown lesion"):
        make_cxr(rng(0), 64, "fracture")
    with pytest.raises(ValueError, match="unknown lesion"):
        make_head_ct(rng(0), (4, 16, 16), "tumour")


@pytest.mark.parametrize("lesion", [None, *CT_LESIONS])
def test_make_head_ct_hounsfield_units(lesion):
    hu, mask = make_head_ct(rng(5), (16, 64, 64), lesion)
    hu2, mask2 = make_head_ct(rng(5), (16, 64, 64), lesion)
    assert hu.dtype == np.int16 and hu.shape == (16, 64, 64) and mask.dtype == bool
    assert np.array_equal(hu, hu2) and np.array_equal(mask, mask2)
    assert np.median(hu[:, :2, :2]) == pytest.approx(-1000, abs=10)  # air in the corners
    mid = hu[8]
    assert 700 < np.percentile(mid, 99.5) < 1800  # skull
    brain = mid[24:40, 20:44]
    assert 15 < np.median(brain) < 45  # brain parenchyma / CSF mix
    assert (hu[~mask] > 1500 + 40).mean() < 0.01


@pytest.mark.parametrize("lesion", CT_LESIONS)
def test_ct_lesion_changes_hu_under_its_mask(lesion):
    for seed in range(3):
        normal, _ = make_head_ct(rng(seed), (16, 64, 64))
        hu, mask = make_head_ct(rng(seed), (16, 64, 64), lesion)
        assert mask.sum() > 30 and mask.any(axis=(1, 2)).sum() >= 2  # spans several slices
        lesion_hu = np.median(hu[mask])
        if lesion == "haemorrhage":
            assert 55 <= lesion_hu <= 85
            assert (hu - normal)[mask].mean() > 20
        else:
            assert 5 <= lesion_hu <= 25
            assert (hu - normal)[mask].mean() < -8
        assert np.abs(hu - normal)[~mask].mean() < 1.0


# --- PadChest --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padchest(tmp_path_factory):
    root = tmp_path_factory.mktemp("padchest")
    csv_path = write_padchest(root, n_normal=12, n_abnormal=12, size=64, seed=1, n_broken=1)
    return root, csv_path


def test_padchest_columns_match_real_csv(padchest):
    _, csv_path = padchest
    with gzip.open(csv_path, "rt") as f:
        header = f.readline().rstrip("\n").split(",")
    assert header[0] == "" and header[1:] == PADCHEST_COLUMNS and len(header) == 36
    if not REAL_PADCHEST.exists():
        pytest.skip("real PadChest CSV not shipped with this torchxrayvision")
    with gzip.open(REAL_PADCHEST, "rt") as f:
        real = f.readline().rstrip("\n").split(",")
    assert header == real


def test_padchest_rows_labels_and_images(padchest):
    root, csv_path = padchest
    df = pd.read_csv(csv_path, index_col=0, dtype={"PatientID": str, "StudyID": str})
    assert list(df.index) == list(range(len(df)))
    assert df.ImageDir.dtype.kind == "i"
    assert df.ImageID.str.fullmatch(r"\d+_[0-9a-z-]+\.png").all()
    assert set(df.Projection) == {"PA", "L"} and set(df.MethodLabel) == {"Physician", "RNN_model"}
    assert df.PatientID.duplicated().any()  # some patients have several images
    assert df.Labels.isna().sum() == 1  # an empty Labels cell, like the real CSV's 103
    parsed = df.Labels.dropna().map(ast.literal_eval)
    assert any(any(e.startswith(" ") for e in lab) for lab in parsed)  # real leading spaces
    stripped = parsed.map(lambda lab: tuple(e.strip() for e in lab))
    assert {("",), ("exclude",), ("suboptimal study",)} <= set(stripped)
    labelled = df.loc[parsed.index]
    keep = labelled[(labelled.MethodLabel == "Physician") & (labelled.Projection == "PA")]
    kind = stripped.loc[keep.index]
    n_normal = (kind == ("normal",)).sum()
    n_abn = kind.map(lambda k: not set(k) & {"normal", "", "exclude", "suboptimal study"}).sum()
    assert n_abn == 12 and n_normal == 12 + 1  # + the broken one
    for lab in df.labelCUIS.dropna():
        assert lab.startswith("[") and "," not in lab  # numpy-array style
    n_broken = 0
    for _, r in df.iterrows():
        path = root / str(r.ImageDir) / r.ImageID
        try:
            with Image.open(path) as im:
                assert im.mode == "I;16"
                arr = np.asarray(im)
        except OSError:
            n_broken += 1
            continue
        assert arr.max() > 30000 and arr.shape == (64, 64)
    assert n_broken == 1
    abnormal = keep.index[kind.map(lambda k: "normal" not in k and k not in {("",)}
                                   and "exclude" not in k and "suboptimal study" not in k)]
    for i in abnormal:
        mask = np.asarray(Image.open(root / "masks" / df.ImageID[i]))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}


def test_padchest_deterministic(tmp_path):
    a = write_padchest(tmp_path / "a", 3, 3, size=32, seed=7).parent
    b = write_padchest(tmp_path / "b", 3, 3, size=32, seed=7).parent
    c = write_padchest(tmp_path / "c", 3, 3, size=32, seed=8).parent
    assert _tree_digest(a) == _tree_digest(b) != _tree_digest(c)


@pytest.mark.parametrize("writer", ["rsna", "folder"])
def test_rsna_and_folder_deterministic(tmp_path, writer):
    def write(d, seed):
        if writer == "rsna":
            return write_rsna(tmp_path / d, 1, 1, 1, size=32, seed=seed)
        return write_folder(tmp_path / d, "cxr", 2, 2, 1, 1, size=32, seed=seed)

    assert _tree_digest(write("a", 4)) == _tree_digest(write("b", 4)) != \
        _tree_digest(write("c", 5))


# --- RSNA ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    return write_rsna(root, n_normal=4, n_not_normal=4, n_opacity=8, size=64, seed=2)


def test_rsna_csvs(rsna):
    labels = pd.read_csv(rsna / "stage_2_train_labels.csv")
    info = pd.read_csv(rsna / "stage_2_detailed_class_info.csv")
    assert list(labels.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    assert list(info.columns) == ["patientId", "class"]
    assert list(labels.patientId) == list(info.patientId)  # rows repeated like the labels
    assert labels.patientId.is_monotonic_increasing
    assert labels.patientId.str.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-"
                                          r"[89ab][0-9a-f]{3}-[0-9a-f]{12}").all()
    per = info.drop_duplicates("patientId")["class"].value_counts().to_dict()
    assert per == {RSNA_CLASSES[0]: 4, RSNA_CLASSES[1]: 4, RSNA_CLASSES[2]: 8}
    assert labels.patientId.duplicated().any()  # someone has 2+ boxes
    neg = labels[labels.Target == 0]
    assert neg[["x", "y", "width", "height"]].isna().all().all()
    pos = labels[labels.Target == 1]
    assert pos[["x", "y", "width", "height"]].notna().all().all()
    assert (pos.x + pos.width <= 64).all() and (pos.y + pos.height <= 64).all()
    assert set(info[labels.Target == 1]["class"]) == {"Lung Opacity"}
    for pid, boxes in pos.groupby("patientId"):  # boxes cover the opacity mask
        mask = np.asarray(Image.open(rsna / "masks" / f"{pid}.png")) > 0
        covered = np.zeros_like(mask)
        for b in boxes.itertuples():
            covered[int(b.y):int(b.y + b.height), int(b.x):int(b.x + b.width)] = True
        assert (mask & covered).sum() >= 0.9 * mask.sum()
    raw = (rsna / "stage_2_train_labels.csv").read_text().splitlines()
    assert any(line.endswith(",,,,,0") for line in raw)


def test_rsna_dicoms_decode(rsna):
    labels = pd.read_csv(rsna / "stage_2_train_labels.csv")
    syntaxes = set()
    for pid in labels.patientId.unique():
        ds = pydicom.dcmread(rsna / "stage_2_train_images" / f"{pid}.dcm")
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (8, 8, 1)
        assert ds.Modality == "CR" and ds.PatientID == pid
        assert str(ds.PatientName).startswith("PHANTOM^")
        arr = ds.pixel_array
        assert arr.dtype == np.uint8 and arr.shape == (64, 64) and arr.max() > 150
    assert "1.2.840.10008.1.2.4.50" in syntaxes  # JPEG Baseline, like the real files
    assert "1.2.840.10008.1.2.1" in syntaxes  # and a few uncompressed
    n_masks = len(list((rsna / "masks").glob("*.png")))
    assert n_masks == 12  # not normal + opacity


def test_rsna_jpeg_close_to_phantom(tmp_path):
    root = write_rsna(tmp_path, 0, 0, 1, size=64, seed=0)
    pid = pd.read_csv(root / "stage_2_train_labels.csv").patientId[0]
    ds = pydicom.dcmread(root / "stage_2_train_images" / f"{pid}.dcm")
    img, _ = make_cxr(item_rng(0, 2, 0), 64, "consolidation")
    err = np.abs(ds.pixel_array / 255.0 - img)
    assert err.mean() < 0.02  # lossy but faithful (or uncompressed)


# --- head-CT DICOM series --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bct(tmp_path_factory):
    root = tmp_path_factory.mktemp("bct")
    shape = (8, 48, 48)
    return write_bct(root, n_normal=3, n_haemorrhage=3, n_infarct=2, shape=shape, seed=3), shape


def _read_series(folder: Path):
    """A minimal reference reader (README: "Head CT (flow method, 3D)"): drop localizers, sort along the normal."""
    slices = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    axial = [s for s in slices if "LOCALIZER" not in s.ImageType]
    n_loc = len(slices) - len(axial)
    iop = np.array(axial[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    axial.sort(key=lambda s: float(np.dot(normal, np.array(s.ImagePositionPatient, float))))
    hu = np.stack([apply_modality_lut(s.pixel_array, s) for s in axial])
    return axial, hu, n_loc


def test_bct_series_tags_and_hu(bct):
    root, shape = bct
    rows = list(csv.DictReader(open(root / "labels.csv")))
    assert [r["case"] for r in rows] == [f"case{i:04d}" for i in range(8)]
    assert sorted(r["finding"] for r in rows) == ["", "", "", "haemorrhage", "haemorrhage",
                                                  "haemorrhage", "infarct", "infarct"]
    n_reversed = n_localizer = n_padded = n_tilted = n_rle = 0
    for i, r in enumerate(rows):
        axial, hu, n_loc = _read_series(root / r["case"])
        n_localizer += n_loc
        assert len(axial) == shape[0]
        assert len({s.SeriesInstanceUID for s in axial}) == 1
        assert len({s.StudyInstanceUID for s in axial}) == 1
        assert len({s.SOPInstanceUID for s in axial}) == shape[0]
        assert all(s.SOPClassUID == pydicom.uid.CTImageStorage for s in axial)
        assert all(s.RescaleIntercept == -1024 and s.RescaleSlope == 1 for s in axial)
        inst = [int(s.InstanceNumber) for s in axial]
        n_reversed += inst == sorted(inst, reverse=True)
        n_tilted += abs(float(axial[0].ImageOrientationPatient[5])) > 0.05
        n_rle += axial[0].file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        # Regenerate the phantom: HU via the modality LUT must match inside the FOV.
        g = item_rng(3, STREAM_BCT, i)
        ref, mask = make_head_ct(g, shape, r["finding"] or None)
        opts = bct_series_options(g, i)
        pad = hu <= -2000
        n_padded += pad.any()
        assert pad.any() == opts["padding"]
        assert np.array_equal(hu[~pad], ref[~pad].astype(float))
        if r["finding"]:
            m = np.load(root / "masks" / f"{r['case']}.npy")
            assert m.dtype == bool and m.shape == shape and np.array_equal(m, mask) and m.any()
            assert int(r["label"]) == 1
        else:
            assert not (root / "masks" / f"{r['case']}.npy").exists() and r["label"] == "0"
    assert n_reversed >= 1 and n_localizer >= 1 and n_padded >= 1 and n_tilted >= 1
    assert n_rle >= 1


def test_bct_deterministic_uids(tmp_path):
    a = write_bct(tmp_path / "a", 1, 1, 0, shape=(4, 32, 32), seed=5)
    b = write_bct(tmp_path / "b", 1, 1, 0, shape=(4, 32, 32), seed=5)
    assert _tree_digest(a) == _tree_digest(b)
    ds = pydicom.dcmread(next((a / "case0000").glob("*.dcm")))
    assert ds.SeriesInstanceUID.startswith(pydicom.uid.PYDICOM_ROOT_UID)


# --- generic folder layout -------------------------------------------------------------------


def test_write_folder_cxr_layout(tmp_path):
    root = write_folder(tmp_path, "cxr", n_train_normal=9, n_train_mixture=8, n_val=3,
                        n_test=2, size=48, seed=0, abnormal_fraction=0.5)
    for split, groups in {"train": ("normal", "mixture"),
                          "val": ("normal", "abnormal"), "test": ("normal", "abnormal")}.items():
        for g in groups:
            assert (root / split / g).is_dir()
    files = lambda d: sorted(p for p in d.iterdir() if p.is_file())  # noqa: E731
    assert len(files(root / "train/normal")) == 9 and len(files(root / "train/mixture")) == 8
    assert len(files(root / "val/abnormal")) == 3 and len(files(root / "test/normal")) == 2
    modes = {Image.open(p).mode for p in (root / "train/normal").glob("*.png")} | \
        {Image.open(p).mode for p in (root / "train/mixture").glob("*.png")}
    assert modes == {"I;16", "L"}  # 16-bit and a few 8-bit PNGs
    dcm = list((root / "train/normal").glob("*.dcm"))
    assert len(dcm) == 1
    ds = pydicom.dcmread(dcm[0])
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 12
    truth_img, _ = make_cxr(item_rng(0, STREAM_FOLDER_CXR, 0), 48)  # item 0
    assert np.abs((4095 - ds.pixel_array.astype(float)) / 4095 - truth_img).max() < 1e-3
    for split in ("val", "test"):
        abn = {p.stem for p in (root / split / "abnormal").iterdir()}
        assert {p.stem for p in (root / split / "masks").iterdir()} == abn
        assert not abn & {p.stem for p in (root / split / "normal").iterdir()}
    truth = pd.read_csv(root / "phantom_truth.csv", keep_default_na=False)
    mix = truth[truth.path.str.startswith("train/mixture")]
    assert mix.label.sum() == 4 and len(mix) == 8
    assert (truth[truth.label == 1].finding != "").all()


def test_write_folder_background_per_class(tmp_path):
    root = write_folder(tmp_path, "cxr", 0, 0, 2, 0, size=64, background=(0.4, 0.0),
                        with_dicom=False)
    zero = lambda p: (np.asarray(Image.open(p)) == 0).mean()  # noqa: E731
    assert min(zero(p) for p in (root / "val/normal").glob("*.png")) > 0.35
    assert max(zero(p) for p in (root / "val/abnormal").glob("*.png")) < 0.05


def test_write_folder_bct_layout(tmp_path):
    root = write_folder(tmp_path, "bct", n_train_normal=2, n_train_mixture=2, n_val=1,
                        n_test=1, size=(6, 32, 32), seed=0)
    npys = list((root / "train/normal").glob("*.npy"))
    series = [p for p in (root / "train/normal").iterdir() if p.is_dir()]
    assert len(npys) == 1 and len(series) == 1
    vol = np.load(npys[0])
    assert vol.dtype == np.int16 and vol.shape == (6, 32, 32) and vol.min() < -900
    assert len(list(series[0].glob("*.dcm"))) >= 6
    test_abn = list((root / "test/abnormal").iterdir())
    assert len(test_abn) == 1 and test_abn[0].is_dir()  # the DICOM-series item
    m = np.load(root / "test/masks" / f"{test_abn[0].stem}.npy")
    assert m.dtype == bool and m.shape == (6, 32, 32) and m.any()
    assert len(list((root / "val/masks").glob("*.npy"))) == 1


def test_write_folder_rejects_bad_modality(tmp_path):
    with pytest.raises(ValueError, match="modality"):
        write_folder(tmp_path, "mri")


def test_cli(tmp_path, capsys):
    out = cli_main(["--format", "folder", "--out", str(tmp_path / "f"), "--n", "2",
                    "--size", "32"])
    assert (out / "train/normal").is_dir()
    assert "phantoms [folder]" in capsys.readouterr().out


def test_speed_100_png(tmp_path, record_property):
    """Measured, not asserted tightly: 100 PNGs of 256² (50 normal, 50 mixture)."""
    t0, c0 = time.perf_counter(), time.process_time()
    write_folder(tmp_path, "cxr", n_train_normal=50, n_train_mixture=50, n_val=0, n_test=0,
                 size=256, with_dicom=False, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    record_property("wall_s_per_100_png_256", wall)
    record_property("cpu_s_per_100_png_256", cpu)
    print(f"\n100 phantom PNGs 256x256: {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert wall < 120


def test_writers_accept_a_total_count(tmp_path):
    """``n`` = total, split evenly over the classes (what the data factory passes)."""
    rsna_root = write_rsna(tmp_path / "r", n=7, size=32)
    labels = pd.read_csv(rsna_root / "stage_2_detailed_class_info.csv")
    counts = labels.drop_duplicates("patientId")["class"].value_counts()
    assert sorted(counts.tolist()) == [2, 2, 3]
    bct_root = write_bct(tmp_path / "b", n=4, shape=(4, 24, 24))
    rows = list(csv.DictReader(open(bct_root / "labels.csv")))
    assert [r["finding"] for r in rows].count("") == 2 and len(rows) == 4
    df = pd.read_csv(write_padchest(tmp_path / "p", n=6, size=32, n_extra=0), index_col=0)
    assert (df.Labels == "['normal']").sum() == 3 and len(df) == 6
