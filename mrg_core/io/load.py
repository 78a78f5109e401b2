"""load_study / load_view: sources (paths, bytes, (filename, bytes)) -> Study.

File names are only *shown* (display names); they never take part in building a path.
"""
from __future__ import annotations

import os
import re
import secrets
import statistics
import zipfile
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Iterable, Union

from ..study import SeriesInfo, Study, View
from .dicom import SeriesKey, decode_dicom_keyed
from .errors import StudyLoadError
from .images import decode_image
from .limits import Budget, LoadLimits, mib

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, tuple]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# A DICOM file without its 128-byte preamble starts with a group 0002 or 0008 tag (little
# endian). Only such files are offered to pydicom: force=True would accept any bytes.
_BARE_DICOM_STARTS = (b"\x02\x00", b"\x08\x00")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f]")


def display_name(filename: str | None, index: int = 0) -> str:
    """What we show for a file: its last path component, printable, short."""
    text = str(filename or "")
    text = _UNSAFE_NAME.sub("", re.split(r"[\\/]", text)[-1]).strip()
    return text[:120] or f"file {index + 1}"


def sniff(data: bytes) -> str | None:
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[:2] in _BARE_DICOM_STARTS:
        return "bare_dicom"
    return None


def read_source(source: Source, limits: LoadLimits, index: int = 0) -> tuple[str, bytes]:
    """(display name, bytes), refusing files over max_file_bytes before reading them."""
    if isinstance(source, tuple):
        if len(source) != 2 or not isinstance(source[1], (bytes, bytearray, memoryview)):
            raise TypeError("a tuple source must be (filename, bytes)")
        name, data = display_name(source[0], index), bytes(source[1])
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, data = display_name(None, index), bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = display_name(path.name, index)
        try:
            size = path.stat().st_size
            if size > limits.max_file_bytes:
                raise _too_big(name, size, limits)
            if not path.is_file():
                raise StudyLoadError("not_an_image", f"{name} is a folder, not an image file.",
                                     name=name)
            with path.open("rb") as fh:
                # read(n) pre-allocates n bytes: ask for what stat saw (+1 to notice growth)
                data = fh.read(size + 1)
        except OSError as exc:
            raise StudyLoadError("not_found", name=name) from exc
    else:
        raise TypeError(f"unsupported source type {type(source).__name__}")
    if len(data) > limits.max_file_bytes:
        raise _too_big(name, len(data), limits)
    return name, data


def _too_big(name: str, size: int, limits: LoadLimits) -> StudyLoadError:
    return StudyLoadError("file_too_big", f"{name} is larger than this viewer accepts "
                          f"({mib(size)}; the limit is {mib(limits.max_file_bytes)} a file).",
                          name=name)


def _decode(name: str, data: bytes, budget: Budget, salt: bytes = b""):
    """(views, SeriesKey or None for a plain image) of one file's bytes."""
    if not data:
        raise StudyLoadError("empty_image", f"{name} is an empty file.", name=name)
    kind = sniff(data)
    if kind in ("dicom", "bare_dicom"):
        return decode_dicom_keyed(data, name, budget, kind == "dicom", salt)
    if kind in ("png", "jpeg"):
        return decode_image(data, name, budget), None
    raise StudyLoadError("not_an_image", name=name)


def load_view(source: Source, limits: LoadLimits = LoadLimits(), *,
              budget: Budget | None = None, index: int = 0) -> list[View]:
    """All views of one file (one per frame for a multi-frame DICOM)."""
    name, data = read_source(source, limits, index)
    return _decode(name, data, budget or Budget(limits))[0]


def _as_list(sources) -> list:
    if isinstance(sources, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [sources]
    if isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[0], str) \
            and isinstance(sources[1], (bytes, bytearray, memoryview)):
        return [sources]
    return list(sources)


def load_study(sources: Source | Iterable[Source], limits: LoadLimits = LoadLimits()) -> Study:
    """One Study from one or several files (a folder or a zip counts as its files). Slices of
    a DICOM series are ordered along the slice normal; files of several series are refused
    here (load_studies returns each). Raises StudyLoadError."""
    studies = load_studies(sources, limits)
    if len(studies) > 1:
        names = "; ".join(s.series.describe() for s in studies if s.series)
        raise StudyLoadError("several_series", f"These files hold {len(studies)} series "
                             f"({names}); choose one.")
    return studies[0]


def load_studies(sources: Source | Iterable[Source],
                 limits: LoadLimits = LoadLimits()) -> list[Study]:
    """Files (or folders, or zips of them) → one Study per DICOM series, in SeriesNumber
    order; plain images (PNG/JPEG) form one study in the order given. An upload that mixes
    patients or kinds of image (CT with CR, a DICOM with a PNG) is refused."""
    items = expand_sources(_as_list(sources), limits)
    if not items:
        raise StudyLoadError("no_files")
    budget = Budget(limits)
    salt = secrets.token_bytes(16)  # keys of this call match nothing outside it
    decoded: list[tuple[list[View], SeriesKey | None]] = []
    for i, source in enumerate(items):
        name, data = read_source(source, limits, i)
        budget.read(len(data), name)
        decoded.append(_decode(name, data, budget, salt))
        del data
    _refuse_mixtures(decoded)
    groups: dict = {}
    for views, key in decoded:
        groups.setdefault(_group(views, key), []).append((views, key))
    studies = [_one_study(members) for members in groups.values()]
    if len(studies) > 1:  # several DICOM series: by SeriesNumber, then as given
        number = [s.series.series_number if s.series else None for s in studies]
        order = sorted(range(len(studies)), key=lambda i: (number[i] is None, number[i] or 0, i))
        studies = [studies[i] for i in order]
    return [s if s.series is None else
            replace(s, series=replace(s.series, index=i + 1)) for i, s in enumerate(studies)]


# Cross-sectional modalities come as series of slices; a projection study (PA + lateral
# radiographs) is one study of views even when each view is its own series.
CROSS_SECTIONAL = {"CT", "MR", "PT", "NM"}


def _group(views: list[View], key: SeriesKey | None):
    if key is None:
        return None  # plain images: one study in the order given
    if views[0].meta.modality in CROSS_SECTIONAL:
        return key.study, key.series
    return key.study, "views"


def _kind(views: list[View]) -> str:
    m = views[0].meta
    return f"{m.modality or 'unknown modality'} DICOM" if m.source_format == "dicom" \
        else "plain PNG/JPEG image"


def _refuse_mixtures(decoded) -> None:
    patients = {key.patient for _, key in decoded if key is not None and key.patient}
    if len(patients) > 1:
        raise StudyLoadError("mixed_patients", f"These files belong to {len(patients)} "
                             "different patients; load one patient's study at a time.")
    kinds = list(dict.fromkeys(_kind(views) for views, _ in decoded))
    if len(kinds) > 1:
        raise StudyLoadError("mixed_modalities", "These files are different kinds of image ("
                             + " and ".join(kinds) + "); load one kind at a time.")


def _one_study(members) -> Study:
    views = [v for vs, _ in members for v in vs]
    key = members[0][1]
    if key is None or views[0].meta.modality not in CROSS_SECTIONAL:
        return Study(views=tuple(views))  # plain images or projection views: as given
    positions = [v.meta.slice_position for v in views]
    numbers = [v.meta.instance_number for v in views]
    if len(views) < 2:
        order, ordered_by = [0], "given"
    elif None not in positions and len(set(positions)) == len(positions):
        # head first for axial slices (the normal of a standard orientation points up)
        order, ordered_by = sorted(range(len(views)), key=lambda i: -positions[i]), "position"
    elif None not in numbers and len(set(numbers)) == len(numbers):
        order, ordered_by = sorted(range(len(views)), key=lambda i: numbers[i]), \
            "instance_number"
    else:
        order, ordered_by = list(range(len(views))), "given"
    views = [views[i] for i in order]
    spacing, gaps = None, ()
    if ordered_by == "position":
        steps = [abs(a.meta.slice_position - b.meta.slice_position)
                 for a, b in zip(views, views[1:])]
        spacing = round(statistics.median(steps), 3)
        gaps = tuple(i for i, d in enumerate(steps) if d > 1.5 * spacing)
    thick = [v.meta.slice_thickness for v in views if v.meta.slice_thickness]
    info = SeriesInfo(index=1, n_slices=len(views), modality=views[0].meta.modality,
                      series_number=key.series_number, kernel=key.kernel,
                      slice_thickness_mm=round(statistics.median(thick), 3) if thick else None,
                      spacing_mm=spacing, ordered_by=ordered_by, gaps_after=gaps)
    return Study(views=tuple(views), series=info)


# ----------------------------------------------------------------------------- folders, zips

ZIP_MAGIC = b"PK\x03\x04"
_SKIP_NAMES = {"dicomdir", "license.txt", "readme.txt", "thumbs.db"}


def _skipped(name: str) -> bool:
    base = re.split(r"[\\/]", name)[-1]
    return not base or base.startswith(".") or base.lower() in _SKIP_NAMES \
        or "__MACOSX" in name


def expand_sources(items: list, limits: LoadLimits) -> list:
    """Folders become their files (recursively, sorted), zips their members as (name, bytes);
    everything else stays. The file count limit applies to the expanded list."""
    out: list = []

    def add(x):
        out.append(x)
        if len(out) > limits.max_files:
            raise StudyLoadError("too_many_files", f"More than {limits.max_files} files were "
                                 "given at once for one study.")

    for item in items:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            for p in sorted(Path(item).rglob("*")):
                if p.is_file() and not _skipped(str(p.relative_to(item))):
                    add(p)
        elif _is_zip(item):
            for member in _zip_members(item, limits):
                add(member)
        else:
            add(item)
    return out


def _is_zip(item) -> bool:
    if isinstance(item, (str, os.PathLike)):
        return str(item).lower().endswith(".zip") and Path(item).is_file()
    if isinstance(item, tuple) and len(item) == 2:
        return bytes(item[1][:4]) == ZIP_MAGIC
    return isinstance(item, (bytes, bytearray, memoryview)) and bytes(item[:4]) == ZIP_MAGIC


def _zip_members(item, limits: LoadLimits) -> list[tuple[str, bytes]]:
    """(name, bytes) of a zip's files, each read at most to the file limit and all together at
    most to the upload limit, whatever the zip's directory claims (zip bombs)."""
    name = display_name(item[0] if isinstance(item, tuple) else
                        Path(item).name if isinstance(item, (str, os.PathLike)) else None)
    src = item[1] if isinstance(item, tuple) else item
    try:
        zf = zipfile.ZipFile(BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray,
                                                                     memoryview)) else src)
    except (zipfile.BadZipFile, OSError) as exc:
        raise StudyLoadError("corrupt", name=name) from exc
    out, total = [], 0
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and not _skipped(i.filename)]
        if len(infos) > limits.max_files:
            raise StudyLoadError("too_many_files", f"{name} holds more than {limits.max_files} "
                                 "files; at most that many can form one study.", name=name)
        for info in infos:
            member = display_name(info.filename)
            try:
                with zf.open(info) as fh:
                    data = fh.read(limits.max_file_bytes + 1)
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError,
                    NotImplementedError) as exc:  # damaged, encrypted or unknown method
                raise StudyLoadError("corrupt", f"{name} is damaged or encrypted and cannot "
                                     "be read.", name=name) from exc
            if len(data) > limits.max_file_bytes:
                raise _too_big(member, len(data), limits)
            total += len(data)
            if total > limits.max_total_bytes:
                raise StudyLoadError("too_large", f"{name} expands to more than "
                                     f"{mib(limits.max_total_bytes)}.", name=name)
            out.append((member, data))
    return out
