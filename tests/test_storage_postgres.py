"""The same store behaviour against a real PostgreSQL server.

Set MRG_TEST_POSTGRES_URL (e.g. from `eval "$(.ci/start_postgres.sh)"`); without it the
server tests skip (and fail under CI=true). Each test gets its own schema, dropped afterwards.
"""
from __future__ import annotations

import os
import socket
import threading
import uuid
from urllib.parse import quote

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from conftest import require
from mrg_core.storage import Store, StoreUnavailable
from storage_writer import make_draft, make_study, study_for

try:
    import psycopg
except ImportError:  # in requirements-dev.txt; without it every test here skips (fails in CI)
    psycopg = None
PG_URL = os.environ.get("MRG_TEST_POSTGRES_URL")


@pytest.fixture(autouse=True)
def _driver():
    require(psycopg is not None, "PostgreSQL driver psycopg is not installed")


@pytest.fixture
def _server():
    require(PG_URL, "MRG_TEST_POSTGRES_URL is not set (start one with .ci/start_postgres.sh)")


needs_server = pytest.mark.usefixtures("_server")


@pytest.fixture
def pg_url(_server):
    schema = f"mrg_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    with admin.begin() as c:
        c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@needs_server
def test_round_trip(pg_url):
    with Store(pg_url) as store:
        study = make_study(7, n_views=3)
        r = store.save_review(study, make_draft(), "Small left effusion.", " Dr A ", label=1)
        (h,) = store.history(study.content_hash)
        assert (h.correction_id, h.reviewer, h.final_text, h.label, h.probability) == (
            r.correction_id, "Dr A", "Small left effusion.", 1, 0.8)
        assert h.created_at.tzinfo is not None
        imgs = store.get_study_images(study.content_hash)
        assert all(np.array_equal(a, v.display) for a, v in zip(imgs, study.views))
        assert len(imgs) == 3


@needs_server
def test_append_only(pg_url):
    with Store(pg_url) as store:
        study = make_study(8)
        first = store.save_review(study, make_draft("d1"), "first", "r1")
        before = store.history(study.content_hash)
        second = store.save_review(study, make_draft("d2"), "second", "r2")
        hist = store.history(study.content_hash)
        assert [e.correction_id for e in hist] == [second.correction_id, first.correction_id]
        assert hist[1] == before[0] and first.study_id == second.study_id
        st = store.stats()
        assert (st["studies"], st["views"], st["drafts"], st["corrections"]) == (1, 2, 2, 2)


@needs_server
def test_concurrent_threads_lose_nothing(pg_url):
    """Threads race to create the same studies: the unique index + savepoint + re-select path
    must resolve every race without losing or duplicating anything."""
    store = Store(pg_url)
    store.stats()  # schema before the race
    n_threads, n_saves = 8, 12
    ids: list[int] = []
    errors: list[BaseException] = []
    lock, start = threading.Lock(), threading.Barrier(n_threads)

    def work(tag):
        try:
            start.wait()
            for i in range(n_saves):
                cid = store.save_review(study_for(tag, i), make_draft(), f"{tag} {i}",
                                        tag).correction_id
                with lock:
                    ids.append(cid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{k}",)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    tags = [f"t{k}" for k in range(n_threads)]
    n_studies = len({study_for(t, i).content_hash for t in tags for i in range(n_saves)})
    st = store.stats()
    assert len(set(ids)) == st["corrections"] == st["drafts"] == n_threads * n_saves
    assert st["studies"] == n_studies and st["views"] == 2 * n_studies
    store.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when we return: nothing listens there


def test_unreachable_server_is_unavailable():
    """Runs without a server: a refused connection must read as 'unavailable', quickly."""
    store = Store(f"postgresql+psycopg://mrg:pw@127.0.0.1:{_closed_port()}/mrg",
                  busy_timeout_s=2.0)
    with pytest.raises(StoreUnavailable) as ei:
        store.save_review(make_study(1), make_draft(), "report", "r")
    assert "not lost" in ei.value.message and ei.value.detail
    with pytest.raises(StoreUnavailable):
        store.history("0" * 64)


@needs_server
def test_wrong_password_is_unavailable(pg_url):
    from sqlalchemy.engine import make_url
    bad = make_url(pg_url).set(password="definitely-wrong")
    with pytest.raises(StoreUnavailable, match="not lost"):
        Store(bad.render_as_string(hide_password=False)).stats()
