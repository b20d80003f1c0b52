"""DICOM readers against pydicom's real test files (CT, CR MONOCHROME1, multi-slice series,
compressed and broken files)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEGLSLossless

from datamodules import dicom
from datamodules.dicom import (
    DicomReadError,
    MissingDecoderError,
    SeriesError,
    brain_window,
    load_brain_volume,
    read_image,
    read_npy_volume,
    read_series,
)
from datamodules.images import resize_3d

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
CT5N = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"  # 5 axial CT slices
CT_WITH_LOCALIZERS = TEST_FILES / "dicomdirtests" / "98892001"  # CT5N + CT2N (2 localizers)
CT2 = TEST_FILES / "dicomdirtests" / "77654033" / "CT2"  # another 4-slice CT series
CR_MONO1 = TEST_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"  # MONOCHROME1 CR


# --- brain window ---------------------------------------------------------------------------


def test_brain_window_formula():
    hu = np.array([-3024, -1000, -15, -14, -13, 0, 40, 112.4, 112.6, 113, 114, 3000])
    expected = np.array([0, 0, 0, 0, 1, 14, 54, 126, 127, 127, 127, 127])
    out = brain_window(hu)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_example_ct_windows_to_range_with_padding_at_zero(tmp_path):
    ds = pydicom.examples.ct  # 128x128 CT, PixelPaddingValue -2000, rescale -1024
    assert int(ds.PixelPaddingValue) == -2000
    raw = ds.pixel_array.copy()
    raw[:10, :10] = -2000  # the declared padding value, written into a corner
    ds.PixelData = raw.astype(np.int16).tobytes()
    (tmp_path / "ct").mkdir()
    ds.save_as(tmp_path / "ct" / "slice.dcm")

    hu, spacing = read_series(tmp_path / "ct")
    assert hu.shape == (1, 128, 128) and hu.dtype == np.float32
    expected_hu = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(hu[0], expected_hu)
    assert spacing[1:] == pytest.approx((0.661468, 0.661468))
    win = brain_window(hu)
    assert win.min() == 0 and win.max() <= 127
    assert (win[0, :10, :10] == 0).all()  # padding -> HU -3024 -> 0
    np.testing.assert_array_equal(win[0], np.clip(np.rint(expected_hu + 14), 0, 127))
    # The real image content spans the window (soft tissue inside, air/bone clipped).
    assert 0 < (win == 127).mean() < 1 and (win[0, 10:, 10:] > 0).any()


def test_window_is_applied_before_resampling(tmp_path):
    hu = np.full((4, 16, 16), 30.0, np.float32)  # brain tissue, window value 44
    hu[:, :, :4] = -2000.0  # padding on the left
    np.save(tmp_path / "v.npy", hu)
    out = load_brain_volume(tmp_path / "v.npy", (4, 8, 6))
    expected = resize_3d(brain_window(hu).astype(np.float32), (4, 8, 6)) / 127
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # Resampling HU first drags the boundary column (a blend of -2000 and 30 HU) to 0;
    # windowing first blends 0 and 44 instead.
    wrong = brain_window(resize_3d(hu, (4, 8, 6))) / 127
    assert np.abs(out - wrong).max() > 0.1
    assert out.min() >= 0 and out.max() <= 1


# --- series ---------------------------------------------------------------------------------


def _positions(folder):
    out = {}
    for f in Path(folder).iterdir():
        ds = pydicom.dcmread(f)
        out[f.name] = (float(ds.ImagePositionPatient[2]), int(ds.InstanceNumber), ds.pixel_array)
    return out


def test_real_series_sorted_along_slice_normal_not_instance_number():
    info = _positions(CT5N)
    # In this real series InstanceNumber runs against the z position.
    by_instance = sorted(info.values(), key=lambda t: t[1])
    assert by_instance[0][0] > by_instance[-1][0]
    hu, (dz, dy, dx) = read_series(CT5N)
    assert hu.shape == (5, 16, 16)
    by_z = sorted(info.values(), key=lambda t: t[0])  # normal (0, 0, 1): ascending z
    for k, (_, _, px) in enumerate(by_z):
        np.testing.assert_allclose(hu[k], px.astype(np.float64) - 1024)  # slope 1, icpt -1024
    assert dz == pytest.approx(2.5) and dy == pytest.approx(0.488281)


def test_series_order_ignores_instance_number_and_file_names(tmp_path):
    ref, _ = read_series(CT5N)
    files = sorted(CT5N.iterdir())
    for i, f in enumerate(files):  # reversed InstanceNumbers, file names in another order
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 100 - int(ds.InstanceNumber)
        ds.save_as(tmp_path / f"z{(7 * i) % 5}.dcm")
    hu, _ = read_series(tmp_path)
    np.testing.assert_array_equal(hu, ref)


def test_oblique_normal_from_cross_product(tmp_path):
    # Flip the row direction: normal = row x col points to -z, so order must reverse.
    for f in CT5N.iterdir():
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.save_as(tmp_path / f.name)
    ref, _ = read_series(CT5N)
    hu, (dz, _, _) = read_series(tmp_path)
    np.testing.assert_array_equal(hu, ref[::-1])
    assert dz == pytest.approx(2.5)


def test_localizers_dropped():
    # The real patient folder holds the axial series and two LOCALIZER images of another series.
    hu, _ = read_series(CT_WITH_LOCALIZERS)
    assert hu.shape == (5, 16, 16)


def test_two_series_is_an_error_listing_them(tmp_path):
    for src in (CT5N, CT2):
        for f in src.iterdir():
            shutil.copy(f, tmp_path / f"{src.name}_{f.name}.dcm")
    uid5 = pydicom.dcmread(next(CT5N.iterdir())).SeriesInstanceUID
    uid2 = pydicom.dcmread(next(CT2.iterdir())).SeriesInstanceUID
    with pytest.raises(SeriesError) as e:
        read_series(tmp_path)
    assert uid5 in str(e.value) and uid2 in str(e.value) and "series_uid" in str(e.value)
    hu, _ = read_series(tmp_path, series_uid=uid2)
    assert hu.shape == (4, 16, 16)


def test_real_head_ct_jpeg2000_slice(tmp_path):
    src = get_testdata_file("J2K_pixelrep_mismatch.dcm")  # 512x512 head CT, JPEG 2000
    (tmp_path / "s").mkdir()
    shutil.copy(src, tmp_path / "s" / "a.dcm")
    hu, _ = read_series(tmp_path / "s")
    assert hu.shape == (1, 512, 512)
    win = brain_window(hu)
    # A head slice: air outside (0), brain inside the window, bone saturated.
    assert (win == 0).mean() > 0.2 and ((win > 10) & (win < 100)).mean() > 0.1


# --- 2D images ------------------------------------------------------------------------------


def test_monochrome1_inverted(tmp_path):
    ds = pydicom.dcmread(CR_MONO1)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = read_image(CR_MONO1)
    # Independent formula: modality LUT, scaled by the LUT image of the stored range, inverted.
    slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    lo, hi = icpt, (2 ** int(ds.BitsStored) - 1) * slope + icpt
    expected = 1 - (ds.pixel_array * slope + icpt - lo) / (hi - lo)
    np.testing.assert_allclose(img, expected, atol=1e-6)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "m2.dcm")
    np.testing.assert_allclose(read_image(tmp_path / "m2.dcm"), 1 - img, atol=1e-6)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "CT_small.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_and_native_images_decode(name):
    path = get_testdata_file(name)
    with pytest.warns(UserWarning) if "rgb" in name else _nullcontext():
        img = read_image(path)
    assert img.ndim == 2 and img.dtype == np.float32
    assert 0 <= img.min() and img.max() <= 1 and img.std() > 0


def test_jpeg_ls_same_pixels_as_uncompressed():
    a = read_image(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    b = read_image(get_testdata_file("MR_small.dcm"))
    np.testing.assert_array_equal(a, b)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("name,match", [
    ("MR_truncated.dcm", "truncated"),
    ("badVR.dcm", "unreadable"),
    ("no_meta.dcm", "file meta"),
])
def test_broken_files_raise_naming_the_file(name, match):
    path = get_testdata_file(name)
    with pytest.raises(DicomReadError, match=match) as e:
        read_image(path)
    assert name in str(e.value)
    with pytest.raises(DicomReadError):
        dicom.verify_dicom(path)


def test_missing_decoder_names_file_syntax_and_package(monkeypatch):
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable",
                        {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    for check in (read_image, dicom.verify_dicom):
        with pytest.raises(MissingDecoderError) as e:
            check(path)
        msg = str(e.value)
        assert "MR_small_jpeg_ls_lossless.dcm" in msg and "JPEG-LS Lossless" in msg
        assert "pylibjpeg-libjpeg" in msg and "python-gdcm" in msg
    # Same message when only pydicom itself notices (our pre-check bypassed).
    monkeypatch.setattr(dicom, "check_decoder", lambda ds, p: None)
    with pytest.raises(MissingDecoderError, match="pylibjpeg-libjpeg"):
        read_image(path)


def test_npy_volume_rejects_nan_and_bad_shape(tmp_path):
    v = np.zeros((2, 4, 4), np.float32)
    v[1, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", v)
    with pytest.raises(dicom.ImageReadError, match="NaN/Inf"):
        read_npy_volume(tmp_path / "nan.npy")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    with pytest.raises(dicom.ImageReadError, match="D, H, W"):
        read_npy_volume(tmp_path / "flat.npy")


def _with_name_in_instance_number(src: Path, dst: Path, drop_positions: bool) -> None:
    """A real series whose InstanceNumber (IS) holds a patient name, as a broken export
    writes it, and optionally without slice positions."""
    dst.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 10_000_000 + i  # 8 digits, patched to the name below
        if drop_positions:
            del ds.ImagePositionPatient
        ds.save_as(dst / f.name)
        raw = (dst / f.name).read_bytes()
        (dst / f.name).write_bytes(raw.replace(str(10_000_000 + i).encode(), b"DOE^JOHN"))


@pytest.mark.parametrize("drop_positions", [False, True])
def test_header_values_never_reach_messages(tmp_path, capsys, caplog, recwarn,
                                            drop_positions):
    """pydicom quotes invalid values in its warnings and errors: the readers re-word them
    (file and VR / tag named, value not shown), on the console, in logs and in exceptions."""
    import logging

    folder = tmp_path / "case"
    _with_name_in_instance_number(CT5N, folder, drop_positions)
    caplog.set_level(logging.DEBUG)
    if drop_positions:  # the order then rests on the broken InstanceNumber: a clear error
        with pytest.raises(dicom.SeriesError, match=r"InstanceNumber \(0020,0013\) is not a "
                                                    "number") as e:
            read_series(folder)
        assert "DOE" not in str(e.value)
    else:
        read_series(folder)
        for f in sorted(folder.iterdir()):
            dicom.verify_dicom(f)
            ds = dicom.dcmread(f)
            with dicom.header_warnings(f):
                _ = ds.InstanceNumber  # the lazy conversion that warns
        assert "non-conforming DICOM header value(s) (VR IS) ignored" in caplog.text
    out = capsys.readouterr()
    shown = out.out + out.err + caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "DOE" not in shown and "JOHN" not in shown


# --- the quick check decides what the reader will do ---------------------------------------


@pytest.mark.parametrize("path", sorted(TEST_FILES.glob("*.dcm")), ids=lambda p: p.name)
def test_quick_check_agrees_with_the_reader_on_pydicoms_files(path, recwarn):
    """Every pydicom test file (multi-frame, PALETTE COLOR, broken JPEG / J2K, truncated,
    subsampled YBR_FULL_422, ...): the quick check passes exactly the files read_image reads,
    so nothing that passes the check crashes training later."""
    from datamodules.common import verify_item
    from datamodules.images import ImageReadError, read_2d

    try:
        read_2d(path)
        readable = True
    except ImageReadError:
        readable = False
    if readable:
        verify_item(path)
    else:
        with pytest.raises(ImageReadError, match=re.escape(path.name)):
            verify_item(path)


def test_degenerate_volumes_are_refused_by_check_and_reader(tmp_path):
    from datamodules.common import verify_item
    from datamodules.images import ImageReadError

    for shape in [(0, 32, 32), (1, 32, 32), (4, 1, 32)]:
        p = tmp_path / f"v{shape[0]}_{shape[1]}.npy"
        np.save(p, np.zeros(shape, np.int16))
        with pytest.raises(ImageReadError, match="at least 2 voxels"):
            verify_item(p)
        with pytest.raises(ImageReadError, match="at least 2 voxels"):
            load_brain_volume(p, (8, 16, 16))
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted(CT5N.iterdir())[0], one / "a.dcm")
    with pytest.raises(ImageReadError, match="only 1 image slice"):
        verify_item(one)
    with pytest.raises(SeriesError, match="only 1 image slice"):
        load_brain_volume(one, (8, 16, 16))
    dup = tmp_path / "dup"
    shutil.copytree(CT5N, dup)
    first = sorted(dup.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dup / "copy.dcm")  # a second slice at the same position
    with pytest.raises(ImageReadError, match="share a position"):
        verify_item(dup)
