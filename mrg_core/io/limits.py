"""Size limits checked from headers *before* anything is decoded (decompression-bomb guard)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import StudyLoadError


@dataclass(frozen=True)
class LoadLimits:
    max_file_bytes: int = 256 * 2**20  # one file's size on disk / upload
    max_pixels: int = 40_000_000  # one frame: rows * columns
    max_total_pixels: int = 160_000_000  # whole study (~5 bytes/pixel kept: values + display)
    # A 600-slice 512² CT series passes: 157 Mpx, ~300 MB of files, ~800 MB once decoded.
    max_files: int = 2048  # files in one upload (a zip's members count one by one)
    max_frames: int = 2048  # whole upload
    max_total_bytes: int = 2 * 2**30  # all files of one upload together, as read (zip: inflated)


@dataclass
class Budget:
    """Running totals for one load call, so several files share the study-wide limits."""

    limits: LoadLimits = field(default_factory=LoadLimits)
    frames: int = 0
    pixels: int = 0
    bytes_read: int = 0

    def read(self, n: int, name: str) -> None:
        """Account for n more bytes read; raise before the upload's total passes the limit."""
        if self.bytes_read + n > self.limits.max_total_bytes:
            raise StudyLoadError("too_large", f"{name} is one file too many: the files of one "
                                 f"study may have at most {mib(self.limits.max_total_bytes)} in "
                                 "all.", name=name)
        self.bytes_read += n

    def reserve(self, rows: int, columns: int, frames: int, name: str) -> None:
        """Account for `frames` frames of rows x columns; raise before any pixel is decoded."""
        if rows <= 0 or columns <= 0 or frames <= 0:
            raise StudyLoadError("empty_image", name=name)
        lim = self.limits
        # The messages state the limit, never the file's own values (see errors.py).
        if rows * columns > lim.max_pixels:
            raise StudyLoadError("too_large", f"{name} is too large to display safely: one "
                                 f"image may have at most {_mpx(lim.max_pixels)}.", name=name)
        if self.frames + frames > lim.max_frames:
            raise StudyLoadError("too_large", f"{name} is too large to display safely: a study "
                                 f"may have at most {lim.max_frames} frames or slices.",
                                 name=name)
        if self.pixels + rows * columns * frames > lim.max_total_pixels:
            raise StudyLoadError("too_large", f"{name} is too large to display safely: a study "
                                 f"may have at most {_mpx(lim.max_total_pixels)} in all.",
                                 name=name)
        self.frames += frames
        self.pixels += rows * columns * frames


def _mpx(n: int) -> str:
    return f"{n / 1e6:g} megapixels" if n >= 1_000_000 else f"{n:,} pixels"


def mib(n: int) -> str:
    """A byte count for a message: '256 MB', '1.5 MB' (MiB, as the --max-upload-mb flag),
    '12 KB', '100 bytes'."""
    if n >= 2**20:
        return f"{n / 2**20:.3g} MB"
    return f"{n / 2**10:.3g} KB" if n >= 2**10 else f"{n} bytes"
