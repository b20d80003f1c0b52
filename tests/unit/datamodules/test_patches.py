"""Patch grid, vectorised patch extraction and the SimCLR patch datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.base import ABNORMAL, NORMAL
from datamodules.patches import (
    PatchCell,
    extract_patches,
    patch_grid,
    train_patch_dataset,
    val_patch_dataset,
)
from tests.support import FakeCXR


def test_grid_is_the_papers_non_overlapping_grid():
    for s in (128, 256, 512, 1024):
        cells = patch_grid(1024, s)
        n = 1024 // s
        assert len(cells) == n * n
        assert cells[0] == PatchCell(size=s, x=0, y=0, row=0, col=0)
        assert cells[-1] == PatchCell(size=s, x=1024 - s, y=1024 - s, row=n - 1, col=n - 1)
        # row-major, every pixel covered exactly once
        cover = np.zeros((1024, 1024), int)
        for c in cells:
            cover[c.y:c.y + s, c.x:c.x + s] += 1
        assert (cover == 1).all()
    assert [(c.row, c.col) for c in patch_grid(8, 4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_grid_with_stride_and_rectangular_images():
    cells = patch_grid((6, 10), 4, stride=2)
    assert {c.y for c in cells} == {0, 2} and {c.x for c in cells} == {0, 2, 4, 6}
    assert len(cells) == 2 * 4
    with pytest.raises(ValueError, match="larger than the image"):
        patch_grid(64, 128)
    with pytest.raises(ValueError, match="positive"):
        patch_grid(64, 16, stride=0)


@pytest.mark.parametrize("stride", [None, 3, 8])
def test_extract_patches_matches_slicing(stride):
    img = torch.rand(20, 24)
    patches, cells = extract_patches(img, 8, stride)
    assert patches.shape == (len(cells), 1, 8, 8) and patches.dtype == torch.float32
    for p, c in zip(patches, cells):
        assert torch.equal(p[0], img[c.y:c.y + 8, c.x:c.x + 8])
    # numpy and (1, H, W) inputs give the same
    p2, _ = extract_patches(img.numpy(), 8, stride)
    p3, _ = extract_patches(img[None], 8, stride)
    assert torch.equal(p2, patches) and torch.equal(p3, patches)
    with pytest.raises(ValueError, match="2D image"):
        extract_patches(torch.rand(2, 3, 20, 20), 8)


def _identity_views(x):
    return x.clone()


def test_train_dataset_covers_every_patch_of_every_normal_image():
    dm = FakeCXR(n_train=3, size=64)
    ds = train_patch_dataset(dm, 16, _identity_views)
    assert len(ds) == 3 * 16
    assert dm.n_loads == 3  # loaded once each, then served from the cache
    for i in (0, 5, 47):
        s = ds[i]
        img_idx, cell_idx = divmod(i, 16)
        c = ds.cells[cell_idx]
        ref = dm.load(ds.items[img_idx])[c.y:c.y + 16, c.x:c.x + 16]
        # uint16 cache: exact to 1/65535
        assert np.abs(s["view0"][0].numpy() - ref).max() <= 0.5 / 65535 + 1e-7
        assert s["view0"].shape == (1, 16, 16) and s["label"] == NORMAL
        assert (s["row"], s["col"]) == (c.row, c.col)


def test_uncached_dataset_gives_the_same_patches():
    dm = FakeCXR(n_train=2, size=32)
    cached = train_patch_dataset(dm, 16, _identity_views)
    uncached = train_patch_dataset(dm, 16, _identity_views, cache_max_gb=0.0)
    assert uncached.store.array is None and cached.store.array is not None
    for i in range(len(cached)):
        a, b = cached[i]["view0"], uncached[i]["view0"]
        assert torch.allclose(a, b, atol=0.5 / 65535 + 1e-7)  # uint16 cache


def test_val_dataset_fixed_views_labels_and_subset():
    from lightning_modules.simclr.transforms import resize_transform, view_transform

    dm = FakeCXR(n_val=2, size=64)
    views = view_transform(16, 0.5, None, 5.0)
    ds = val_patch_dataset(dm, 16, views, resize_transform(16), max_patches=40, seed=3)
    assert len(ds) == 40  # of 4 images x 16 patches
    labels = {ds[i]["label"] for i in range(len(ds))}
    assert labels == {NORMAL, ABNORMAL}
    a, b = ds[7], ds[7]
    assert torch.equal(a["view0"], b["view0"]) and torch.equal(a["view1"], b["view1"])
    assert not torch.equal(a["view0"], a["view1"])  # two different random views
    assert a["patch"].shape == (1, 16, 16)
    # the kept crops are the image's grid cells (uint16 in memory)
    for i in (0, 13, 39):
        flat = int(ds.index[i])
        img, cell = divmod(flat, 16)
        c = ds.cells[cell]
        ref = dm.load(ds.items[img])[c.y:c.y + 16, c.x:c.x + 16]
        assert np.abs(ds[i]["patch"][0].numpy() - ref).max() <= 0.5 / 65535 + 1e-6
        assert ds[i]["image"] == img and ds[i]["label"] == ds.items[img].label


def test_val_subset_reads_only_the_images_it_needs():
    from lightning_modules.simclr.transforms import resize_transform, view_transform

    dm = FakeCXR(n_val=20, size=32)
    ds = val_patch_dataset(dm, 16, view_transform(16), resize_transform(16), max_patches=2)
    assert len(ds) == 2 and ds.crops.shape == (2, 16, 16)
    assert dm.n_loads <= 3  # the first image (for the grid) + at most the 2 needed ones


def test_train_dataset_errors_without_normal_images():
    dm = FakeCXR(n_train=0)
    with pytest.raises(ValueError, match="train/normal"):
        train_patch_dataset(dm, 16, _identity_views)
