"""The generic folder data set: ``data=folder data.root=DIR`` (README: "Your own images (folder layout)").

Layout::

    DIR/train/normal/          normal images (both methods)
    DIR/train/mixture/         unlabeled normal + abnormal images (flow method, M1)
    DIR/val/{normal,abnormal}/ threshold / normalisation fitting
    DIR/test/{normal,abnormal}/
    DIR/{val,test}/masks/<stem>.png   optional lesion masks (<stem>.npy for 3D items)

2D items (``data.modality=cxr``): ``.png`` (8- or 16-bit) or ``.dcm`` files. 3D items
(``data.modality=bct``): a sub-folder of ``.dcm`` slices (one series) or a ``.npy`` (D, H, W)
array in HU; the brain window is applied. Items of any size are resized to
``data.image_size`` / ``data.volume_size``; masks with nearest neighbour.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datamodules.base import ABNORMAL, NORMAL, SPLIT_GROUPS, UNLABELED, Item
from datamodules.common import FileDataModule
from datamodules.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

GROUP_LABEL = {"normal": NORMAL, "abnormal": ABNORMAL, "mixture": UNLABELED}
_IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
_2D_SUFFIXES = IMAGE_SUFFIXES + (".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def item_stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def find_mask(masks_dir: Path, stem: str) -> Path | None:
    for suffix in (".png", ".npy"):
        p = masks_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


class FolderDataModule(FileDataModule):
    """Items from the folder layout above; labels from the folder names."""

    patient_ids = False  # stems repeat across splits; leaks are checked by resolved file
    root_holds = "the folder layout: DIR/train/normal, ... (see datamodules/folder.py)"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.is_3d = str(self.cfg.modality) == "bct"

    def _entries(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """(items, ignored entries) of one group folder."""
        items, ignored = [], []
        for p in sorted(folder.iterdir()):
            if p.name.lower() in _IGNORED_NAMES or p.name.startswith("."):
                continue
            if self.is_3d:
                ok = p.is_dir() or p.suffix.lower() == ".npy"
            else:
                ok = p.is_file() and p.suffix.lower() in _2D_SUFFIXES
            (items if ok else ignored).append(p)
        return items, ignored

    def index_items(self) -> dict[tuple[str, str], list[Item]]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root={self.root} does not exist. Expected DIR/train/normal, "
                "DIR/val/{normal,abnormal}, DIR/test/{normal,abnormal} (see datamodules/folder.py)."
            )
        index: dict[tuple[str, str], list[Item]] = {}
        n_ignored = 0
        examples: list[str] = []
        for split, groups in SPLIT_GROUPS.items():
            masks_dir = self.root / split / "masks"
            for group in groups:
                folder = self.root / split / group
                if not folder.is_dir():
                    continue
                paths, ignored = self._entries(folder)
                n_ignored += len(ignored)
                examples += [str(p) for p in ignored[:2]]
                items = []
                for p in paths:
                    stem = item_stem(p)
                    mask = find_mask(masks_dir, stem) if masks_dir.is_dir() else None
                    items.append(Item(
                        path=str(p), label=GROUP_LABEL[group], finding="",
                        mask_path=str(mask) if mask else None, group_id=stem,
                    ))
                index[(split, group)] = items
            if masks_dir.is_dir():
                stems = {item_stem(Path(it.path)) for g in groups
                         for it in index.get((split, g), [])}
                orphans = sorted(p.name for p in masks_dir.iterdir()
                                 if not p.name.startswith(".") and item_stem(p) not in stems)
                if orphans:
                    log.warning("%s: %d masks match no %s item by name and are unused, e.g. "
                                "%s (a mask is <split>/masks/<item stem>.png|.npy)", masks_dir,
                                len(orphans), split, ", ".join(orphans[:3]))
        if n_ignored:
            kind = "a .npy volume or a series sub-folder" if self.is_3d else ".png / .dcm"
            log.warning(
                "%d entries under %s are not %s items (data.modality=%s) and were ignored, "
                "e.g. %s", n_ignored, self.root, kind, self.cfg.modality,
                ", ".join(examples[:3]),
            )
        return index
