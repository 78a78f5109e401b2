"""Test-file factories: real DICOM / PNG / JPEG files written with pydicom and Pillow.

Other test modules (storage, app) import write_phi_dicom to prove no patient data leaks.
"""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from bench.common import free_port  # noqa: F401 - one helper for benches and tests
from mrg_core.io.deid import BASIC_PROFILE
from mrg_core.samples import CR_IMAGE_STORAGE, CT_IMAGE_STORAGE, new_dataset

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def ct_hu_pattern(rows: int = 64, cols: int = 64) -> np.ndarray:
    """Known HU values: air top-left, lung, water, soft tissue, bone in bands."""
    hu = np.full((rows, cols), -1000, np.int16)
    bands = [-1000, -850, 0, 40, 700, 1500]
    for i, v in enumerate(bands):
        hu[:, i * cols // len(bands):(i + 1) * cols // len(bands)] = v
    return hu


def write_ct_signed(path, hu: np.ndarray | None = None, slope: float = 2.0,
                    intercept: float = -1024.0) -> np.ndarray:
    """16-bit *signed* CT with a rescale: stored = (HU - intercept) / slope. Returns the HU."""
    hu = ct_hu_pattern() if hu is None else hu
    ds = new_dataset(CT_IMAGE_STORAGE, "CT", f"ct-signed-{path}")
    stored = np.round((hu.astype(np.float64) - intercept) / slope).astype(np.int16)
    ds.set_pixel_data(stored, "MONOCHROME2", 16)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400  # ignored: CT opens in the lung window
    ds.PixelSpacing = [0.5, 0.6]
    ds.save_as(path, enforce_file_format=True)
    return hu


def write_mono1(path, rows: int = 32, cols: int = 48, window: bool = True) -> np.ndarray:
    """12-bit MONOCHROME1 CR: a horizontal ramp 0..4095 (left = low = bright)."""
    ds = new_dataset(CR_IMAGE_STORAGE, "CR", f"mono1-{path}")
    arr = np.tile(np.linspace(0, 4095, cols).round().astype(np.uint16), (rows, 1))
    ds.set_pixel_data(arr, "MONOCHROME1", 12)
    if window:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.ViewPosition = "PA"
    ds.save_as(path, enforce_file_format=True)
    return arr


def write_mono2(path, arr: np.ndarray, bits: int, modality: str = "DX", **attrs) -> None:
    ds = new_dataset(CR_IMAGE_STORAGE, modality, f"mono2-{path}")
    ds.set_pixel_data(arr, "MONOCHROME2", bits)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


def write_multiframe(path, frames: int = 5, rows: int = 16, cols: int = 20) -> np.ndarray:
    """Multi-frame 8-bit MONOCHROME2; frame i is filled with 10 * (i + 1) plus a gradient."""
    ds = new_dataset(SC_IMAGE_STORAGE, "OT", f"mf-{path}")
    arr = np.stack([np.full((rows, cols), 10 * (i + 1), np.uint8) for i in range(frames)])
    arr[:, 0, 0] = 0
    ds.set_pixel_data(arr, "MONOCHROME2", 8)
    ds.save_as(path, enforce_file_format=True)
    return arr


def write_rle_pair(uncompressed_path, rle_path, rows: int = 40, cols: int = 30) -> None:
    """The same 16-bit image twice: uncompressed and RLE Lossless."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 4096, (rows, cols)).astype(np.uint16)
    ds = new_dataset(CR_IMAGE_STORAGE, "CR", "rle")
    ds.set_pixel_data(arr, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.save_as(uncompressed_path, enforce_file_format=True)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(rle_path, enforce_file_format=True)


def write_rgb(path, rows: int = 12, cols: int = 10) -> np.ndarray:
    ds = new_dataset(SC_IMAGE_STORAGE, "OT", "rgb")
    arr = np.zeros((rows, cols, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 200, 100, 50
    ds.set_pixel_data(arr, "RGB", 8)
    ds.save_as(path, enforce_file_format=True)
    return arr


def _lut_item(first: int, bits: int, table: np.ndarray) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(table) % 65536, first, bits])  # LUT Descriptor
    item.add_new(0x00283006, "OW", np.asarray(table, "<u2").tobytes())  # LUT Data
    return item


def write_lut_cr(path, rows: int = 32, cols: int = 32) -> np.ndarray:
    """12-bit CR with a Modality LUT Sequence (reverses the range) and a VOI LUT Sequence
    (a gamma curve, 8-bit output) and a window beside it. Returns the stored values."""
    from pydicom.sequence import Sequence

    ds = new_dataset(CR_IMAGE_STORAGE, "CR", f"lut-{path}")
    arr = np.linspace(0, 4095, rows * cols).round().astype(np.uint16).reshape(rows, cols)
    ds.set_pixel_data(arr, "MONOCHROME2", 12)
    ds.ModalityLUTSequence = Sequence([_lut_item(0, 16, 4095 - np.arange(4096))])
    ds.VOILUTSequence = Sequence([_lut_item(
        100, 8, np.round(255 * (np.arange(3000) / 2999) ** 0.5))])
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.save_as(path, enforce_file_format=True)
    return arr


def write_enhanced_ct(path, frames: int = 3, rows: int = 16, cols: int = 16) -> np.ndarray:
    """Enhanced CT multi-frame whose rescale is only in the per-frame functional groups
    (frame i: slope i + 1, intercept -1024 * (i + 1)) and pixel spacing in the shared ones.
    Returns the HU of each frame."""
    from pydicom.sequence import Sequence

    def item(**attrs):
        it = Dataset()
        for k, v in attrs.items():
            setattr(it, k, v)
        return it

    stored = np.tile(np.linspace(0, 2000, cols).round().astype(np.int64), (frames, rows, 1))
    hu = np.stack([stored[i] * (i + 1) - 1024 * (i + 1) for i in range(frames)])
    ds = new_dataset(ENHANCED_CT_IMAGE_STORAGE, "CT", f"enhanced-{path}")
    ds.set_pixel_data(stored.astype(np.uint16), "MONOCHROME2", 16)
    ds.SharedFunctionalGroupsSequence = Sequence([item(
        PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.7, 0.8])]))])
    ds.PerFrameFunctionalGroupsSequence = Sequence([item(
        PixelValueTransformationSequence=Sequence([item(
            RescaleSlope=i + 1, RescaleIntercept=-1024 * (i + 1), RescaleType="HU")]))
        for i in range(frames)])
    ds.save_as(path, enforce_file_format=True)
    return hu


def write_no_pixels(path) -> None:
    ds = new_dataset("1.2.840.10008.5.1.4.1.1.88.11", "SR", "sr")  # a basic text SR
    ds.save_as(path, enforce_file_format=True)


def write_truncated(path) -> None:
    """A valid file cut in the middle of its pixel data."""
    buf = BytesIO()
    write_mono1(buf)
    data = buf.getvalue()
    Path(path).write_bytes(data[: len(data) - 1000])


def write_corrupt(path) -> None:
    """DICM preamble followed by garbage."""
    rng = np.random.default_rng(3)
    Path(path).write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(3000))


def write_huge_header(path, rows: int = 60000, cols: int = 60000, frames: int = 1) -> None:
    """Header claims rows x cols x frames but holds only a few bytes of pixels."""
    buf = BytesIO()
    write_mono1(buf, rows=4, cols=4)
    import pydicom

    ds = pydicom.dcmread(BytesIO(buf.getvalue()))
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.save_as(path)


def save_image(path, arr: np.ndarray, mode: str | None = None, fmt: str = "PNG", **kw) -> None:
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path, format=fmt, **kw)


# ---- patient data markers ------------------------------------------------------------------

# Values that are not text in the file (binary numbers) or too short to search in binary data
# (an age): phi_readings gives the ways they read once printed. Distinct, and five digits or
# more, so that they cannot turn up by chance in a page, a log or a database row.
PHI_AGE = "077Y"
PHI_NUMBERS: dict[str, int | float] = {
    "US": 47093, "SS": -27183, "UL": 3141592653, "SL": -1718281828, "SV": -9007199254740993,
    "UV": 18446744073709551557, "FL": 31337.25, "FD": -27182.8182,
}
PHI_VR_CREATOR = "PHI MARKER EVERY VR"


def _every_vr_values() -> list[tuple[str, object]]:
    """(VR, value) for a private element of each value representation."""
    return [
        ("AS", PHI_AGE), ("DA", "18930707"), ("TM", "071733.424242"),
        ("DT", "18930707071733.424242"), ("PN", "PHI-MARKER-PrivFamily^PHIMARKGVprv"),
        ("IS", "-1893070"), ("DS", "-1893.0707"), ("UC", "PHI-MARKER-private-UC"),
        ("UR", "http://phi-marker.invalid/PHI-MARKER-private-UR"),
        ("UT", "PHI-MARKER-private-UT"), ("LT", "PHI-MARKER-private-LT"),
        ("ST", "PHI-MARKER-private-ST"),
        *((vr, PHI_NUMBERS[vr]) for vr in ("US", "SS", "UL", "SL", "SV", "UV", "FL", "FD")),
        ("US", [PHI_NUMBERS["US"], 47094]), ("FD", [PHI_NUMBERS["FD"], 27182.8183]),
    ]


def phi_readings(path) -> list[str]:
    """How the markers of a write_phi_dicom file read once parsed and printed, beyond the
    strings write_phi_dicom returns: the age, the binary numbers (US, SS, UL, SL, SV, UV, FL,
    FD: decimal text, a float's whole part), IS/DS numbers, dates and times in ISO form
    (1893-07-07, 07:17:33) and names as 'Given Family'. Search them in text (pages, logs,
    database rows, JSON) with phi_found: they are not in the file as these bytes."""
    import datetime

    import pydicom
    from pydicom.valuerep import DA, DT, TM

    ds = pydicom.dcmread(BytesIO(Path(path).read_bytes()))  # pydicom logs a path it opens
    readings: set[str] = set()

    def read(elem):
        for v in (list(elem.value) if elem.VM > 1 else [elem.value]):
            if v is None or v == "":
                continue
            if elem.VR == "AS":
                readings.update({str(v), f"{int(str(v)[:3])} years"})
            elif elem.VR in ("US", "SS", "UL", "SL", "SV", "UV", "IS"):
                readings.add(str(int(v)))
            elif elem.VR in ("FL", "FD", "DS"):
                readings.update({repr(float(v)), str(abs(int(float(v))))})
            elif elem.VR == "DA":
                readings.add(DA(str(v)).isoformat())
            elif elem.VR == "TM":
                t = TM(str(v))  # with its fraction: a bare HH:MM:SS could be a timestamp
                if t.microsecond:
                    readings.add(t.isoformat())
            elif elem.VR == "DT":
                t = DT(str(v))
                readings.update({t.isoformat(), t.isoformat(sep=" "),
                                 datetime.datetime.strftime(t, "%Y-%m-%d %H:%M:%S")})
            elif elem.VR == "PN" and str(v):
                name = pydicom.valuerep.PersonName(str(v))
                if name.given_name and name.family_name:
                    readings.add(f"{name.given_name} {name.family_name}")

    def walk(d):
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword in BASIC_PROFILE or (elem.tag.is_private and
                                                   elem.tag.element >= 0x1000):
                read(elem)

    walk(ds)
    # short whole numbers could be anything (a byte count in a log): five digits or more
    return sorted(r for r in readings if len(r.strip("-")) >= (5 if r.strip("-").isdigit()
                                                               else 4))


def phi_found(readings, text: str) -> list[str]:
    """The readings that occur in `text` as a whole (not inside a longer run of digits)."""
    import re

    return [r for r in readings
            if re.search(rf"(?<![0-9]){re.escape(r)}(?![0-9])", text)]


def _marker_value(keyword: str, vr: str, n: int):
    """(value, marker string or None). Text VRs carry 'PHI-MARKER-<keyword>'; dates, times and
    UIDs carry distinctive values that are markers too."""
    text = f"PHI-MARKER-{keyword}"
    if vr in ("LO", "LT", "ST", "UT", "UC", "SH"):
        text = text[:16] if vr == "SH" else text[:64] if vr == "LO" else text
        return text, text
    if vr == "PN":  # family^given^middle^prefix^suffix: each name part is a marker
        family, given, middle = text[:35], f"PHIMARKGV{n:03d}", f"PHIMARKMD{n:03d}"
        return f"{family}^{given}^{middle}^DR^III", [family, given, middle]
    if vr == "CS":
        return "PHIMARK" + str(n).zfill(3), "PHIMARK" + str(n).zfill(3)
    if vr == "AE":
        return f"PHIAE{n:03d}", f"PHIAE{n:03d}"
    if vr == "UI":
        uid = f"1.2.826.0.1.3680043.9.7777.{n}.31337"
        return uid, uid
    if vr == "DA":
        d = f"1893{(n % 12) + 1:02d}{(n % 27) + 1:02d}"
        return d, d
    if vr == "TM":
        t = f"{n % 24:02d}1717.{n:06d}"
        return t, t
    if vr == "DT":
        t = f"18930303{n % 24:02d}1717.{n:06d}"
        return t, t
    if vr == "AS":  # 4 characters: too short to search in binary data, see phi_readings
        return PHI_AGE, None
    if vr == "DS":
        return f"{n}.31337", f"{n}.31337"
    if vr in PHI_NUMBERS:  # stored in binary: see phi_readings
        return PHI_NUMBERS[vr], None
    if vr in ("OB", "OW", "UN"):
        return text.encode().ljust(len(text) + len(text) % 2, b" "), text
    if vr == "SQ":
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = f"PHI{n}", "99PHI"
        item.CodeMeaning = text
        return [item], text
    return None, None


def write_phi_dicom(path) -> list[str]:
    """A valid, loadable CT image whose every settable PS3.15 basic-profile attribute holds a
    distinctive marker. Returns the marker strings (none may ever leave the loader)."""
    ds = new_dataset(CT_IMAGE_STORAGE, "CT", "phi")
    ds.set_pixel_data(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096,
                      "MONOCHROME2", 12, generate_instance_uid=False)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    markers = []
    skip = {"DataSetTrailingPadding", "MediaStorageSOPInstanceUID"}  # not ordinary elements
    for n, keyword in enumerate(BASIC_PROFILE):
        tag = tag_for_keyword(keyword)
        if keyword in skip or tag >> 16 in (0x0000, 0x0002):  # command / file-meta groups
            continue
        vr = dictionary_VR(tag_for_keyword(keyword)).split(" or ")[0]
        value, marker = _marker_value(keyword, vr, n)
        if value is None:
            continue
        setattr(ds, keyword, value)
        if marker:
            markers += marker if isinstance(marker, list) else [marker]
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # a private block too: the allow-list must ignore it
    block = ds.private_block(0x0011, "PHI MARKER CREATOR", create=True)
    block.add_new(0x01, "LO", "PHI-MARKER-private")
    markers.append("PHI-MARKER-private")
    # and one element of every other value representation, numbers and dates included
    every = ds.private_block(0x0013, PHI_VR_CREATOR, create=True)
    for i, (vr, value) in enumerate(_every_vr_values()):
        every.add_new(0x10 + i, vr, value)
        if vr in ("UC", "UR", "UT", "LT", "ST", "PN"):
            markers += value.split("^")
    ds.save_as(path, enforce_file_format=True)
    return sorted(set(markers))


def save_tiny_versions(root, versions=(("1.0.0", 0), ("2.0.0", 1))):
    """Tiny models saved as version folders root/tiny-<version> (the Model panel lists them)."""
    from mrg_core.models import tiny_model

    for version, seed in versions:
        m = tiny_model(method="prompt", family="gpt2", seed=seed)
        m.config.version = version
        m.save_pretrained(root / f"tiny-{version}")
    return root


def lung_phantom(size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CT-like slice: tissue ellipse on black air, two dark lungs with bright vessel dots, a
    bright spine; returns (uint8 image, true lung mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)

    def ellipse(cx, cy, ax, ay):
        return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1

    img = np.zeros((size, size))
    img[ellipse(128, 128, 115, 90)] = 170
    lungs = ellipse(78, 120, 40, 62) | ellipse(178, 120, 40, 62)
    img[lungs] = 40
    img[ellipse(128, 190, 14, 14)] = 250  # spine
    for y, x in np.argwhere(lungs)[rng.choice(int(lungs.sum()), 25, replace=False)]:
        img[ellipse(x, y, 2, 2) & lungs] = 200  # vessels
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lungs


def launch_local(demo, **kwargs) -> None:
    """demo.queue().launch on a free port of 127.0.0.1 without blocking (demo.local_url says
    where). Gradio gives up when its own check of the local URL (one HEAD request, 3 s timeout)
    is slow on a loaded machine: the half-started server is closed (so it does not hold this
    process's file folders) and started once more, on another port."""
    for attempt in (1, 2):
        try:
            demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                server_port=free_port(), **kwargs)
            return
        except ValueError as exc:
            demo.close()
            if attempt == 2 or "localhost is not accessible" not in str(exc):
                raise
