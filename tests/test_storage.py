"""Correction store behaviour on real SQLite files (no mocks)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst
from PIL import Image

from factories import write_phi_dicom
from mrg_core.io import load_study
from mrg_core.storage import MAX_TEXT_CHARS, InvalidCorrection, Store, StoreUnavailable
from storage_writer import make_draft, make_study


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "mrg.db"


@pytest.fixture
def store(db_path):
    with Store(f"sqlite:///{db_path}") as s:
        yield s


def table_counts(db_path: Path) -> dict[str, int]:
    con = sqlite3.connect(db_path)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("studies", "study_views", "drafts", "corrections")}
    finally:
        con.close()


def test_round_trip(store):
    study = make_study(7, n_views=3, shape=(64, 50))
    r = store.save_review(study, make_draft(), "Small left effusion.", reviewer="  Dr A ", label=1)
    assert r.study_id and r.draft_id and r.correction_id and r.created_at.tzinfo is not None
    (h,) = store.history(study.content_hash)
    assert (h.correction_id, h.reviewer, h.final_text, h.label) == (
        r.correction_id, "Dr A", "Small left effusion.", 1)
    assert (h.draft_text, h.model_version, h.probability) == (
        "No acute cardiopulmonary abnormality.", "0.1.0", 0.8)
    imgs = store.get_study_images(study.content_hash)
    assert len(imgs) == 3
    for got, view in zip(imgs, study.views):
        assert got.dtype == np.uint8 and np.array_equal(got, view.display)
    assert store.get_study_images("0" * 64) == [] and store.history("0" * 64) == []


def test_append_only(store, db_path):
    study = make_study(8)
    first = store.save_review(study, make_draft("d1"), "first report", "r1")
    before = store.history(study.content_hash)
    second = store.save_review(study, make_draft("d2"), "second report", "r2")
    hist = store.history(study.content_hash)
    assert [e.correction_id for e in hist] == [second.correction_id, first.correction_id]
    assert hist[1] == before[0]  # the earlier entry is untouched
    assert second.study_id == first.study_id  # study reused by content_hash
    assert table_counts(db_path) == {"studies": 1, "study_views": 2, "drafts": 2,
                                     "corrections": 2}


def test_draft_kept_without_correction_then_corrected(store, db_path):
    study = make_study(9)
    draft_id = store.save_draft(study, make_draft())
    assert store.history(study.content_hash) == []
    cid = store.save_correction(draft_id, "Corrected later.", "r")
    assert [e.correction_id for e in store.history(study.content_hash)] == [cid]
    assert table_counts(db_path)["drafts"] == 1
    with pytest.raises(InvalidCorrection, match="not in the database"):
        store.save_correction(draft_id + 1000, "text", "r")


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", None])
def test_empty_report_is_refused(store, db_path, text):
    with pytest.raises(InvalidCorrection, match="empty"):
        store.save_review(make_study(1), make_draft(), text, "r")
    assert store.stats()["corrections"] == 0


def test_other_invalid_input(store):
    with pytest.raises(InvalidCorrection, match="too long"):
        store.save_review(make_study(1), make_draft(), "x" * (MAX_TEXT_CHARS + 1), "r")
    with pytest.raises(InvalidCorrection, match="label"):
        store.save_review(make_study(1), make_draft(), "ok", "r", label=2)
    with pytest.raises(InvalidCorrection, match="probability"):
        store.save_review(make_study(1), make_draft(probability=float("nan")), "ok", "r")
    assert store.stats()["studies"] == 0
    e = InvalidCorrection("m")
    assert isinstance(e, ValueError) and e.message == "m"


@pytest.mark.parametrize("blank", ["", "   ", None, "\x00"])
def test_blank_reviewer_is_refused(store, db_path, blank):
    study = make_study(2)
    with pytest.raises(InvalidCorrection, match="reviewer's name"):
        store.save_review(study, make_draft(), "report", blank)
    draft_id = store.save_draft(study, make_draft())
    with pytest.raises(InvalidCorrection, match="reviewer's name"):
        store.save_correction(draft_id, "report", blank)
    assert store.history(study.content_hash) == []
    assert table_counts(db_path)["corrections"] == 0


def test_unchanged_draft_is_recorded_as_accepted_not_as_a_correction(store, db_path, tmp_path):
    study = make_study(3)
    draft = "No acute cardiopulmonary abnormality.\nHeart size normal."
    accepted = store.save_review(study, make_draft(draft), draft.replace("\n", "  \n") + " ",
                                 "Dr A")  # whitespace only: no word changed
    corrected = store.save_review(study, make_draft(draft), draft + " Small effusion.", "Dr A")
    written = store.save_review(study, make_draft(""), "Written by hand.", "Dr A")
    later = store.save_correction(store.save_draft(study, make_draft(draft)), draft, "Dr B")
    assert (accepted.kind, corrected.kind, written.kind) == ("accepted", "corrected", "written")
    kinds = {e.correction_id: e.kind for e in store.history(study.content_hash)}
    assert kinds == {accepted.correction_id: "accepted", corrected.correction_id: "corrected",
                     written.correction_id: "written", later: "accepted"}
    with sqlite3.connect(db_path) as con:  # recorded in the row, not only derived on reading
        assert dict(con.execute("SELECT id, kind FROM corrections")) == kinds
    assert store.stats()["accepted"] == 2
    assert {e.correction_id: e.kind for e in store.iter_corrections()} == kinds
    store.export_pairs(tmp_path / "pairs")
    rows = [json.loads(x) for x in (tmp_path / "pairs" / "corrections.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert {r["id"]: r["kind"] for r in rows} == kinds


def test_a_database_file_from_before_the_kind_column_still_opens(db_path):
    """Files written before `corrections.kind` existed: opened, the column added in place,
    old rows read with a kind derived from their texts, new rows record theirs."""
    study = make_study(4)
    with Store(f"sqlite:///{db_path}") as s:
        old_same = s.save_review(study, make_draft("Clear lungs."), "Clear lungs.", "r")
        old_edit = s.save_review(study, make_draft("Clear lungs."), "Left effusion.", "r")
    with sqlite3.connect(db_path) as con:  # the schema as the previous release made it
        con.execute("ALTER TABLE corrections DROP COLUMN kind")
        assert "kind" not in {r[1] for r in con.execute("PRAGMA table_info(corrections)")}
    with Store(f"sqlite:///{db_path}") as s:
        hist = {e.correction_id: e.kind for e in s.history(study.content_hash)}
        assert hist == {old_same.correction_id: "accepted", old_edit.correction_id: "corrected"}
        new = s.save_review(study, make_draft("Clear lungs."), "Clear lungs.", "r")
        assert new.kind == "accepted"
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT kind FROM corrections ORDER BY id").fetchall() == [
            (None,), (None,), ("accepted",)]  # append-only: old rows are not rewritten


def test_a_database_file_from_before_the_finding_chips_still_opens(db_path, tmp_path):
    """Files written before `corrections.findings` / `finding_flips`: opened, the columns added
    in place (old rows NULL), and new rows keep the reader's chips, in history, fine-tuning
    and the export."""
    study = make_study(4)
    with Store(f"sqlite:///{db_path}") as s:
        old = s.save_review(study, make_draft("Clear lungs."), "Left effusion.", "r")
    with sqlite3.connect(db_path) as con:  # the schema as the previous release made it
        con.execute("ALTER TABLE corrections DROP COLUMN findings")
        con.execute("ALTER TABLE corrections DROP COLUMN finding_flips")
    with Store(f"sqlite:///{db_path}") as s:
        chips = {"ground_glass": 1, "cavity": 0}
        new = s.save_review(study, make_draft("Clear lungs."), "Ground glass.", "r",
                            findings=chips, finding_flips=["ground_glass"])
        hist = {e.correction_id: (e.findings, e.finding_flips)
                for e in s.history(study.content_hash)}
        assert hist == {old.correction_id: (None, []),
                        new.correction_id: (chips, ["ground_glass"])}
        assert [e.findings for e in s.iter_corrections()] == [None, chips]
        s.export_pairs(tmp_path / "pairs")
        with pytest.raises(InvalidCorrection):  # a flip must be one of the chips
            s.save_review(study, make_draft(), "x", "r", findings=chips, finding_flips=["x"])
        with pytest.raises(InvalidCorrection):
            s.save_review(study, make_draft(), "x", "r", findings={"cavity": 2})
    with sqlite3.connect(db_path) as con:
        rows = con.execute("SELECT findings, finding_flips FROM corrections ORDER BY id").fetchall()
    assert rows[0] == (None, None) and json.loads(rows[1][0]) == chips
    from mrg_core.data.corrections import load_corrections

    meta = [e.meta for e in load_corrections(tmp_path / "pairs")]
    assert [m["findings"] for m in meta] == [None, chips]
    assert meta[1]["finding_flips"] == ["ground_glass"]


def test_failed_transaction_leaves_nothing(store, db_path):
    """A failure at the last INSERT (a real SQLite trigger refuses it) rolls back the study, its
    views and the draft written earlier in the same transaction."""
    store.save_review(make_study(3), make_draft(), "kept", "r")
    con = sqlite3.connect(db_path)
    con.execute("CREATE TRIGGER refuse BEFORE INSERT ON corrections WHEN NEW.final_text = 'BOOM' "
                "BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END")
    con.commit()
    con.close()
    before = table_counts(db_path)
    with pytest.raises(StoreUnavailable) as ei:
        store.save_review(make_study(4), make_draft(), "BOOM", "r")
    assert "not lost" in ei.value.message and "refused by test trigger" in ei.value.detail
    assert table_counts(db_path) == before


def test_locked_database_then_retry(tmp_path):
    db = tmp_path / "locked.db"
    store = Store(f"sqlite:///{db}", busy_timeout_s=0.2)
    study = make_study(5)
    earlier = store.save_review(study, make_draft(), "earlier report", "r")

    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        # refused, not hanging; how fast: bench/timing_limits.py (locked_store_s)
        with pytest.raises(StoreUnavailable) as ei:
            store.save_review(study, make_draft(), "new report", "r")
        assert "busy" in ei.value.message and "not lost" in ei.value.message
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    retry = store.save_review(study, make_draft(), "new report", "r")
    assert [e.correction_id for e in store.history(study.content_hash)] == [
        retry.correction_id, earlier.correction_id]
    assert table_counts(db)["corrections"] == 2  # the refused attempt left no row
    store.close()


def test_read_only_database(tmp_path):
    db = tmp_path / "ro.db"
    with Store(f"sqlite:///{db}") as s:
        s.save_review(make_study(6), make_draft(), "report", "r")
    # A read-only open (the root user ignores chmod, so use SQLite's own read-only mode).
    ro = Store(f"sqlite:///file:{db}?mode=ro&uri=true")
    assert ro.stats()["corrections"] == 1
    with pytest.raises(StoreUnavailable, match="not lost"):
        ro.save_review(make_study(7), make_draft(), "report", "r")
    ro.close()
    assert table_counts(db)["corrections"] == 1


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://x/y"])
def test_bad_url(url):
    with pytest.raises(StoreUnavailable, match="not lost"):
        Store(url)


def test_missing_folder_is_unavailable(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    with pytest.raises(StoreUnavailable):
        s.save_review(make_study(1), make_draft(), "report", "r")


def test_iter_corrections_labels(store):
    a, b = make_study(10), make_study(11, n_views=1)
    store.save_review(a, make_draft(probability=0.9, threshold=0.5), "abnormal", "r")
    store.save_review(a, make_draft(probability=0.9, threshold=0.5), "actually normal", "r",
                      label=0)
    store.save_review(b, make_draft(probability=0.1, threshold=0.5), "normal", "r")
    store.save_review(b, make_draft(probability=None, threshold=None), "unknown", "r")
    ex = store.iter_corrections()
    assert [e.final_text for e in ex] == ["abnormal", "actually normal", "normal", "unknown"]
    assert [e.label for e in ex] == [1, 0, 0, None]
    assert np.array_equal(ex[0].images[1], a.views[1].display) and len(ex[2].images) == 1
    assert ex[0].content_hash == a.content_hash and ex[0].draft_text


def test_export_pairs(store, tmp_path):
    a, b = make_study(12), make_study(13, n_views=1)
    store.save_review(a, make_draft(), "first\nline two — ünïcode", "Dr Secret Name", label=1)
    store.save_review(a, make_draft(), "second", "Dr Secret Name")
    store.save_review(b, make_draft(probability=0.2), "third", "Dr Secret Name")
    out = tmp_path / "export"
    assert store.export_pairs(out) == 3
    lines = (out / "corrections.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["report"] for r in rows] == ["first\nline two — ünïcode", "second", "third"]
    assert [r["label"] for r in rows] == [1, 1, 0]
    for r in rows:
        assert set(r) == {"id", "image_path", "report", "label", "kind", "draft",
                          "probability", "model_version", "created_at", "findings",
                          "finding_flips"}
        for rel in r["image_path"]:
            with Image.open(out / rel) as im:
                im.load()
    assert rows[0]["image_path"] == [f"images/{a.content_hash}_{i}.png" for i in range(2)]
    got = np.asarray(Image.open(out / rows[2]["image_path"][0]))
    assert np.array_equal(got, b.views[0].display)
    assert len(list((out / "images").iterdir())) == 3  # images once per study
    assert "Secret" not in (out / "corrections.jsonl").read_text(encoding="utf-8")
    assert store.export_pairs(tmp_path / "empty_export_is_fine_too") == 3


def test_stats(store):
    store.save_review(make_study(14), make_draft(), "r1", "a", label=1)
    store.save_draft(make_study(15), make_draft())
    st = store.stats()
    assert {k: st[k] for k in ("studies", "views", "drafts", "corrections", "labelled",
                               "reviewers")} == {"studies": 2, "views": 4, "drafts": 2,
                                                 "corrections": 1, "labelled": 1,
                                                 "reviewers": 1}


def test_any_report_text_round_trips(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    study = make_study(16, n_views=1)

    @settings(max_examples=40, deadline=None)
    @given(text=hst.text(min_size=1, max_size=400).filter(lambda t: t.strip()))
    def check(text):
        store.save_review(study, make_draft(), text, "r")
        assert store.history(study.content_hash)[0].final_text == text.replace("\x00", "")

    check()
    store.close()


# ------------------------------------------------------------------------------------- PHI

def test_metadata_stored_is_view_meta_only(store, db_path):
    """Whatever a Study carries, the store keeps pixels + ViewMeta fields, nothing else."""
    study = make_study(17)
    store.save_review(study, make_draft(), "report", "r")
    con = sqlite3.connect(db_path)
    metas = [json.loads(m) for (m,) in con.execute("SELECT meta FROM study_views")]
    con.close()
    assert metas == [v.meta.to_dict() for v in study.views]


def _phi_dicom(path: Path, markers: dict[str, str]) -> Path:
    """A small CT slice whose identifying attributes all carry distinctive markers."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
    for k, v in markers.items():
        setattr(ds, k, v)
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.random.default_rng(0).integers(0, 2000, (32, 32), dtype=np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _assert_no_marker(markers, db_path, export):
    files = [p for p in db_path.parent.glob(db_path.name + "*")]  # db, -wal, -shm
    assert any(p.name.endswith("-wal") for p in files)  # the WAL is scanned too
    files += [p for p in export.rglob("*") if p.is_file()]
    for p in files:
        raw = p.read_bytes()
        for m in markers:
            for enc in {m.encode("utf-8"), m.encode("utf-16-le")}:
                assert enc not in raw, f"PHI marker {m!r} found in {p.name}"


def _save_and_export(study, db_path, tmp_path):
    export = tmp_path / "export"
    store = Store(f"sqlite:///{db_path}")
    store.save_review(study, make_draft(), "Report text.", "r")
    store.export_pairs(export)
    # No close(): the WAL must still hold the pages, so its raw bytes are checked too.
    return store, export


def test_no_phi_from_a_loaded_dicom(tmp_path, db_path):
    markers = {"PatientName": "PHIMARK^NAME", "PatientID": "PHIMARKID123",
               "InstitutionName": "PHIMARK HOSPITAL", "ReferringPhysicianName": "PHIMARK^DOC",
               "StudyDate": "19990909", "AccessionNumber": "PHIMARKACC"}
    study = load_study(_phi_dicom(tmp_path / "phi.dcm", markers))
    store, export = _save_and_export(study, db_path, tmp_path)
    _assert_no_marker(list(markers.values()) + ["PHIMARK"], db_path, export)
    store.close()


def test_no_phi_from_factories_dicom(tmp_path, db_path):
    path = tmp_path / "factory_phi.dcm"
    markers = write_phi_dicom(path)  # returns the marker strings it planted
    assert markers
    study = load_study(path)
    store, export = _save_and_export(study, db_path, tmp_path)
    _assert_no_marker([str(m) for m in markers if len(str(m)) >= 6], db_path, export)
    store.close()
