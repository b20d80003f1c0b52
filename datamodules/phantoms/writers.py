"""Write phantom data sets in the real on-disk formats (README: "Data sets").

The readers in ``datamodules`` run the same code on these files as on the real data sets, so
every quirk the readers must handle appears here on purpose (and is listed in each writer's
docstring): lateral and RNN-labelled PadChest rows, ``['']`` / ``exclude`` / ``suboptimal
study`` / missing labels, JPEG Baseline RSNA DICOMs next to a few uncompressed ones, head-CT
series with reversed InstanceNumber, gantry tilt, a localizer image and -2000 padding.

Everything is deterministic given ``seed``: item ``i`` of a writer draws from
``item_rng(seed, stream, i)``, the volume/image first, so tests can regenerate it.

Additions that are not part of the real formats (documented, ignored by readers of the real
data): lesion masks under ``<root>/masks/`` and ``phantom_truth.csv`` (folder layout).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from datamodules.phantoms.anatomy import CT_LESIONS, CXR_LESIONS, make_cxr, make_head_ct

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_MIN_ITEMS = 50  # show a progress bar from this many items on

# Per-writer random streams: item i of stream s uses item_rng(seed, s, i).
STREAM_PADCHEST, STREAM_RSNA, STREAM_BCT, STREAM_FOLDER_CXR, STREAM_FOLDER_BCT = range(1, 6)
STREAM_META = 99  # table-level draws (ids, orders, flags)


def item_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), int(index)])


def _class_counts(total: int | None, *counts: int | None, default: int = 24) -> list[int]:
    """Counts per class: given ones kept, missing ones share ``total`` (or ``default``)."""
    missing = [i for i, c in enumerate(counts) if c is None]
    out = [int(c) if c is not None else 0 for c in counts]
    if total is None:
        return [default if i in missing else c for i, c in enumerate(out)]
    rest = max(int(total) - sum(out), 0)
    for k, i in enumerate(missing):
        out[i] = rest // len(missing) + (1 if k < rest % len(missing) else 0)
    for c in out:
        if c < 0:
            raise ValueError(f"negative class count in {counts}")
    return out


def _progress(it: Iterable[T], description: str, total: int, progress: bool | None
              ) -> Iterator[T]:
    enabled = total >= PROGRESS_MIN_ITEMS if progress is None else progress
    if not enabled:
        yield from it
        return
    from datamodules.progress import track

    yield from track(it, description=description, total=total)


# ------------------------------------------------------------------------------------------
# Image files
# ------------------------------------------------------------------------------------------


def save_png16(path: Path, img: np.ndarray) -> None:
    """(H, W) float in [0, 1] -> 16-bit grayscale PNG (Pillow mode ``I;16``), full range."""
    u16 = np.round(np.clip(img, 0, 1) * 65535.0).astype(np.uint16)
    Image.fromarray(u16).save(path, compress_level=1)


def save_png8(path: Path, img: np.ndarray) -> None:
    u8 = np.round(np.clip(img, 0, 1) * 255.0).astype(np.uint8)
    Image.fromarray(u8).save(path, compress_level=1)


def save_mask_png(path: Path, mask: np.ndarray) -> None:
    """Bool mask -> 8-bit PNG, 255 = lesion."""
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, compress_level=1)


def _dicom_meta(sop_class: str, sop_uid: str, transfer_syntax: str):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _new_dataset(sop_class: str, sop: str, syntax: str, modality: str, study_date: str,
                 study_time: str):
    """A DICOM data set with its file meta, SOP identity, study time and modality."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.file_meta = _dicom_meta(sop_class, sop, syntax)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyDate, ds.StudyTime = study_date, study_time
    ds.Modality = modality
    return ds


def _uid(seed: int, *parts) -> str:
    """Deterministic DICOM UID (pydicom root + SHA-512 of the parts)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["phantom", str(seed), *map(str, parts)])


def write_cr_dicom(path: Path, img: np.ndarray, *, patient_id: str, patient_index: int,
                   seed: int, compressed: bool = True, view: str = "PA", sex: str = "F",
                   age: int = 50, monochrome1: bool = False, bits: int = 8) -> None:
    """A radiograph as an RSNA-style DICOM: Secondary Capture, Modality CR, 8-bit
    MONOCHROME2, JPEG Baseline (1.2.840.10008.1.2.4.50) or Explicit VR Little Endian.

    pydicom 3 has no JPEG Baseline *encoder* (only decoders), so the JPEG is written by Pillow
    and encapsulated with ``pydicom.encaps.encapsulate``. ``monochrome1`` / ``bits=16`` write
    an uncompressed inverted 12-bit radiograph instead (CR plates often store MONOCHROME1)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage

    compressed = compressed and bits == 8 and not monochrome1
    sop = _uid(seed, "cr", patient_id, "sop")
    ds = _new_dataset(SecondaryCaptureImageStorage, sop,
                      JPEGBaseline8Bit if compressed else ExplicitVRLittleEndian, "CR",
                      "19010101", "000000.00")
    ds.AccessionNumber = ""
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view}"
    ds.PatientName = f"PHANTOM^{patient_index}"  # placeholder demographics only
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = _uid(seed, "cr", patient_id, "study")
    ds.SeriesInstanceUID = _uid(seed, "cr", patient_id, "series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    h, w = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = h, w
    ps = round(0.168 * 1024 / max(h, w), 4)
    ds.PixelSpacing = [ps, ps]
    ds.PixelRepresentation = 0
    if bits == 8:
        arr = np.round(np.clip(img, 0, 1) * 255.0).astype(np.uint8)
        if monochrome1:
            arr = 255 - arr
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    else:
        arr = np.round(np.clip(img, 0, 1) * 4095.0).astype(np.uint16)
        if monochrome1:
            arr = 4095 - arr
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    if compressed:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.add_new(0x7FE00010, "OB", encapsulate([buf.getvalue()]))
    else:
        ds.add_new(0x7FE00010, "OB" if bits == 8 else "OW", arr.tobytes())
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(folder: Path, hu: np.ndarray, *, case: str, case_index: int, seed: int,
                    reversed_instances: bool = False, tilt_deg: float = 0.0,
                    localizer: bool = False, padding: bool = False, signed: bool | None = None,
                    rle: bool = False, name_by_uid: bool = False,
                    fov_mm: float = 230.0, slice_mm: float | None = None) -> list[Path]:
    """One axial head-CT series, one CT Image Storage file per slice (slice 0 inferior).

    Stored value = HU + 1024 with RescaleSlope 1 / RescaleIntercept -1024, as scanners do:
    unsigned 12-bit (PixelRepresentation 0) or signed 16-bit (1). ``padding`` stores -2000
    (PixelPaddingValue, signed) outside a circular field of view. ``tilt_deg`` writes a gantry
    tilt in ImageOrientationPatient / GantryDetectorTilt (the pixels are not sheared).
    ``reversed_instances`` numbers slices top-down; ``localizer`` adds a scout image
    (ImageType ORIGINAL/PRIMARY/LOCALIZER) in the same series and folder; ``rle`` writes RLE
    Lossless (pydicom's own encoder) instead of Explicit VR Little Endian."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless

    folder.mkdir(parents=True, exist_ok=True)
    d, h, w = hu.shape
    signed = padding if signed is None else (signed or padding)
    ps = fov_mm / w
    dz = slice_mm if slice_mm is not None else round(5.0 * 32 / d, 3)
    study = _uid(seed, "ct", case, "study")
    series = _uid(seed, "ct", case, "series")
    frame = _uid(seed, "ct", case, "frame")
    t = math.radians(tilt_deg)
    iop = [1.0, 0.0, 0.0, 0.0, round(math.cos(t), 6), round(math.sin(t), 6)]
    x0, y0, z0 = -ps * (w - 1) / 2, -ps * (h - 1) / 2 + 20.0, -60.0

    stored = hu.astype(np.int32) + 1024
    if padding:
        yy, xx = np.mgrid[:h, :w]
        outside = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 > (0.5 * min(h, w)) ** 2
        stored = np.where(outside[None], -2000, stored)
    if signed:
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
    else:
        stored = np.clip(stored, 0, 4095).astype(np.uint16)

    def base(sop: str, instance: int, syntax: str) -> Dataset:
        ds = _new_dataset(CTImageStorage, sop, syntax, "CT", "20000101", "000000")
        ds.Manufacturer = "PHANTOM"
        ds.PatientName = f"PHANTOM^{case_index}"  # placeholder demographics only
        ds.PatientID = f"PHANTOM-{case_index:05d}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "HEAD"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.SeriesDescription = "HEAD PHANTOM"
        ds.InstanceNumber = instance
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        return ds

    def set_pixels(ds: Dataset, arr: np.ndarray, pad: bool) -> None:
        ds.Rows, ds.Columns = arr.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16 if signed else 12
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if pad:
            ds.PixelPaddingValue = -2000
        if rle:
            ds.compress(RLELossless, arr, generate_instance_uid=False)
        else:
            ds.add_new(0x7FE00010, "OW", arr.tobytes())

    syntax = RLELossless if rle else ExplicitVRLittleEndian
    paths = []
    for k in range(d):
        instance = d - k if reversed_instances else k + 1
        sop = _uid(seed, "ct", case, "slice", k)
        ds = base(sop, instance, syntax)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = dz
        ds.PixelSpacing = [round(ps, 6), round(ps, 6)]
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z0 + k * dz, 4)]
        ds.SliceLocation = round(z0 + k * dz, 4)
        ds.GantryDetectorTilt = tilt_deg
        set_pixels(ds, stored[k], padding)
        name = f"{sop}.dcm" if name_by_uid else f"IM-{instance:04d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    if localizer:
        # Lateral scout: a projection through the head, sagittal orientation, other size.
        scout_hu = np.clip(hu.astype(np.float32), -1000, 2000).mean(axis=2)  # (D, H)
        scout = np.repeat(scout_hu[::-1], 2, axis=0)  # (2D, H): superior at the top
        scout = np.clip(scout + 1024, 0, 4095).astype(np.int16 if signed else np.uint16)
        sop = _uid(seed, "ct", case, "localizer")
        ds = base(sop, 0, syntax)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.PixelSpacing = [round(dz / 2, 6), round(ps, 6)]
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.ImagePositionPatient = [0.0, round(y0, 4), round(z0 + d * dz, 4)]
        ds.SliceThickness = 0
        set_pixels(ds, scout, False)  # no FOV padding on a scout
        ds.save_as(folder / "IM-0000-scout.dcm", enforce_file_format=True)
        paths.append(folder / "IM-0000-scout.dcm")
    return paths


# ------------------------------------------------------------------------------------------
# PadChest
# ------------------------------------------------------------------------------------------

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
# The real 36 columns, in order; the first (unnamed) is the pandas index.
PADCHEST_COLUMNS = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
    "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
    "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM",
    "ExposureTime", "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel",
    "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS",
    "LocalizationsCUIS",
]
# Phantom lesion -> PadChest labels (UMLS CUIs as in the real CSV) and report stem.
PADCHEST_FINDINGS = {
    "nodule": (["nodule"], ["C0034079"], " nodul pulmonar ."),
    "consolidation": (["consolidation", "pneumonia"], ["C0521530", "C0032285"],
                      " consolid neumon ."),
    "effusion": (["pleural effusion"], ["C2073625"], " derram pleural ."),
    "cardiomegaly": (["cardiomegaly"], ["C0018800"], " cardiomegali ."),
}
PADCHEST_LOC_CUIS = {
    "loc right upper lobe": "C1261074", "loc left upper lobe": "C1261076",
    "loc right lower lobe": "C1261075", "loc left lower lobe": "C1261077",
    "loc right": "C0444532", "loc left": "C0443246", "loc pleural": "C0032225",
    "loc bilateral": "C0238767", "loc cardiac": "C1522601",
}


def _list_str(items: list[str]) -> str:
    """Python-list string as in the real CSV: ``"['pneumonia', ' consolidation']"``."""
    return "[" + ", ".join(repr(s) for s in items) + "]"


def _cui_str(cuis: list[str]) -> str:
    """numpy-array string as in the real CSV: ``"['C0521530' 'C0032285']"``."""
    return "[" + " ".join(repr(c) for c in cuis) + "]"


def _digits(rng: np.random.Generator, n: int) -> str:
    return str(rng.integers(1, 10)) + "".join(map(str, rng.integers(0, 10, n - 1)))


def _localizations(lesion: str, mask: np.ndarray) -> list[str]:
    if lesion == "cardiomegaly":
        return ["loc cardiac"]
    h, w = mask.shape
    cols = np.flatnonzero(mask.any(0))
    left_img, right_img = (cols < w / 2).any(), (cols >= w / 2).any()
    if left_img and right_img:
        return ["loc bilateral"] + (["loc pleural"] if lesion == "effusion" else [])
    side = "right" if left_img else "left"  # PA view: the patient's right is on image left
    if lesion == "effusion":
        return [f"loc {side}", "loc pleural"]
    row = np.flatnonzero(mask.any(1)).mean()
    return [f"loc {side} {'upper' if row < h * 0.45 else 'lower'} lobe"]


def write_padchest(root, n_normal: int | None = None, n_abnormal: int | None = None,
                   size: int = 256, seed: int = 0, n_patients: int | None = None,
                   n_extra: int | None = None, n_broken: int = 0, n: int | None = None,
                   progress: bool | None = None) -> Path:
    """PadChest layout: ``<root>/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz``
    (the real 36 columns in the real order, first unnamed = index) and 16-bit PNGs at
    ``<root>/<ImageDir>/<ImageID>``.

    ``n_normal`` / ``n_abnormal`` count the rows a reader following README "Data sets" keeps:
    ``MethodLabel == 'Physician'``, ``Projection == 'PA'``, Labels exactly ``['normal']`` or a
    list of findings (nodule, consolidation + pneumonia, pleural effusion, cardiomegaly). On top
    come rows a reader must filter or apply a policy to (``n_extra``, default 3 % of the
    images, at least 1; 0 disables them): ``n_extra`` lateral (``Projection 'L'``) images that
    share a study with a PA row, ``n_extra`` PA rows labelled by ``RNN_model``, and one
    Physician/PA row each with Labels ``['']``, ``['exclude']``, ``['suboptimal study']`` and
    an empty Labels cell (the real CSV has 103). ``n_broken`` adds normal Physician/PA rows
    whose PNG is truncated (as some real files are). Lateral rows get PA phantom pixels.

    Not part of PadChest: lesion masks ``<root>/masks/<ImageID>`` (8-bit PNG, 255 = lesion)
    for every image with a lesion.

    Counts left None come from ``n`` (the total, split evenly), else 24 per class.

    Returns the labels CSV path.
    """
    n_normal, n_abnormal = _class_counts(n, n_normal, n_abnormal)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = item_rng(seed, STREAM_META, STREAM_PADCHEST)
    n_img = n_normal + n_abnormal
    if n_extra is None:
        n_extra = max(1, round(0.03 * n_img)) if n_img else 0
    # kinds: (projection, method, labels-kind)
    kinds = [("PA", "Physician", "normal")] * n_normal + \
        [("PA", "Physician", "finding")] * n_abnormal + \
        [("PA", "RNN_model", "normal" if k % 2 else "finding") for k in range(n_extra)]
    if n_extra:
        kinds += [("PA", "Physician", k) for k in ("empty", "exclude", "suboptimal", "nan")]
    kinds += [("PA", "Physician", "broken")] * n_broken
    order = meta.permutation(len(kinds))
    kinds = [kinds[i] for i in order]
    n_rows_pa = len(kinds)
    n_pat = n_patients or max(1, round(n_rows_pa / 1.4))
    n_pat = min(n_pat, n_rows_pa)
    patient_of = np.concatenate([np.arange(n_pat), meta.integers(0, n_pat, n_rows_pa - n_pat)])
    patient_of = patient_of[meta.permutation(n_rows_pa)]
    patients = [dict(id=_digits(meta, int(meta.integers(36, 40))),
                     birth=float(meta.integers(1925, 2000)),
                     sex=str(meta.choice(["M", "F"]))) for _ in range(n_pat)]
    lateral_of = sorted(meta.choice(n_rows_pa, size=min(n_extra, n_rows_pa), replace=False))
    # Several ImageDir folders even for small sets, so readers must use the column.
    n_dirs = min(55, max(2, math.ceil((n_rows_pa + len(lateral_of)) / 100)))
    lesions = meta.choice(CXR_LESIONS, size=len(kinds))

    rows = []
    jobs = []  # (row index, labels kind, lesion or None)
    for i, (proj, method, kind) in enumerate(kinds):
        pat = patients[patient_of[i]]
        study = _digits(meta, int(meta.integers(32, 39)))
        date = int(f"{meta.integers(2009, 2018)}{meta.integers(1, 13):02d}"
                   f"{meta.integers(1, 29):02d}")
        rows.append(_padchest_row(meta, study, date, pat, proj, method, size, n_dirs))
        jobs.append((i, kind, str(lesions[i]) if kind == "finding" else None))
    for j, i in enumerate(lateral_of):  # a lateral image in the same study as row i
        pa = rows[i]
        pat = patients[patient_of[i]]
        row = _padchest_row(meta, pa["StudyID"], pa["StudyDate_DICOM"], pat, "L",
                            pa["MethodLabel"], size, n_dirs)
        rows.append(row)
        kind = kinds[i][2] if kinds[i][2] in ("normal", "finding") else "normal"
        jobs.append((n_rows_pa + j, kind, str(lesions[i]) if kind == "finding" else None))

    (root / "masks").mkdir(exist_ok=True)
    for i, kind, lesion in _progress(jobs, "PadChest phantoms", len(jobs), progress):
        row = rows[i]
        img, mask = make_cxr(item_rng(seed, STREAM_PADCHEST, i), size, lesion)
        rng = item_rng(seed, STREAM_PADCHEST + 100, i)
        _padchest_labels(row, rng, kind, lesion, mask)
        folder = root / str(row["ImageDir"])
        folder.mkdir(exist_ok=True)
        save_png16(folder / row["ImageID"], img)
        if kind == "broken":
            data = (folder / row["ImageID"]).read_bytes()
            (folder / row["ImageID"]).write_bytes(data[: len(data) // 2])
        if lesion is not None:
            save_mask_png(root / "masks" / row["ImageID"], mask)

    df = pd.DataFrame(rows, columns=PADCHEST_COLUMNS)
    csv_path = root / PADCHEST_CSV
    # The real file writes missing values as "None"; gzip mtime 0 keeps the bytes
    # deterministic.
    df.to_csv(csv_path, index=True, na_rep="None",
              compression={"method": "gzip", "mtime": 0})
    log.info("PadChest phantoms: %d rows (%d normal, %d abnormal PA/Physician) in %s",
             len(df), n_normal, n_abnormal, root)
    return csv_path


def _padchest_row(meta, study, date, pat, proj, method, size, n_dirs) -> dict:
    philips = bool(meta.random() < 0.5)
    suffix = (f"{meta.integers(0, 100):02d}-{meta.integers(0, 1000):03d}-"
              f"{meta.integers(0, 1000):03d}") if philips else \
        "".join(meta.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), 6))
    view = {"PA": meta.choice(["POSTEROANTERIOR", "PA", None], p=[0.5, 0.1, 0.4]),
            "L": meta.choice(["LATERAL", "LL", None], p=[0.5, 0.1, 0.4])}[proj]
    current = float(meta.choice([250.0, 320.0, 400.0]))
    exposure = float(meta.choice([2.0, 3.0, 4.0, 10.0]))
    return {
        "ImageID": f"{study}_{suffix}.png",
        "ImageDir": int(meta.integers(0, n_dirs)),
        "StudyDate_DICOM": date,
        "StudyID": study,
        "PatientID": pat["id"],
        "PatientBirth": pat["birth"],
        "PatientSex_DICOM": pat["sex"],
        "ViewPosition_DICOM": view,
        "Projection": proj,
        "MethodProjection": "Manual review of DICOM fields",
        "Pediatric": "No",
        "Modality_DICOM": "DX" if philips and meta.random() < 0.3 else "CR",
        "Manufacturer_DICOM": "PhilipsMedicalSystems" if philips else
        "ImagingDynamicsCompanyLtd",
        "PhotometricInterpretation_DICOM": "MONOCHROME2",
        "PixelRepresentation_DICOM": 0,
        "PixelAspectRatio_DICOM": "['1', '1']" if philips else None,
        "SpatialResolution_DICOM": float(meta.choice([0.143, 0.148, 0.2])) if philips else None,
        "BitsStored_DICOM": 12 if not philips or meta.random() < 0.5 else 10,
        "WindowCenter_DICOM": int(meta.integers(1800, 2800)),
        "WindowWidth_DICOM": int(meta.integers(2000, 4096)),
        "Rows_DICOM": size,
        "Columns_DICOM": size,
        "XRayTubeCurrent_DICOM": current,
        "Exposure_DICOM": exposure,
        "ExposureInuAs_DICOM": exposure * 1000 + (500 if exposure == 2.0 else 0),
        "ExposureTime": float(meta.choice([8.0, 10.0, 25.0])),
        "RelativeXRayExposure_DICOM": None if philips else round(float(meta.normal(0, 1.5)), 2),
        "ReportID": int(meta.integers(3_200_000, 5_520_000)),
        "Report": "",
        "MethodLabel": method,
        "Labels": "",
        "Localizations": "[]",
        "LabelsLocalizationsBySentence": "",
        "labelCUIS": "[]",
        "LocalizationsCUIS": "[]",
    }


def _padchest_labels(row: dict, rng, kind: str, lesion: str | None, mask) -> None:
    if kind in ("normal", "broken"):
        row.update(Labels="['normal']", Report=" sin hallazg patolog .",
                   LabelsLocalizationsBySentence="[['normal'], ['normal']]")
    elif kind == "finding":
        labels, cuis, report = PADCHEST_FINDINGS[lesion]
        locs = _localizations(lesion, mask)
        # Real rows often carry a leading space on later elements: "['a', ' b']".
        shown = [lab if k == 0 or rng.random() < 0.5 else " " + lab
                 for k, lab in enumerate(labels)]
        row.update(Labels=_list_str(shown), Report=report,
                   Localizations=_list_str(locs),
                   LabelsLocalizationsBySentence="[" + _list_str(shown + locs) + "]",
                   labelCUIS=_cui_str(cuis),
                   LocalizationsCUIS=_cui_str([PADCHEST_LOC_CUIS[loc] for loc in locs]))
    elif kind == "empty":
        row.update(Labels="['']", Report=" .", LabelsLocalizationsBySentence="[['']]",
                   labelCUIS="['']")
    elif kind == "exclude":
        row.update(Labels="['exclude']", Report=" exclu .",
                   LabelsLocalizationsBySentence="[['exclude']]")
    elif kind == "suboptimal":
        row.update(Labels="['suboptimal study']", Report=" estudi suboptim .",
                   LabelsLocalizationsBySentence="[['suboptimal study']]",
                   labelCUIS="['C2828075']")
    elif kind == "nan":
        row.update(Labels=None, Report=None, Localizations=None,
                   LabelsLocalizationsBySentence=None, labelCUIS=None, LocalizationsCUIS=None)


# ------------------------------------------------------------------------------------------
# RSNA Pneumonia
# ------------------------------------------------------------------------------------------

RSNA_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
RSNA_NOT_NORMAL_LESIONS = ("nodule", "effusion", "cardiomegaly")


def mask_boxes(mask: np.ndarray, min_area: float = 0.002) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x, y, width, height) of the connected components of a mask, ignoring
    components smaller than ``min_area`` of the image."""
    lab, n = ndimage.label(mask)
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or (lab[sl] == k).sum() < min_area * mask.size:
            continue
        ys, xs = sl
        boxes.append((xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start))
    return boxes


def write_rsna(root, n_normal: int | None = None, n_not_normal: int | None = None,
               n_opacity: int | None = None, size: int = 256, seed: int = 0,
               n: int | None = None, progress: bool | None = None) -> Path:
    """RSNA Pneumonia Detection layout:

    - ``stage_2_train_labels.csv``: ``patientId,x,y,width,height,Target``, one row per box
      (x, y, width, height in pixels of the image, floats like ``264.0``), empty box fields
      and Target 0 for patients without opacity;
    - ``stage_2_detailed_class_info.csv``: ``patientId,class`` (``Normal``, ``No Lung Opacity /
      Not Normal``, ``Lung Opacity``), rows repeated like the labels;
    - ``stage_2_train_images/<patientId>.dcm``: Secondary Capture, Modality CR, 8-bit
      MONOCHROME2, JPEG Baseline like the real files; ~10 % (at least one) uncompressed.

    ``Lung Opacity`` patients get a consolidation (one or two regions -> one or two boxes),
    ``No Lung Opacity / Not Normal`` a nodule, effusion or cardiomegaly. Not part of RSNA:
    masks ``<root>/masks/<patientId>.png`` for every image with a lesion. Counts left None
    come from ``n`` (the total, split evenly), else 24 per class. Returns ``root``.
    """
    n_normal, n_not_normal, n_opacity = _class_counts(n, n_normal, n_not_normal, n_opacity)
    root = Path(root)
    (root / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    meta = item_rng(seed, STREAM_META, STREAM_RSNA)
    classes = [0] * n_normal + [1] * n_not_normal + [2] * n_opacity
    classes = [classes[i] for i in meta.permutation(len(classes))]
    n = len(classes)
    ids = [str(uuid.UUID(bytes=meta.bytes(16), version=4)) for _ in range(n)]
    uncompressed = set(meta.choice(n, size=max(1, n // 10), replace=False).tolist()) if n else set()

    label_rows, class_rows = [], []
    for i in _progress(range(n), "RSNA phantoms", n, progress):
        cls, pid = classes[i], ids[i]
        rng = item_rng(seed, STREAM_RSNA, i)
        lesion = {0: None, 1: None, 2: "consolidation"}[cls]
        if cls == 1:
            lesion = RSNA_NOT_NORMAL_LESIONS[i % len(RSNA_NOT_NORMAL_LESIONS)]
        img, mask = make_cxr(rng, size, lesion)
        boxes = mask_boxes(mask) if cls == 2 else []
        if cls == 2 and not boxes:  # tiny region: box the whole mask
            boxes = mask_boxes(mask, min_area=0.0)[:1]
        if boxes:
            for bx, by, bw, bh in boxes:
                label_rows.append([pid, float(bx), float(by), float(bw), float(bh), 1])
                class_rows.append([pid, RSNA_CLASSES[cls]])
        else:
            label_rows.append([pid, "", "", "", "", 0])
            class_rows.append([pid, RSNA_CLASSES[cls]])
        write_cr_dicom(root / "stage_2_train_images" / f"{pid}.dcm", img, patient_id=pid,
                       patient_index=i, seed=seed, compressed=i not in uncompressed,
                       view=str(rng.choice(["PA", "AP"])), sex=str(rng.choice(["M", "F"])),
                       age=int(rng.integers(20, 90)))
        if lesion is not None:
            save_mask_png(root / "masks" / f"{pid}.png", mask)

    order = sorted(range(len(label_rows)), key=lambda k: label_rows[k][0])  # real: by id
    with open(root / "stage_2_train_labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["patientId", "x", "y", "width", "height", "Target"])
        wr.writerows(label_rows[k] for k in order)
    with open(root / "stage_2_detailed_class_info.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["patientId", "class"])
        wr.writerows(class_rows[k] for k in order)
    log.info("RSNA phantoms: %d normal, %d not normal, %d opacity in %s", n_normal,
             n_not_normal, n_opacity, root)
    return root


# ------------------------------------------------------------------------------------------
# Brain CT (BCT) DICOM series
# ------------------------------------------------------------------------------------------


def bct_series_options(rng: np.random.Generator, index: int) -> dict:
    """Per-case DICOM quirks; index-based so small sets contain each at least once."""
    return dict(
        reversed_instances=index % 3 == 1,
        tilt_deg=float(rng.uniform(8.0, 20.0)) if index % 4 == 2 else 0.0,
        localizer=index % 5 == 3,
        padding=index % 3 == 2,
        signed=index % 2 == 1,
        rle=index % 7 == 4,
        name_by_uid=index % 4 == 1,
    )


def write_bct(root, n_normal: int | None = None, n_haemorrhage: int | None = None,
              n_infarct: int | None = None, shape: tuple[int, int, int] = (32, 128, 128),
              seed: int = 0, n: int | None = None, progress: bool | None = None) -> Path:
    """Head-CT DICOM series, one folder per case: ``<root>/<case>/*.dcm`` (see
    :func:`write_ct_series` for the tags and the quirks: reversed InstanceNumber, gantry tilt,
    localizer, -2000 padding, signed/unsigned storage, RLE Lossless, file names by UID).
    ``<root>/labels.csv``: ``case,label,finding`` (label 0/1; finding '', 'haemorrhage',
    'infarct'). Not part of a real export: ``<root>/masks/<case>.npy`` (bool (D, H, W),
    slice 0 inferior like the sorted series) for every case with a lesion. Counts left None
    come from ``n`` (the total: half normal, a quarter of each lesion), else 24 / 12 / 12.
    Returns ``root``.
    """
    if n is not None:
        n_normal = n - n // 2 if n_normal is None else n_normal
    n_normal = 24 if n_normal is None else n_normal
    n_haemorrhage, n_infarct = _class_counts(
        None if n is None else n // 2, n_haemorrhage, n_infarct, default=12)
    root = Path(root)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    meta = item_rng(seed, STREAM_META, STREAM_BCT)
    findings = [""] * n_normal + ["haemorrhage"] * n_haemorrhage + ["infarct"] * n_infarct
    findings = [findings[i] for i in meta.permutation(len(findings))]
    rows = []
    for i in _progress(range(len(findings)), "BCT phantoms", len(findings), progress):
        case = f"case{i:04d}"
        finding = findings[i]
        rng = item_rng(seed, STREAM_BCT, i)
        hu, mask = make_head_ct(rng, tuple(shape), finding or None)
        write_ct_series(root / case, hu, case=case, case_index=i, seed=seed,
                        **bct_series_options(rng, i))
        if finding:
            np.save(root / "masks" / f"{case}.npy", mask)
        rows.append((case, int(bool(finding)), finding))
    with open(root / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["case", "label", "finding"])
        wr.writerows(rows)
    log.info("BCT phantoms: %d normal, %d haemorrhage, %d infarct in %s", n_normal,
             n_haemorrhage, n_infarct, root)
    return root


# ------------------------------------------------------------------------------------------
# Generic folder layout (README: "Your own images (folder layout)")
# ------------------------------------------------------------------------------------------


def write_folder(root, modality: str = "cxr", n_train_normal: int = 40,
                 n_train_mixture: int = 40, n_val: int = 10, n_test: int = 10,
                 size: int | tuple[int, ...] | None = None, seed: int = 0,
                 abnormal_fraction: float = 0.5, background: tuple[float, float] | None = None,
                 with_dicom: bool = True, progress: bool | None = None,
                 style: str = "default") -> Path:
    """The generic folder layout::

        root/train/normal/   root/train/mixture/   (mixture: unlabeled normal + abnormal)
        root/val/{normal,abnormal}/   root/test/{normal,abnormal}/
        root/{val,test}/masks/<stem>.png   (2D)   or <stem>.npy (3D, bool (D, H, W))

    ``n_val`` / ``n_test`` are counts per class; ``abnormal_fraction`` is the share of
    abnormal items in ``train/mixture``. Stems are neutral (``img00042``) and unique in a
    split, so names never reveal labels. Masks exist for abnormal items only.

    - ``modality="cxr"``: 16-bit PNGs (every 8th as 8-bit PNG); with ``with_dicom`` one
      ``train/normal`` item is a MONOCHROME1 12-bit DICOM (polarity must be inverted by the
      reader). ``size`` = side (default 256). ``background=(normal, abnormal)`` sets the
      zero-border fraction per class (Appendix A of the flow paper).
    - ``modality="bct"``: ``.npy`` HU volumes (D, H, W) int16; with ``with_dicom`` the first
      ``train/normal`` and ``test/abnormal`` items are DICOM series sub-folders.
      ``size`` = (D, H, W) or H (then D = H // 4; default (32, 128, 128)).

    ``style``: ``default`` or ``hard`` (the detection benchmark's nuisance variation and small
    lesions; see ``anatomy.CXR_STYLES`` / ``CT_STYLES``).

    Not part of the layout (readers ignore it): ``root/phantom_truth.csv`` with
    ``path,label,finding`` for every item (also the hidden labels of ``train/mixture``).
    Returns ``root``.
    """
    if modality not in ("cxr", "bct"):
        raise ValueError(f"write_folder: modality must be 'cxr' or 'bct', got {modality!r}")
    if not 0.0 <= abnormal_fraction <= 1.0:
        raise ValueError(f"write_folder: abnormal_fraction must be in [0, 1], "
                         f"got {abnormal_fraction}")
    root = Path(root)
    is_3d = modality == "bct"
    if is_3d:
        if size is None:
            shape = (32, 128, 128)
        elif isinstance(size, int):
            shape = (max(size // 4, 4), size, size)
        else:
            shape = tuple(size)
    else:
        shape = (256, 256) if size is None else \
            ((size, size) if isinstance(size, int) else tuple(size))
    lesions = CT_LESIONS if is_3d else CXR_LESIONS
    meta = item_rng(seed, STREAM_META, STREAM_FOLDER_BCT if is_3d else STREAM_FOLDER_CXR)

    # (split, group, abnormal?) per item
    n_mix_abn = int(round(abnormal_fraction * n_train_mixture))
    mix = [True] * n_mix_abn + [False] * (n_train_mixture - n_mix_abn)
    mix = [mix[i] for i in meta.permutation(len(mix))]
    plan = [("train", "normal", False)] * n_train_normal + \
        [("train", "mixture", a) for a in mix]
    for split, n in (("val", n_val), ("test", n_test)):
        items = [(split, "normal", False)] * n + [(split, "abnormal", True)] * n
        plan += [items[i] for i in meta.permutation(len(items))]
    for split in ("train", "val", "test"):
        groups = ("normal", "mixture") if split == "train" else ("normal", "abnormal", "masks")
        for g in groups:
            (root / split / g).mkdir(parents=True, exist_ok=True)

    stream = STREAM_FOLDER_BCT if is_3d else STREAM_FOLDER_CXR
    counters = {"train": 0, "val": 0, "test": 0}
    # Groups that get one DICOM item (the first one) when with_dicom.
    dicom_groups = {("train", "normal")} | ({("test", "abnormal")} if is_3d else set())
    truth = []
    for i, (split, group, abnormal) in enumerate(
            _progress(plan, f"folder phantoms ({modality})", len(plan), progress)):
        rng = item_rng(seed, stream, i)
        lesion = str(lesions[i % len(lesions)]) if abnormal else None
        stem = f"img{counters[split]:05d}"
        counters[split] += 1
        folder = root / split / group
        as_dicom = with_dicom and (split, group) in dicom_groups
        if as_dicom:
            dicom_groups.discard((split, group))
        if is_3d:
            hu, mask = make_head_ct(rng, shape, lesion, style=style)
            if as_dicom:
                write_ct_series(folder / stem, hu, case=f"{split}-{stem}", case_index=i,
                                seed=seed, **bct_series_options(rng, i))
                path = folder / stem
            else:
                path = folder / f"{stem}.npy"
                np.save(path, hu)
            if lesion is not None and split != "train":
                np.save(root / split / "masks" / f"{stem}.npy", mask)
        else:
            bg = None if background is None else background[int(abnormal)]
            img, mask = make_cxr(rng, shape, lesion, background=bg, style=style)
            if as_dicom:
                path = folder / f"{stem}.dcm"
                write_cr_dicom(path, img, patient_id=f"PHANTOM-{i:05d}", patient_index=i,
                               seed=seed, compressed=False, monochrome1=True, bits=16)
            elif i % 8 == 7:
                path = folder / f"{stem}.png"
                save_png8(path, img)
            else:
                path = folder / f"{stem}.png"
                save_png16(path, img)
            if lesion is not None and split != "train":
                save_mask_png(root / split / "masks" / f"{stem}.png", mask)
        truth.append((path.relative_to(root).as_posix(), int(abnormal), lesion or ""))
    with open(root / "phantom_truth.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "label", "finding"])
        wr.writerows(truth)
    log.info("folder phantoms (%s): %d items in %s", modality, len(plan), root)
    return root
