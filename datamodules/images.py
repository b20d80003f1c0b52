"""2D image reading (PNG 8/16-bit, DICOM) and resizing to the configured input size.

Every reader returns a float32 (H, W) array in [0, 1] with MONOCHROME2 polarity (bright =
dense). Intensities are scaled by the storage range only (8-bit: /255, 16-bit: /65535); no
per-image normalisation, as in Kim et al. 2023 ("no intensity normalisation").

Errors name the file and say what to do: :class:`ImageReadError` (and its DICOM subclasses in
:mod:`datamodules.dicom`) is what the data modules catch, count and skip.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from datamodules.errors import ImageReadError
from datamodules.resize import resize_2d, resize_3d, resize_mask  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

PNG_SUFFIXES = (".png",)
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PNG_SUFFIXES + DICOM_SUFFIXES




@contextmanager
def _png_errors(path: Path, broken: str):
    """Pillow's errors on ``path`` -> :class:`ImageReadError` naming the file and the fix."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found.") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"{path}: image too large to decode safely ({e}). Downscale it first, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS in your own script if the file is trusted.") from None
    except (OSError, SyntaxError, UnidentifiedImageError, ValueError) as e:
        raise ImageReadError(f"{path}: {broken.format(e=e)}") from None


def read_png(path: str | Path, expect_16bit: bool | None = None) -> np.ndarray:
    """Read a grayscale PNG as float32 (H, W) in [0, 1].

    16-bit PNGs (PadChest, mode ``I;16``) are converted through numpy and divided by 65535;
    ``Image.convert('L')`` would clip them to 8 bits. 8-bit PNGs are divided by 255. When
    ``expect_16bit`` is True and the file is 8-bit, a warning is emitted and the 8-bit range is
    used (the image is still scaled right). RGB(A) files whose channels are equal are read as
    gray; true colour images are converted to luma (ITU-R 601) with a warning.
    """
    path = Path(path)
    with _png_errors(path, "cannot decode PNG ({e}). The file is probably truncated or "
                           "corrupt; re-download or re-export it, or remove it from the data set."):
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)

    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        bits = 16
        img = arr.astype(np.float32) / 65535.0
    elif mode == "I":
        # Some writers store 16-bit gray as 32-bit signed; the values still lie in 0..65535.
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageReadError(f"{path}: 32-bit integer PNG with values outside 0..65535.")
        bits = 16
        img = arr.astype(np.float32) / 65535.0
    elif mode in ("L", "P", "1", "LA", "RGB", "RGBA"):
        bits = 8
        img = _gray8(path, mode, arr)
    else:
        raise ImageReadError(f"{path}: unsupported PNG mode {mode!r}; expected 8/16-bit gray.")

    if expect_16bit and bits == 8:
        warnings.warn(
            f"{path}: expected a 16-bit PNG but found an 8-bit one ({mode}); scaled by 1/255.",
            stacklevel=2,
        )
    return np.ascontiguousarray(img, dtype=np.float32)


def _gray8(path: Path, mode: str, arr: np.ndarray) -> np.ndarray:
    if mode == "1":
        return arr.astype(np.float32)
    if mode == "P":
        with Image.open(path) as im:
            # A palette image: expand to RGB first (convert('L') from P is exact for gray palettes).
            arr = np.asarray(im.convert("RGB"))
        mode = "RGB"
    if mode == "LA":
        arr = arr[..., 0]
    elif mode in ("RGB", "RGBA"):
        rgb = arr[..., :3].astype(np.float32)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            arr = rgb[..., 0]
        else:
            warnings.warn(f"{path}: colour image converted to gray (luma).", stacklevel=3)
            arr = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return arr.astype(np.float32) / 255.0


def read_2d(path: str | Path, expect_16bit: bool | None = None) -> np.ndarray:
    """Read a 2D item (PNG or DICOM; other formats Pillow can read are accepted too)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        from datamodules.dicom import read_image

        return read_image(path)
    if suffix in PNG_SUFFIXES:
        return read_png(path, expect_16bit=expect_16bit)
    if suffix in (".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        return read_png(path, expect_16bit=expect_16bit)  # same Pillow path, same scaling
    raise ImageReadError(
        f"{path}: unsupported file type {suffix!r}; use .png (8/16-bit) or .dcm for 2D items."
    )


def read_mask(path: str | Path) -> np.ndarray:
    """A lesion mask PNG (any bit depth) as bool: nonzero = lesion."""
    return read_png(path) > 0


def verify_png(path: str | Path) -> None:
    """Cheap integrity check (chunk CRCs, no decompression); raises :class:`ImageReadError`."""
    path = Path(path)
    with _png_errors(path, "broken PNG ({e}); re-download or re-export it, or remove it."):
        with Image.open(path) as im:
            im.verify()
