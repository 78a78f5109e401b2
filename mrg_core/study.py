"""The one shape that crosses module borders: a Study made of Views.

A View holds decoded pixels and *non-identifying* metadata only. Anything that could identify a
patient (names, IDs, dates, institution, UIDs...) stays inside the loader and never reaches this
module, the model, the store, the logs or the page.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

# Named CT windows (centre, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}


@dataclass(frozen=True)
class ViewMeta:
    """Non-identifying facts about one view / slice. Unknown values are None."""

    source_format: str  # "dicom" | "png" | "jpeg"
    rows: int
    columns: int
    modality: str | None = None  # DICOM Modality, e.g. "CT", "CR", "DX"; None for plain images
    body_part: str | None = None  # e.g. "CHEST"
    view_position: str | None = None  # e.g. "PA", "AP"
    pixel_spacing: tuple[float, float] | None = None  # mm (row, column)
    photometric: str | None = None  # e.g. "MONOCHROME1", "MONOCHROME2", "RGB"
    manufacturer: str | None = None
    bits_stored: int | None = None
    frame_index: int = 0  # index within a multi-frame object
    units: str = "raw"  # "HU" when values are Hounsfield units, else "raw"
    # Slice geometry (CT/MR series): position along the slice normal (ImagePositionPatient ·
    # normal of ImageOrientationPatient, mm), nominal thickness, InstanceNumber.
    slice_position: float | None = None
    slice_thickness: float | None = None
    instance_number: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["pixel_spacing"] is not None:
            d["pixel_spacing"] = list(d["pixel_spacing"])
        return d


@dataclass(frozen=True)
class View:
    """One decoded 2-D image.

    values:  float32 (rows, columns) in modality units (HU for CT, raw stored values after the
             modality LUT otherwise, 0..255 or 0..65535 grey for PNG/JPEG). Used for re-windowing.
    display: uint8 (rows, columns) grey-scale, ready to show: VOI LUT / default window applied,
             MONOCHROME1 inverted (so air is dark, bone bright). This is what the model reads.
    window:  (centre, width) that produced `display`, in `values` units; None for plain images.
    """

    values: np.ndarray
    display: np.ndarray
    meta: ViewMeta
    window: tuple[float, float] | None = None

    def windowed(self, centre: float, width: float) -> np.ndarray:
        """uint8 display of `values` with a linear window (DICOM PS3.3 C.11.2.1.2 style)."""
        lo, hi = centre - width / 2.0, centre + width / 2.0
        out = (self.values.astype(np.float32) - lo) / max(hi - lo, 1e-6)
        img = (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if self.meta.photometric == "MONOCHROME1":
            img = 255 - img
        return img


@dataclass(frozen=True)
class SeriesInfo:
    """How the loader put a series together (non-identifying: no UID, no description)."""

    index: int  # 1-based position among the series of one upload (by SeriesNumber)
    n_slices: int
    modality: str | None = None
    series_number: int | None = None
    kernel: str | None = None  # ConvolutionKernel, e.g. "B40f"
    slice_thickness_mm: float | None = None  # median nominal thickness
    spacing_mm: float | None = None  # median distance between neighbouring slice positions
    ordered_by: str = "given"  # "position" | "instance_number" | "given"
    gaps_after: tuple[int, ...] = ()  # slice indices followed by a missing slice (> 1.5 spacing)

    def describe(self) -> str:
        """'series 2 (CT, B40f): 30 slices, 8 mm thick, 8 mm apart' for messages and menus."""
        head = ", ".join(x for x in (self.modality, self.kernel) if x)
        n = self.series_number if self.series_number is not None else self.index
        text = f"series {n}" + (f" ({head})" if head else "") + f": {self.n_slices} slices"
        if self.slice_thickness_mm:
            text += f", {self.slice_thickness_mm:g} mm thick"
        if self.spacing_mm:
            text += f", {self.spacing_mm:g} mm apart"
        if self.gaps_after:
            text += f", {len(self.gaps_after)} missing slice gap(s)"
        return text

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gaps_after"] = list(self.gaps_after)
        return d


@dataclass(frozen=True)
class Study:
    """One or more views (projections or CT slices) of one examination. `series` is set when
    the views are the ordered slices of one DICOM series."""

    views: tuple[View, ...]
    content_hash: str = field(default="")
    series: SeriesInfo | None = None

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("a study needs at least one view")
        if not self.content_hash:
            object.__setattr__(self, "content_hash", hash_views(self.views))

    @property
    def modality(self) -> str | None:
        return self.views[0].meta.modality

    @property
    def body_part(self) -> str | None:
        return self.views[0].meta.body_part

    def summary(self) -> dict:
        """JSON-safe, non-identifying description."""
        return {
            "content_hash": self.content_hash,
            "n_views": len(self.views),
            "series": None if self.series is None else self.series.to_dict(),
            "views": [v.meta.to_dict() for v in self.views],
        }


def hash_views(views: tuple[View, ...] | list[View]) -> str:
    """sha256 over the display pixels and shapes: the same image gives the same hash whatever
    the file's name or (lossless) encoding, and no metadata takes part."""
    h = hashlib.sha256()
    for v in views:
        h.update(np.asarray(v.display.shape, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(v.display).tobytes())
    return h.hexdigest()


def study_from_arrays(images: list[np.ndarray], modality: str | None = None,
                      body_part: str | None = None) -> Study:
    """Build a Study from uint8 grey arrays (tests, datasets, synthetic samples)."""
    views = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim == 3:
            img = img.mean(axis=2)
        disp = np.clip(img, 0, 255).astype(np.uint8)
        meta = ViewMeta(source_format="png", rows=disp.shape[0], columns=disp.shape[1],
                        modality=modality, body_part=body_part, frame_index=i,
                        photometric="MONOCHROME2")
        views.append(View(values=disp.astype(np.float32), display=disp, meta=meta))
    return Study(views=tuple(views))
