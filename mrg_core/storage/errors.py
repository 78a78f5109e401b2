"""The two ways a save can fail. Both carry a message written for the radiologist."""
from __future__ import annotations


class StoreError(Exception):
    """Base class: `message` is safe to show on the page as is."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Technical cause for the log (driver text, never SQL parameters: the engine hides them).
        self.detail = detail


class StoreUnavailable(StoreError):
    """The database could not be reached, was busy past the timeout, or refused the write.

    Nothing was written (the transaction was rolled back): the caller keeps the text and may
    simply retry.
    """


class InvalidCorrection(StoreError, ValueError):
    """The input cannot be saved as given (empty report, text too long, unknown draft...).
    Retrying the same input will fail again; the user has to change it."""
