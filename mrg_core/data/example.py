"""The one record every dataset loader returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Example:
    """One study: its image files (one per view/slice), reference report and binary label.

    report:     "" when the source has no text (kept for classification, skipped by text losses
                and caption metrics).
    label:      1 = COVID-19 pneumonia, 0 = not, -1 = unknown.
    references: every reference text of this id (the source may hold several); report is the
                first. Metrics use all of them (multi-reference, as COCO captions do).
    meta:       free extras (e.g. the draft and model version of an exported correction).
    """

    id: str
    image_paths: list[Path]
    report: str
    label: int = -1
    references: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_paths = [Path(p) for p in self.image_paths]
        if not self.references and self.report:
            self.references = (self.report,)

    @property
    def has_report(self) -> bool:
        return bool(self.report.strip())
