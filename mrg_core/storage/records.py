"""Plain dataclasses that cross the store's border (no ORM objects leak out)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

# What a saved review is (CorrectionRow.kind). Only "corrected" carries a reviewer's edit.
CORRECTED = "corrected"  # the reviewer changed the model's draft
ACCEPTED = "accepted"  # the draft was saved unchanged ("accepted as drafted")
WRITTEN = "written"  # no model draft: the report was written by hand
KINDS = (CORRECTED, ACCEPTED, WRITTEN)
KIND_LABELS = {CORRECTED: "corrected", ACCEPTED: "accepted as drafted",
               WRITTEN: "written by hand"}


def review_kind(draft_text: str | None, final_text: str) -> str:
    """ACCEPTED when the saved text equals the draft up to whitespace (line breaks, trailing
    spaces: no words changed), WRITTEN without a draft, else CORRECTED."""
    draft = " ".join((draft_text or "").split())
    if not draft:
        return WRITTEN
    return ACCEPTED if draft == " ".join((final_text or "").split()) else CORRECTED


@dataclass
class DraftRecord:
    """What the model produced, as the engine hands it to the store."""

    model_name: str
    model_version: str
    text: str
    probability: float | None = None
    threshold: float | None = None
    settings: dict = field(default_factory=dict)  # GenerationSettings as a JSON-safe dict
    timings: dict = field(default_factory=dict)  # seconds per stage


@dataclass
class SaveResult:
    study_id: int
    draft_id: int
    correction_id: int
    created_at: datetime
    kind: str = CORRECTED  # CORRECTED / ACCEPTED / WRITTEN (review_kind)


@dataclass
class HistoryEntry:
    correction_id: int
    created_at: datetime
    reviewer: str
    final_text: str
    draft_text: str
    model_version: str
    probability: float | None
    label: int | None = None
    kind: str = CORRECTED  # CORRECTED / ACCEPTED / WRITTEN
    finding_flips: list[str] = field(default_factory=list)  # chips the reader changed
    findings: dict[str, int] | None = None  # the reader's finding chips, {name: 0/1}


@dataclass
class CorrectionExample:
    """One fine-tuning pair: the study's images and the radiologist's report."""

    correction_id: int
    content_hash: str
    images: list[np.ndarray]
    final_text: str
    label: int | None  # reviewer label, else draft probability >= threshold, else None
    draft_text: str
    model_version: str
    probability: float | None
    created_at: datetime
    kind: str = CORRECTED  # ACCEPTED rows are the model's own text: finetune leaves them out
    model_name: str = ""  # the model that drafted it: fine-tuning uses its own model's only
    # the reader's finding chips ({name: 0/1}) when they flipped one (Store: _reviewed_findings)
    findings: dict[str, int] | None = None
