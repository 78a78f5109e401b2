"""The whole radiologist flow in a real headless Chromium: upload → look → draft → edit → save."""
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlparse

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


def test_upload_generate_edit_save(browser, served_app, artifacts, tmp_path):
    t0 = time.perf_counter()
    url, db = served_app
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
    page.locator("#reviewer textarea, #reviewer input").first.fill("Dr E2E")
    page.locator("#save").click()
    wait_text(page, "#save-message", "Saved as correction #")
    wait_text(page, "#history", "Dr E2E")
    assert "+Ground-glass opacities" in page.locator("#history").inner_text()
    assert editor.input_value() == final  # saving never changes the editor
    page.screenshot(path=str(artifacts / "after_save.png"), full_page=True)

    # 5. The row is in the database file.
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT c.final_text, c.reviewer, d.text, d.model_name FROM "
                           "corrections c JOIN drafts d ON d.id = c.draft_id").fetchall()
    assert rows == [(final, "Dr E2E", draft, "mrg-studio-tiny")]
    assert not outside, f"the page made outside requests: {outside[:5]}"
    page.close()
    assert time.perf_counter() - t0 < 90
