"""load_study / load_view: sources (paths, bytes, (filename, bytes)) -> Study.

File names are only *shown* (display names); they never take part in building a path.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Union

from ..study import Study, View
from .dicom import decode_dicom
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


def _decode(name: str, data: bytes, budget: Budget) -> list[View]:
    if not data:
        raise StudyLoadError("empty_image", f"{name} is an empty file.", name=name)
    kind = sniff(data)
    if kind in ("dicom", "bare_dicom"):
        return decode_dicom(data, name, budget, has_preamble=kind == "dicom")
    if kind in ("png", "jpeg"):
        return decode_image(data, name, budget)
    raise StudyLoadError("not_an_image", name=name)


def load_view(source: Source, limits: LoadLimits = LoadLimits(), *,
              budget: Budget | None = None, index: int = 0) -> list[View]:
    """All views of one file (one per frame for a multi-frame DICOM)."""
    name, data = read_source(source, limits, index)
    return _decode(name, data, budget or Budget(limits))


def _as_list(sources) -> list:
    if isinstance(sources, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [sources]
    if isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[0], str) \
            and isinstance(sources[1], (bytes, bytearray, memoryview)):
        return [sources]
    return list(sources)


def load_study(sources: Source | Iterable[Source], limits: LoadLimits = LoadLimits()) -> Study:
    """One Study from one or several files, in the order given. Raises StudyLoadError."""
    items = _as_list(sources)
    if not items:
        raise StudyLoadError("no_files")
    if len(items) > limits.max_files:
        raise StudyLoadError("too_many_files",
                             f"{len(items)} files were given; at most {limits.max_files} can "
                             "form one study.")
    budget = Budget(limits)
    views: list[View] = []
    for i, source in enumerate(items):
        views.extend(load_view(source, limits, budget=budget, index=i))
    return Study(views=tuple(views))
