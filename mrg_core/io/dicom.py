"""DICOM -> Views with pydicom: modality LUT (HU for CT), VOI LUT / window, MONOCHROME1.

Order of work: read the header, check geometry against the limits, check the pixel data is
all there and decodable, then decode. Nothing outside deid.ALLOWED leaves this module.
Enhanced multi-frame objects keep rescale, window and pixel spacing in functional group
macros: each frame is read with its own (shared, then per-frame) values.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import pydicom
import pydicom.config
from pydicom import filereader
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID_dictionary
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

from ..study import CT_WINDOWS, View
from .deid import _get, group_key, safe_meta, series_facts
from .errors import StudyLoadError
from .frame_size import frame_size
from .limits import Budget, mib
from .pixels import finite_or_none, linear_window, minmax_window, rgb_to_grey

# pydicom's read-time validation warns *and logs* invalid values verbatim, which for a damaged
# PatientName would put patient data into the application log. We never trust header values
# anyway (everything used is re-checked or sanitised here), so validation on read is off.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
# Words in decoder / reader errors that mean "the data stops early" rather than "bad data".
_TRUNCATION_HINTS = ("truncat", "end of file", "eof", "insufficient", "not enough", "too short",
                     "missing", "less than the expected", "shorter")


def _fail(code: str, name: str, exc: BaseException | None = None) -> StudyLoadError:
    if exc is not None and code == "corrupt":
        text = str(exc).lower()
        if isinstance(exc, EOFError) or any(h in text for h in _TRUNCATION_HINTS):
            code = "truncated"
    return StudyLoadError(code, name=name)


_INFLATE_STEP = 8 * 2**20


def _inflated(data: bytes, name: str, max_bytes: int):
    """A Deflated Explicit VR Little Endian file (PS3.5 A.5), read with the dataset inflated
    at most to max_bytes: pydicom would inflate it whole before any limit applies (a 3 MB file
    became 3 GiB). None when the file is not deflated (or has no readable file meta)."""
    fp = BytesIO(data)
    try:
        preamble = filereader.read_preamble(fp, False)
        meta = filereader._read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not a file with a meta header: pydicom decides below
        return None
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return None
    # in 8 MB steps: one call with max_length grows (and copies) its output buffer, which
    # doubled the peak memory of a bomb
    inflate, parts, total = zlib.decompressobj(-zlib.MAX_WBITS), [], 0
    tail = memoryview(data)[fp.tell():]
    try:
        while tail and not inflate.eof:
            part = inflate.decompress(tail, _INFLATE_STEP)
            tail = inflate.unconsumed_tail
            total += len(part)
            if total > max_bytes:
                raise StudyLoadError("too_large", f"{name} is too large to read safely: its "
                                     f"compressed data may expand to at most {mib(max_bytes)}.",
                                     name=name)
            parts.append(part)
            if not part and not tail:
                break
    except zlib.error as exc:
        raise StudyLoadError("corrupt", name=name) from exc
    raw = b"".join(parts)
    del parts
    ds = filereader.read_dataset(DicomBytesIO(raw), is_implicit_VR=False, is_little_endian=True)
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # the dataset is inflated now
    return FileDataset(None, ds, preamble=preamble, file_meta=meta, is_implicit_VR=False,
                       is_little_endian=True)


def read_dataset(data: bytes, name: str, has_preamble: bool, max_inflated: int = 256 * 2**20):
    """Parse the header (pixels stay raw bytes). Random bytes -> not_an_image. A deflated
    dataset expands to at most max_inflated bytes."""
    try:
        ds = _inflated(data, name, max_inflated) or pydicom.dcmread(BytesIO(data), force=True)
    except StudyLoadError:
        raise
    except MemoryError as exc:
        raise StudyLoadError("too_large", name=name) from exc
    except Exception as exc:  # noqa: BLE001 - InvalidDicomError, struct.error, ValueError...
        if not has_preamble:
            raise StudyLoadError("not_an_image", name=name) from exc
        raise _fail("corrupt", name, exc) from exc
    if "PixelData" not in ds:
        # force=True turns any bytes into *some* dataset: only call it DICOM if it says so.
        looks_dicom = any(k in ds for k in ("SOPClassUID", "Modality", "Rows",
                                            "StudyInstanceUID", "SeriesInstanceUID"))
        code = "no_pixel_data" if looks_dicom else "corrupt" if has_preamble else "not_an_image"
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            code = "unsupported_format"
        raise StudyLoadError(code, name=name)
    return ds


def _geometry(ds, name: str) -> tuple[int, int, int, int]:
    """(rows, columns, frames, samples) after checking the header describes a usable image."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits_alloc, bits_stored = int(ds.BitsAllocated), int(ds.get("BitsStored") or 0)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except Exception as exc:  # noqa: BLE001 - missing or unparsable required attribute
        raise StudyLoadError("corrupt", name=name) from exc
    if frames < 0:
        raise StudyLoadError("corrupt", name=name)
    if spp == 1 and photometric in GREY:
        ok_bits = bits_alloc in (8, 16, 32)
    elif spp == 3 and photometric in COLOUR:
        ok_bits = bits_alloc in (8, 16)
    else:
        ok_bits = False
    if not ok_bits or not 1 <= bits_stored <= bits_alloc:
        raise StudyLoadError("unsupported_format", name=name)
    return rows, cols, frames, spp


def _check_pixel_data(ds, name: str, rows: int, cols: int, frames: int, spp: int) -> None:
    """Native data must be long enough; compressed data needs an installed decoder."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        compressed = tsyntax is not None and tsyntax.is_compressed
    except Exception as exc:  # noqa: BLE001 - not a transfer syntax UID at all
        raise StudyLoadError("corrupt", name=name) from exc
    if compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError as exc:
            raise StudyLoadError("unsupported_compression", name=name) from exc
        if not decoder.is_available:
            raise StudyLoadError("unsupported_compression", name=name)
        _check_frame_sizes(ds, name, rows, cols, frames)
        return
    try:
        n = len(ds.PixelData)
    except Exception as exc:  # noqa: BLE001
        raise _fail("corrupt", name, exc) from exc
    # YBR_FULL_422 stores each pair of pixels as Y Y Cb Cr: two samples a pixel, not three
    ybr422 = str(ds.PhotometricInterpretation).strip().upper() == "YBR_FULL_422"
    per_pixel = 2 if spp == 3 and ybr422 else spp
    expected = rows * cols * frames * per_pixel * int(ds.BitsAllocated) // 8
    if n < expected:
        raise StudyLoadError("truncated", name=name)


def _check_frame_sizes(ds, name: str, rows: int, cols: int, frames: int) -> None:
    """Each encapsulated frame's own size (its JPEG / JPEG 2000 header) must be the header's:
    a decoder allocates what the frame says, so a lie is refused before decoding."""
    try:
        chunks = generate_frames(ds.PixelData, number_of_frames=frames)
        for _ in range(frames):
            size = frame_size(next(chunks))
            if size is None or size == (rows, cols):
                continue
            if size[0] * size[1] > rows * cols:
                raise StudyLoadError("too_large", f"{name} is too large to display safely: an "
                                     "image inside it is bigger than its header says.", name=name)
            raise StudyLoadError("corrupt", name=name)
    except MemoryError as exc:
        raise StudyLoadError("too_large", name=name) from exc
    except StudyLoadError:
        raise
    except Exception:  # noqa: BLE001, S110 - a damaged fragment table: the decoder judges it
        pass


def _decode(ds, name: str, frames: int) -> np.ndarray:
    """All frames as (frames, rows, cols[, 3])."""
    try:
        arr = ds.pixel_array
    except MemoryError as exc:
        raise StudyLoadError("too_large", name=name) from exc
    except Exception as exc:  # noqa: BLE001 - plugin errors have no common base class
        err = _fail("corrupt", name, exc)
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        try:
            known = ts is not None and ts in UID_dictionary and ts.is_compressed
        except Exception:  # noqa: BLE001 - not a UID at all
            known = False
        if err.code == "corrupt" and known:
            # Every installed decoder refused complete data: name the compression (a name
            # from pydicom's registry of known transfer syntaxes, not a value from the file),
            # e.g. 12-bit "JPEG Extended (Process 2 and 4)" that libjpeg rejects.
            raise StudyLoadError(
                "unsupported_compression",
                f"{name} uses {ts.name} compression in a form the installed decoders "
                "(pylibjpeg, Pillow) cannot read, or its compressed data is damaged. Export it "
                "from the PACS as uncompressed DICOM, or as PNG.", name=name) from exc
        raise err from exc
    return arr[np.newaxis] if frames == 1 else arr


# Functional group macros (PS3.3 C.7.6.16) whose attributes the grey-scale code reads.
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence",
                 "PixelMeasuresSequence")
_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def _frame_datasets(ds, frames: int) -> list:
    """One dataset per frame. Enhanced multi-frame objects hold Rescale Slope/Intercept/Type,
    Window Center/Width and Pixel Spacing in the shared and per-frame functional groups (a
    per-frame value wins); they are lifted to the top level of a per-frame copy of the header
    (elements shared, pixel data left out). Other files, or damaged groups: `ds` itself."""
    shared, per_frame = (_get(ds, k) for k in _GROUPS)  # unreadable: None
    if not shared and not per_frame:
        return [ds] * frames
    try:
        top = Dataset()
        for elem in ds:
            if elem.keyword not in _GROUPS and elem.tag != 0x7FE00010:  # PixelData
                top.add(elem)
        out = []
        for i in range(frames):
            fd = Dataset()
            fd.update(top)
            if hasattr(ds, "file_meta"):  # the LUT Data byte order and transfer syntax
                fd.file_meta = ds.file_meta
            groups = [shared[0] if shared else None,
                      per_frame[i] if per_frame and i < len(per_frame) else None]
            for group in groups:
                for macro in _FRAME_MACROS:
                    seq = group.get(macro) if group is not None else None
                    if seq:
                        for elem in seq[0]:
                            fd[elem.tag] = elem
            out.append(fd)
        return out
    except Exception:  # noqa: BLE001 - damaged functional groups: read the frames as before
        return [ds] * frames


def _lut_table(item, ds) -> tuple[np.ndarray, int, int] | None:
    """(table, first value mapped, output bits) of a LUT Sequence item (PS3.3 C.11.2.1.1)."""
    n, first, bits = (int(x) for x in item.LUTDescriptor)
    n = n or 65536
    data = item["LUTData"].value
    if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words in the file's byte order
        tsyntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
        big = tsyntax is not None and tsyntax == pydicom.uid.ExplicitVRBigEndian
        table = np.frombuffer(bytes(data), dtype=">u2" if big else "<u2")
    else:
        table = np.asarray(list(data) if isinstance(data, (list, pydicom.multival.MultiValue))
                           else [data], dtype=np.int64)
    table = table[:n].astype(np.float64)
    if table.size == 0 or not 8 <= bits <= 16:
        return None
    return table, first, bits


def _voi_lut_display(values: np.ndarray, ds) -> np.ndarray | None:
    """uint8 display through the first VOI LUT: inputs below the first mapped value take the
    first entry, past the end the last; the output 0 .. 2**bits - 1 is scaled to 0..255.
    (pydicom's apply_voi_lut indexes an 8-bit LUT with 8-bit integers, which wraps.)"""
    try:
        lut = _lut_table(ds.VOILUTSequence[0], ds)
    except Exception:  # noqa: BLE001 - damaged LUT: the caller falls back
        return None
    if lut is None:
        return None
    table, first, bits = lut
    idx = np.clip(np.rint(values.astype(np.float64)) - first, 0, table.size - 1).astype(np.int64)
    out = table[idx] / float(2**bits - 1)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def _window_output_range(ds) -> tuple[float, float]:
    """The output range of pydicom's windowing (PS3.3 C.11.2.1.2), to scale it to 0..255."""
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = (0, 2**bits - 1) if int(ds.PixelRepresentation) == 0 else \
        (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + icpt, hi * slope + icpt))
    return float(lo), float(hi)


def _first(value) -> float:
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)


def _grey_view(ds, frame: np.ndarray, index: int) -> View:
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    modality = str(_get(ds, "Modality") or "").upper()  # damaged optional values: None
    try:
        values = finite_or_none(np.asarray(apply_modality_lut(frame, ds), dtype=np.float32))
    except Exception:  # noqa: BLE001 - a damaged rescale/LUT: fall back to stored values
        values = None
    if values is None:
        values = frame.astype(np.float32)
    is_ct = modality == "CT" and str(_get(ds, "RescaleType") or "HU").upper() == "HU"
    units = "HU" if is_ct else "raw"

    window, display = None, None
    if is_ct:
        # The model and the lung-first reading workflow expect the lung window, whatever
        # window the scanner stored; View.windowed() re-windows on demand.
        window = CT_WINDOWS["lung"]
        display = linear_window(values, *window)
    else:
        # A VOI LUT, when there is one, is preferred to a window stored beside it (as pydicom
        # does); `window` stays None then: no (centre, width) made the display.
        display = _voi_lut_display(values, ds) if _get(ds, "VOILUTSequence") else None
        if display is None and "WindowCenter" in ds:
            try:
                out = np.asarray(apply_voi_lut(values.astype(np.float64), ds, index=0,
                                               prefer_lut=False))
                lo, hi = _window_output_range(ds)
                scaled = (out - lo) / max(hi - lo, 1e-6)
                if np.isfinite(scaled).all():
                    display = (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)
                    window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
            except Exception:  # noqa: BLE001 - bad window: use the min/max window below
                display, window = None, None
    if display is None:
        window = minmax_window(values)
        display = linear_window(values, *window)
    if photometric == "MONOCHROME1":  # high values are dark: invert after the VOI step
        display = 255 - display
    meta = safe_meta(ds, frame.shape[0], frame.shape[1], index, units)
    return View(values=values, display=display, meta=meta, window=window)


def _colour_view(ds, frame: np.ndarray, index: int) -> View:
    """pydicom returns RGB (YBR converted); keep luma only: the model reads grey."""
    grey = rgb_to_grey(frame)
    if frame.dtype.itemsize == 1:
        window = None
        display = (grey + 0.5).astype(np.uint8)
    else:
        window = minmax_window(grey)
        display = linear_window(grey, *window)
    meta = safe_meta(ds, frame.shape[0], frame.shape[1], index, "raw")
    return View(values=grey, display=display, meta=meta, window=window)


@dataclass(frozen=True)
class SeriesKey:
    """What load_study groups files by; lives only for one load call (salted hashes)."""

    patient: str | None
    study: str | None
    series: str | None
    series_number: int | None
    kernel: str | None


def decode_dicom(data: bytes, name: str, budget: Budget, has_preamble: bool = True) -> list[View]:
    return decode_dicom_keyed(data, name, budget, has_preamble, b"")[0]


def decode_dicom_keyed(data: bytes, name: str, budget: Budget, has_preamble: bool,
                       salt: bytes) -> tuple[list[View], SeriesKey]:
    with warnings.catch_warnings():  # pydicom warnings may quote header values: keep them in
        warnings.simplefilter("ignore")
        return _decode_dicom(data, name, budget, has_preamble, salt)


def _decode_dicom(data: bytes, name: str, budget: Budget, has_preamble: bool,
                  salt: bytes) -> tuple[list[View], SeriesKey]:
    ds = read_dataset(data, name, has_preamble, budget.limits.max_file_bytes)
    key = SeriesKey(*group_key(ds, salt), *series_facts(ds))
    rows, cols, frames, spp = _geometry(ds, name)
    budget.reserve(rows, cols, frames, name)
    _check_pixel_data(ds, name, rows, cols, frames, spp)
    arr = _decode(ds, name, frames)
    if arr.shape[0] != frames or arr.shape[1:3] != (rows, cols):
        raise StudyLoadError("corrupt", name=name)
    make = _colour_view if spp == 3 else _grey_view
    per_frame = _frame_datasets(ds, frames)
    try:
        return [make(per_frame[i], arr[i], i) for i in range(frames)], key
    except MemoryError as exc:
        raise StudyLoadError("too_large", name=name) from exc
