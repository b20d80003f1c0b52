"""DICOM readers: single radiographs and head-CT series (pydicom 3).

- :func:`read_image`: one 2D image -> float32 (H, W) in [0, 1], MONOCHROME2 polarity.
- :func:`read_series`: a folder of slices -> HU volume (D, H, W) sorted along the slice
  normal, and its spacing (dz, dy, dx) in mm.
- :func:`brain_window`: I = clip(HU + 14, 0, 127) (Shibata et al. 2021, eq. 4: 7-bit
  brain window), applied before any resampling so that padding (-2000 ...) maps to 0 instead
  of bleeding into the brain.

Compressed transfer syntaxes: JPEG Baseline and JPEG 2000 decode with Pillow; JPEG Lossless
and JPEG-LS (common from PACS) need ``pylibjpeg`` + ``pylibjpeg-libjpeg`` or ``python-gdcm``.
Without a decoder a :class:`MissingDecoderError` names the file, its transfer syntax and the
package to install. No header values are logged (patient data); errors name files only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from datamodules.errors import ImageReadError
from datamodules.resize import resize_3d

log = logging.getLogger(__name__)

# Brain window of Shibata et al. (eq. 4): I = clip(HU + 14, 0, 127).
BRAIN_WINDOW_OFFSET = 14
BRAIN_WINDOW_MAX = 127

_INSTALL_HINT = {
    # Transfer syntax UID -> what to install (pydicom's own plugin list names the same ones).
    "1.2.840.10008.1.2.4.57": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.70": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.80": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.50": "pip install pillow  (or: pip install pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.51": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.90": "pip install pillow  (with OpenJPEG) or pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pip install pillow  (with OpenJPEG) or pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pip install numpy  (pydicom's own RLE decoder) or pylibjpeg-rle",
}
_DEFAULT_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg  (or: python-gdcm)"


# --- no header values in messages --------------------------------------------------------
# pydicom quotes the offending value in its warnings, log records and exceptions ("Invalid
# value for VR IS: 'DOE^JOHN'"): a patient name in a mis-typed element would reach the console,
# W&B's output.log and anything synced from it. Quoted parts are replaced before anything is
# shown; messages name the file and the VR / tag only.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")
_VR = re.compile(r"\bVR ([A-Z]{2})\b")
_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)")


def redact(text: str) -> str:
    """``text`` with every quoted value replaced by ``<value not shown>``."""
    return _QUOTED.sub("<value not shown>", str(text))


def _safe(e: BaseException) -> str:
    return f"{type(e).__name__}: {redact(e)}"


class _RedactValues(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


logging.getLogger("pydicom").addFilter(_RedactValues())


@contextlib.contextmanager
def header_warnings(path: str | Path):
    """Catch pydicom's warnings about non-conforming header values while reading ``path``
    and log one line naming the file and the VRs / tags instead (never the values)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _report(path, caught)


def _report(path, caught) -> None:
    ours = [w for w in caught if "pydicom" in str(w.filename)]
    for w in caught:
        if w not in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if ours:
        what = sorted({m.group(0) for w in ours for m in (_VR.search(str(w.message)),
                                                           _TAG.search(str(w.message))) if m})
        log.warning("%s: %d non-conforming DICOM header value(s)%s ignored; values are not "
                    "shown.", path, len(ours), f" ({', '.join(what)})" if what else "")


def _reworded(fn):
    """Run a reader under :func:`header_warnings` for its first argument (the path)."""
    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        with header_warnings(path):
            return fn(path, *args, **kwargs)
    return wrapper


class DicomReadError(ImageReadError):
    """A DICOM file that cannot be read or decoded."""


class MissingDecoderError(DicomReadError):
    """Compressed pixel data and no installed plugin can decode its transfer syntax."""


class SeriesError(ImageReadError):
    """A folder that does not hold exactly one usable image series."""


# --- single files ---------------------------------------------------------------------------


def dcmread(path: str | Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """``pydicom.dcmread`` with errors that name the file and the fix."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # pydicom warns on every non-conforming value (e.g. bad VR); errors surface below.
            warnings.simplefilter("ignore", UserWarning)
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise DicomReadError(f"{path}: file not found.") from None
    except InvalidDicomError:
        raise DicomReadError(
            f"{path}: not a DICOM Part 10 file (no 128-byte preamble + 'DICM' + file meta "
            "header). Re-export it from the PACS as DICOM Part 10, or convert it with "
            "`dcmconv +F` / `gdcmconv`."
        ) from None
    except Exception as e:  # pydicom raises many types on malformed input
        raise DicomReadError(f"{path}: cannot parse DICOM ({_safe(e)}).") from None


def transfer_syntax(ds: pydicom.Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(tsuid) if tsuid else UID("1.2.840.10008.1.2")  # implicit VR LE by default


def check_decoder(ds: pydicom.Dataset, path: str | Path) -> None:
    """Raise :class:`MissingDecoderError` if the pixel data's transfer syntax cannot be decoded."""
    uid = transfer_syntax(ds)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise MissingDecoderError(
            f"{path}: transfer syntax {uid.name} ({uid}) is not supported by pydicom; "
            "convert the file to Explicit VR Little Endian (`gdcmconv --raw`)."
        ) from None
    if not decoder.is_available:
        hint = _INSTALL_HINT.get(str(uid), _DEFAULT_HINT)
        raise MissingDecoderError(
            f"{path}: compressed pixel data in transfer syntax {uid.name} ({uid}) and no "
            f"installed decoder can read it. Install one: {hint}"
        )


def pixel_array(ds: pydicom.Dataset, path: str | Path) -> np.ndarray:
    """Decoded stored values (no LUT applied); errors name the file."""
    if "PixelData" not in ds:
        raise DicomReadError(f"{path}: the DICOM file has no pixel data.")
    check_decoder(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return ds.pixel_array
    except RuntimeError as e:
        uid = transfer_syntax(ds)
        if "missing dependencies" in str(e):
            hint = _INSTALL_HINT.get(str(uid), _DEFAULT_HINT)
            raise MissingDecoderError(
                f"{path}: no installed decoder for {uid.name} ({uid}). Install one: {hint}"
            ) from None
        raise DicomReadError(f"{path}: cannot decode {uid.name} pixel data ({redact(e)}).") \
            from None
    except Exception as e:
        raise DicomReadError(
            f"{path}: pixel data unreadable ({_safe(e)}). The file is probably "
            "truncated or has a malformed image header; re-export it."
        ) from None


def _modality_lut(arr: np.ndarray, ds: pydicom.Dataset, path: str | Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except Exception as e:
        raise DicomReadError(f"{path}: cannot apply the modality LUT ({_safe(e)}).") from None


def _stored_range(ds: pydicom.Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@_reworded
def read_image(path: str | Path) -> np.ndarray:
    """One 2D DICOM image as float32 (H, W) in [0, 1] with MONOCHROME2 polarity.

    Stored values go through the modality LUT (rescale slope/intercept or LUT sequence) and are
    scaled by the LUT image of the stored range (BitsStored, PixelRepresentation), so the scale
    is fixed per acquisition type rather than per image (no intensity normalisation).
    MONOCHROME1 images are inverted (1 - v). Colour images are converted to gray (luma) with a
    warning. Multi-frame files are rejected (one image per file).
    """
    path = Path(path)
    ds = dcmread(path)
    arr = pixel_array(ds, path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomReadError(
            f"{path}: multi-frame DICOM ({frames} frames); a 2D item must hold one image."
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if arr.ndim == 3:  # colour, already converted to RGB by pydicom
        warnings.warn(f"{path}: colour DICOM ({photometric}) converted to gray.", stacklevel=2)
        rgb = arr[..., :3].astype(np.float64)
        maxval = 2 ** int(ds.get("BitsStored", 8)) - 1
        gray = rgb @ np.array([0.299, 0.587, 0.114])
        return np.clip(gray / maxval, 0.0, 1.0).astype(np.float32)
    if arr.ndim != 2:
        raise DicomReadError(f"{path}: expected a 2D image, got pixel array shape {arr.shape}.")

    values = _modality_lut(arr, ds, path)
    lo, hi = _modality_lut(np.array(_stored_range(ds)), ds, path)
    lo, hi = min(lo, hi), max(lo, hi)
    if hi <= lo:
        raise DicomReadError(f"{path}: degenerate modality LUT (empty output range).")
    img = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    elif photometric not in ("MONOCHROME2", ""):
        raise DicomReadError(f"{path}: unsupported photometric interpretation {photometric!r}.")
    return img.astype(np.float32)


_GRAY = ("MONOCHROME1", "MONOCHROME2", "")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")


@_reworded
def verify_dicom(path: str | Path) -> None:
    """The quick check: decides what :func:`read_image` / :func:`read_series` will do with the
    file without reading more than needed. Parses the header; refuses what the readers refuse
    (no pixel data, multi-frame, a photometric interpretation they cannot convert such as
    PALETTE COLOR, no decoder); checks native pixel data against pydicom's expected length
    (which knows subsampled YBR_FULL_422); and decodes compressed pixel data (JPEG, JPEG 2000,
    RLE), since a broken compressed stream shows only when decoded. Raises
    :class:`DicomReadError` with the reader's message."""
    path = Path(path)
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise DicomReadError(f"{path}: the DICOM file has no pixel data.")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as e:
        raise DicomReadError(f"{path}: malformed image header ({_safe(e)}).") from None
    if frames > 1:
        raise DicomReadError(
            f"{path}: multi-frame DICOM ({frames} frames); a 2D item must hold one image.")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in _GRAY + _COLOUR:
        raise DicomReadError(f"{path}: unsupported photometric interpretation {photometric!r}.")
    check_decoder(ds, path)
    if transfer_syntax(ds).is_compressed:
        arr = pixel_array(ds, path)  # the decode the reader will do (cached by the caller)
        if arr.ndim not in (2, 3):
            raise DicomReadError(f"{path}: expected a 2D image, got pixel array shape "
                                 f"{arr.shape}.")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _check_native_length(ds, path)


def _check_native_length(ds: pydicom.Dataset, path: str | Path) -> None:
    from pydicom.pixels.utils import get_expected_length

    try:
        expected = int(get_expected_length(ds, unit="bytes"))
    except Exception as e:
        raise DicomReadError(f"{path}: malformed image header ({_safe(e)}).") from None
    if len(ds.PixelData) < expected:
        raise DicomReadError(
            f"{path}: truncated pixel data ({len(ds.PixelData)} of {expected} bytes)."
        )


# --- series -> volume -----------------------------------------------------------------------


def _is_localizer(ds: pydicom.Dataset) -> bool:
    image_type = ds.get("ImageType", [])
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(v).upper() == "LOCALIZER" for v in image_type)


def _slice_normal(ds: pydicom.Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def list_series(folder: str | Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """Headers of every non-localizer DICOM file under ``folder``, grouped by SeriesInstanceUID.

    Files that are not DICOM (DICOMDIR, notes, thumbnails) are skipped and counted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesError(f"{folder}: not a folder of DICOM slices.")
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    n_other = n_localizer = 0
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        if f.name.upper() == "DICOMDIR" or f.suffix.lower() in (".txt", ".json", ".csv", ".npy"):
            n_other += 1
            continue
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except DicomReadError:
            n_other += 1
            continue
        if "SOPInstanceUID" not in ds or "Rows" not in ds:
            n_other += 1
            continue
        if _is_localizer(ds):
            n_localizer += 1
            continue
        groups[str(ds.get("SeriesInstanceUID", ""))].append((f, ds))
    if n_other or n_localizer:
        log.debug("%s: skipped %d non-image files and %d localizer images",
                  folder.name, n_other, n_localizer)
    return dict(groups)


@_reworded
def read_series(
    folder: str | Path, series_uid: str | None = None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read one DICOM series as an HU volume.

    Files are grouped by SeriesInstanceUID; LOCALIZER images are dropped. A folder with several
    series is an error listing them unless ``series_uid`` picks one. Slices are sorted by the
    projection of ImagePositionPatient on the slice normal (cross product of the two
    ImageOrientationPatient vectors), never by InstanceNumber, which can run backwards. Each
    slice goes through the modality LUT (slopes may differ per slice).

    Returns ``(hu (D, H, W) float32, (dz, dy, dx) in mm)``.
    """
    folder = Path(folder)
    slices, key, normal = ordered_slices(folder, series_uid)
    return _read_slices(slices, key, normal)


def ordered_slices(folder: str | Path, series_uid: str | None = None):
    """Headers of one series' slices in volume order, their positions along the slice normal
    and the normal (None if unknown): everything :func:`read_series` decides before reading
    pixels, so the quick check can refuse exactly what the reader refuses."""
    folder = Path(folder)
    groups = list_series(folder)
    if not groups:
        raise SeriesError(f"{folder}: no DICOM image slices found (localizers excluded).")
    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesError(f"{folder}: series {series_uid} not found; found {sorted(groups)}.")
        uid = series_uid
    elif len(groups) > 1:
        listing = "; ".join(
            f"{u} ({len(v)} slices, SeriesNumber {v[0][1].get('SeriesNumber', '?')})"
            for u, v in sorted(groups.items())
        )
        raise SeriesError(
            f"{folder}: holds {len(groups)} image series: {listing}. Keep one series per "
            "folder, or pass series_uid=<SeriesInstanceUID>."
        )
    else:
        uid = next(iter(groups))
    slices = groups[uid]

    normal = _slice_normal(slices[0][1])
    positions = [s[1].get("ImagePositionPatient") for s in slices]
    if normal is not None and all(p is not None and len(p) == 3 for p in positions):
        for f, ds in slices[1:]:
            n = _slice_normal(ds)
            if n is None or abs(float(np.dot(n, normal))) < 0.999:
                raise SeriesError(f"{f}: slice orientation differs from the rest of the series.")
        key = np.array([float(np.dot(np.asarray(p, dtype=float), normal)) for p in positions])
    else:
        warnings.warn(
            f"{folder}: slices lack ImagePositionPatient/ImageOrientationPatient; sorted by "
            "InstanceNumber instead (check the slice order).", stacklevel=2,
        )
        try:
            key = np.array([float(s[1].get("InstanceNumber", i)) for i, s in enumerate(slices)])
        except (TypeError, ValueError):
            raise SeriesError(f"{folder}: slices lack ImagePositionPatient and an InstanceNumber "
                              "(0020,0013) is not a number: the slice order is unknown. "
                              "Re-export the series with positions.") from None
    order = np.argsort(key, kind="stable")
    slices = [slices[i] for i in order]
    key = key[order]
    if len(key) > 1 and np.any(np.diff(key) < 1e-4):
        n_dup = int(np.sum(np.diff(key) < 1e-4))
        raise SeriesError(
            f"{folder}: {n_dup} slices share a position along the slice normal (two "
            "acquisitions in one series?); split them into separate folders."
        )
    return slices, key, normal


def _read_slices(slices, key, normal) -> tuple[np.ndarray, tuple[float, float, float]]:
    hu_slices = []
    shape = None
    for f, _ in slices:
        ds = dcmread(f)
        arr = pixel_array(ds, f)
        if arr.ndim != 2:
            raise SeriesError(f"{f}: expected one 2D slice per file, got shape {arr.shape}.")
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise SeriesError(f"{f}: slice size {arr.shape} differs from {shape}.")
        hu_slices.append(_modality_lut(arr, ds, f).astype(np.float32))
    hu = np.stack(hu_slices)  # (D, H, W)

    first = slices[0][1]
    dy, dx = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    if len(key) > 1 and normal is not None:
        dz = float(np.median(np.diff(key)))
    else:
        dz = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    return hu, (dz, dy, dx)


def brain_window(hu: np.ndarray) -> np.ndarray:
    """I = clip(HU + 14, 0, 127) as uint8 (Shibata et al. 2021, eq. 4)."""
    hu = np.asarray(hu)
    return np.clip(np.rint(hu + BRAIN_WINDOW_OFFSET), 0, BRAIN_WINDOW_MAX).astype(np.uint8)


MIN_SLICES = 2  # a 3D item: one slice would be stretched over every output slice


def _too_few_slices(path, n: int) -> str:
    return (f"{path}: only {n} image slice; a 3D item needs at least {MIN_SLICES} slices (it "
            "would be stretched to data.volume_size otherwise).")


def read_npy_volume(path: str | Path) -> np.ndarray:
    """A (D, H, W) HU volume stored as ``.npy``; rejects NaN/Inf and wrong shapes."""
    path = Path(path)
    try:
        vol = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found.") from None
    except Exception as e:
        raise ImageReadError(f"{path}: cannot load .npy ({type(e).__name__}: {e}).") from None
    if vol.ndim != 3 or min(vol.shape) < 2:
        raise ImageReadError(f"{path}: expected a (D, H, W) HU volume with at least 2 voxels "
                             f"along each axis, got shape {vol.shape}.")
    if not (np.issubdtype(vol.dtype, np.number) or vol.dtype == np.bool_):
        raise ImageReadError(f"{path}: non-numeric array dtype {vol.dtype}.")
    if np.issubdtype(vol.dtype, np.floating) and not np.isfinite(vol).all():
        n_bad = int((~np.isfinite(vol)).sum())
        raise ImageReadError(f"{path}: {n_bad} NaN/Inf voxels; fix or remove the volume.")
    return vol.astype(np.float32)


def read_volume_hu(path: str | Path, series_uid: str | None = None) -> np.ndarray:
    """HU volume (D, H, W) from a DICOM series folder or a ``.npy`` file."""
    path = Path(path)
    if path.is_dir():
        return read_series(path, series_uid)[0]
    if path.suffix.lower() == ".npy":
        return read_npy_volume(path)
    raise ImageReadError(
        f"{path}: a 3D item must be a folder of DICOM slices or a .npy (D, H, W) HU volume."
    )


def load_brain_volume(path: str | Path, shape: tuple[int, int, int],
                      series_uid: str | None = None) -> np.ndarray:
    """HU -> brain window (eq. 4) -> trilinear resample to ``shape`` -> /127: float32 in [0, 1].

    The resampling to a fixed number of slices is ours (the paper does not say how its volumes
    were brought to 32 slices). The window comes first: resampling raw HU would blend padding (-2000 ...) and bone into the
    brain voxels at the edges."""
    hu = read_volume_hu(path, series_uid)
    if hu.shape[0] < MIN_SLICES:
        raise SeriesError(_too_few_slices(path, hu.shape[0]))
    windowed = brain_window(hu).astype(np.float32)  # 0..127
    vol = resize_3d(windowed, shape) / BRAIN_WINDOW_MAX
    return np.clip(vol, 0.0, 1.0).astype(np.float32)
