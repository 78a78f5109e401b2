"""The one exception the loader raises: a short machine code plus a sentence for a radiologist.

Messages may name the file's display name (what the user called it) but never any value read
from inside the file: DICOM headers can hold patient data.
"""
from __future__ import annotations

# code -> message template; {name} is the file's display name.
MESSAGES: dict[str, str] = {
    "not_an_image": "{name} is not a DICOM, PNG or JPEG image.",
    "no_pixel_data": "{name} is a DICOM file without an image in it (for example a report or "
                     "a structured document).",
    "unsupported_compression": "{name} uses an image compression this viewer cannot decode. "
                               "Export it from the PACS as uncompressed DICOM, or as PNG.",
    "unsupported_format": "{name} stores its pixels in a form this viewer cannot show "
                          "(unusual bit depth or colour layout).",
    "corrupt": "{name} is damaged and cannot be read. Please export it again.",
    "truncated": "{name} is incomplete (the file ends too early). Please copy or export it "
                 "again.",
    "empty_image": "{name} contains no picture (it is empty or has zero size).",
    "too_large": "{name} is too large to display safely (too many pixels or frames).",
    "file_too_big": "{name} is larger than this viewer accepts.",
    "too_many_files": "Too many files were given at once for one study.",
    "mixed_patients": "These files belong to different patients; load one patient's study at "
                      "a time.",
    "mixed_modalities": "These files are different kinds of image; load one kind at a time.",
    "several_series": "These files hold several series; choose one.",
    "no_files": "No image file was given.",
    "not_found": "{name} could not be found or opened.",
}

CODES = frozenset(MESSAGES)


class StudyLoadError(Exception):
    """A file (or set of files) could not become a Study. `code` is one of CODES."""

    def __init__(self, code: str, message: str | None = None, name: str | None = None):
        if code not in MESSAGES:
            raise ValueError(f"unknown StudyLoadError code {code!r}")
        self.code = code
        self.name = name
        self.message = message or MESSAGES[code].format(name=name or "The file")
        super().__init__(self.message)

    def to_dict(self) -> dict:
        return {"file": self.name, "error": self.code, "message": self.message}
