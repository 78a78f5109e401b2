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
