"""Concurrency and crash durability of the SQLite store: real files, real threads, real
processes, real SIGKILL."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import event

from mrg_core.storage import Store
from storage_writer import SHARED_SEEDS, make_draft, make_study, study_for

WRITER = Path(__file__).with_name("storage_writer.py")
REPO = WRITER.parent.parent


def integrity(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def ids_on_disk(db: Path) -> set[int]:
    con = sqlite3.connect(db)
    try:
        return {i for (i,) in con.execute("SELECT id FROM corrections")}
    finally:
        con.close()


def expected_study_count(tags: list[str], n: int) -> int:
    return len({study_for(t, i).content_hash for t in tags for i in range(n)})


def test_every_store_connection_has_the_durability_settings(tmp_path):
    """Asked of the live SQLite connections the Store itself uses (the one a save commits
    through and new ones opened beside it), not of the code that sets them up: a committed
    save survives power loss (synchronous FULL, or EXTRA), readers never block the writer
    (WAL), foreign keys are enforced, and a busy file waits busy_timeout before failing."""
    db = tmp_path / "durable.db"
    store = Store(f"sqlite:///{db}", busy_timeout_s=7.0)
    used = {}

    @event.listens_for(store.engine, "before_cursor_execute")
    def _seen(conn, *_):
        raw = conn.connection.dbapi_connection
        used[id(raw)] = raw

    store.save_review(make_study(1), make_draft(), "final", "r")
    assert store.history(make_study(1).content_hash)
    held = [store.engine.connect() for _ in range(3)]  # forces connections beside the first
    for c in held:
        c.exec_driver_sql("SELECT 1").all()
    assert len(used) >= 3

    def pragma(raw, name):
        return raw.execute(f"PRAGMA {name}").fetchone()[0]

    for raw in used.values():
        assert pragma(raw, "synchronous") in (2, 3)  # 2 = FULL, 3 = EXTRA (0 OFF, 1 NORMAL)
        assert str(pragma(raw, "journal_mode")).lower() == "wal"
        assert pragma(raw, "foreign_keys") == 1
        assert pragma(raw, "busy_timeout") == 7000
    for c in held:
        c.close()
    assert any(p.name == "durable.db-wal" for p in tmp_path.iterdir())
    # WAL is a property of the file: a plain connection that sets nothing sees it too.
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        con.close()
    store.close()


def test_threads_lose_nothing(tmp_path):
    db = tmp_path / "threads.db"
    store = Store(f"sqlite:///{db}", busy_timeout_s=30.0)
    n_threads, n_saves = 8, 25
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(tag: str) -> None:
        try:
            start.wait()
            results[tag] = [store.save_review(study_for(tag, i), make_draft(f"d {tag} {i}"),
                                              f"final {tag} {i}", f"r{tag}").correction_id
                            for i in range(n_saves)]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{k}",)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    acked = [i for ids in results.values() for i in ids]
    assert len(acked) == len(set(acked)) == n_threads * n_saves
    st = store.stats()
    tags = [f"t{k}" for k in range(n_threads)]
    assert st["corrections"] == st["drafts"] == n_threads * n_saves
    assert st["studies"] == expected_study_count(tags, n_saves)
    assert st["views"] == 2 * st["studies"]
    assert ids_on_disk(db) == set(acked)
    assert integrity(db) == "ok"
    # Every shared study was stored once but holds every thread's corrections.
    for seed in SHARED_SEEDS:
        assert len(store.history(make_study(seed).content_hash)) > n_threads
    store.close()


def _writer(url: str, n: int, tag: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(WRITER), url, str(n), tag], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_processes_lose_nothing(tmp_path):
    db = tmp_path / "procs.db"
    url = f"sqlite:///{db}"
    Store(url).stats()  # schema first, so the writers race on saves only
    tags, n = ["p0", "p1", "p2", "p3"], 25
    procs = [_writer(url, n, t) for t in tags]
    acked: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        lines = out.split()
        assert lines[-1] == "done"
        acked += [int(x) for x in lines[:-1]]
    assert len(acked) == len(set(acked)) == len(tags) * n
    assert ids_on_disk(db) == set(acked)
    st = Store(url).stats()
    assert st["studies"] == expected_study_count(tags, n) and st["drafts"] == len(tags) * n
    assert integrity(db) == "ok"


@pytest.mark.parametrize("kill_after", [1, 17, 60])
def test_sigkill_mid_stream_keeps_every_acknowledged_save(tmp_path, kill_after):
    """Kill -9 a writer in the middle of a stream of saves (a second writer keeps going
    meanwhile): every id it printed (printed only after COMMIT) is on disk, the file passes
    integrity_check, and the store accepts new saves straight away."""
    db = tmp_path / "kill.db"
    url = f"sqlite:///{db}"
    Store(url).stats()
    victim, other = _writer(url, -1, "victim"), _writer(url, -1, "other")
    acked: list[int] = []
    for line in victim.stdout:
        acked.append(int(line))
        if len(acked) >= kill_after:
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    acked += [int(x) for x in victim.stdout.read().split()]  # acks still in the pipe
    other.send_signal(signal.SIGKILL)  # a second, uncoordinated crash
    other.wait(timeout=30)
    other_acked = [int(x) for x in other.stdout.read().split() if x.isdigit()]

    on_disk = ids_on_disk(db)
    assert set(acked) <= on_disk and set(other_acked) <= on_disk
    assert integrity(db) == "ok"
    with Store(url, busy_timeout_s=5.0) as s:  # no stale lock left behind
        r = s.save_review(make_study(999), make_draft(), "after the crash", "r")
        assert r.correction_id not in on_disk
        assert s.stats()["corrections"] == len(on_disk) + 1
