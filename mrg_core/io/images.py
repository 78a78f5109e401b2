"""PNG / JPEG -> one grey View with Pillow.

Colour becomes BT.601 luma. Transparent pixels are composited on black: radiograph
backgrounds are air (dark), so transparent padding reads as air rather than as a bright frame.
16-bit grey keeps its values and is displayed with its own min..max window.
"""
from __future__ import annotations

import warnings
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..study import View, ViewMeta
from .errors import StudyLoadError
from .limits import Budget
from .pixels import linear_window, minmax_window, rgb_to_grey

FORMATS = ("PNG", "JPEG")  # Pillow opens nothing else here (no TIFF/EPS/... parsers reached)


def _grey(im: Image.Image) -> tuple[np.ndarray, int, bool]:
    """(grey values, bits per sample, was grey) for any Pillow mode."""
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.asarray(im).astype(np.float32), 16, True
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.float32), 8, True
    if mode in ("L", "LA", "La"):
        arr = np.asarray(im.convert("LA") if mode == "La" else im)
        grey, was_grey = arr[..., 0] if arr.ndim == 3 else arr, True
        alpha = arr[..., 1] if arr.ndim == 3 else None
    else:
        arr = np.asarray(im.convert("RGBA") if "A" in mode or "a" in mode else im.convert("RGB"))
        grey, was_grey = rgb_to_grey(arr), False
        alpha = arr[..., 3] if arr.shape[-1] == 4 else None
    grey = grey.astype(np.float32)
    if alpha is not None:
        grey = grey * (alpha.astype(np.float32) / 255.0)
    return grey, 8, was_grey


def decode_image(data: bytes, name: str, budget: Budget) -> list[View]:
    try:
        with warnings.catch_warnings():
            # We enforce our own (smaller) pixel limit below, before load().
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise StudyLoadError("too_large", name=name) from exc
    except UnidentifiedImageError as exc:
        raise StudyLoadError("corrupt", name=name) from exc
    except Exception as exc:  # noqa: BLE001 - Pillow header parsers raise many types
        raise StudyLoadError("corrupt", name=name) from exc
    fmt = (im.format or "").lower()
    width, height = im.size
    budget.reserve(height, width, 1, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            if fmt == "jpeg":  # phone photos of films carry EXIF orientation
                im = ImageOps.exif_transpose(im)
            grey, bits, was_grey = _grey(im)
    except MemoryError as exc:
        raise StudyLoadError("too_large", name=name) from exc
    except (OSError, EOFError, SyntaxError) as exc:
        truncated = isinstance(exc, EOFError) or "truncated" in str(exc).lower()
        raise StudyLoadError("truncated" if truncated else "corrupt", name=name) from exc
    except Exception as exc:  # noqa: BLE001
        raise StudyLoadError("corrupt", name=name) from exc
    if bits == 8:
        window, display = None, np.clip(grey + 0.5, 0, 255).astype(np.uint8)
    else:
        window = minmax_window(grey)
        display = linear_window(grey, *window)
    meta = ViewMeta(source_format=fmt or "png", rows=grey.shape[0], columns=grey.shape[1],
                    photometric="MONOCHROME2" if was_grey else "RGB", bits_stored=bits)
    return [View(values=grey, display=display, meta=meta, window=window)]
