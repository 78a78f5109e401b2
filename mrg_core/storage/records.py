"""Plain dataclasses that cross the store's border (no ORM objects leak out)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np


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
