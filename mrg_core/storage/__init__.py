"""Append-only store of model drafts and radiologists' corrections (see DESIGN.md, storage)."""
from .errors import InvalidCorrection, StoreError, StoreUnavailable
from .records import (ACCEPTED, CORRECTED, KIND_LABELS, KINDS, WRITTEN, CorrectionExample,
                      DraftRecord, HistoryEntry, SaveResult, review_kind)
from .store import MAX_TEXT_CHARS, REVIEWER_REQUIRED, Store

__all__ = ["Store", "DraftRecord", "SaveResult", "HistoryEntry", "CorrectionExample",
           "StoreError", "StoreUnavailable", "InvalidCorrection", "MAX_TEXT_CHARS",
           "ACCEPTED", "CORRECTED", "WRITTEN", "KINDS", "KIND_LABELS", "review_kind",
           "REVIEWER_REQUIRED"]
