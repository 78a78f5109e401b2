"""Browser-test fixtures: a headless system Chromium and the app served in-process."""
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.serving import serve_app

from conftest import require

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="session")
def browser():
    require(os.path.exists(CHROMIUM) or shutil.which("chromium"),
            f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require(sync_playwright is not None, "playwright (python) is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """(url, sqlite path, engine) of the real page, with a tiny model loaded from a folder."""
    from mrg_core.models import tiny_model

    tmp = tmp_path_factory.mktemp("e2e")
    tiny_model(method="prompt", family="gpt2", seed=0).save_pretrained(tmp / "model")
    db = tmp / "reports.db"
    demo, engine = serve_app(tmp / "model", db)
    assert engine.model is not None
    try:
        yield demo.local_url, db, engine
    finally:
        demo.close()
        engine.store.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
