"""Append-only store of model drafts and radiologists' corrections (see DESIGN.md, storage)."""
from .errors import InvalidCorrection, StoreError, StoreUnavailable
from .records import CorrectionExample, DraftRecord, HistoryEntry, SaveResult
from .store import MAX_TEXT_CHARS, Store

__all__ = ["Store", "DraftRecord", "SaveResult", "HistoryEntry", "CorrectionExample",
           "StoreError", "StoreUnavailable", "InvalidCorrection", "MAX_TEXT_CHARS"]
