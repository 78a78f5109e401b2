"""PNG / JPEG loading with Pillow."""
from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from mrg_core.io import LoadLimits, StudyLoadError, load_study

RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (20, 1))  # 20 x 64


def _png(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _view(data: bytes):
    return load_study([("x.png", data)]).views[0]


def test_png_8bit_grey():
    v = _view(_png(Image.fromarray(RAMP)))
    np.testing.assert_array_equal(v.display, RAMP)
    assert v.meta.source_format == "png" and v.meta.bits_stored == 8 and v.window is None


def test_png_16bit_scaled_by_its_range():
    arr = (np.arange(20 * 64, dtype=np.uint16).reshape(20, 64) * 3 + 1000)
    v = _view(_png(Image.fromarray(arr)))
    np.testing.assert_array_equal(v.values, arr)
    assert v.display.min() == 0 and v.display.max() == 255 and v.meta.bits_stored == 16


def test_rgb_rgba_p_la_become_grey():
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    v = _view(_png(Image.fromarray(rgb)))
    assert v.display.shape == (10, 12) and v.display[0, 0] == expected
    rgba = np.dstack([rgb, np.full((10, 12), 255, np.uint8)])
    rgba[:, :6, 3] = 0  # left half transparent -> composited on black
    v = _view(_png(Image.fromarray(rgba)))
    assert v.display[0, 0] == 0 and v.display[0, -1] == expected
    v = _view(_png(Image.fromarray(RAMP).convert("P")))
    assert np.abs(v.display.astype(int) - RAMP).max() <= 1
    la = Image.fromarray(np.dstack([RAMP, np.full_like(RAMP, 255)]), "LA")
    np.testing.assert_array_equal(_view(_png(la)).display, RAMP)


def test_jpeg_grey_and_colour():
    v = load_study([("x.jpg", _png(Image.fromarray(RAMP), "JPEG", quality=95))]).views[0]
    assert v.meta.source_format == "jpeg"
    assert np.abs(v.display.astype(int) - RAMP).mean() < 3
    col = Image.fromarray(np.dstack([RAMP] * 3))
    v = _view(_png(col, "JPEG", quality=95))
    assert v.display.ndim == 2 and np.abs(v.display.astype(int) - RAMP).mean() < 3


def test_truncated_and_corrupt():
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200),
                                                                   dtype=np.uint8)))
    with pytest.raises(StudyLoadError) as info:
        _view(data[: len(data) // 2])
    assert info.value.code == "truncated"
    jpg = _png(Image.fromarray(RAMP), "JPEG")
    with pytest.raises(StudyLoadError) as info:
        _view(jpg[:200])
    assert info.value.code in ("truncated", "corrupt")
    with pytest.raises(StudyLoadError) as info:
        _view(data[:8] + b"\0" * 100)  # PNG magic, garbage header
    assert info.value.code == "corrupt"


def test_png_pixel_limit_before_decoding():
    data = _png(Image.new("L", (3000, 3000)))
    with pytest.raises(StudyLoadError) as info:
        load_study([data], LoadLimits(max_pixels=1_000_000))
    assert info.value.code == "too_large"


def test_png_decompression_bomb():
    # a 20000 x 20000 PNG compresses to a few hundred KB: refused from its header
    data = _png(Image.new("1", (20000, 20000)))
    with pytest.raises(StudyLoadError) as info:
        _view(data)
    assert info.value.code == "too_large"


def test_file_path_and_hash_independent_of_name(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(Image.fromarray(RAMP)))
    (tmp_path / "b.png").write_bytes(_png(Image.fromarray(RAMP)))
    assert load_study(tmp_path / "a.png").content_hash == load_study(tmp_path / "b.png").content_hash
