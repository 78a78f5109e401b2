"""The radiologist flow in a real headless Chromium: upload → look → draft → edit → save."""
import base64
import json
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlparse

import pydicom
import pytest

from mrg_core.paths import SAMPLES_DIR, data_dir

pytestmark = pytest.mark.e2e

CT_SAMPLE = SAMPLES_DIR / "ct_phantom_covid.dcm"
WAIT_MS = 30_000


def cr_file(tmp_path) -> Path:
    shared = data_dir() / "dicom" / "RG1_UNCR.dcm"
    if shared.is_file():
        return shared
    from tests import factories

    path = tmp_path / "cr_chest.dcm"
    factories.write_mono1(path, rows=256, cols=200)
    return path


def upload(page, path: Path):
    page.locator("#upload input[type=file]").set_input_files(str(path))


def wait_text(page, selector: str, text: str):
    page.locator(selector).filter(has_text=text).first.wait_for(timeout=WAIT_MS)


def download_fhir(page) -> dict:
    """Export → the FHIR R4 file the page offers, downloaded and parsed."""
    page.get_by_text("Export", exact=True).click()
    page.locator("#export").click()
    fhir_btn = page.get_by_role("button", name="FHIR R4")
    fhir_btn.wait_for(timeout=WAIT_MS)
    with page.expect_download(timeout=WAIT_MS) as dl:
        fhir_btn.click()
    return json.loads(Path(dl.value.path()).read_text(encoding="utf-8"))


def test_upload_generate_edit_save(browser, served_app, artifacts, tmp_path):
    url, db, _ = served_app
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    outside = []  # the page must not reach anything but the app itself
    page.on("request", lambda r: outside.append(r.url)
            if urlparse(r.url).hostname not in ("127.0.0.1", "localhost", None)
            and not r.url.startswith(("data:", "blob:")) else None)
    page.goto(url)
    page.locator("#generate").wait_for(timeout=WAIT_MS)

    # 1. A chest radiograph: the model was trained on CT → a warning above the probability.
    upload(page, cr_file(tmp_path))
    wait_text(page, "#load-message", "Loaded")
    wait_text(page, "#domain-warning", "Out of domain")
    wait_text(page, "#probability", "Pneumonia probability")
    warn_y = page.locator("#domain-warning").bounding_box()["y"]
    assert warn_y < page.locator("#probability").bounding_box()["y"]
    page.locator("#viewer img").first.wait_for(timeout=WAIT_MS)
    page.screenshot(path=str(artifacts / "out_of_domain.png"))

    # 2. The CT sample (in domain): probability, overlay image, no warning.
    page.locator("#upload button[aria-label='Clear']").first.click()
    upload(page, CT_SAMPLE)
    wait_text(page, "#load-message", "CT CHEST, 1 view")
    page.locator("#domain-warning").wait_for(state="hidden", timeout=WAIT_MS)
    wait_text(page, "#probability", "threshold 0.50")
    assert page.locator("#viewer img").first.get_attribute("src")
    assert "Pneumonia probability" in page.locator("#probability").inner_text()

    # 3. Generate: the draft streams into the editor.
    page.locator("#generate").click()
    wait_text(page, "#draft-notice", "Draft ready")
    editor = page.locator("#editor textarea")
    draft = editor.input_value()
    assert len(draft.split()) > 5

    # 4. Edit, sign and save.
    final = "Ground-glass opacities in both lower lobes.\n" + draft
    editor.fill(final)
    page.locator("#save").click()  # no reviewer yet: refused, nothing stored
    wait_text(page, "#save-message", "Enter the reviewer's name")
    page.locator("#reviewer textarea, #reviewer input").first.fill("Dr E2E")
    page.locator("#save").click()
    wait_text(page, "#save-message", "Saved as correction #")
    wait_text(page, "#history", "Dr E2E")
    history = page.locator("#history").inner_text()  # word-level diff: the added line only
    assert "{+Ground-glass opacities in both lower lobes.+}" in history
    assert "[-" not in history and "corrected" in history
    assert editor.input_value() == final  # saving never changes the editor
    page.screenshot(path=str(artifacts / "after_save.png"), full_page=True)

    # 5. Export: the FHIR file downloads and carries the saved text.
    doc = download_fhir(page)
    assert doc["resourceType"] == "DiagnosticReport" and doc["status"] == "final"
    assert base64.b64decode(doc["presentedForm"][0]["data"]).decode("utf-8") == final
    # ... and so does the DICOM SR (issue 21), read back with pydicom
    with page.expect_download(timeout=WAIT_MS) as dl:
        page.get_by_role("button", name="DICOM SR").click()
    sr = pydicom.dcmread(dl.value.path())
    assert sr.Modality == "SR" and sr.PreliminaryFlag == "FINAL"
    texts = [c.TextValue for item in sr.ContentSequence if "ContentSequence" in item
             for c in item.ContentSequence]
    assert "\n".join(texts) == final.strip()

    # 6. The row is in the database file.
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT c.final_text, c.reviewer, d.text, d.model_name FROM "
                           "corrections c JOIN drafts d ON d.id = c.draft_id").fetchall()
    assert rows == [(final, "Dr E2E", draft, "mrg-studio-tiny")]
    assert not outside, f"the page made outside requests: {outside[:5]}"
    page.close()


def test_streaming_never_overwrites_the_users_text(browser, served_app, monkeypatch):
    """Slowed-down streams: the editor is read-only while a draft streams into it, and a
    Regenerate after the user has typed goes to the Latest draft box, not over their text."""
    url, _, engine = served_app
    real = engine.stream_report

    def slow(study, settings=None):
        for piece in real(study, settings):
            time.sleep(0.03)
            yield piece

    monkeypatch.setattr(engine, "stream_report", slow)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.locator("#sample input").click()
    page.get_by_role("option", name="ct_phantom_covid.dcm").click()
    page.locator("#load-sample").click()
    wait_text(page, "#load-message", "ct_phantom_covid.dcm")
    wait_text(page, "#probability", "Pneumonia probability")

    editor = page.locator("#editor textarea")
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#editor textarea').value.length > 20",
                           timeout=WAIT_MS)
    assert not editor.is_editable()  # locked while streaming: no keystroke can be lost
    wait_text(page, "#draft-notice", "Draft ready")
    page.wait_for_function("() => !document.querySelector('#editor textarea').disabled",
                           timeout=WAIT_MS)

    editor.click()
    page.keyboard.press("Control+End")
    page.keyboard.type(" MY OWN WORDS", delay=10)
    mine = editor.input_value()
    assert mine.endswith(" MY OWN WORDS")
    page.locator("#regenerate").click()
    wait_text(page, "#draft-notice", "your text was kept")
    # While the new draft streams, keep typing: nothing may be lost.
    editor.click()
    page.keyboard.press("Control+End")
    page.keyboard.type(" AND MORE", delay=10)
    wait_text(page, "#draft-notice", "Draft ready in Latest draft")
    assert editor.input_value() == mine + " AND MORE"
    latest = page.locator("#latest-draft textarea").input_value()
    assert len(latest.split()) > 5
    page.get_by_role("button", name="Replace editor with latest draft").click()
    page.wait_for_function("(t) => document.querySelector('#editor textarea').value === t",
                           arg=latest, timeout=WAIT_MS)

    # Stop mid-stream: the editor unlocks with the partial draft, and the model is free again.
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#editor textarea').disabled",
                           timeout=WAIT_MS)
    page.locator("#stop").click()
    wait_text(page, "#draft-notice", "Draft stopped")
    page.wait_for_function("() => !document.querySelector('#editor textarea').disabled",
                           timeout=WAIT_MS)
    partial = editor.input_value()
    assert partial and "Draft stopped" in page.locator("#draft-notice").inner_text()
    page.locator("#generate").click()
    wait_text(page, "#draft-notice", "Draft ready")
    # A stop can land before the page received the last streamed piece; then the editor no
    # longer equals the model's text and counts as the user's: it is kept and the new draft
    # goes to Latest draft. Either way nothing in the editor is silently replaced.
    if "in the editor" in page.locator("#draft-notice").inner_text():
        assert len(editor.input_value()) > len(partial)
    else:
        assert editor.input_value() == partial
    page.close()
