"""DICOM files that carry their own grey-scale transforms: Modality LUT Sequence, VOI LUT
Sequence (with and without a window beside it), both together, enhanced multi-frame objects
with per-frame functional groups, and compressed (RLE) multi-frame objects.

The files are written with pydicom here or taken from pydicom's bundled test files. Every
expected value is computed in this file from the table or numbers written into the file
(DICOM PS3.3 C.11.1 / C.11.2), never with the loader's own helpers, so a loader that skips,
misreads or rescales a LUT fails.
"""
from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless

from mrg_core.io import load_study
from mrg_core.samples import CR_IMAGE_STORAGE, new_dataset

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LUNG = (-600.0, 1500.0)  # centre, width in HU: what a CT opens in


def to_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def lut_item(first: int, bits: int, data, vr: str = "US") -> Dataset:
    """One LUT Sequence item: LUT Descriptor [entries, first value mapped, bits] + LUT Data."""
    data = np.asarray(data, np.int64)
    item = Dataset()
    item.add_new(0x00283002, "US", [len(data) % 65536, first, bits])  # LUTDescriptor
    if vr == "OW":
        item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())  # LUTData
    else:
        item.add_new(0x00283006, "US", [int(x) for x in data])
    return item


def lut_lookup(table, first: int, x) -> np.ndarray:
    """PS3.3 C.11: inputs below the first mapped value take the first entry, inputs past
    the table's end the last one."""
    table = np.asarray(table, np.int64)
    idx = np.clip(np.asarray(x, np.int64) - first, 0, len(table) - 1)
    return table[idx]


def to_uint8(x, lo: float, hi: float) -> np.ndarray:
    return np.floor(np.clip((np.asarray(x, np.float64) - lo) / (hi - lo), 0, 1) * 255 + 0.5)


def grey_file(arr: np.ndarray, bits: int, photometric: str = "MONOCHROME2",
              modality: str = "CR") -> Dataset:
    ds = new_dataset(CR_IMAGE_STORAGE, modality, f"lut-{modality}-{bits}-{photometric}")
    ds.set_pixel_data(arr, photometric, bits)
    return ds


def assert_display(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to one grey level (rounding of the last step)."""
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max() <= 1, (int(diff.max()), np.argwhere(diff > 1)[:5].tolist())


# ---- Modality LUT Sequence ------------------------------------------------------------------

@pytest.mark.parametrize("vr", ["US", "OW"])
def test_modality_lut_sequence_maps_stored_values(vr):
    """A non-monotone 256-entry table starting at stored value 1000: each stored value shows
    the table's entry, clamped at both ends. Without a VOI transform the display spans the
    mapped values' own range."""
    table = (97 * np.arange(256) + 13) % 4096
    stored = np.array([[0, 999, 1000, 1001, 1002, 1050, 1100, 1128],
                       [1200, 1254, 1255, 1256, 3000, 4095, 1017, 1031]], np.uint16)
    ds = grey_file(stored, 12)
    ds.ModalityLUTSequence = Sequence([lut_item(1000, 16, table, vr)])
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"  # unspecified units
    v = load_study([to_bytes(ds)]).views[0]
    known = {0: 13, 999: 13, 1000: 13, 1001: 110, 1002: 207, 1255: table[255], 4095: table[255],
             1050: (97 * 50 + 13) % 4096}
    for s, out in known.items():
        assert v.values[stored == s][0] == out, s
    want = lut_lookup(table, 1000, stored)
    np.testing.assert_array_equal(v.values, want.astype(np.float32))
    assert v.meta.units == "raw"
    assert_display(v.display, to_uint8(want, want.min(), want.max()))


# ---- VOI LUT Sequence -----------------------------------------------------------------------

def gamma_table(entries: int, bits: int) -> np.ndarray:
    return np.round((2**bits - 1) * (np.arange(entries) / (entries - 1)) ** 0.5).astype(np.int64)


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("with_window", [False, True])
def test_voi_lut_sequence_gives_the_display(bits, photometric, with_window):
    """A gamma-shaped VOI LUT of 2048 entries from stored value 512, output `bits` wide:
    display = entry / (2**bits - 1) * 255 (inverted for MONOCHROME1). A window stored beside
    the LUT does not change which transform is used or how its output is scaled."""
    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    table = gamma_table(2048, bits)
    ds = grey_file(stored, 12, photometric)
    ds.VOILUTSequence = Sequence([lut_item(512, bits, table)])
    if with_window:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    v = load_study([to_bytes(ds)]).views[0]
    np.testing.assert_array_equal(v.values, stored.astype(np.float32))
    want = to_uint8(lut_lookup(table, 512, stored), 0, 2**bits - 1)
    if photometric == "MONOCHROME1":
        want = 255 - want
    assert_display(v.display, want)
    assert v.window is None  # the LUT made the display, not a (centre, width) window
    # the curve really is not a straight window: the middle grey sits well above half
    assert abs(int(v.display[32, 0]) - 128) > 40


def test_gamma_table_is_not_a_window():
    """Sanity check of the test's own table: it is nothing like a linear window over the same
    input, so a loader that ignores the LUT cannot pass the test above."""
    table = gamma_table(2048, 12)
    linear = to_uint8(np.arange(4096), 0, 4095)
    lut = to_uint8(lut_lookup(table, 512, np.arange(4096)), 0, 4095)
    assert np.abs(lut - linear).max() > 60


def test_modality_then_voi_lut_sequence():
    """Both sequences: stored -> Modality LUT (reverses the 12-bit range) -> VOI LUT (a
    squared curve, 10-bit output) -> display."""
    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    modality = 4095 - np.arange(4096)
    voi = np.round(1023 * (np.arange(4096) / 4095) ** 2).astype(np.int64)
    ds = grey_file(stored, 12)
    ds.ModalityLUTSequence = Sequence([lut_item(0, 16, modality)])
    ds.VOILUTSequence = Sequence([lut_item(0, 10, voi)])
    v = load_study([to_bytes(ds)]).views[0]
    np.testing.assert_array_equal(v.values, (4095 - stored).astype(np.float32))
    want = to_uint8(voi[4095 - stored.astype(np.int64)], 0, 1023)
    assert_display(v.display, want)
    assert v.display[0, 0] == 255 and v.display[-1, -1] == 0  # reversed by the modality LUT
    assert v.display[32, 0] < 80  # squared curve: the middle of the range is dark


# ---- enhanced multi-frame: per-frame functional groups --------------------------------------

def _item(**attrs) -> Dataset:
    it = Dataset()
    for k, val in attrs.items():
        setattr(it, k, val)
    return it


def enhanced(sop: str, modality: str, stored: np.ndarray, shared: dict, per_frame: list[dict],
             bits: int = 16) -> Dataset:
    """An enhanced multi-frame dataset: the grey-scale transform lives only in the functional
    group macros (none at the top level)."""
    ds = new_dataset(sop, modality, f"enhanced-{modality}-{len(per_frame)}")
    ds.set_pixel_data(stored, "MONOCHROME2", bits)
    ds.SharedFunctionalGroupsSequence = Sequence([_item(**shared)])
    ds.PerFrameFunctionalGroupsSequence = Sequence([_item(**f) for f in per_frame])
    return ds


def test_enhanced_ct_per_frame_rescale_gives_hu():
    """Three frames with three different rescales (PixelValueTransformationSequence per
    frame); the stored numbers differ, the HU are known: every frame shows its HU in the lung
    window, and the pixel spacing comes from the shared Pixel Measures."""
    base = np.repeat(np.array([-1000, -850, -400, 0, 40, 700, 1200, 1500], np.int64), 4)
    hu = np.stack([np.tile(base + 20 * i, (16, 1)) for i in range(3)])  # frames differ
    rescale = [(1.0, -1024.0), (2.0, -2048.0), (0.5, -1100.0)]  # (slope, intercept)
    stored = np.stack([np.round((hu[i] - b) / m) for i, (m, b) in enumerate(rescale)])
    assert stored.min() >= 0 and stored.max() < 2**16
    per_frame = [
        {"PixelValueTransformationSequence": Sequence([_item(
            RescaleSlope=m, RescaleIntercept=b, RescaleType="HU")]),
         "FrameContentSequence": Sequence([_item(InStackPositionNumber=i + 1)])}
        for i, (m, b) in enumerate(rescale)]
    shared = {"PixelMeasuresSequence": Sequence([_item(PixelSpacing=[0.7, 0.8],
                                                       SliceThickness=1.0)]),
              "FrameVOILUTSequence": Sequence([_item(WindowCenter=40, WindowWidth=400)])}
    ds = enhanced(ENHANCED_CT, "CT", stored.astype(np.uint16), shared, per_frame)
    views = load_study([to_bytes(ds)]).views
    assert len(views) == 3
    c, w = LUNG
    for i, v in enumerate(views):
        assert v.meta.frame_index == i and v.meta.units == "HU"
        np.testing.assert_array_equal(v.values, hu[i].astype(np.float32))
        assert_display(v.display, to_uint8(hu[i], c - w / 2, c + w / 2))
        assert v.meta.pixel_spacing == (0.7, 0.8)


def test_enhanced_mr_per_frame_windows():
    """Non-CT: each frame opens in its own stored window (FrameVOILUTSequence per frame),
    DICOM's LINEAR window function (PS3.3 C.11.2.1.2.1)."""
    stored = np.stack([np.tile(np.linspace(0, 2000, 40).round(), (8, 1))] * 3).astype(np.uint16)
    windows = [(500.0, 1000.0), (1000.0, 400.0), (1500.0, 2000.0)]
    per_frame = [{"FrameVOILUTSequence": Sequence([_item(WindowCenter=c, WindowWidth=w)])}
                 for c, w in windows]
    shared = {"PixelValueTransformationSequence": Sequence([_item(
        RescaleSlope=1, RescaleIntercept=0, RescaleType="US")])}
    ds = enhanced(ENHANCED_MR, "MR", stored, shared, per_frame, bits=12)
    views = load_study([to_bytes(ds)]).views
    assert [v.window for v in views] == windows
    for (c, w), v in zip(windows, views):
        x = stored[0].astype(np.float64)
        linear = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # LINEAR, output 0..1
        assert_display(v.display, np.floor(linear * 255 + 0.5))
    assert not np.array_equal(views[0].display, views[1].display)


# ---- compressed multi-frame -----------------------------------------------------------------

def test_rle_enhanced_ct_multiframe_made_here():
    """Four frames, RLE Lossless, rescale in the shared functional groups: each frame's HU
    come back in order."""
    hu = np.stack([np.full((24, 20), -1000 + 300 * i, np.int64) for i in range(4)])
    hu[:, 5:15, 4:12] += 400  # a block, so no frame is flat
    stored = (hu + 1024).astype(np.uint16)
    shared = {"PixelValueTransformationSequence": Sequence([_item(
        RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")])}
    ds = enhanced(ENHANCED_CT, "CT", stored, shared, [{} for _ in range(4)])
    ds.compress(RLELossless, stored, generate_instance_uid=False)
    data = to_bytes(ds)
    assert pydicom.dcmread(BytesIO(data)).file_meta.TransferSyntaxUID == RLELossless
    views = load_study([data]).views
    assert [v.meta.frame_index for v in views] == [0, 1, 2, 3]
    for i, v in enumerate(views):
        np.testing.assert_array_equal(v.values, hu[i].astype(np.float32))
        c, w = LUNG
        assert_display(v.display, to_uint8(hu[i], c - w / 2, c + w / 2))


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)  # shipped inside the pydicom wheel
    assert path, f"pydicom's bundled test file {name} is missing"
    return path


def test_bundled_rle_multiframe_matches_its_uncompressed_twin():
    """pydicom's RT Dose, 15 frames of 10x10, 32-bit: the RLE file's frames are the
    uncompressed file's stored values, frame by frame and in order."""
    ref = pydicom.dcmread(bundled("rtdose.dcm")).pixel_array  # (15, 10, 10)
    views = load_study([bundled("rtdose_rle.dcm")]).views
    assert len(views) == ref.shape[0] == 15
    assert len({v.values.tobytes() for v in views}) > 1  # frames are not all the same
    for i, v in enumerate(views):
        assert v.meta.frame_index == i
        np.testing.assert_array_equal(v.values, ref[i].astype(np.float32))
        assert v.display.shape == (10, 10) and v.display.dtype == np.uint8
