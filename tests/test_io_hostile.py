"""Hostile and unusual DICOM the loader must handle (issue 19): a deflate bomb stays bounded,
valid files that were refused load, and a compression no decoder reads is named exactly."""
from __future__ import annotations

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from mrg_core.io import LoadLimits, StudyLoadError, load_study
from mrg_core.paths import REPO_ROOT
from mrg_core.samples import new_dataset
from tests.factories import SC_IMAGE_STORAGE

GiB = 2**30


def grey8(rows: int, cols: int, seed: str):
    """An 8-bit MONOCHROME2 secondary capture header for rows x cols (pixels set by caller)."""
    ds = new_dataset(SC_IMAGE_STORAGE, "OT", seed)
    ds.set_pixel_data(np.zeros((rows, cols), np.uint8), "MONOCHROME2", 8)
    return ds


def deflate_bomb(path, inflated_pixel_bytes: int, rows: int = 64, cols: int = 64) -> int:
    """A Deflated Explicit VR Little Endian file whose header says rows x cols (8 bit) but whose
    pixel data element inflates to inflated_pixel_bytes of zeros; returns the file size."""
    ds = grey8(rows, cols, f"bomb-{path}")
    meta = ds.file_meta
    del ds.PixelData  # written by hand below: its length is the bomb's
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    head = body.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00" + inflated_pixel_bytes.to_bytes(4, "little")
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk, left = bytes(64 * 2**20), inflated_pixel_bytes
    parts = [deflate.compress(head)]
    while left:
        n = min(left, len(chunk))
        parts.append(deflate.compress(chunk[:n]))
        left -= n
    parts.append(deflate.flush())
    data = out.getvalue() + b"".join(parts)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def test_deflate_bomb_is_refused_with_bounded_memory(tmp_path):
    """3 GiB of pixel data deflated into a few MB: refused as too large while inflating, in a
    fresh process whose peak memory stays far below the 3 GiB (it was 6.3 GB). The peak is the
    process's own VmHWM: ru_maxrss would include the pytest parent's size at fork."""
    bomb = tmp_path / "bomb.dcm"
    size = deflate_bomb(bomb, 3 * GiB)
    assert size < 5 * 2**20  # it passes the 256 MB upload limit easily
    code = ("import json, resource, sys; from mrg_core.io import load_study, StudyLoadError\n"
            "try:\n    load_study([sys.argv[1]]); out = 'loaded'\n"
            "except StudyLoadError as e:\n    out = e.code + ': ' + e.message\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
            "peak = int(hwm[0].split()[1]) / 1024 if hwm else "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "print(json.dumps({'out': out, 'peak_mb': peak}))")
    run = subprocess.run([sys.executable, "-c", code, str(bomb)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["out"].startswith("too_large") and "expand" in res["out"], res
    assert res["peak_mb"] < 1024, res  # the target: < 1 GB for any accepted input


def test_deflated_files_within_the_limits_still_load(tmp_path):
    real = load_study([get_testdata_file("image_dfl.dcm", download=False)])  # pydicom's own
    assert real.views[0].values.shape == (512, 512)
    # a small limit refuses what inflates past it, whatever the header says
    small = tmp_path / "small.dcm"
    deflate_bomb(small, 64 * 64, rows=64, cols=64)  # honest: 4 KB of pixels
    assert load_study([small]).views[0].values.shape == (64, 64)
    with pytest.raises(StudyLoadError) as err:
        load_study([small], limits=LoadLimits(max_file_bytes=2048))
    assert err.value.code == "too_large" and "2 KB" in err.value.message


def test_ybr_full_422_native_is_not_called_truncated():
    """4:2:2 sampling stores two samples a pixel, not three (pydicom's own test file)."""
    views = load_study([get_testdata_file("SC_ybr_full_422_uncompressed.dcm",
                                          download=False)]).views
    assert views[0].values.shape == (100, 100)
    assert views[0].values.std() > 0  # a picture, not a blank


def test_compression_no_decoder_reads_is_named():
    """12-bit JPEG Extended that libjpeg rejects and Pillow cannot do: the message names the
    compression instead of calling the file damaged."""
    with pytest.raises(StudyLoadError) as err:
        load_study([get_testdata_file("JPEG-lossy.dcm", download=False)])
    assert err.value.code == "unsupported_compression"
    assert "JPEG Extended (Process 2 and 4)" in err.value.message


def _encapsulated(path, ts, frame: bytes, rows: int = 64, cols: int = 64) -> None:
    """A DICOM whose header says rows x cols and whose one encapsulated frame is `frame`."""
    ds = grey8(rows, cols, f"frame-{path}")
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def _jpeg_saying(rows: int, cols: int) -> bytes:
    sof = b"\xff\xc0\x00\x0b\x08" + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + \
        b"\x01\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + sof + bytes(200) + b"\xff\xd9"


def _j2k_saying(rows: int, cols: int) -> bytes:
    siz = (b"\xff\x4f\xff\x51\x00\x29\x00\x00" + cols.to_bytes(4, "big") + rows.to_bytes(4, "big")
           + bytes(8) + cols.to_bytes(4, "big") + rows.to_bytes(4, "big") + bytes(8)
           + b"\x00\x01\x07\x01\x01")
    return siz + bytes(200) + b"\xff\xd9"


@pytest.mark.parametrize("ts,frame", [
    ("1.2.840.10008.1.2.4.50", _jpeg_saying(16000, 16000)),  # JPEG baseline
    ("1.2.840.10008.1.2.4.90", _j2k_saying(16000, 16000)),  # JPEG 2000 lossless
])
def test_frame_bigger_than_its_header_says_is_refused_before_decoding(tmp_path, ts, frame):
    """Header 64 x 64, frame 16000 x 16000: refused from the frame's own header (it was
    decoded in full first: 1.3 GB peak)."""
    from mrg_core.io.frame_size import frame_size

    assert frame_size(frame) == (16000, 16000)
    liar = tmp_path / "liar.dcm"
    _encapsulated(liar, ts, frame)
    with pytest.raises(StudyLoadError) as err:
        load_study([liar])
    assert err.value.code == "too_large" and "bigger than its header says" in err.value.message


def test_frame_sizes_of_real_compressed_files_are_read():
    from pydicom import dcmread
    from pydicom.encaps import generate_frames

    from mrg_core.io.frame_size import frame_size

    for name in ("SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_16.dcm"):
        ds = dcmread(get_testdata_file(name, download=False))
        first = next(generate_frames(ds.PixelData, number_of_frames=1))
        assert frame_size(first) == (ds.Rows, ds.Columns), name
        assert load_study([get_testdata_file(name, download=False)]).views
