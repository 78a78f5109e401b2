"""DICOM loading: real shared files (skipped when absent) and generated files."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from factories import (ct_hu_pattern, write_corrupt, write_ct_signed, write_huge_header,
                       write_mono1, write_mono2, write_multiframe, write_no_pixels,
                       write_rgb, write_rle_pair, write_truncated)
from mrg_core.io import LoadLimits, StudyLoadError, load_study, load_view
from mrg_core.paths import SAMPLES_DIR
from mrg_core.study import CT_WINDOWS


def _code(source, **kw) -> str:
    with pytest.raises(StudyLoadError) as info:
        load_study([source], **kw)
    assert info.value.message and "Traceback" not in info.value.message
    return info.value.code


def _small(img: np.ndarray, shape) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize(shape[::-1], Image.BILINEAR), np.float32)


def _corr(a, b) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---- real files --------------------------------------------------------------------------

def test_every_shared_dicom_loads(shared_data):
    files = sorted((shared_data / "dicom").rglob("*.dcm"))
    assert len(files) >= 7
    for f in files:
        study = load_study([f])
        for v in study.views:
            assert v.display.dtype == np.uint8 and v.display.shape == v.values.shape
            assert v.display.std() > 1, f.name  # not a flat image
            assert v.meta.source_format == "dicom"


@pytest.fixture(scope="module")
def rg1(shared_data):
    d = shared_data / "dicom"
    return {k: load_study([d / f"RG1_{k}.dcm"]).views[0] for k in ("UNCR", "J2KR", "J2KI")}


def test_rg1_monochrome1_matches_preview(rg1, shared_data):
    prev = np.asarray(Image.open(shared_data / "dicom" / "RG1_preview.png").convert("L"),
                      np.float32)
    v = rg1["UNCR"]
    assert v.meta.photometric == "MONOCHROME1" and v.display.shape == (1955, 1841)
    small = _small(v.display, prev.shape)
    assert _corr(small, prev) > 0.9
    assert _corr(255 - small, prev) < 0  # not inverted
    # anatomy: the lung fields (left/right of centre, mid-height) are darker than the
    # mediastinum (centre column)
    h, w = v.display.shape
    lungs = np.r_[v.display[h // 3: h // 2, w // 5: w // 3].ravel(),
                  v.display[h // 3: h // 2, 2 * w // 3: 4 * w // 5].ravel()].mean()
    mediastinum = v.display[h // 3: 2 * h // 3, w // 2 - 40: w // 2 + 40].mean()
    assert lungs + 30 < mediastinum


def test_rg1_encodings_agree(rg1):
    base = rg1["UNCR"].display.astype(np.int16)
    assert np.abs(base - rg1["J2KR"].display).mean() < 1
    assert np.abs(base - rg1["J2KI"].display).mean() < 3
    assert rg1["UNCR"].window == rg1["J2KI"].window


def test_rsna_jpeg_baseline(shared_data):
    v = load_study([shared_data / "dicom" / "RSNA_c64d5667_CR_AP_jpegbaseline.dcm"]).views[0]
    assert v.meta.photometric == "MONOCHROME2" and v.display.shape == (1024, 1024)
    assert v.values.min() >= 0 and v.values.max() <= 255 and v.values.max() - v.values.min() > 100
    assert 30 < v.display.mean() < 220


def test_tiny_cr(shared_data):
    for f in sorted((shared_data / "dicom" / "pydicom_tiny_cr").glob("*.dcm")):
        v = load_study([f]).views[0]
        assert v.display.shape == (16, 16) and v.meta.bits_stored == 12
        assert v.window == (1600.0, 2800.0)


# ---- generated files ---------------------------------------------------------------------

def test_ct_signed_rescale_gives_hu_and_lung_window(tmp_path):
    hu = write_ct_signed(tmp_path / "ct.dcm")
    v = load_study(tmp_path / "ct.dcm").views[0]
    assert v.meta.units == "HU" and v.meta.modality == "CT"
    np.testing.assert_allclose(v.values, hu, atol=1)
    assert v.window == CT_WINDOWS["lung"]
    np.testing.assert_array_equal(v.display, v.windowed(*CT_WINDOWS["lung"]))
    col = {h: v.display[0, int(np.argmax(hu[0] == h))] for h in (-1000, -850, 0, 700)}
    assert col[-1000] < col[-850] < col[0] < col[700] == 255
    assert v.meta.pixel_spacing == (0.5, 0.6)


def test_samples_load(tmp_path):
    covid = load_study(SAMPLES_DIR / "ct_phantom_covid.dcm").views[0]
    normal = load_study(SAMPLES_DIR / "ct_phantom_normal.dcm").views[0]
    assert covid.meta.units == "HU" and covid.values.shape == (512, 512)
    assert abs(float(np.median(covid.values[240:260, 130:150])) + 850) < 60  # right lung
    assert abs(float(np.median(covid.values[368:376, 276:282])) - 700) < 80  # vertebral cortex
    ggo = ((covid.values > -650) & (covid.values < -350)).sum()
    assert ggo - ((normal.values > -650) & (normal.values < -350)).sum() > 1500
    cr = load_study(SAMPLES_DIR / "cr_phantom_pa.dcm").views[0]
    assert cr.meta.photometric == "MONOCHROME1" and cr.meta.view_position == "PA"
    assert cr.display[250, 120] < cr.display[250, 240]  # lung darker than spine
    for f in SAMPLES_DIR.glob("*.dcm"):
        assert f.stat().st_size < 600 * 1024


def test_monochrome1_is_inverted(tmp_path):
    arr = write_mono1(tmp_path / "m1.dcm")
    v = load_study(tmp_path / "m1.dcm").views[0]
    np.testing.assert_array_equal(v.values, arr)
    assert v.display[0, 0] > 250 and v.display[0, -1] < 5  # low stored value = bright
    np.testing.assert_array_equal(v.display, v.windowed(2048, 4096))
    write_mono1(tmp_path / "m1nw.dcm", window=False)  # min/max fallback, still inverted
    v2 = load_study(tmp_path / "m1nw.dcm").views[0]
    assert v2.display[0, 0] == 255 and v2.display[0, -1] == 0


@pytest.mark.parametrize("bits,signed", [(8, False), (10, False), (12, True), (16, False),
                                         (16, True)])
def test_any_bit_depth(tmp_path, bits, signed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    dtype = (np.int8 if signed else np.uint8) if bits == 8 else (np.int16 if signed else np.uint16)
    arr = np.linspace(lo, hi, 20 * 30).round().astype(dtype).reshape(20, 30)
    write_mono2(tmp_path / "b.dcm", arr, bits)
    v = load_study(tmp_path / "b.dcm").views[0]
    np.testing.assert_array_equal(v.values, arr.astype(np.float32))
    assert v.display[0, 0] == 0 and v.display[-1, -1] == 255  # min/max window
    assert np.all(np.diff(v.display.ravel().astype(int)) >= 0)


def test_multiframe_one_view_per_frame(tmp_path):
    arr = write_multiframe(tmp_path / "mf.dcm", frames=5)
    views = load_view(tmp_path / "mf.dcm")
    assert len(views) == 5 and [v.meta.frame_index for v in views] == list(range(5))
    for v, a in zip(views, arr):
        np.testing.assert_array_equal(v.values, a)
    assert load_study([tmp_path / "mf.dcm"] * 2).content_hash  # 10 views
    with pytest.raises(StudyLoadError) as info:
        load_study([tmp_path / "mf.dcm"], LoadLimits(max_frames=4))
    assert info.value.code == "too_large"


def test_rle_equals_uncompressed(tmp_path):
    write_rle_pair(tmp_path / "u.dcm", tmp_path / "rle.dcm")
    a, b = load_study(tmp_path / "u.dcm"), load_study(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(a.views[0].values, b.views[0].values)
    assert a.content_hash == b.content_hash


def test_rgb_dicom_becomes_grey(tmp_path):
    write_rgb(tmp_path / "rgb.dcm")
    v = load_study(tmp_path / "rgb.dcm").views[0]
    assert v.display.ndim == 2 and v.meta.photometric == "RGB"
    assert v.display[0, 0] == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)


def test_bytes_and_tuple_sources(tmp_path):
    write_mono1(tmp_path / "m1.dcm")
    data = (tmp_path / "m1.dcm").read_bytes()
    h = load_study(tmp_path / "m1.dcm").content_hash
    assert load_study([data]).content_hash == h
    assert load_study([("../../etc/passwd", data)]).content_hash == h  # name only shown
    assert len(load_study([data, data]).views) == 2
    # preamble-less DICOM (starts at the group 0002 / 0008 tags) is still recognised
    assert load_study([data[128 + 4:]]).content_hash == h


@pytest.mark.parametrize("writer,code", [
    (write_corrupt, "corrupt"), (write_truncated, "truncated"), (write_no_pixels,
                                                                 "no_pixel_data"),
])
def test_bad_files_have_codes(tmp_path, writer, code):
    writer(tmp_path / "bad.dcm")
    assert _code(tmp_path / "bad.dcm") == code


def test_other_errors(tmp_path):
    assert _code(b"hello, this is not an image at all") == "not_an_image"
    assert _code(b"") == "empty_image"
    assert _code(tmp_path / "missing.dcm") == "not_found"
    with pytest.raises(StudyLoadError) as info:
        load_study([])
    assert info.value.code == "no_files"
    write_mono1(tmp_path / "m1.dcm")
    with pytest.raises(StudyLoadError) as info:
        load_study([tmp_path / "m1.dcm"] * 3, LoadLimits(max_files=2))
    assert info.value.code == "too_many_files"
    assert _code(tmp_path / "m1.dcm", limits=LoadLimits(max_file_bytes=100)) == "file_too_big"


def test_pixel_limit_checked_before_decoding(tmp_path):
    write_huge_header(tmp_path / "huge.dcm", 60000, 60000)
    tracemalloc.start()
    try:
        assert _code(tmp_path / "huge.dcm") == "too_large"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # the 3.6-gigapixel image was never allocated
    write_huge_header(tmp_path / "frames.dcm", 512, 512, frames=100000)
    assert _code(tmp_path / "frames.dcm") == "too_large"
    write_huge_header(tmp_path / "ok_but_short.dcm", 64, 64)
    assert _code(tmp_path / "ok_but_short.dcm") == "truncated"
