"""What Gradio keeps on disk: uploads (the original files, patient names inside) and the files
the page is sent. Only de-identified data may stay (issue 19):

- an upload is deleted as soon as the loader has read it (the study lives on in memory,
  de-identified); only files inside Gradio's upload folder are ever deleted, never a sample or
  a path the user gave the CLI;
- the app runs with an upload folder of its own (MRG_UPLOAD_DIR, default a `mrg_studio_uploads`
  folder in the system temp dir), emptied when the app starts and when it stops, so nothing from
  a previous run remains. When the operator sets GRADIO_TEMP_DIR, that folder is used and never
  emptied (it may hold other things).

Who may fetch which file there, the per-user and total caps, and the purges when a page closes
and by age: ui/file_access.py.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def upload_folder() -> Path:
    import gradio.utils

    return Path(gradio.utils.get_upload_folder()).resolve()


def use_own_upload_folder(environ=os.environ) -> Path | None:
    """Point Gradio at an upload folder this app owns (before the page is built) and return
    it; None when the operator set GRADIO_TEMP_DIR (a folder that may hold other things, so
    the app never empties it)."""
    if environ.get("GRADIO_TEMP_DIR"):
        return None
    own = Path(environ.get("MRG_UPLOAD_DIR") or Path(tempfile.gettempdir())
               / "mrg_studio_uploads")
    own.mkdir(parents=True, exist_ok=True, mode=0o700)
    environ["GRADIO_TEMP_DIR"] = str(own)
    return own.resolve()


def discard_uploads(files: Iterable, root: Path | None = None) -> int:
    """Delete uploaded files (and their now-empty per-file folders) that lie inside the
    upload folder; returns how many were deleted. Anything else is left alone."""
    root = (root or upload_folder()).resolve()
    n = 0
    for f in files:
        if not isinstance(f, (str, os.PathLike)):
            continue  # (name, bytes) pairs: nothing on disk
        p = Path(f).resolve()
        if root not in p.parents or not p.is_file():
            continue
        try:
            p.unlink()
            n += 1
            parent = p.parent
            while parent != root and root in parent.parents and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        except OSError:
            log.warning("an uploaded file could not be deleted")
    return n


def empty_upload_folder(folder: Path) -> None:
    """Delete everything inside the app's own upload folder (at start and at stop)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        try:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        except OSError:
            log.warning("a cached file could not be deleted")
