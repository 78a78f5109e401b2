"""The page's handlers with a real tiny model, a real SQLite file and real DICOM files."""
import base64
import json
import os
import sqlite3

import numpy as np
import pydicom
import pytest

from mrg_core.engine import Engine
from mrg_core.models import tiny_model
from mrg_core.paths import SAMPLES_DIR
from mrg_core.storage import Store
from tests import factories
from ui import handlers as h
from ui.state import Session

CT_SAMPLE = SAMPLES_DIR / "ct_phantom_covid.dcm"


@pytest.fixture(scope="module")
def model():
    return tiny_model(method="prompt", family="gpt2", seed=0)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "reports.db"


@pytest.fixture
def engine(model, db_path):
    store = Store(f"sqlite:///{db_path}", busy_timeout_s=0.3)
    yield Engine(model, store)
    store.close()


@pytest.fixture
def ct_session(engine):
    s = Session()
    assert h.load_files(engine, s, [str(CT_SAMPLE)]).ok
    return s


def stream_all(engine, s, editor=""):
    ups = list(h.stream_draft(engine, s, editor))
    assert ups[-1].done
    return ups


def test_load_analyse_render(engine):
    s = Session()
    res = h.load_sample(engine, s, str(CT_SAMPLE))
    assert res.ok and res.n_views == 1 and res.is_ct
    assert "CT" in res.message
    a = h.analyze(engine, s)
    assert a.warning is None  # the tiny model is trained on CT CHEST
    p = s.analysis.probability
    assert a.probability == (f"Pneumonia probability {p:.2f} (threshold 0.50 → "
                             f"{'positive' if p >= 0.5 else 'negative'})")
    view = s.study.views[0]
    plain = h.render_view(engine, s, 0, "default", show_overlay=False)
    assert plain.shape == (*view.display.shape, 3) and plain.dtype == np.uint8
    assert np.array_equal(plain[..., 0], view.display)
    over = h.render_view(engine, s, 0, "default", show_overlay=True, opacity=0.5)
    assert over.shape == plain.shape and not np.array_equal(over, plain)
    bone = h.render_view(engine, s, 0, "bone", show_overlay=False)
    assert np.array_equal(bone[..., 0], view.windowed(400, 1800))
    custom = h.render_view(engine, s, 0, "custom", 40, 400, show_overlay=False)
    assert np.array_equal(custom[..., 0], view.windowed(40, 400))


def test_probability_wording():
    assert h.probability_text(0.873, 0.5) == \
        "Pneumonia probability 0.87 (threshold 0.50 → positive)"
    assert h.probability_text(0.2, 0.5).endswith("→ negative)")
    with_findings = h.probability_text(0.9, 0.5, ("ground glass shadow", "both lungs"))
    assert with_findings.endswith("Image findings: ground glass shadow, both lungs")


def test_stream_edit_save_history(engine, ct_session, db_path):
    s = ct_session
    h.analyze(engine, s)
    ups = stream_all(engine, s)
    editor_values = [u.editor for u in ups if u.editor is not None]
    full = "".join(engine.stream_report(s.study))
    assert len(editor_values) > 3  # it really streamed
    assert editor_values[-1] == full == s.draft
    assert all(full.startswith(v) for v in editor_values)  # each update extends the last
    assert s.draft_timings["pieces"] > 0

    edited = "Right lower lobe consolidation.\n" + full
    out = h.save(engine, s, edited, "Dr Ada")
    assert out.ok and out.message.startswith(f"Saved as correction #{s.last_save.correction_id}")

    hist = h.history_markdown(engine, s)
    assert f"| {s.last_save.correction_id} |" in hist and "Dr Ada" in hist
    assert "{+Right lower lobe consolidation.+}" in hist and "model draft → saved" in hist
    assert "| corrected |" in hist

    with sqlite3.connect(db_path) as con:
        final, reviewer, draft = con.execute(
            "SELECT c.final_text, c.reviewer, d.text FROM corrections c "
            "JOIN drafts d ON d.id = c.draft_id WHERE c.id = ?",
            (s.last_save.correction_id,)).fetchone()
    assert (final, reviewer, draft) == (edited, "Dr Ada", full)


def test_empty_report_is_refused_readably(engine, ct_session):
    out = h.save(engine, ct_session, "   \n", "Dr Ada")
    assert not out.ok and "The report is empty" in out.message
    assert "Traceback" not in out.message
    assert h.history_markdown(engine, ct_session) == "No saved versions of this study yet."


def test_locked_database_then_retry(engine, ct_session, db_path):
    s = ct_session
    assert h.save(engine, s, "First version.", "Dr Ada").ok  # schema exists now
    text = "Second version, typed while the database was locked."
    locker = sqlite3.connect(db_path, isolation_level=None, timeout=0.1)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        out = h.save(engine, s, text, "Dr Ada")
        assert not out.ok
        assert "busy" in out.message.lower() and "not lost" in out.message
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    out = h.save(engine, s, text, "Dr Ada")  # the same text, retried
    assert out.ok
    assert engine.history(s.study)[0].final_text == text


@pytest.mark.parametrize("blank", ["", "  ", None])
def test_saving_without_a_reviewer_is_refused(engine, ct_session, blank):
    s = ct_session
    assert list(h.stream_draft(engine, s, ""))[-1].done
    out = h.save(engine, s, s.draft + " edited", blank)
    assert not out.ok and "Not saved" in out.message and "reviewer's name" in out.message
    assert engine.history(s.study) == [] and s.last_save is None


def test_unchanged_draft_is_saved_as_accepted_as_drafted(engine, ct_session):
    s = ct_session
    assert list(h.stream_draft(engine, s, ""))[-1].done
    out = h.save(engine, s, s.draft, "Dr Ada")
    assert out.ok and out.message.startswith(f"Saved #{s.last_save.correction_id}, accepted "
                                             "as drafted")
    assert h.save(engine, s, s.draft + " Small effusion.", "Dr Ada").ok
    hist = h.history_markdown(engine, s)
    rows = [r for r in hist.splitlines() if r.startswith("| ") and "Dr Ada" in r]
    assert "| corrected |" in rows[0] and "| accepted as drafted |" in rows[1]  # newest first
    assert "**Accepted as drafted #" in hist and "(saved unchanged: accepted as drafted)" in hist
    assert "{+Small effusion.+}" in hist


def test_history_diff_is_word_level():
    draft = ("Bilateral ground glass opacities in the lower lobes.\n"
             "No pleural effusion. Heart size normal.")
    final = ("Bilateral ground glass opacities in the upper lobes.\n"
             "No pleural effusion. Heart size normal.")
    assert h.diff_text(draft, final) == (
        "Bilateral ground glass opacities in the [-lower-] {+upper+} lobes.\n"
        "No pleural effusion. Heart size normal.")
    assert h.diff_text(draft, draft.replace("\n", " \n ")) == (
        "(saved unchanged: accepted as drafted)")
    added = h.diff_text("Clear lungs.", "Clear lungs.\nSmall left effusion.")
    assert added == "Clear lungs.\n{+Small left effusion.+}"
    assert h.diff_text("a b c d", "a c d e") == "a [-b-] c d {+e+}"
    assert h.diff_text("", "Hand\nwritten") == ("(no model draft: written by hand)\n"
                                                  "{+Hand+}\n{+written+}")


def test_bad_files_give_readable_errors(engine, tmp_path):
    s = Session()
    junk = tmp_path / "notes.dcm"
    junk.write_bytes(b"this is not an image at all" * 10)
    res = h.load_files(engine, s, [str(junk)])
    assert not res.ok and "notes.dcm" in res.message and "Traceback" not in res.message
    nopix = tmp_path / "sr.dcm"
    factories.write_no_pixels(nopix)
    res = h.load_files(engine, s, [str(nopix)])
    assert not res.ok and "without an image" in res.message
    assert not h.load_files(engine, s, []).ok
    assert s.study is None


def test_out_of_domain_warning_for_cr(engine, tmp_path):
    cr = tmp_path / "cr.dcm"
    factories.write_mono1(cr)
    s = Session()
    assert h.load_files(engine, s, [str(cr)]).ok
    a = h.analyze(engine, s)
    assert a.warning and "CR" in a.warning and "CT" in a.warning
    assert a.probability.startswith("Pneumonia probability")
    assert 'role="alert"' in h.warning_html(a.warning)


def test_edits_during_streaming_are_kept(engine, ct_session):
    s = ct_session
    gen = h.stream_draft(engine, s, "")
    ups = [next(gen) for _ in range(4)]  # start + a few pieces into the editor
    assert ups[0].editor_locked is True  # the page makes the editor read-only meanwhile
    assert ups[-1].editor
    mine = ups[-1].editor + " my own words"
    h.note_edit(s, mine)  # an edit arrives mid-stream anyway (e.g. from an API client)
    rest = list(gen)
    assert all(u.editor is None for u in rest)  # the stream never touches the editor again
    assert rest[0].editor_locked is False and rest[-1].editor_locked is False
    assert "your text was kept" in rest[-1].notice.lower()
    full = "".join(engine.stream_report(s.study))
    assert s.draft == full and s.latest == full
    latest_updates = [u.latest for u in rest if u.latest is not None]
    assert latest_updates[-1] == full
    assert h.take_latest(s) == full  # explicit user choice only


def test_own_text_before_generate_goes_to_latest_box(engine, ct_session):
    s = ct_session
    ups = stream_all(engine, s, editor="Dictated report.")
    assert all(u.editor is None and not u.editor_locked for u in ups)
    assert s.latest and s.latest == s.draft
    # After taking the draft, Regenerate may stream into the editor again.
    taken = h.take_latest(s)
    ups = stream_all(engine, s, editor=taken)
    assert any(u.editor for u in ups)


def test_stop_keeps_partial_text_and_allows_save(engine, ct_session):
    s = ct_session
    gen = h.stream_draft(engine, s, "")
    ups = [next(gen) for _ in range(3)]
    h.stop_message(s)
    rest = list(gen)
    assert "stopped" in rest[-1].notice
    assert s.draft == ups[-1].editor and not s.streaming
    assert h.save(engine, s, s.draft + " edited", "Dr Ada").ok


def test_a_superseded_stream_leaves_the_page_to_the_new_one(engine, ct_session):
    """A second Generate while a draft streams: the first stream ends without a last update,
    so it can neither unlock the editor under the new stream nor overwrite its notice."""
    s = ct_session
    first = h.stream_draft(engine, s, "")
    [next(first) for _ in range(2)]
    second = h.stream_draft(engine, s, "")
    assert next(second).editor_locked
    assert not any(u.done or u.editor_locked is False for u in first)
    last = list(second)[-1]
    assert last.done and last.notice.startswith("Draft ready") and not s.streaming


def test_save_refused_while_streaming(engine, ct_session):
    s = ct_session
    gen = h.stream_draft(engine, s, "")
    next(gen), next(gen)
    out = h.save(engine, s, "text", "Dr Ada")
    assert not out.ok and "still being generated" in out.message
    gen.close()
    assert not s.streaming
    assert h.save(engine, s, "text", "Dr Ada").ok


def test_no_model_state(db_path):
    engine = Engine(None, Store(f"sqlite:///{db_path}"))
    assert "No model loaded" in h.model_info_markdown(engine)
    s = Session()
    assert h.load_files(engine, s, [str(CT_SAMPLE)]).ok
    assert "No model loaded" in h.analyze(engine, s).probability
    assert h.render_view(engine, s).shape[-1] == 3
    ups = list(h.stream_draft(engine, s, ""))
    assert len(ups) == 1 and "No model loaded" in ups[0].notice
    assert h.save(engine, s, "Written by hand.", "Dr Ada").ok
    assert "written by hand" in h.history_markdown(engine, s)


def test_model_info_line(engine):
    line = h.model_info_markdown(engine)
    assert "mrg" in line and "CT CHEST" in line and "not for clinical use" in line


def test_export_files_without_phi(engine, tmp_path):
    phi = tmp_path / "phi.dcm"
    markers = factories.write_phi_dicom(phi)
    s = Session()
    res = h.load_files(engine, s, [str(phi)])
    assert res.ok
    a = h.analyze(engine, s)
    stream_all(engine, s)
    assert h.save(engine, s, "Clear lungs.", "Dr Ada").ok
    paths, msg = h.export_files(engine, s, "Clear lungs.", "Dr Ada", tmp_path / "out")
    assert len(paths) == 4 and "ready" in msg
    # the SR is binary: its bytes are searched as text too, then read as DICOM
    texts = [open(p, encoding="utf-8", errors="replace").read() for p in paths]
    page = " ".join([res.message, a.probability, a.warning or "", h.history_markdown(engine, s),
                     *texts])
    leaked = [m for m in markers if m in page]
    assert not leaked
    fhir = json.loads(texts[2])
    assert fhir["resourceType"] == "DiagnosticReport" and fhir["status"] == "final"
    assert base64.b64decode(fhir["presentedForm"][0]["data"]).decode() == "Clear lungs."
    sr = pydicom.dcmread(paths[3])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.PreliminaryFlag == "FINAL" and sr.CompletionFlag == "COMPLETE"  # it was saved
    assert str(sr.PatientName) == "" and sr.PatientID == ""
    # the page keeps no UID: a standalone SR, not the source study's
    src = pydicom.dcmread(phi, stop_before_pixels=True)
    assert sr.StudyInstanceUID != src.StudyInstanceUID
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    finding = sr.ContentSequence[0]
    assert finding.ConceptNameCodeSequence[0].CodeMeaning == "Findings"
    assert finding.ContentSequence[0].TextValue == "Clear lungs."
    assert h.export_files(engine, s, " ", "x", tmp_path)[0] == []


def test_export_files_belong_to_one_session_study_and_text(engine, tmp_path):
    """Issue 17: export files are per session, remembered with their study and text (so the
    page can tell they are stale), and deleted when replaced or cleared."""
    out = tmp_path / "out"
    a, b = Session(), Session()
    for s in (a, b):
        assert h.load_files(engine, s, [str(CT_SAMPLE)]).ok
    pa, _ = h.export_files(engine, a, "Report A.", "", out)
    pb, _ = h.export_files(engine, b, "Report B.", "", out)
    assert len(pa) == len(pb) == 4 and not set(pa) & set(pb)  # same study, two tabs
    assert "Report A." in open(pa[0], encoding="utf-8").read()
    assert "Report B." in open(pb[0], encoding="utf-8").read()
    assert not h.exports_stale(a, "Report A.")
    assert h.exports_stale(a, "Report A. Edited.")

    assert h.load_files(engine, a, [str(SAMPLES_DIR / "ct_phantom_normal.dcm")]).ok
    assert h.exports_stale(a, "Report A.")  # another study on the page
    pa2, _ = h.export_files(engine, a, "Report A2.", "", out)
    assert all(os.path.isfile(p) for p in pa2)
    assert not any(os.path.exists(p) for p in set(pa) - set(pa2))  # the old study's are gone

    assert h.export_files(engine, a, "  ", "", out)[0] == []  # refused: the old files go too
    assert not any(os.path.exists(p) for p in pa2) and a.export_key is None
    h.clear_exports(b)
    assert not any(os.path.exists(p) for p in pb) and b.export_paths == []
    assert not h.exports_stale(b, "anything")  # nothing prepared: nothing stale
    assert not any(out.iterdir())
    h.clear_exports(b)  # twice is harmless


def test_export_refused_while_streaming(engine, ct_session, tmp_path):
    gen = h.stream_draft(engine, ct_session, "")
    next(gen), next(gen)
    paths, msg = h.export_files(engine, ct_session, "partial", "", tmp_path)
    assert paths == [] and "still being generated" in msg
    gen.close()
    assert len(h.export_files(engine, ct_session, "Done.", "", tmp_path)[0]) == 4


def test_fhir_is_final_only_for_the_text_that_was_saved(engine, ct_session, tmp_path):
    stream_all(engine, ct_session)
    assert h.save(engine, ct_session, "Clear lungs.", "Dr Ada").ok

    def status(text):
        paths, _ = h.export_files(engine, ct_session, text, "Dr Ada", tmp_path)
        return json.loads(open(paths[2], encoding="utf-8").read())["status"]

    assert status("Clear lungs.") == "final"
    assert status("Clear lungs. Edited after saving.") == "preliminary"


def test_stop_before_any_text_says_so(engine, ct_session):
    s = ct_session
    gen = h.stream_draft(engine, s, "")
    first = next(gen)  # the editor is locked, no piece yet
    assert first.editor_locked
    h.stop_message(s)
    last = list(gen)[-1]
    assert last.done and last.editor_locked is False
    assert "before the model wrote anything" in last.notice
    assert "0 words" not in last.notice


def test_load_message_gives_every_views_size(engine, tmp_path):
    from PIL import Image

    paths = []
    for i, (w, hgt) in enumerate([(64, 48), (80, 80), (64, 48)]):
        p = tmp_path / f"view{i}.png"
        Image.fromarray(np.full((hgt, w), 100 + i, np.uint8)).save(p)
        paths.append(str(p))
    res = h.load_files(engine, Session(), paths)
    assert res.ok and "3 views, 64×48, 80×80 px" in res.message, res.message
    res = h.load_files(engine, Session(), paths[:1])
    assert res.ok and res.message.endswith("1 view, 64×48 px."), res.message
    many = []
    for i, w in enumerate((40, 50, 60, 70)):
        p = tmp_path / f"m{i}.png"
        Image.fromarray(np.full((32, w), 90, np.uint8)).save(p)
        many.append(str(p))
    res = h.load_files(engine, Session(), many)
    assert "4 sizes from 40×32 to 70×32 px" in res.message, res.message


def test_too_large_messages_state_the_limit(tmp_path):
    from mrg_core.io import LoadLimits

    with Store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        small = Engine(None, store, LoadLimits(max_file_bytes=2048))
        res = h.load_files(small, Session(), [str(CT_SAMPLE)])
        assert not res.ok and "the limit is 2 KB a file" in res.message, res.message
        few = Engine(None, store, LoadLimits(max_pixels=1000))
        res = h.load_files(few, Session(), [str(CT_SAMPLE)])
        assert not res.ok and "at most 1,000 pixels" in res.message, res.message
