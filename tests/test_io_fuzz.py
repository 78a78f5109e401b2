"""Fuzzing the loader: mutated real and generated DICOM / PNG / JPEG files.

Only StudyLoadError may escape; every input must allocate (tracemalloc peak, which sees
numpy buffers) well under the memory the limits allow. The time per input is reported, not
asserted: bench/timing_limits.py checks it (target 5 s). Derandomized: the same inputs every
run. MRG_FUZZ_EXAMPLES (default 2000) sets the total input count.
"""
from __future__ import annotations

import os
import struct
import time
import tracemalloc
import zlib
from io import BytesIO

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from factories import (write_ct_signed, write_enhanced_ct, write_lut_cr, write_mono1,
                       write_multiframe, write_rgb, write_rle_pair)
from mrg_core.io import CODES, LoadLimits, StudyLoadError, load_study
from mrg_core.paths import data_dir

TOTAL = int(os.environ.get("MRG_FUZZ_EXAMPLES", "2000"))
SHARE = {"bytes": 0.45, "truncate": 0.2, "dicom_header": 0.25, "png_header": 0.1}
# Small limits keep the memory assertion strict: at most 8 M pixels in one study.
LIMITS = LoadLimits(max_pixels=4_000_000, max_total_pixels=8_000_000, max_frames=64)
MAX_PEAK = 400 * 2**20  # bytes; 8 M pixels x (f64 working copy + f32 values + u8 display)
STATS = {"inputs": 0, "errors": 0, "loaded": 0, "max_s": 0.0, "max_peak_mb": 0.0}


def _fuzz_settings(part: str):
    return settings(derandomize=True, deadline=None, database=None,
                    max_examples=max(1, int(TOTAL * SHARE[part])),
                    suppress_health_check=list(HealthCheck))


def _bytes_of(writer, *args, **kw) -> bytes:
    buf = BytesIO()
    writer(buf, *args, **kw)
    return buf.getvalue()


def _image_bytes(arr, fmt, **kw) -> bytes:
    buf = BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _build_corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (48, 40), dtype=np.uint8)
    corpus = {
        "mono1": _bytes_of(write_mono1),
        "ct_signed": _bytes_of(write_ct_signed),
        "multiframe": _bytes_of(write_multiframe, frames=4),
        "rgb": _bytes_of(write_rgb),
        "lut_cr": _bytes_of(write_lut_cr),  # Modality + VOI LUT Sequences
        "enhanced_ct": _bytes_of(write_enhanced_ct),  # per-frame functional groups
        "png8": _image_bytes(grey, "PNG"),
        "png16": _image_bytes((grey.astype(np.uint16) * 200), "PNG"),
        "png_rgba": _image_bytes(np.dstack([grey] * 4), "PNG"),
        "jpeg": _image_bytes(grey, "JPEG"),
        "jpeg_rgb": _image_bytes(np.dstack([grey] * 3), "JPEG"),
    }
    tmp = BytesIO(), BytesIO()
    write_rle_pair(*tmp)
    corpus["rle"] = tmp[1].getvalue()
    shared = data_dir() / "dicom"
    if shared.is_dir():  # real files when present; RG1 (4-7 MB, 0.5 s per decode) left out
        for f in sorted((shared / "pydicom_tiny_cr").glob("*.dcm")):
            corpus[f"shared_{f.name}"] = f.read_bytes()
        rsna = shared / "RSNA_c64d5667_CR_AP_jpegbaseline.dcm"
        if rsna.exists():
            corpus["shared_rsna"] = rsna.read_bytes()
    return corpus


CORPUS = _build_corpus()
NAMES = sorted(CORPUS)
DICOM_NAMES = [n for n in NAMES if CORPUS[n][128:132] == b"DICM" and n != "rle"]


@pytest.fixture(scope="module", autouse=True)
def _report(pytestconfig):
    yield
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[fuzz] corpus={len(CORPUS)} files, {STATS}")


def _check(data: bytes) -> None:
    # tracemalloc only around the load: tracing hypothesis itself would triple the run time
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        load_study([("fuzz.bin", data)], LIMITS)
        STATS["loaded"] += 1
    except StudyLoadError as err:  # the only exception allowed out
        assert err.code in CODES and err.message
        STATS["errors"] += 1
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    STATS["inputs"] += 1
    STATS["max_s"] = round(max(STATS["max_s"], seconds), 3)
    STATS["max_peak_mb"] = round(max(STATS["max_peak_mb"], peak / 2**20), 1)
    assert peak < MAX_PEAK


@_fuzz_settings("bytes")
@given(name=st.sampled_from(NAMES),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=24),
       header_bias=st.booleans())
def test_byte_flips(name, flips, header_bias):
    data = bytearray(CORPUS[name])
    # half the time aim at the first 1 KB, where headers (and most parser branches) live
    span = min(len(data), 1024) if header_bias else len(data)
    for where, value in flips:
        data[int(where * span)] = value
    _check(bytes(data))


@_fuzz_settings("truncate")
@given(name=st.sampled_from(NAMES), cut=st.floats(0, 1, exclude_max=True))
def test_truncations(name, cut):
    data = CORPUS[name]
    _check(data[: int(cut * len(data))])


HUGE = st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 31, 32, 33, 64, 255, 4096,
                        32767, 65535])
FIELDS = {
    "Rows": HUGE, "Columns": HUGE, "BitsAllocated": HUGE, "BitsStored": HUGE,
    "HighBit": HUGE, "SamplesPerPixel": HUGE, "PixelRepresentation": st.sampled_from([0, 1, 2]),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "-1", "64", "65", "100000",
                                       "2147483647", "99999999999", "x"]),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB",
                                                  "PALETTE COLOR", "YBR_FULL", "", "XYZ"]),
    "RescaleSlope": st.sampled_from(["0", "-1", "1e308", "nan", "inf", "abc"]),
    "RescaleIntercept": st.sampled_from(["-1024", "1e308", "nan"]),
    "WindowCenter": st.sampled_from(["0", "-1e300", "nan", "40\\400", "abc"]),
    "WindowWidth": st.sampled_from(["0", "-5", "1e-300", "nan", "1"]),
    "VOILUTFunction": st.sampled_from(["SIGMOID", "LINEAR_EXACT", "BOGUS"]),
}


@_fuzz_settings("dicom_header")
@given(name=st.sampled_from(DICOM_NAMES),
       changes=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.just(None), min_size=1,
                               max_size=4).flatmap(
           lambda d: st.fixed_dictionaries({k: FIELDS[k] for k in d})),
       drop_pixels=st.booleans())
def test_dicom_header_mutations(name, changes, drop_pixels):
    try:
        with pydicom.config.disable_value_validation():
            ds = pydicom.dcmread(BytesIO(CORPUS[name]))
            for keyword, value in changes.items():
                setattr(ds, keyword, value)
            if drop_pixels:  # keep only the first few bytes of pixel data
                ds.PixelData = ds.PixelData[:64]
            buf = BytesIO()
            ds.save_as(buf)
    except (ValueError, OverflowError, struct.error):
        assume(False)  # pydicom will not even write this value: nothing to test
    _check(buf.getvalue())


def _png_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite IHDR width/height with a correct CRC (so only the size is a lie)."""
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return data[:12] + bytes(ihdr) + crc + data[33:]


@_fuzz_settings("png_header")
@given(name=st.sampled_from([n for n in NAMES if n.startswith("png")]),
       width=st.sampled_from([0, 1, 40, 41, 100_000, 2**31 - 1, 2**32 - 1]),
       height=st.sampled_from([0, 1, 48, 47, 100_000, 2**31 - 1, 2**32 - 1]))
def test_png_header_mutations(name, width, height):
    _check(_png_with_size(CORPUS[name], width, height))


def test_corpus_loads_unmutated():
    for name in NAMES:
        assert load_study([CORPUS[name]], LIMITS).views
