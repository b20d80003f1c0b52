"""What every file-based data module shares: loading at the configured size, masks, and the
check of every indexed item before training (unreadable items are skipped, counted and
summarised; a split left empty is an error).

Verification (``data.verify``):
    quick  decides what the reader will do, reading no more than needed: PNG chunk CRCs,
           DICOM headers (multi-frame, photometric, decoder, native length, slice order and
           duplicates of a series), compressed DICOM pixel data decoded once; results are
           cached in ``.cache/verified/`` keyed by file size + mtime, so a large
           data set (PadChest: ~24k PNGs) is read once, not per run
    full   decode every item (slow; finds everything)
    none   trust the files (a broken one then fails at load time, naming the file)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from datamodules.base import SPLIT_GROUPS, Item, MedicalDataModule
from datamodules.dicom import (
    MIN_SLICES,
    MissingDecoderError,
    _too_few_slices,
    load_brain_volume,
    ordered_slices,
    read_npy_volume,
    verify_dicom,
)
from datamodules.images import (
    DICOM_SUFFIXES,
    ImageReadError,
    read_2d,
    read_mask,
    resize_2d,
    resize_mask,
    verify_png,
)
from datamodules.splits import check_disjoint

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"
VERIFY_MODES = ("quick", "full", "none")
# Bumped whenever the quick check's verdicts change, so cached verdicts are not reused.
CHECK_VERSION = 2


class EmptySplitError(ValueError):
    """A (split, group) that the methods need has no usable item."""


class FileDataModule(MedicalDataModule):
    """Base for the data modules that read files: loads items, masks, verifies the index.

    Subclasses implement :meth:`index_items` (returning the raw index) and may set
    ``expect_16bit`` (PadChest) or ``is_3d``.
    """

    expect_16bit: bool | None = None
    # (split, group) pairs that must not be empty; train/mixture is only needed by the flow
    # method, so it may be empty.
    required = (("train", "normal"), ("val", "normal"), ("val", "abnormal"),
                ("test", "normal"), ("test", "abnormal"))
    # Item.group_id is a patient id: no patient may straddle train and val/test. The folder
    # layout has none (its stems repeat across splits), so there a case is a resolved file.
    patient_ids = True
    root_holds = "the data set's folder"  # what data.root must hold (for the error message)

    def __init__(self, cfg):
        super().__init__(cfg)
        if not self.cfg.root:
            raise ValueError(f"{type(self).__name__} needs data.root ({self.root_holds}).")
        self.root = Path(self.cfg.root).expanduser()
        self.skipped: list[tuple[Item, str]] = []
        # Series folder -> SeriesInstanceUID to read, for folders holding several series.
        self.series_uid: dict[str, str] = {}

    # --- index --------------------------------------------------------------------------
    def index_items(self) -> dict[tuple[str, str], list[Item]]:
        raise NotImplementedError

    def build_index(self) -> dict[tuple[str, str], list[Item]]:
        index = self.index_items()
        for key in index:
            if key[0] not in SPLIT_GROUPS or key[1] not in SPLIT_GROUPS[key[0]]:
                raise ValueError(f"bad (split, group) {key}")
        check_disjoint(index, by_patient=self.patient_ids)
        index = self.verify_index(index)
        self.check_not_empty(index)
        counts = ", ".join(f"{s}/{g}={len(v)}" for (s, g), v in sorted(index.items()))
        log.info("%s: %s", type(self).__name__, counts)
        return index

    def check_not_empty(self, index: dict[tuple[str, str], list[Item]]) -> None:
        # data.val_fraction=0: no validation set asked for (the flow cross-fits its threshold)
        required = [(s, g) for s, g in self.required
                    if s != "val" or float(self.cfg.val_fraction) > 0]
        empty = [f"{s}/{g}" for s, g in required if not index.get((s, g))]
        if empty:
            raise EmptySplitError(
                f"{type(self).__name__} (data.root={self.cfg.root or ''}): no usable "
                f"items in {', '.join(empty)}. Check the data layout and the log above for "
                "skipped files" + ("; data.val_fraction=0 runs without a validation set "
                                   "(flow method: thresholds cross-fitted on test)."
                                   if any(e.startswith("val/") for e in empty) else ".")
            )

    def verify_index(
        self, index: dict[tuple[str, str], list[Item]]
    ) -> dict[tuple[str, str], list[Item]]:
        mode = str(self.cfg.verify)
        if mode not in VERIFY_MODES:
            raise ValueError(f"data.verify={mode!r} is not one of {list(VERIFY_MODES)}")
        if mode == "none":
            return index
        all_items = [it for items in index.values() for it in items]
        errors = self._verify_all(all_items, mode)
        mask_errors = {p: e[len(MASK_ERROR):] for p, e in errors.items()
                       if e.startswith(MASK_ERROR)}
        errors = {p: e for p, e in errors.items() if p not in mask_errors}
        if mask_errors:
            self.dropped_masks = sorted(mask_errors.values())
            log.warning("%d lesion masks are unreadable or do not match their image and were "
                        "dropped (their images are kept, without a mask). First: %s",
                        len(mask_errors), "; ".join(self.dropped_masks[:3]))
            index = {k: [dataclasses.replace(it, mask_path=None) if it.path in mask_errors
                         else it for it in v] for k, v in index.items()}
        if not errors:
            return index
        self.skipped.extend((it, errors[it.path]) for it in all_items if it.path in errors)
        reasons = Counter(_reason_kind(e) for e in errors.values())
        examples = "; ".join(sorted(set(errors.values()))[:3])
        log.warning(
            "%d of %d items skipped (%s). First errors: %s",
            len(errors), len({it.path for it in all_items}),
            ", ".join(f"{n} {k}" for k, n in reasons.most_common()), examples,
        )
        out = {}
        for key, items in index.items():
            kept = [it for it in items if it.path not in errors]
            if items and not kept:
                raise EmptySplitError(
                    f"every item of {key[0]}/{key[1]} is unreadable ({len(items)} skipped); "
                    f"e.g. {errors[items[0].path]}"
                )
            out[key] = kept
        return out

    def _verify_all(self, items: list[Item], mode: str) -> dict[str, str]:
        """path -> error message for unreadable items."""
        paths = sorted({it.path for it in items})
        by_path = {it.path: it for it in items}
        cache_file = CACHE_DIR / "verified" / (
            hashlib.sha1(str(self.cfg.root or "").encode()).hexdigest()[:16]
            + f".v{CHECK_VERSION}.json"
        )
        cache = {}
        if mode == "quick" and cache_file.is_file():
            try:
                cache = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                cache = {}

        def check(p: str) -> str | None:
            try:
                if mode == "full":
                    self.load(by_path[p])
                else:
                    verify_item(p, self.series_uid.get(p))
            except MissingDecoderError as e:
                missing_decoder.add(p)
                return str(e)
            except ImageReadError as e:
                return str(e)
            except Exception as e:  # never lose an item silently: count it with its reason
                return f"{p}: {type(e).__name__}: {e}"
            if not by_path[p].mask_path:
                return None
            try:  # a bad mask costs the mask, not its (valid) image
                if mode == "full":
                    self.load_mask(by_path[p])
                else:
                    verify_item(by_path[p].mask_path)
                    self.check_mask_shape(by_path[p])
            except Exception as e:
                return MASK_ERROR + (str(e) if isinstance(e, ImageReadError)
                                     else f"{by_path[p].mask_path}: {type(e).__name__}: {e}")
            return None

        todo = []
        missing_decoder: set[str] = set()
        results: dict[str, str | None] = {}
        def ckey(p: str) -> str:  # what was checked: the item, its mask, the chosen series
            return f"{p}|{by_path[p].mask_path or ''}|{self.series_uid.get(p, '')}"

        def cstamp(p: str) -> list:
            mask = by_path[p].mask_path
            return _stamp(p) + (_stamp(mask) if mask else [])

        for p in paths:
            s = cstamp(p)
            hit = cache.get(ckey(p))
            if hit is not None and hit[:-1] == s:
                results[p] = hit[-1]
            else:
                todo.append(p)
        if todo:
            from datamodules.progress import track

            workers = min(8, (os.cpu_count() or 2) * 2)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for p, err in track(
                    zip(todo, pool.map(check, todo)), f"Checking {len(todo)} items",
                    total=len(todo), enabled=len(todo) > 200,
                ):
                    results[p] = err
            if mode == "quick":
                # A missing decoder depends on the environment, not the file: never cached.
                cache.update({ckey(p): cstamp(p) + [results[p]] for p in todo
                              if p not in missing_decoder})
                try:
                    cache_file.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cache_file.with_suffix(".tmp")
                    tmp.write_text(json.dumps(cache))
                    tmp.replace(cache_file)
                except OSError as e:
                    log.debug("verification cache not written: %s", e)
        return {p: e for p, e in results.items() if e}

    # --- loading ------------------------------------------------------------------------
    def load(self, item: Item) -> np.ndarray:
        if not self.cfg.cache_items:
            return self._load(item)
        target = (tuple(self.cfg.volume_size) if self.is_3d
                  else int(self.cfg.image_size))
        key = f"{item.path}|{_stamp(item.path)}|{target}"
        path = CACHE_DIR / "items" / (hashlib.sha1(key.encode()).hexdigest() + ".npy")
        if path.is_file():
            try:
                return np.load(path).astype(np.float32) / 65535.0
            except (OSError, ValueError):
                pass  # a damaged cache entry: rebuild it
        x = self._load(item)
        # uint16 quantisation of [0, 1]: error <= 7.6e-6, below a 16-bit source's own step.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npy")
        np.save(tmp, np.round(np.clip(x, 0.0, 1.0) * 65535.0).astype(np.uint16))
        tmp.replace(path)
        return x

    def _load(self, item: Item) -> np.ndarray:
        if self.is_3d:
            shape = tuple(int(s) for s in self.cfg.volume_size)
            # (D, H, W) in [0, 1]
            return load_brain_volume(item.path, shape, self.series_uid.get(item.path))
        img = read_2d(item.path, expect_16bit=self.expect_16bit)  # (H, W) in [0, 1]
        return resize_2d(img, int(self.cfg.image_size))

    def check_mask_shape(self, item: Item, mask_shape: tuple[int, ...] | None = None) -> None:
        """A mask must have its image's native shape (it would be stretched otherwise)."""
        image = native_shape(item.path)
        if mask_shape is None:
            mask_shape = native_shape(item.mask_path)
        if image is not None and mask_shape is not None and tuple(mask_shape) != tuple(image):
            raise ImageReadError(f"{item.mask_path}: mask shape {tuple(mask_shape)} differs "
                                 f"from its image's {tuple(image)} ({item.path}); write the "
                                 "mask at the image's size.")

    def load_mask(self, item: Item) -> np.ndarray | None:
        if not item.mask_path:
            return None
        path = Path(item.mask_path)
        if path.suffix.lower() == ".npy":
            mask = read_npy_volume(path) > 0
        else:
            mask = read_mask(path)
        self.check_mask_shape(item, mask.shape)
        if self.is_3d:
            if mask.ndim != 3:
                raise ImageReadError(f"{path}: a 3D item needs a (D, H, W) .npy mask.")
            shape = tuple(int(s) for s in self.cfg.volume_size)
            return resize_mask(mask, shape)
        return resize_mask(mask, int(self.cfg.image_size))


def _stamp(p: str) -> list:
    """[size, mtime] of a file; [total size, latest mtime, file count] of a folder."""
    try:
        if os.path.isdir(p):
            sts = [f.stat() for f in Path(p).rglob("*") if f.is_file()]
            return [sum(st.st_size for st in sts),
                    max((st.st_mtime_ns for st in sts), default=0), len(sts)]
        st = os.stat(p)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


MASK_ERROR = "MASK\x00"  # prefix of a mask's (not its image's) verification error


def native_shape(path: str | Path | None) -> tuple[int, ...] | None:
    """Shape of an item as stored, from its header only (PNG size, DICOM Rows x Columns,
    .npy header); None where it is not known cheaply (a series folder)."""
    if path is None:
        return None
    p = Path(path)
    try:
        suffix = p.suffix.lower()
        if p.is_dir():
            return None
        if suffix == ".npy":
            return tuple(np.load(p, mmap_mode="r").shape)
        if suffix in DICOM_SUFFIXES:
            import pydicom

            ds = pydicom.dcmread(p, stop_before_pixels=True,
                                 specific_tags=["Rows", "Columns"])
            return (int(ds.Rows), int(ds.Columns))
        from PIL import Image

        with Image.open(p) as im:
            return (im.height, im.width)
    except Exception:
        return None  # unreadable: the item's own check reports it


def verify_item(path: str | Path, series_uid: str | None = None) -> None:
    """Quick check of one item (file or series folder); raises :class:`ImageReadError`."""
    path = Path(path)
    if path.is_dir():
        # Same grouping, ordering and slice checks as read_series, headers only.
        slices, _, _ = ordered_slices(path, series_uid)
        if len(slices) < MIN_SLICES:
            raise ImageReadError(_too_few_slices(path, len(slices)))
        for f, _ in slices:
            verify_dicom(f)
        return
    suffix = path.suffix.lower()
    if not path.exists():
        raise ImageReadError(f"{path}: file not found.")
    if suffix in DICOM_SUFFIXES:
        verify_dicom(path)
    elif suffix == ".npy":
        read_npy_volume(path)
    else:
        verify_png(path)


def _reason_kind(message: str) -> str:
    m = message.split(": ", 1)[-1].lower()  # messages start with the path
    for key, kind in (
        ("not found", "missing"), ("decoder", "no decoder"), ("truncated", "truncated"),
        ("part 10", "no file meta"), ("nan/inf", "NaN/Inf"), ("series", "series"),
        ("png", "broken PNG"),
    ):
        if key in m:
            return kind
    return "unreadable"
