"""No patient data anywhere, end to end: two PHI-laden DICOM files go through the page's
handlers (load → analyse → stream draft → save → history → export) and Store.export_pairs with
a real tiny model and a real SQLite file, every logger at DEBUG into a file, stdout/stderr
captured. Then every marker is searched in everything the app wrote or showed: zero hits.

Markers cover every value representation: text, code strings, UIDs, names (each part), dates,
times and date-times, the age (AS), decimal and integer strings, binary numbers (US, SS, UL,
SL, SV, UV, FL, FD) and binary blobs, in the basic-profile attributes, in sequences and in
private blocks. The text markers are searched as bytes everywhere; the readings of the others
(factories.phi_readings: '077Y', '47093', '1893-07-07', '07:17:33.424242', 'Given Family')
in all text: the Study's metadata, the page, logs, database rows and the export files.

The figures (markers searched, places searched, hits) go to tests/artifacts/phi_end_to_end.json.
"""
import json
import logging
import sqlite3
import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.dataset import Dataset

from mrg_core.engine import Engine, EngineSettings
from mrg_core.models import tiny_model
from tests import factories
from ui import handlers as h
from ui import models_panel as mp
from ui.state import Session

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PIXEL_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}  # anything else could carry text

# The second file's markers: same shapes and lengths as the factory's, different values.
SECOND = [("PHI-MARKER-", "PHI-SECOND-"), ("PHIMARK", "PHISCND"), ("PHIAE", "PHIAF"),
          (".9.7777.", ".9.8888."), ("1893", "1894"), ("1717.", "1818."), (".31337", ".42424")]
# Value representations that carry a marker in the two files (all but AT and the float/long
# binary arrays OD, OF, OL, OV, which hold no text or person data).
EVERY_VR = {"AE", "AS", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OW", "PN",
            "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UR", "US", "UT", "UV"}


def second_marker(text: str) -> str:
    for old, new in SECOND:
        text = text.replace(old, new)
    return text


def _rewrite(ds: Dataset) -> None:
    """Every marker value in the data set (sequences and private tags included) → SECOND."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _rewrite(item)
        elif isinstance(elem.value, bytes) and elem.tag != 0x7FE00010:
            elem.value = second_marker(elem.value.decode("latin-1")).encode("latin-1")
        elif isinstance(elem.value, str | pydicom.valuerep.PersonName | pydicom.uid.UID) or \
                type(elem.value).__name__ in ("DA", "TM", "DT", "DSfloat", "DSdecimal"):
            elem.value = second_marker(str(elem.value))


def write_second_phi_file(path: Path) -> list[str]:
    """The factory's PHI file with other marker values and another modality (DX: the model
    was trained on CT, so the out-of-domain warning is rendered and searched too)."""
    first = path.with_name("template.dcm")
    markers = factories.write_phi_dicom(first)
    ds = pydicom.dcmread(first)
    _rewrite(ds)
    _rewrite(ds.file_meta)
    ds.Modality = "DX"
    ds.save_as(path, enforce_file_format=True)
    first.unlink()
    return sorted({second_marker(m) for m in markers})


@pytest.fixture
def debug_log(tmp_path):
    """Every logger at DEBUG, into one file; levels and handlers restored afterwards."""
    path = tmp_path / "debug.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in
                                       list(logging.root.manager.loggerDict)]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    logging.getLogger().addHandler(handler)
    logging.captureWarnings(True)
    yield path
    logging.captureWarnings(False)
    logging.getLogger().removeHandler(handler)
    handler.close()
    for lg, level, disabled in saved:
        lg.setLevel(level)
        lg.disabled = disabled


def png_chunks(data: bytes) -> list[bytes]:
    assert data.startswith(PNG_SIGNATURE)
    pos, kinds = len(PNG_SIGNATURE), []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        kinds.append(kind)
        pos += 12 + length
    return kinds


def db_pngs(db: Path) -> list[bytes]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT png FROM study_views")]


def study_texts(study) -> list[str]:
    """Everything the Study tells about itself: repr, summary, each view's metadata."""
    return [repr(study), json.dumps(study.summary()),
            *(repr(v.meta) for v in study.views),
            *(json.dumps(v.meta.to_dict()) for v in study.views)]


def db_rows_text(db: Path) -> str:
    """Every non-binary value of every table, as text."""
    out = []
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                out += [str(v) for v in row if not isinstance(v, bytes)]
    return "\n".join(out)


def flow(engine: Engine, path: Path, final: str, out: Path
         ) -> tuple[list[str], list[str], list[str]]:
    """One file through every handler the page calls; returns (rendered strings, files, the
    loaded Study's own metadata)."""
    s = Session()
    res = h.load_files(engine, s, [str(path)])
    assert res.ok, res.message
    meta = study_texts(s.study)
    shown = []
    a = h.analyze(engine, s)
    shown += [res.message, a.probability, h.warning_html(a.warning)]
    for u in h.stream_draft(engine, s, ""):
        shown += [u.editor or "", u.latest or "", u.notice]
    assert s.draft
    out_save = h.save(engine, s, final, "Dr Ada")
    assert out_save.ok, out_save.message
    shown += [out_save.message, h.history_markdown(engine, s)]
    paths, msg = h.export_files(engine, s, final, "Dr Ada", out)
    assert len(paths) == 4  # txt, json, FHIR, DICOM SR
    shown.append(msg)
    return shown, paths, meta


def test_no_phi_anywhere(tmp_path, debug_log, capfd):
    torch.set_num_threads(1)
    first = tmp_path / "phi_ct.dcm"
    # A file name can hold PHI too: it may be shown back to its uploader, stored nowhere.
    name_marker = "PHI-FILENAME-Doe_John"
    second = tmp_path / f"{name_marker}.dcm"
    markers = factories.write_phi_dicom(first) + write_second_phi_file(second)
    assert len(set(markers)) == len(markers) > 100
    raw = first.read_bytes() + second.read_bytes()
    missing = [m for m in markers if m.encode() not in raw]
    assert not missing, f"positive control: markers not in the input files: {missing[:5]}"
    readings = sorted(set(factories.phi_readings(first)) | set(factories.phi_readings(second)))
    planted = {e.VR for f in (first, second)  # read from bytes: pydicom logs a path it opens
               for e in pydicom.dcmread(BytesIO(f.read_bytes())).iterall()}
    assert planted >= EVERY_VR, f"no marker of VR {sorted(EVERY_VR - planted)}"
    for must in ("077Y", "77 years", "47093", "-27183", "3141592653", "-1718281828", "31337.25",
                 "1893-07-07", "1894-07-07", "07:17:33.424242", "1893-07-07 07:17:33",
                 "PHIMARKGV137 PHI-MARKER-PatientName", "PHISCNDGV137 PHI-SECOND-PatientName"):
        assert must in readings, must
    # the search itself: a reading is found as a whole, not inside a longer number
    assert factories.phi_found(readings, "age 077Y, value=47093.") == ["077Y", "47093"]
    assert factories.phi_found(readings, "id 1470931 at 2026-11-30 07:17:33.5") == []

    model_dir = tmp_path / "model"
    tiny_model(method="prompt", family="gpt2", seed=0).save_pretrained(model_dir)
    db = tmp_path / "reports.db"
    engine = Engine.from_settings(EngineSettings(model_dir=model_dir,  # one model reads all
                                                 database_url=f"sqlite:///{db}", route=False))
    exports = tmp_path / "export"
    shown, files, meta = [h.model_info_markdown(engine)], [], []
    for path, final in ((first, "Clear lungs."), (second, "Right basal consolidation.")):
        more, paths, study_meta = flow(engine, path, final, exports)
        shown += more
        files += paths
        meta += study_meta
    # A PHI file that fails to decode: the error message and the error log are searched too.
    broken = tmp_path / "phi_broken.dcm"
    broken.write_bytes(first.read_bytes()[:-3000])
    bad = h.load_files(engine, Session(), [str(broken)])
    shown.append(bad.message)
    shown += [label for label, _ in mp.model_choices(engine, [model_dir])]
    n_pairs = engine.store.export_pairs(tmp_path / "pairs")
    assert n_pairs == 2
    files += [str(p) for p in (tmp_path / "pairs").rglob("*") if p.is_file()]
    pngs = db_pngs(db) + [Path(p).read_bytes() for p in files if p.endswith(".png")]
    engine.store.close()

    captured = capfd.readouterr()
    text_places = {
        "study metadata": "\n".join(meta),
        "rendered handler output": "\n".join(shown),
        "database rows": db_rows_text(db),
        "debug log": debug_log.read_text(encoding="utf-8"),
        "stdout+stderr": captured.out + captured.err,
        **{f"file {Path(p).relative_to(tmp_path)}":
           Path(p).read_text(encoding="utf-8", errors="replace")
           for p in files if not p.endswith(".png")},
    }
    reading_hits = {where: found for where, text in text_places.items()
                    if (found := factories.phi_found(readings, text))}
    places = {
        "database": b"".join(Path(f"{db}{x}").read_bytes() for x in ("", "-wal", "-shm")
                             if Path(f"{db}{x}").exists()),
        "debug log": debug_log.read_bytes(),
        "stdout+stderr": (captured.out + captured.err).encode(),
        "rendered handler output": "\n".join(shown).encode(),
        "study metadata": "\n".join(meta).encode(),
        **{f"file {Path(p).relative_to(tmp_path)}": Path(p).read_bytes() for p in files},
    }
    hits = {where: [m for m in markers if m.encode() in data] for where, data in places.items()}
    for where, data in places.items():
        if where != "rendered handler output" and name_marker.encode() in data:
            hits.setdefault(where, []).append(name_marker)
    hits = {where: found for where, found in hits.items() if found}

    assert len(pngs) >= 4  # two studies in the database + two exported images
    text_chunks = [c for data in pngs for c in png_chunks(data) if c not in PIXEL_CHUNKS]
    log_text = debug_log.read_text()
    assert "ui.handlers: study" in log_text and (  # it captured (the save line's wording
        "saved review #" in log_text or "saved correction #" in log_text)  # changed in ui/)
    assert "DEBUG sqlalchemy" in log_text or "DEBUG" in log_text
    assert not bad.ok and any("Out of domain" in x for x in shown)  # both paths exercised

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "phi_end_to_end.json").write_text(json.dumps({
        "markers_searched": len(markers) + 1, "places_searched": sorted(places),
        "readings_searched": len(readings), "text_places_searched": sorted(text_places),
        "vrs_planted": sorted(planted), "reading_hits_by_place": reading_hits,
        "bytes_searched": sum(len(d) for d in places.values()), "pngs_checked": len(pngs),
        "png_non_pixel_chunks": [c.decode() for c in text_chunks],
        "hits": sum(len(v) for v in hits.values()), "hits_by_place": hits}, indent=2))
    assert not hits, f"patient data leaked: {hits}"
    assert not reading_hits, f"patient data leaked (ages, numbers, dates): {reading_hits}"
    assert not text_chunks, f"PNG chunks beyond pixels: {text_chunks}"
