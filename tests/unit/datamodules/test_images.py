"""PNG reading (8/16-bit, never clipped), resizing of images, masks and volumes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules.images import (
    ImageReadError,
    read_2d,
    read_png,
    resize_2d,
    resize_3d,
    resize_mask,
    verify_png,
)


def _png16(path, arr):
    Image.fromarray(arr.astype(np.uint16)).save(path)
    return path


def test_16bit_png_divided_by_65535_not_clipped(tmp_path):
    arr = np.array([[0, 255, 256, 4095], [30000, 65535, 1, 65534]], dtype=np.uint16)
    p = _png16(tmp_path / "a.png", arr)
    assert Image.open(p).mode == "I;16"
    img = read_png(p)
    assert img.dtype == np.float32 and img.shape == (2, 4)
    np.testing.assert_allclose(img, arr / 65535.0, rtol=0, atol=1e-7)
    # What convert('L') would do: everything above 255 saturates; our values stay distinct.
    assert len(np.unique(img)) == arr.size
    assert img[1, 1] == pytest.approx(1.0) and img[0, 0] == 0.0


def test_8bit_png_divided_by_255(tmp_path):
    arr = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "b.png")
    np.testing.assert_allclose(read_png(tmp_path / "b.png"), arr / 255.0, atol=1e-7)


def test_8bit_png_where_16bit_expected_warns_and_scales_right(tmp_path):
    arr = np.full((4, 4), 128, dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match="expected a 16-bit PNG"):
        img = read_png(tmp_path / "c.png", expect_16bit=True)
    np.testing.assert_allclose(img, 128 / 255.0, atol=1e-7)


def test_gray_rgb_png_read_as_gray(tmp_path):
    g = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(np.stack([g, g, g], -1)).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(read_png(tmp_path / "rgb.png"), g / 255.0, atol=1e-7)


def test_truncated_png_names_the_file(tmp_path):
    p = _png16(tmp_path / "full.png", np.random.default_rng(0).integers(0, 65535, (64, 64)))
    data = p.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_png(bad)
    with pytest.raises(ImageReadError, match="truncated.png"):
        verify_png(bad)
    verify_png(p)  # the intact one passes


def test_unsupported_suffix_and_missing_file(tmp_path):
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_2d(tmp_path / "x.gif")
    with pytest.raises(ImageReadError, match="nope.png"):
        read_png(tmp_path / "nope.png")


def test_resize_2d_any_size_to_configured_size():
    rng = np.random.default_rng(0)
    for shape in [(28, 28), (300, 200), (7, 1000)]:
        out = resize_2d(rng.random(shape, dtype=np.float32), 64)
        assert out.shape == (64, 64) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
    const = np.full((123, 77), 0.3, np.float32)
    np.testing.assert_allclose(resize_2d(const, 32), 0.3, atol=1e-6)
    # Antialiased shrinking averages a fine checkerboard to its mean (plain bilinear aliases).
    checker = (np.indices((250, 250)).sum(0) % 2).astype(np.float32)
    np.testing.assert_allclose(resize_2d(checker, 32), 0.5, atol=0.02)


def test_resize_mask_nearest_stays_binary():
    mask = np.zeros((100, 100), bool)
    mask[20:40, 50:90] = True
    out = resize_mask(mask, 50)
    assert out.dtype == bool and out.shape == (50, 50)
    assert out[10:20, 25:45].all() and out.sum() == 10 * 20
    vol = np.zeros((8, 16, 16), bool)
    vol[2:4, 4:8, 4:8] = True
    assert resize_mask(vol, (4, 8, 8)).sum() == 1 * 2 * 2


def test_resize_3d_trilinear_shape_and_constant():
    vol = np.full((10, 40, 30), 7.0, np.float32)
    out = resize_3d(vol, (32, 128, 128))
    assert out.shape == (32, 128, 128)
    np.testing.assert_allclose(out, 7.0, atol=1e-5)


def test_decompression_bomb_is_the_projects_error(tmp_path, monkeypatch):
    """A huge PNG (Pillow's DecompressionBombError) is an ImageReadError naming the file."""
    from PIL import Image as PILImage

    p = _png16(tmp_path / "huge.png", np.zeros((64, 64)))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 64x64 > 2 x 100: a "bomb"
    for fn in (read_png, verify_png):
        with pytest.raises(ImageReadError, match="huge.png: image too large to decode safely"):
            fn(p)
