"""Finding chips in the browser (issue 21), with the shipped default model: the chips show the
findings and their probabilities; ticking one and redrafting writes it into the draft while
the radiologist's own line stays; Save keeps the chips and the flip."""
import json
import sqlite3

import pytest

from mrg_core.paths import DEFAULT_MODEL_DIR, SAMPLES_DIR
from tests.e2e.serving import serve_app
from tests.e2e.test_browser import WAIT_MS, upload, wait_text

pytestmark = pytest.mark.e2e

MINE = "Compare with the prior CT of May."


def test_tick_a_finding_redraft_keep_my_line_and_save_the_flip(browser, tmp_path, artifacts):
    from mrg_core.evaluation.clinical import extract_findings

    db = tmp_path / "r.db"
    demo, engine = serve_app(DEFAULT_MODEL_DIR, db)
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    try:
        page.goto(demo.local_url)
        upload(page, SAMPLES_DIR / "ct_phantom_covid.dcm")
        wait_text(page, "#probability", "Pneumonia probability")
        chips = page.locator("#finding-chips")
        chips.wait_for(timeout=WAIT_MS)
        glass = chips.locator("label").filter(has_text="ground glass shadow")
        glass.wait_for(timeout=WAIT_MS)
        assert "%" in glass.inner_text()  # the head's probability beside the finding
        assert chips.locator("label").count() == len(engine.model.finding_names)
        assert not glass.locator("input").is_checked()  # the model does not predict it here

        page.locator("#generate").click()
        wait_text(page, "#draft-notice", "Draft ready")
        editor = page.locator("#editor textarea")
        first = editor.input_value()
        assert "ground_glass" not in extract_findings(first)
        editor.fill(first + "\n" + MINE)  # the radiologist's own line

        glass.click()
        assert glass.locator("input").is_checked()
        page.locator("#redraft").click()
        wait_text(page, "#draft-notice", "with your own edits kept")
        text = editor.input_value()
        assert "ground_glass" in extract_findings(text), text  # the draft follows the chip
        assert text.rstrip().endswith("\n" + MINE)  # on its own line, as written
        page.screenshot(path=str(artifacts / "finding_chips.png"))

        page.locator("#reviewer input, #reviewer textarea").first.fill("dr-chips")
        page.locator("#save").click()
        wait_text(page, "#save-message", "Saved")
        wait_text(page, "#history", "Findings changed by the reviewer: ground_glass → present")
    finally:
        page.close()
        demo.close()
        engine.store.close()
    with sqlite3.connect(db) as con:
        findings, flips, final = con.execute(
            "SELECT findings, finding_flips, final_text FROM corrections").fetchone()
    state = json.loads(findings)
    assert state["ground_glass"] == 1 and json.loads(flips) == ["ground_glass"]
    assert set(state) == set(engine.model.finding_names)
    assert final.rstrip().endswith(MINE)
