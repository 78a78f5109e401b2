"""Engine set-up per backend, and the one place database errors become `StoreUnavailable`."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from .errors import StoreUnavailable

BUSY = ("The report database is busy (another save is in progress). "
        "Your text was not lost — try Save again in a moment.")
UNAVAILABLE = ("The report database is unavailable right now. "
               "Your text was not lost — try Save again; if it keeps failing, copy the report "
               "and tell IT.")
BAD_CONFIG = ("The report database is not configured correctly, so reports cannot be saved. "
              "Your text was not lost — copy the report and tell IT.")

# Execution option that marks a write transaction (SQLite: BEGIN IMMEDIATE, see below).
WRITE = "mrg_write"


def make_engine(url: str, busy_timeout_s: float) -> Engine:
    try:
        parsed = make_url(url)
        # hide_parameters: error text and logs must never carry report text or reviewer names.
        kw: dict = {"hide_parameters": True}
        if parsed.get_backend_name() == "sqlite":
            kw["connect_args"] = {"timeout": busy_timeout_s}
        else:
            kw["pool_pre_ping"] = True  # a server restart must not fail the next save
            if parsed.get_backend_name() == "postgresql":
                kw["connect_args"] = {"connect_timeout": max(1, int(round(busy_timeout_s)))}
        engine = create_engine(parsed, **kw)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise StoreUnavailable(BAD_CONFIG, detail=f"bad database URL: {exc}") from exc
    if engine.dialect.name == "sqlite":
        _setup_sqlite(engine, busy_timeout_s)
    return engine


def _setup_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN breaks SAVEPOINT and
        # cannot ask for IMMEDIATE).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA foreign_keys = ON")
            # WAL: readers never block the writer and a killed process cannot corrupt the file.
            cur.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed correction survives power loss too, not just a process crash.
            cur.execute("PRAGMA synchronous = FULL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A write takes the write lock up front. A deferred transaction that reads first and
        # upgrades later gets SQLITE_BUSY at once under WAL, without waiting for busy_timeout.
        mode = "IMMEDIATE" if conn.get_execution_options().get(WRITE) else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def translate_errors() -> Iterator[None]:
    """Database/driver failures -> StoreUnavailable (the caller's transaction is rolled back by
    the session context manager before this sees the exception)."""
    try:
        yield
    except SQLAlchemyError as exc:
        text = str(getattr(exc, "orig", None) or exc)
        low = text.lower()
        msg = BUSY if ("locked" in low or "busy" in low) else UNAVAILABLE
        raise StoreUnavailable(msg, detail=f"{type(exc).__name__}: {text}") from exc
    except OSError as exc:  # e.g. sqlite file's folder vanished, disk full at connect
        raise StoreUnavailable(UNAVAILABLE, detail=f"{type(exc).__name__}: {exc}") from exc

