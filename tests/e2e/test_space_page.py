"""On a Hugging Face Space whose corrections would be lost on restart, the page says so
(issue 17): SPACE_ID set, the SQLite store outside /data."""
import pytest

from tests.e2e.serving import serve_app
from tests.e2e.test_browser import WAIT_MS, wait_text

pytestmark = pytest.mark.e2e


def test_space_page_warns_that_saved_reports_are_ephemeral(browser, tmp_path, monkeypatch):
    from mrg_core.models import tiny_model

    tiny_model(method="prompt", family="gpt2", seed=0).save_pretrained(tmp_path / "model")
    monkeypatch.setenv("SPACE_ID", "mrg/studio")
    demo, engine = serve_app(tmp_path / "model", tmp_path / "r.db")  # not under /data
    page = browser.new_page()
    try:
        page.goto(demo.local_url)
        wait_text(page, "#model-info", "lost when it restarts")
        assert "/data" in page.locator("#model-info").inner_text(timeout=WAIT_MS)
    finally:
        page.close()
        demo.close()
        engine.store.close()
    monkeypatch.delenv("SPACE_ID")  # the same app off a Space: no warning
    demo, engine = serve_app(tmp_path / "model", tmp_path / "r2.db")
    page = browser.new_page()
    try:
        page.goto(demo.local_url)
        wait_text(page, "#model-info", "mrg-studio-tiny")
        assert "lost when it restarts" not in page.locator("#model-info").inner_text()
    finally:
        page.close()
        demo.close()
        engine.store.close()
