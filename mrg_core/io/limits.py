"""Size limits checked from headers *before* anything is decoded (decompression-bomb guard)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import StudyLoadError


@dataclass(frozen=True)
class LoadLimits:
    max_file_bytes: int = 256 * 2**20  # one file's size on disk / upload
    max_pixels: int = 40_000_000  # one frame: rows * columns
    max_total_pixels: int = 160_000_000  # whole study (~5 bytes/pixel kept: values + display)
    max_files: int = 64
    max_frames: int = 512  # whole study


@dataclass
class Budget:
    """Running totals for one load call, so several files share the study-wide limits."""

    limits: LoadLimits = field(default_factory=LoadLimits)
    frames: int = 0
    pixels: int = 0

    def reserve(self, rows: int, columns: int, frames: int, name: str) -> None:
        """Account for `frames` frames of rows x columns; raise before any pixel is decoded."""
        if rows <= 0 or columns <= 0 or frames <= 0:
            raise StudyLoadError("empty_image", name=name)
        lim = self.limits
        if rows * columns > lim.max_pixels:
            raise StudyLoadError("too_large", name=name)
        if self.frames + frames > lim.max_frames:
            raise StudyLoadError("too_large", name=name)
        if self.pixels + rows * columns * frames > lim.max_total_pixels:
            raise StudyLoadError("too_large", name=name)
        self.frames += frames
        self.pixels += rows * columns * frames
