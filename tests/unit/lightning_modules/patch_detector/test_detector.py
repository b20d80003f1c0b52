"""Patch detector model and reference database (Kim et al. 2023), with fixed toy encoders."""

import json

import numpy as np
import pytest
import torch

from lightning_modules.patch_detector.anomaly_map import MapNormalizer
from lightning_modules.patch_detector.detector import PatchAnomalyDetector
from lightning_modules.patch_detector.reference_db import (
    ReferenceDB,
    ReferenceDBMismatch,
    file_sha256,
)
from tests.support import PoolEncoder, random_images, toy_detector


@pytest.mark.parametrize("stride_fraction", [1.0, 0.5])
def test_planted_outlier_patch_gets_the_top_score(stride_fraction):
    det = toy_detector(stride_fraction)
    q = random_images(3, seed=1)
    q[1, 0, 8:16, 16:24] = 1.0  # a bright lesion filling the 8-px patch at row 1, col 2
    scores = det.patch_scores(det.features(q))
    grid = det.grid(8)
    top = int(scores[8][1].argmax())
    assert (grid[top].y, grid[top].x) == (8, 16) if stride_fraction == 1.0 else \
        (8 - 4 <= grid[top].y <= 8 + 4 and 16 - 4 <= grid[top].x <= 16 + 4)
    assert float(scores[8][1].max()) > 3 * float(scores[8][0].max())
    # fused: the image with the lesion scores highest, and its map peaks on the lesion
    val = det.patch_scores(det.features(random_images(4, seed=2)))
    det.normalizer = MapNormalizer.fit_scales([val[s] for s in det.patch_sizes], det.patch_sizes,
                                              [1.0, 1.0], "geometric")
    det.normalizer.fit_calibration(det.raw_image_scores(val, det.normalizer).numpy(),
                                   np.zeros(4, int))
    final, img_scores = det.fuse(scores)
    assert int(img_scores.argmax()) == 1
    # (the sigmoid may saturate at 1 in float32: locate the peak before it)
    full = det.upsample(det.normalizer.fused_log_map(det.size_maps(scores)))[1]  # (32, 32)
    peak = np.unravel_index(int(full.argmax()), full.shape)
    assert 8 <= peak[0] < 16 and 16 <= peak[1] < 24
    assert ((final >= 0) & (final <= 1)).all() and final.dtype == torch.float64


def test_extract_matches_the_shared_patch_grid():
    from datamodules.patches import extract_patches

    det = toy_detector(0.5)
    img = random_images(2)
    mine = det.extract(img, 16)  # (2 * N, 1, 16, 16)
    theirs, cells = extract_patches(img[1, 0], 16, det.stride(16))
    n = len(cells)
    torch.testing.assert_close(mine[n:], theirs)
    assert det.window(8) == 2  # d = 1 patch = 2 cells at stride 4


def test_reference_db_round_trip_and_mismatch(tmp_path):
    det = toy_detector()
    db = det.dbs[8]
    ckpt = tmp_path / "enc.ckpt"
    ckpt.write_bytes(b"weights")
    db.encoder_sha256 = file_sha256(ckpt)
    path = db.save(tmp_path / "db" / "res8.safetensors")
    back = ReferenceDB.load(path, db.encoder_sha256, det.patch_config(8))
    torch.testing.assert_close(back.features, db.features)
    assert torch.equal(back.cells, db.cells) and back.config == db.config
    other = "0" * 64
    with pytest.raises(ReferenceDBMismatch) as e:
        ReferenceDB.load(path, other)
    assert db.encoder_sha256 in str(e.value) and other in str(e.value)
    with pytest.raises(ReferenceDBMismatch, match="stride"):
        ReferenceDB.load(path, None, {**det.patch_config(8), "stride": 4})
    # not a pickle: the file is safetensors with a JSON header
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    meta = json.loads(path.read_bytes()[8:8 + header_len])["__metadata__"]
    assert meta["encoder_sha256"] == db.encoder_sha256


def test_cell_normalize_divides_by_the_local_normal_spread():
    # reference images whose top-left 8-px cell varies a lot between images (like the body
    # outline), the rest little; a query with ordinary variation there and a small lesion
    # elsewhere: raw distances put the maximum at the variable cell, normalised ones on the
    # lesion.
    def imgs(n, seed):
        x = random_images(n, seed=seed)
        g = torch.Generator().manual_seed(seed + 100)
        x[:, :, :8, :8] = torch.rand(n, 1, 8, 8, generator=g)  # very variable tissue
        return x

    sizes = [8]
    dets = {}
    for cn in (False, True):
        det = PatchAnomalyDetector({8: PoolEncoder()}, 32, sizes, [0], distance="euclidean",
                                   cell_normalize=cn)
        f = det.features(imgs(30, 0))[8]
        n_img, n, d = f.shape
        ct = det.cell_tensors(8)
        det.set_db(ReferenceDB(8, f.reshape(-1, d), **{k: v.repeat(n_img) for k, v in ct.items()},
                               image_index=torch.arange(n_img).repeat_interleave(n).int(),
                               config=det.patch_config(8)))
        dets[cn] = det
    q = imgs(1, 5)
    q[0, 0, 16:24, 16:24] += 0.15  # faint lesion at cell (2, 2)
    raw = dets[False].patch_scores(dets[False].features(q))[8][0]
    norm = dets[True].patch_scores(dets[True].features(q))[8][0]
    lesion = 2 * 4 + 2
    assert int(norm.argmax()) == lesion
    # the scale is the median leave-one-image-out distance: ~1 on reference-like patches
    scale = dets[True]._reference(8, "euclidean", torch.device("cpu"))[3]
    torch.testing.assert_close(norm, raw / scale)
    assert scale[0] > 3 * scale[1:].median()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("options", [{}, {"cell_zscore": True}, {"distance": "mahalanobis"}])
def test_half_precision_database_changes_scores_by_its_rounding_only(dtype, options):
    """patch.db_dtype: the prepared database is stored in half precision; every score stays
    within the rounding of the stored values (relative 2**-8 for bfloat16's 8-bit mantissa,
    2**-11 for float16, times a small factor for the squared distance)."""
    full, half = toy_detector(**options), toy_detector(db_dtype=dtype, **options)
    q = half.features(random_images(3, seed=5))
    a, b = full.patch_scores(q), half.patch_scores(q)
    _, ref, _, _ = half._reference(8, half.distance, torch.device("cpu"))
    assert ref.dtype == getattr(torch, dtype)
    assert half.settings()["db_dtype"] == dtype
    tol = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype] * 8
    for s in a:
        if options.get("cell_zscore"):  # exp(z), z = (log d - mean_c) / sd_c: |dz| <= rel / sd
            err = (a[s].log() - b[s].log()).abs().max() * full.cell_stats[s][1].min()
        else:
            err = ((a[s] - b[s]).abs() / a[s].abs().clamp_min(1e-6)).max()
        assert 0 < err < tol if dtype == "bfloat16" else err < tol
    with pytest.raises(ValueError, match="db_dtype"):
        toy_detector(db_dtype="float64")
