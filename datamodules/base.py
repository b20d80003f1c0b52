"""The interface every data set offers to the methods.

A data module indexes its data set into :class:`Item` lists per (split, group) and loads an
item as a float32 array at the configured size. Training and scoring code build their own
torch datasets from ``items()`` + ``load()``, so the same code path runs on real data, the
generic folder layout and the embedded phantoms.

Splits and groups (README: "Your own images (folder layout)")::

    train: normal, mixture        (mixture = unlabeled normal+abnormal, flow method)
    val:   normal, abnormal
    test:  normal, abnormal
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.config import data_config

SPLIT_GROUPS: dict[str, tuple[str, ...]] = {
    "train": ("normal", "mixture"),
    "val": ("normal", "abnormal"),
    "test": ("normal", "abnormal"),
}

NORMAL, ABNORMAL, UNLABELED = 0, 1, -1


@dataclass(frozen=True)
class Item:
    path: str  # a file (.png / .dcm / .npy) or a folder (one DICOM series)
    label: int  # NORMAL, ABNORMAL or UNLABELED
    finding: str = ""  # e.g. "Lung Opacity", "haemorrhage"; "" if none/unknown
    mask_path: str | None = None  # lesion mask (same stem), if any
    group_id: str = ""  # patient / case id, for patient-level splits; never logged


class ItemDataset(Dataset):
    """``{"image": (1,H,W) or (1,D,H,W) float32, "label": int, "index": int}`` per item."""

    def __init__(self, dm: MedicalDataModule, items: list[Item]):
        self.dm, self.items = dm, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        x = torch.from_numpy(np.ascontiguousarray(self.dm.load(item), dtype=np.float32))
        return {"image": x.unsqueeze(0), "label": item.label, "index": i}


class MedicalDataModule(pl.LightningDataModule):
    """Base class. Subclasses implement :meth:`build_index` and :meth:`load`."""

    is_3d: bool = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = data_config(cfg)  # typed: defaults from the schema, unknown keys fail
        self._index: dict[tuple[str, str], list[Item]] | None = None

    # --- to implement -------------------------------------------------------------------
    def build_index(self) -> dict[tuple[str, str], list[Item]]:
        raise NotImplementedError

    def load(self, item: Item) -> np.ndarray:
        """2D: (H, W) float32 in [0, 1], MONOCHROME2 polarity, resized to data.image_size.
        3D: (D, H, W) float32 in [0, 1] (brain window / 127), resized to data.volume_size."""
        raise NotImplementedError

    def load_mask(self, item: Item) -> np.ndarray | None:
        """Boolean lesion mask at the same size as :meth:`load`, or None."""
        return None

    # --- shared -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        if self._index is None:
            self._index = self.build_index()

    def items(self, split: str, group: str | None = None) -> list[Item]:
        if split not in SPLIT_GROUPS:
            raise ValueError(f"split must be one of {list(SPLIT_GROUPS)}, got {split!r}")
        self.setup()
        groups = SPLIT_GROUPS[split] if group is None else (group,)
        out: list[Item] = []
        for g in groups:
            out.extend(self._index.get((split, g), []))
        return out

    def dataset(self, split: str, group: str | None = None) -> ItemDataset:
        return ItemDataset(self, self.items(split, group))

    def _loader(self, split: str, group: str | None, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split, group), batch_size=self.cfg.batch_size, shuffle=shuffle,
            num_workers=self.cfg.num_workers, drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", "normal", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", None, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", None, False)
