"""Issue 19, PHI at rest, against a real server on 127.0.0.1 (ui/file_access.py): another
signed-in user's file URL answers 403 (as a file that does not exist), and so do an event that
names another user's file and a request into another user's session; uploads over the per-user
or the total cap are refused (413 / 507) with a reason; the page's images and export files are
deleted when the page closes, files older than the TTL on a schedule, the rest at stop.

Two signed-in users come from a real auth file written by `python -m mrg_core.auth add-user`.
Plain httpx plays the attacker; Chromium only where a page must show images and close."""
import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urljoin

import httpx
import pytest

from mrg_core.auth import load_auth
from tests.factories import free_port as _free_port
from tests.e2e.test_browser import WAIT_MS, wait_text
from ui.file_access import MiB, FilePolicy

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {"ada": "ada-password", "bob": "bob-password", "cy": "cy-password"}
TIMEOUT = httpx.Timeout(30.0)
MB = bytes(MiB)  # one upload of 1 MiB


# ---------------------------------------------------------------------------- serving

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """This module's own Gradio upload folder (so the total cap counts only its files)."""
    path = tmp_path_factory.mktemp("file_access") / "uploads"
    path.mkdir()
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = before


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("file_access_auth") / "users.txt"
    for user, password in PASSWORDS.items():  # the operator's command, password on stdin
        out = subprocess.run([sys.executable, "-m", "mrg_core.auth", "add-user", str(path), user,
                              "--iterations", "1000"], input=password + "\n", text=True,
                             capture_output=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr
    return path


def serve(folder, users_file, policy: FilePolicy):
    from mrg_core.engine import Engine, EngineSettings
    from ui import build_app, launch_kwargs

    engine = Engine.from_settings(EngineSettings(model_dir=folder.parent / "no-model",
                                                 database_url=f"sqlite:///{folder.parent}/r.db"))
    auth = load_auth(users_file)
    demo = build_app(engine, auth=auth)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1",
                        server_port=_free_port(), quiet=True, auth=auth,
                        **launch_kwargs(engine, policy))
    return demo, engine


@pytest.fixture(scope="module")
def app(folder, users_file):
    """Caps small enough to reach with 1 MiB uploads: 2.5 MiB a user, 4.5 MiB in all."""
    policy = FilePolicy(user_quota=int(2.5 * MiB), total_quota=int(4.5 * MiB), ttl_s=3600)
    demo, engine = serve(folder, users_file, policy)
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()
        engine.store.close()


@contextlib.contextmanager
def signed_in(url: str, user: str):
    """An httpx client with `user`'s sign-in cookie (Gradio's /login)."""
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        r = client.post("/login", data={"username": user, "password": PASSWORDS[user]})
        assert r.status_code == 200, r.text
        yield client


def upload(client: httpx.Client, data: bytes, name: str = "scan.png") -> httpx.Response:
    return client.post("/gradio_api/upload", files=[("files", (name, data, "image/png"))])


def fn_index(client: httpx.Client, api_name: str) -> int:
    deps = client.get("/config").json()["dependencies"]
    return next(d["id"] for d in deps if d.get("api_name") == api_name)


def file_path(url: str) -> Path:
    return Path(unquote(url.split("/gradio_api/file=", 1)[1]))


def wait_gone(paths, seconds: float = 20.0) -> list[Path]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(p.exists() for p in paths):
        time.sleep(0.25)
    return [p for p in paths if p.exists()]


# ---------------------------------------------------------------------------- b) scoped files

def test_another_users_file_url_answers_403(app, folder):
    with signed_in(app, "ada") as ada, signed_in(app, "bob") as bob:
        content = b"\x89PNG ada's upload " + uuid.uuid4().bytes
        r = upload(ada, content)
        assert r.status_code == 200, r.text
        path = r.json()[0]
        assert Path(path).is_file() and Path(path).is_relative_to(folder)

        assert ada.get(f"/gradio_api/file={path}").content == content
        stolen = bob.get(f"/gradio_api/file={path}")
        nothing = Path(path).parent / "no-such-file.png"
        missing = bob.get(f"/gradio_api/file={nothing}")  # Gradio's own answer
        # refused, and told apart from a file that does not exist by nothing
        assert stolen.status_code == missing.status_code == 403
        assert stolen.json() == {"detail": f"File not allowed: {path}."}
        assert missing.json() == {"detail": f"File not allowed: {nothing}."}
        assert stolen.headers["content-type"] == missing.headers["content-type"]
        assert bob.head(f"/gradio_api/file={path}").status_code == 403
        relative = os.path.relpath(path, os.getcwd()).replace("/", "//")  # the same file
        assert bob.get(f"/gradio_api/file={relative}").status_code == 403
        assert httpx.get(f"{app}/gradio_api/file={path}").status_code == 401  # not signed in

        # an event naming ada's upload is refused before it runs (the loader would read the
        # study into bob's page, then delete ada's file)
        load = fn_index(bob, "load_files")
        body = {"data": [None, [{"path": path, "orig_name": "scan.png",
                                 "meta": {"_type": "gradio.FileData"}}]],
                "fn_index": load, "session_hash": uuid.uuid4().hex[:11], "trigger_id": None,
                "event_data": None}
        assert bob.post("/gradio_api/queue/join", json=body).status_code == 403
        body["data"][1][0]["path"] = relative
        assert bob.post("/gradio_api/queue/join", json=body).status_code == 403
        assert Path(path).is_file()

        # nor can bob join or read ada's session
        ada_session = uuid.uuid4().hex[:11]
        body.update(session_hash=ada_session, fn_index=fn_index(ada, "load_sample"),
                    data=[None, None])
        assert ada.post("/gradio_api/queue/join", json=body).status_code == 200
        assert bob.post("/gradio_api/queue/join", json=body).status_code == 403
        r = bob.get("/gradio_api/queue/data", params={"session_hash": ada_session})
        assert r.status_code == 403


def test_page_images_and_exports_reach_their_user_only_and_go_when_the_page_closes(
        browser, app, folder):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    assert context.request.post(f"{app}/login", form={"username": "ada",
                                                      "password": PASSWORDS["ada"]}).ok
    page = context.new_page()
    page.goto(app)
    page.locator("#load-sample").click()
    wait_text(page, "#load-message", "Loaded")
    img = page.locator("#viewer img").first
    img.wait_for(timeout=WAIT_MS)
    image_url = urljoin(page.url, img.get_attribute("src"))

    page.locator("#editor textarea").fill("No acute findings.")
    page.get_by_text("Export", exact=True).click()
    page.locator("#export").click()
    txt = page.get_by_role("button", name="Text")
    txt.wait_for(timeout=WAIT_MS)
    with page.expect_download(timeout=WAIT_MS) as dl:
        txt.click()
    export_url = dl.value.url
    assert "No acute findings." in Path(dl.value.path()).read_text(encoding="utf-8")

    # the app writes these inside the upload folder and Gradio serves them as they are: the
    # view and the four exports (text, JSON, FHIR, DICOM SR)
    report = file_path(export_url)
    sent = [file_path(image_url), *report.parent.glob(report.name.split(".")[0] + ".*")]
    assert len(sent) == 5 and all(p.is_file() and p.is_relative_to(folder) for p in sent)

    with signed_in(app, "bob") as bob:
        for u in (image_url, export_url):
            assert page.request.get(u).status == 200  # ada's page
            assert bob.get(u).status_code == 403  # bob, signed in, with ada's URL

    context.close()  # the tab closes: its session ends
    assert not wait_gone(sent), "files of a closed page are still on disk"


def test_without_sign_in_each_browser_has_its_own_files_and_share(browser, folder, tmp_path):
    """No auth file: the page's cookie tells browsers apart; the cap's reason reaches the page."""
    from mrg_core.engine import Engine, EngineSettings
    from ui import build_app, launch_kwargs

    engine = Engine.from_settings(EngineSettings(model_dir=folder.parent / "no-model",
                                                 database_url=f"sqlite:///{tmp_path}/r.db"))
    demo = build_app(engine)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1",
                        server_port=_free_port(), quiet=True, **launch_kwargs(
                            engine, FilePolicy(user_quota=MiB, total_quota=64 * MiB)))
    first, second = browser.new_context(), browser.new_context()
    try:
        page = first.new_page()
        page.goto(demo.local_url)
        page.locator("#load-sample").click()
        img = page.locator("#viewer img").first
        img.wait_for(timeout=WAIT_MS)
        image_url = urljoin(page.url, img.get_attribute("src"))
        assert page.request.get(image_url).status == 200
        other = second.new_page()
        other.goto(demo.local_url)
        assert other.request.get(image_url).status == 403  # another browser
        assert httpx.get(image_url, timeout=TIMEOUT).status_code == 403  # a script
        big = tmp_path / "big.png"
        big.write_bytes(bytes(2 * MiB))
        page.locator("#upload input[type=file]").set_input_files(str(big))
        wait_text(page, "body", "HTTP 413: Upload refused: your files on the server")
        assert "over your share of 1.0 MB" in page.locator("body").inner_text()
    finally:
        first.close()
        second.close()
        demo.close()
        engine.store.close()


# ---------------------------------------------------------------------------- a) disk caps

def test_uploads_over_the_user_or_the_total_cap_are_refused(app, folder):
    with signed_in(app, "ada") as ada, signed_in(app, "bob") as bob, \
            signed_in(app, "cy") as cy:
        kept = [upload(ada, MB, f"a{i}.dcm") for i in range(2)]
        assert [r.status_code for r in kept] == [200, 200]
        third = upload(ada, MB, "a2.dcm")  # 3 MiB > ada's 2.5 MiB share
        assert third.status_code == 413
        assert "over your share of 2.5 MB" in third.text

        assert upload(bob, MB, "b0.dcm").status_code == 200  # bob's share is his own
        assert upload(bob, MB, "b1.dcm").status_code == 200  # 4 MiB in the folder
        full = upload(cy, MB, "c0.dcm")  # 5 MiB > 4.5 MiB in all
        assert full.status_code == 507
        assert "space for uploads is full" in full.text

        # the caps count what is kept: ada's study loads (the uploads go), she may upload again
        paths = [r.json()[0] for r in kept]
        body = {"data": [None, [{"path": p, "orig_name": Path(p).name,
                                 "meta": {"_type": "gradio.FileData"}} for p in paths]],
                "fn_index": fn_index(ada, "load_files"), "session_hash": uuid.uuid4().hex[:11],
                "trigger_id": None, "event_data": None}
        assert ada.post("/gradio_api/queue/join", json=body).status_code == 200
        assert not wait_gone([Path(p) for p in paths])
        assert upload(ada, MB, "a3.dcm").status_code == 200

        def chunked():  # no Content-Length: refused, the size cannot be checked first
            yield b"--x\r\n"
        r = ada.post("/gradio_api/upload", content=chunked(),
                     headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 411


# ---------------------------------------------------------------------------- c) TTL, stop

def test_files_older_than_the_ttl_are_deleted_and_the_rest_at_stop(folder, users_file):
    demo, engine = serve(folder, users_file, FilePolicy(user_quota=8 * MiB,
                                                        total_quota=64 * MiB, ttl_s=1.0))
    url = demo.local_url.rstrip("/")
    try:
        with signed_in(url, "ada") as ada:
            old = Path(upload(ada, b"never loaded", "old.dcm").json()[0])
            assert old.is_file()
            assert not wait_gone([old], 10), "an upload outlived the 1 s TTL"
            fresh = Path(upload(ada, b"uploaded just before the stop", "new.dcm").json()[0])
            assert fresh.is_file()
    finally:
        demo.close()
        engine.store.close()
    assert not wait_gone([fresh], 10), "a file the app received survived its stop"
