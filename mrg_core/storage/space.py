"""Where corrections live on a Hugging Face Space, and a warning when that place is ephemeral.

A Space's own disk is wiped on every restart; only its persistent storage, mounted at /data
when the owner enables it, survives. On a Space (SPACE_ID set) the default SQLite store
therefore goes to /data when /data is writable, and the page warns whenever a Space keeps its
SQLite file anywhere else.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy.engine import make_url

SPACE_DATA = Path("/data")
DB_NAME = "mrg_studio.db"


def on_space(environ: Mapping[str, str] | None = None) -> bool:
    return bool((os.environ if environ is None else environ).get("SPACE_ID"))


def default_database_url(repo_root: Path, environ: Mapping[str, str] | None = None,
                         space_data: Path = SPACE_DATA) -> str:
    """SQLite in the Space's persistent /data when there is one, else in the repository."""
    if on_space(environ) and space_data.is_dir() and os.access(space_data, os.W_OK):
        return f"sqlite:///{space_data / DB_NAME}"
    return f"sqlite:///{repo_root / DB_NAME}"


def ephemeral_store_warning(url, environ: Mapping[str, str] | None = None,
                            space_data: Path = SPACE_DATA) -> str | None:
    """A sentence for the page when a Space keeps its SQLite store outside /data; else None.
    (A server database, e.g. PostgreSQL, is the owner's choice and gets no warning.)"""
    url = make_url(url)
    if not on_space(environ) or url.get_backend_name() != "sqlite":
        return None
    if url.database and url.database != ":memory:":
        resolved, data = Path(url.database).resolve(), space_data.resolve()
        if resolved == data or data in resolved.parents:
            return None
    return ("Saved reports are kept on this Space's temporary disk and are lost when it "
            "restarts: enable persistent storage (mounted at /data) or set MRG_DB_URL to a "
            "database that lasts.")
