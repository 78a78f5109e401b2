"""Browser-test fixtures: a headless system Chromium and the app served in-process."""
import os
import shutil
import socket
from pathlib import Path

import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """(url, sqlite path, engine) of the real page, with a tiny model loaded from a folder."""
    from mrg_core.engine import Engine, EngineSettings
    from mrg_core.models import tiny_model
    from ui import build_app, launch_kwargs

    tmp = tmp_path_factory.mktemp("e2e")
    tiny_model(method="prompt", family="gpt2", seed=0).save_pretrained(tmp / "model")
    db = tmp / "reports.db"
    engine = Engine.from_settings(EngineSettings(model_dir=tmp / "model",
                                                 database_url=f"sqlite:///{db}"))
    assert engine.model is not None
    demo = build_app(engine)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1",
                        server_port=_free_port(), quiet=True, **launch_kwargs(engine))
    try:
        yield demo.local_url, db, engine
    finally:
        demo.close()
        engine.store.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
