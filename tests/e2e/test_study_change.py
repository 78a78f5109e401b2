"""Issue 17: prepared export files and save notices never outlive their study, draft or model.

A report must not leave under the wrong study: after loading another study (or failing to),
generating a new draft or switching the model, the Text/JSON/FHIR downloads are gone."""
import pytest
from playwright.sync_api import expect

from tests.e2e.serving import serve_app
from tests.e2e.test_browser import WAIT_MS, upload, wait_text

pytestmark = pytest.mark.e2e

DOWNLOADS = ("#download-txt", "#download-json", "#download-fhir", "#download-sr")


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """As conftest's, plus the model's folder listed in the Model (admin) panel."""
    from mrg_core.models import tiny_model

    tmp = tmp_path_factory.mktemp("e2e_study_change")
    tiny_model(method="prompt", family="gpt2", seed=0).save_pretrained(tmp / "model")
    demo, engine = serve_app(tmp / "model", tmp / "r.db", model_roots=[tmp / "model"],
                             admin_open=True)  # no sign-in
    try:
        yield demo.local_url, engine
    finally:
        demo.close()
        engine.store.close()


def load_sample(page, name: str):
    page.locator("#sample input").click()
    page.get_by_role("option", name=name).click()
    page.locator("#load-sample").click()
    wait_text(page, "#load-message", name)
    wait_text(page, "#probability", "Pneumonia probability")


def save_and_export(page, text: str):
    """Type a report, save it and prepare the export files: every notice is on screen."""
    page.locator("#editor textarea").fill(text)
    page.locator("#reviewer textarea, #reviewer input").first.fill("Dr E2E")
    page.locator("#save").click()
    wait_text(page, "#save-message", "Saved as correction #")
    if not page.locator("#export").is_visible():
        page.get_by_text("Export", exact=True).click()  # the accordion
    page.locator("#export").click()
    wait_text(page, "#export-message", "Export files ready")
    for sel in DOWNLOADS:
        expect(page.locator(sel)).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_role("button", name="FHIR R4")).to_be_visible()


def assert_no_exports_or_save_notice(page):
    for sel in DOWNLOADS:
        expect(page.locator(sel)).to_be_hidden(timeout=5_000)
    expect(page.get_by_role("button", name="FHIR R4")).to_be_hidden()
    expect(page.locator("#export-message")).not_to_contain_text("ready", timeout=5_000)
    expect(page.locator("#save-message")).to_have_text("", timeout=5_000)


@pytest.fixture
def page(browser, served_app):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(served_app[0])
    page.locator("#generate").wait_for(timeout=WAIT_MS)
    yield page
    page.close()


def test_loading_another_study_clears_its_exports(page):
    load_sample(page, "ct_phantom_covid.dcm")
    save_and_export(page, "Study A: ground-glass opacities in the right lower lobe.")

    load_sample(page, "ct_phantom_normal.dcm")
    assert_no_exports_or_save_notice(page)
    assert page.locator("#editor textarea").input_value() == ""


def test_a_failed_load_clears_exports_but_keeps_the_text(page, tmp_path):
    load_sample(page, "ct_phantom_covid.dcm")
    text = "Study A: clear lungs, typed by hand."
    save_and_export(page, text)

    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00garbage, not a DICOM file\xff" * 20)
    upload(page, bad)
    wait_text(page, "#load-message", "previous study is still shown")
    assert_no_exports_or_save_notice(page)
    assert page.locator("#editor textarea").input_value() == text  # the user's typing stays


def test_generate_and_model_switch_clear_save_and_export_notices(page, served_app):
    load_sample(page, "ct_phantom_covid.dcm")
    page.locator("#generate").click()
    wait_text(page, "#draft-notice", "Draft ready")
    save_and_export(page, page.locator("#editor textarea").input_value() + " Edited.")

    page.locator("#generate").click()  # the editor holds the model's text: a new draft
    assert_no_exports_or_save_notice(page)
    page.wait_for_function("() => !document.querySelector('#editor textarea').disabled",
                           timeout=WAIT_MS)
    wait_text(page, "#draft-notice", "Draft ready")

    # Editing the report after preparing the files makes them stale too.
    save_and_export(page, "Reviewed report.")
    page.locator("#editor textarea").press("End")
    page.locator("#editor textarea").press_sequentially(" Addendum.")
    for sel in DOWNLOADS:
        expect(page.locator(sel)).to_be_hidden(timeout=5_000)
    wait_text(page, "#export-message", "prepare the export files again")

    # A model switch: the draft and the export files were made with another model.
    text = page.locator("#editor textarea").input_value()
    save_and_export(page, text)
    page.get_by_text("Model (admin)", exact=True).click()
    page.locator("#use-model").click()
    wait_text(page, "#model-message", "Now using")
    assert_no_exports_or_save_notice(page)
    assert page.locator("#editor textarea").input_value() == text
