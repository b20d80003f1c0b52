"""Patch grid and patch datasets for the multiresolution patch detector (Kim et al. 2023).

Kim, Moon, Lee et al., *Multiresolution patch-based anomaly detection for chest X-rays*,
Sci Rep 2023 (https://doi.org/10.1038/s41598-023-30589-y): a 1024x1024 radiograph is cut into
a non-overlapping grid of s x s patches (1024/s per side) for s in {128, 256, 512, 1024}; one
SimCLR encoder is trained per size on the patches of normal training images.

Pure functions (:func:`patch_grid`, :func:`extract_patches`) are shared by training and the
detector; the datasets read images through a :class:`~datamodules.base.MedicalDataModule`
(``items()`` + ``load()``), so real data, the folder layout and phantoms use one code path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import Item, MedicalDataModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchCell:
    """One patch of the grid: ``size`` pixels square, top-left corner (``x``, ``y``) in pixels,
    grid position (``row``, ``col``) used by the detector's locality search."""

    size: int
    x: int  # column of the left edge, pixels
    y: int  # row of the top edge, pixels
    row: int
    col: int


def _grid_count(length: int, patch_size: int, stride: int) -> int:
    return (length - patch_size) // stride + 1


def _check_sizes(height: int, width: int, patch_size: int, stride: int) -> None:
    if patch_size <= 0 or stride <= 0:
        raise ValueError(f"patch_size ({patch_size}) and stride ({stride}) must be positive")
    if patch_size > min(height, width):
        raise ValueError(
            f"patch_size {patch_size} is larger than the image ({height}x{width}); "
            "choose simclr.patch_size <= data.image_size"
        )


def patch_grid(image_size: int | tuple[int, int], patch_size: int,
               stride: int | None = None) -> list[PatchCell]:
    """The grid of ``patch_size`` patches over an image, row-major (row 0 = top).

    ``stride=None`` is the paper's non-overlapping grid (stride = patch size). Where the
    image side is not ``patch_size + k*stride`` the last pixels (right/bottom) are not covered;
    this is logged.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    stride = patch_size if stride is None else int(stride)
    _check_sizes(h, w, patch_size, stride)
    n_rows, n_cols = _grid_count(h, patch_size, stride), _grid_count(w, patch_size, stride)
    covered_h, covered_w = (n_rows - 1) * stride + patch_size, (n_cols - 1) * stride + patch_size
    if (covered_h, covered_w) != (h, w):
        log.warning("Patch grid %d/stride %d covers %dx%d of the %dx%d image (edges left out)",
                    patch_size, stride, covered_h, covered_w, h, w)
    return [
        PatchCell(size=patch_size, x=c * stride, y=r * stride, row=r, col=c)
        for r in range(n_rows)
        for c in range(n_cols)
    ]


def extract_patches(image: torch.Tensor | np.ndarray, patch_size: int,
                    stride: int | None = None) -> tuple[torch.Tensor, list[PatchCell]]:
    """Cut an image (H, W) (or (1, H, W)) into its grid of patches.

    Returns ``patches`` (N, 1, s, s) float32 in the order of :func:`patch_grid`, and the cells.
    Vectorised with ``Tensor.unfold`` (a strided view; one copy at the end).
    """
    x = torch.as_tensor(image)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"extract_patches expects a 2D image (H, W), got shape {tuple(x.shape)}")
    stride = patch_size if stride is None else int(stride)
    cells = patch_grid((x.shape[0], x.shape[1]), patch_size, stride)
    # (H, W) -> (n_rows, n_cols, s, s) -> (N, 1, s, s)
    patches = x.unfold(0, patch_size, stride).unfold(1, patch_size, stride)
    patches = patches.reshape(-1, 1, patch_size, patch_size).to(torch.float32).contiguous()
    return patches, cells


class ImageStore:
    """The 2D images of some items, kept in memory as uint16 when they fit in ``cache_max_gb``.

    uint16 quantisation (step 1/65535) is exact for 8- and 16-bit sources and far below any
    image noise after resizing. When the images do not fit, every access calls ``dm.load``.
    Each DDP rank / DataLoader worker shares the array built here (copy-on-write after fork).
    """

    def __init__(self, dm: MedicalDataModule, items: list[Item], cache_max_gb: float = 8.0,
                 description: str = "Loading images"):
        if getattr(dm, "is_3d", False):
            raise ValueError("Patch datasets need 2D images (data.modality=cxr); got a 3D data set")
        self.dm, self.items = dm, list(items)
        self.array: np.ndarray | None = None
        self.shape: tuple[int, int] | None = None
        if not self.items:
            return
        first = self._load(0)
        self.shape = (int(first.shape[0]), int(first.shape[1]))
        need_gb = len(self.items) * first.size * 2 / 2**30
        if need_gb <= cache_max_gb:
            from datamodules.progress import track

            self.array = np.empty((len(self.items), *self.shape), dtype=np.uint16)
            self.array[0] = self._quantise(first)
            for i in track(range(1, len(self.items)), description, total=len(self.items) - 1,
                           enabled=len(self.items) > 64):
                self.array[i] = self._quantise(self._load(i))
        else:
            log.warning("Images need %.1f GiB > simclr.cache_max_gb=%.1f: loading from disk for "
                        "every patch (slow; raise the limit or use data.num_workers > 0)",
                        need_gb, cache_max_gb)

    @staticmethod
    def _quantise(img: np.ndarray) -> np.ndarray:
        return np.rint(np.clip(img, 0.0, 1.0) * 65535.0).astype(np.uint16)

    def _load(self, i: int) -> np.ndarray:
        item = self.items[i]
        img = np.asarray(self.dm.load(item), dtype=np.float32)
        if img.ndim != 2:
            raise ValueError(f"{item.path}: expected a 2D image, got shape {img.shape}")
        if self.shape is not None and img.shape != self.shape:
            raise ValueError(
                f"{item.path}: image shape {img.shape} differs from {self.shape}; "
                "the data module must resize every image to data.image_size"
            )
        return img

    def __len__(self) -> int:
        return len(self.items)

    def crop(self, i: int, cell: PatchCell) -> torch.Tensor:
        """Patch ``cell`` of image ``i`` as (1, s, s) float32 in [0, 1]."""
        s = cell.size
        if self.array is not None:
            p = self.array[i, cell.y:cell.y + s, cell.x:cell.x + s].astype(np.float32) / 65535.0
        else:
            p = self._load(i)[cell.y:cell.y + s, cell.x:cell.x + s]
        return torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32)).unsqueeze(0)


class PatchDataset(Dataset):
    """Every grid patch of one size from a list of 2D items, with two augmented views.

    Each sample is a dict: ``view0``, ``view1`` (augmented views, (1, S, S)), ``patch`` (the
    un-augmented patch resized to the encoder's input size, only with ``include_patch``),
    ``label`` (the image's label), ``image`` (index of the image), ``row``, ``col``.

    ``seed`` fixes the random views per sample (for validation metrics that must be comparable
    across epochs); ``None`` draws fresh views each time (training).
    ``max_patches`` keeps a fixed random subset of the patches; then only those patches are
    kept in memory (each needed image is read once), not the whole images.
    """

    def __init__(self, dm: MedicalDataModule, items: list[Item], patch_size: int,
                 view_transform: Callable[[torch.Tensor], torch.Tensor],
                 stride: int | None = None, cache_max_gb: float = 8.0,
                 max_patches: int | None = None, seed: int | None = None,
                 include_patch: bool = False,
                 patch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 description: str = "Loading images"):
        self.items = list(items)
        self.view_transform = view_transform
        self.patch_transform = patch_transform
        self.include_patch = include_patch
        self.seed = seed
        self.store: ImageStore | None = None
        self.crops: np.ndarray | None = None  # (n, s, s) uint16, subset mode only
        if not self.items:
            self.cells, self.index = [], np.zeros(0, dtype=np.int64)
            return
        n_total_images = len(self.items)
        if max_patches is None:
            self.store = ImageStore(dm, self.items, cache_max_gb=cache_max_gb,
                                    description=description)
            self.cells = patch_grid(self.store.shape, patch_size, stride)
            self.index = np.arange(n_total_images * len(self.cells), dtype=np.int64)
            return
        first = ImageStore(dm, self.items[:1], cache_max_gb=float("inf"))
        self.cells = patch_grid(first.shape, patch_size, stride)
        n = n_total_images * len(self.cells)
        index = np.arange(n, dtype=np.int64)
        if n > max_patches:
            rng = np.random.default_rng(0 if seed is None else seed)
            index = np.sort(rng.choice(n, size=max_patches, replace=False))
        self.index = index  # flat index = image * n_cells + cell
        self.crops = self._load_crops(dm, first, description)

    def _load_crops(self, dm: MedicalDataModule, first: ImageStore,
                    description: str) -> np.ndarray:
        from datamodules.progress import track

        img_of = self.index // len(self.cells)
        s = self.cells[0].size
        crops = np.empty((len(self.index), s, s), dtype=np.uint16)
        needed = np.unique(img_of)
        for img in track(needed, description, total=len(needed), enabled=len(needed) > 64):
            store = first if img == 0 else ImageStore(dm, [self.items[img]], float("inf"))
            if store.shape != first.shape:
                raise ValueError(f"{self.items[img].path}: image shape {store.shape} differs "
                                 f"from {first.shape}; data.image_size must apply to all")
            for j in np.nonzero(img_of == img)[0]:
                c = self.cells[int(self.index[j]) % len(self.cells)]
                crops[j] = store.array[0, c.y:c.y + s, c.x:c.x + s]
        return crops

    def __len__(self) -> int:
        return len(self.index)

    def _views(self, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view_transform(patch), self.view_transform(patch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        flat = int(self.index[i])
        img_idx, cell_idx = divmod(flat, len(self.cells))
        cell = self.cells[cell_idx]
        if self.crops is not None:
            patch = torch.from_numpy(self.crops[i].astype(np.float32) / 65535.0).unsqueeze(0)
        else:
            patch = self.store.crop(img_idx, cell)  # (1, s, s)
        if self.seed is None:
            v0, v1 = self._views(patch)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + flat)
                v0, v1 = self._views(patch)
        out = {"view0": v0, "view1": v1, "label": self.items[img_idx].label,
               "image": img_idx, "row": cell.row, "col": cell.col}
        if self.include_patch:
            out["patch"] = self.patch_transform(patch) if self.patch_transform else patch
        return out


def train_patch_dataset(dm: MedicalDataModule, patch_size: int, view_transform, *,
                        stride: int | None = None, cache_max_gb: float = 8.0) -> PatchDataset:
    """Patches of the normal training images, two fresh augmented views each (SimCLR)."""
    items = dm.items("train", "normal")
    if not items:
        raise ValueError("The data module has no train/normal images: SimCLR trains on them "
                         "(folder layout: DIR/train/normal/)")
    return PatchDataset(dm, items, patch_size, view_transform, stride=stride,
                        cache_max_gb=cache_max_gb, description="Loading train/normal images")


def val_patch_dataset(dm: MedicalDataModule, patch_size: int, view_transform, patch_transform,
                      *, stride: int | None = None, cache_max_gb: float = 8.0,
                      max_patches: int | None = 2048, seed: int = 0) -> PatchDataset | None:
    """Patches of the val normal + abnormal images with fixed views (for alignment /
    uniformity / kNN metrics), or None when the data set has no val images."""
    items = dm.items("val", "normal") + dm.items("val", "abnormal")
    if not items:
        return None
    return PatchDataset(dm, items, patch_size, view_transform, stride=stride,
                        cache_max_gb=cache_max_gb, max_patches=max_patches, seed=seed,
                        include_patch=True, patch_transform=patch_transform,
                        description="Loading val images")
