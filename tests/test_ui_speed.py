"""The page's speed measures keep its behaviour: coalesced stream updates, the background decode,
the viewer's PNG files, the start-up warm-up, and the precision / thread flags."""
import threading
import time

import numpy as np
import pytest
from PIL import Image

from mrg_core.engine import Engine
from mrg_core.models import tiny_model
from mrg_core.paths import SAMPLES_DIR
from mrg_core.storage import Store
from ui import handlers as h
from ui.state import Session

CT_SAMPLE = SAMPLES_DIR / "ct_phantom_covid.dcm"


@pytest.fixture(scope="module")
def model():
    return tiny_model(method="prompt", family="gpt2", seed=0)


@pytest.fixture
def engine(model, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    yield Engine(model, store)
    store.close()


@pytest.fixture
def session(engine):
    s = Session()
    assert h.load_files(engine, s, [str(CT_SAMPLE)]).ok
    return s


def slowed(engine, monkeypatch, study, delay=0.004, hook=None):
    """engine.stream_report with a pause before each piece; returns the real pieces."""
    real = engine.stream_report
    pieces = list(real(study))

    def slow(study, settings=None):
        for i, piece in enumerate(real(study, settings)):
            time.sleep(delay)
            if hook:
                hook(i)
            yield piece

    monkeypatch.setattr(engine, "stream_report", slow)
    return pieces


def test_coalesced_updates_carry_the_whole_draft(engine, session, monkeypatch):
    pieces = slowed(engine, monkeypatch, session.study)
    full = "".join(pieces)
    ups = list(h.stream_draft(engine, session, "", update_every_s=0.05))
    # the streaming updates; the final one may repeat the whole text when the last piece
    # happened to be sent already (an API client sees only that final message)
    texts = [u.editor for u in ups[:-1] if u.editor]
    assert ups[0].editor == "" and ups[0].editor_locked is True
    assert texts[0] == pieces[0]  # the first piece is shown at once
    assert 2 < len(texts) < len(pieces) // 2  # still streaming, far fewer updates
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:]))
    assert full.startswith(texts[-1])
    assert ups[-1].done and ups[-1].editor == full  # the final update brings the rest
    assert session.draft == full == session.editor_shadow
    assert session.draft_timings["pieces"] == len(pieces)


def test_updates_thin_out_while_many_drafts_run(engine, session, monkeypatch):
    """The interval between a draft's updates grows with the drafts running (the server's
    updates per second stay about one draft's), up to MAX_UPDATE_EVERY_S."""
    assert h.update_interval(engine, 0.05) == 0.05  # none running: as asked
    monkeypatch.setattr(engine, "drafts_running", lambda: 4)
    assert h.update_interval(engine, 0.05) == pytest.approx(0.2)
    monkeypatch.setattr(engine, "drafts_running", lambda: 100)
    assert h.update_interval(engine, 0.05) == h.MAX_UPDATE_EVERY_S
    assert h.update_interval(engine, 0.0) == 0.0  # one update per piece stays that
    pieces = slowed(engine, monkeypatch, session.study)  # ~4 ms a piece
    ups = list(h.stream_draft(engine, session, "", update_every_s=0.05))
    texts = [u.editor for u in ups if u.editor]
    # the first piece, then one update per 0.5 s at most, then the final one
    assert len(texts) <= 2 + len(pieces) * 0.004 / h.MAX_UPDATE_EVERY_S + 1
    assert ups[-1].editor == "".join(pieces)


def test_the_final_update_carries_the_whole_draft_even_when_all_was_sent(engine, session,
                                                                          monkeypatch):
    """Every piece shown as it came (no coalescing): the last message still holds the whole
    text, since an API client (gradio_client's predict) sees only that one."""
    full = "".join(slowed(engine, monkeypatch, session.study))
    ups = list(h.stream_draft(engine, session, "", update_every_s=0.0))
    assert ups[-2].editor == full  # already on the page
    assert ups[-1].done and ups[-1].editor == full


def test_coalesced_draft_beside_the_users_text(engine, session, monkeypatch):
    full = "".join(slowed(engine, monkeypatch, session.study))
    ups = list(h.stream_draft(engine, session, "Dictated report.", update_every_s=10))
    assert all(u.editor is None for u in ups)  # the user's text is never touched
    latest = [u.latest for u in ups if u.latest]
    assert len(latest) == 2 and latest[-1] == full == session.latest == session.draft
    assert "your text was kept" in ups[-1].notice


def test_stop_shows_every_piece_decoded_so_far(engine, session, monkeypatch):
    pieces = slowed(engine, monkeypatch, session.study, hook=lambda i: i == 5 and h.request_stop(session))
    ups = list(h.stream_draft(engine, session, "", update_every_s=10))
    partial = "".join(pieces[:5])
    assert "stopped" in ups[-1].notice and ups[-1].editor == partial
    assert session.draft == partial and not session.streaming
    assert h.save(engine, session, partial, "Dr Ada").ok


def test_a_failing_model_keeps_what_the_page_shows(engine, session, monkeypatch):
    def broken(study, settings=None):
        yield "Ground-glass"
        yield " opacity"
        raise RuntimeError("decoder failed")

    monkeypatch.setattr(engine, "stream_report", broken)
    ups = list(h.stream_draft(engine, session, "", update_every_s=10))
    assert ups[1].editor == "Ground-glass"
    assert "could not be generated" in ups[-1].notice and ups[-1].editor_locked is False
    assert session.draft == "Ground-glass" and not session.streaming


def _drafts_end(engine, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while engine.drafts_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.drafts_running() == 0


def test_background_decode_frees_the_model_on_close(engine, session):
    it = engine.stream_report(session.study)
    assert next(it)
    it.close()
    assert _drafts_end(engine, 5)  # Stop ends the decode within a token
    assert "".join(engine.stream_report(session.study)) == \
        engine.model.generate_report(session.study)


def test_another_users_analysis_waits_for_one_decode_step_not_the_whole_draft(
        engine, session, monkeypatch):
    """A draft that cannot share steps (this GPT-2 model) runs on the model thread in slices
    (at least one step): a draft of 10 steps of 0.3 s (3 s) lets an analysis run after at most
    one step."""
    def slow(study, settings=None, **kw):
        for i in range(10):
            time.sleep(0.3)  # the step's computation, under the lock
            yield f"w{i} "

    from mrg_core.study import study_from_arrays

    other = study_from_arrays([np.full((64, 64), 40, np.uint8)])
    engine.analyze(session.study)  # warm (the first analysis imports captum: ~1 s when alone)
    monkeypatch.setattr(engine.model, "stream_report", slow)
    it = engine.stream_report(session.study)
    assert next(it) == "w0 "
    rest = threading.Thread(target=lambda: "".join(it))
    rest.start()
    t0 = time.perf_counter()
    engine.analyze(other)
    waited = time.perf_counter() - t0
    rest.join(10)
    assert waited < 1.5, f"the analysis waited {waited:.1f} s behind the 3 s draft"


def test_background_decode_raises_model_errors_to_the_caller(engine, session, monkeypatch):
    def broken(study, settings):
        yield "a"
        raise ValueError("bad weights")

    monkeypatch.setattr(engine.model, "stream_report", broken)
    it = engine.stream_report(session.study)
    assert next(it) == "a"
    with pytest.raises(ValueError, match="bad weights"):
        next(it)
    assert _drafts_end(engine, 5)


def test_decode_does_not_wait_for_a_slow_reader(engine, session):
    """A reader that pauses (a page receiving updates) does not keep the model busy."""
    it = engine.stream_report(session.study)
    next(it)
    assert _drafts_end(engine, 10)  # the decode finished without the reader
    assert "".join(it)  # and its pieces wait for the reader


def test_png_file_is_lossless_and_written_once(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 30, 3)).astype(np.uint8)
    p = h.png_file(img, tmp_path)
    assert np.array_equal(np.asarray(Image.open(p)), img)
    mtime = (tmp_path / p).stat().st_mtime_ns
    assert h.png_file(img.copy(), tmp_path) == p and (tmp_path / p).stat().st_mtime_ns == mtime
    other = img.copy()
    other[0, 0, 0] ^= 1
    assert h.png_file(other, tmp_path) != p
    threads = [threading.Thread(target=h.png_file, args=(other, tmp_path)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(x.suffix for x in tmp_path.iterdir()) == [".png", ".png"]  # no leftovers


def test_warm_up_stores_nothing(engine, session, tmp_path):
    assert engine.warm_up() > 0
    assert engine.history(session.study) == []
    assert Engine(None, engine.store).warm_up() == 0.0


def test_app_precision_and_thread_flags(monkeypatch):
    import app

    monkeypatch.delenv("MRG_PRECISION", raising=False)
    monkeypatch.delenv("MRG_DECODE_THREADS", raising=False)
    a = app.parse_args([])
    assert a.precision == "int8-weights" and a.decode_threads == "auto"
    monkeypatch.setenv("MRG_PRECISION", "INT8")
    monkeypatch.setenv("MRG_DECODE_THREADS", "1")
    a = app.parse_args([])
    assert a.precision == "int8" and a.decode_threads == 1
    assert Engine(None, None, decode_threads="auto").decode_threads >= 1
    assert Engine(None, None, decode_threads=3).decode_threads == 3
    assert app.parse_args(["--precision", "bf16", "--decode-threads", "2"]).precision == "bf16"
    with pytest.raises(SystemExit):
        app.parse_args(["--precision", "fp8"])
    with pytest.raises(SystemExit):
        app.parse_args(["--decode-threads", "0"])
