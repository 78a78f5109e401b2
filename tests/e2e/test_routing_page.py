"""The shipped app with both shipped models (issue 15): a chest radiograph goes to the CXR model,
a CT slice to the CT model, and the page says which read it, what it looks like and what the
probability means; a picture that is neither is refused."""
import pytest

from conftest import require
from mrg_core.paths import DEFAULT_CXR_MODEL_DIR, DEFAULT_MODEL_DIR, SAMPLES_DIR, SERVING_PRECISION
from tests.e2e.serving import serve_app
from tests.e2e.test_browser import WAIT_MS, upload, wait_text

pytestmark = pytest.mark.e2e


def test_page_routes_radiographs_and_ct_to_their_models(browser, tmp_path, artifacts):
    require((DEFAULT_CXR_MODEL_DIR / "config.json").is_file(), "no shipped CXR model")
    demo, engine = serve_app(DEFAULT_MODEL_DIR, tmp_path / "r.db",
                             extra_model_dirs=[DEFAULT_CXR_MODEL_DIR], precision=SERVING_PRECISION)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(demo.local_url)
        wait_text(page, "#model-info", "a chest radiograph → mrg-studio-cxr-pneumonia")
        upload(page, SAMPLES_DIR / "cxr_child_pneumonia.jpeg")
        wait_text(page, "#probability", "Read as a chest radiograph (from the pixels")
        text = page.locator("#probability").inner_text()
        assert "mrg-studio-cxr-pneumonia" in text and "children aged 1-5" in text
        assert "pneumonia vs normal on a chest radiograph" in text
        assert "not learned from paired images" in text
        page.locator("#domain-warning").wait_for(state="hidden", timeout=WAIT_MS)
        page.locator("#generate").click()
        wait_text(page, "#draft-notice", "Draft ready")
        assert page.locator("#editor textarea").input_value().startswith("Findings:")
        page.screenshot(path=str(artifacts / "routed_radiograph.png"))

        page.locator("#upload button[aria-label='Clear']").first.click()
        upload(page, SAMPLES_DIR / "ct_phantom_covid.dcm")
        wait_text(page, "#probability", "Read as a CT slice (DICOM tags) → mrg-studio-covctr")
        assert "COVID-19 pneumonia vs other findings" in page.locator("#probability").inner_text()

        from tests import factories

        mr = tmp_path / "mr.dcm"  # neither a CT slice nor a chest radiograph: refused
        factories.write_mono2(mr, (factories.ct_hu_pattern(64, 64) % 4096).astype("uint16"), 12,
                              modality="MR", BodyPartExamined="CHEST")
        page.locator("#upload button[aria-label='Clear']").first.click()
        upload(page, mr)
        wait_text(page, "#domain-warning", "No model here reads this study")
        wait_text(page, "#probability", "No model reads this study")
    finally:
        page.close()
        demo.close()
        engine.store.close()
