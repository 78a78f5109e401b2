"""Logging for `python app.py`: INFO and above to stderr, one line each.

What is logged is chosen where it is logged: studies only by their non-identifying ViewMeta and
content hash, drafts and reports only by word counts (never their text at INFO), no file names.
Chatty third-party loggers are kept at WARNING so request URLs do not flood the log.
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("httpx", "httpcore", "urllib3", "multipart", "PIL", "matplotlib", "asyncio")


def configure(level: int = logging.INFO, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def quiet_known_warnings() -> None:
    """Silence third-party warnings a user can do nothing about (the app and every CLI
    command). Only exact, known messages: anything else still shows.
    - peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model
      with a LoRA adapter (transformers says: removed in v6; peft will follow)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)
