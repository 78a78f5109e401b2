"""Small array helpers shared by the DICOM and the PNG/JPEG decoders."""
from __future__ import annotations

import numpy as np

# ITU-R BT.601 luma, the weights Pillow's convert("L") uses: RGB DICOM and RGB PNG give the
# same grey for the same pixels.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) any numeric dtype -> float32 grey in the same value scale."""
    return rgb[..., :3].astype(np.float32) @ _LUMA


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """uint8 of a linear window; the same formula as View.windowed (without inversion)."""
    lo = centre - width / 2.0
    out = (values.astype(np.float32) - np.float32(lo)) / np.float32(max(width, 1e-6))
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def minmax_window(values: np.ndarray) -> tuple[float, float]:
    """(centre, width) spanning the array's own range; a flat image gets width 1."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return (lo + hi) / 2.0, max(hi - lo, 1.0)


def finite_or_none(values: np.ndarray) -> np.ndarray | None:
    return values if np.isfinite(values).all() else None
