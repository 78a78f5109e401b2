"""View pixels <-> PNG bytes. Only the de-identified `View.display` is ever encoded, and PIL is
given no text chunks, so a PNG in the store carries pixels and nothing else."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(display: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(display)
    if arr.dtype != np.uint8:
        raise ValueError(f"View.display must be uint8, got {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"View.display must be 2-D (or H x W x 3), got shape {arr.shape}")
    buf = io.BytesIO()
    # compress_level 1: lossless either way; the save path should not spend CPU on zlib.
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).copy()
