"""Sign-in (mrg_core.auth + app.py) and upload limits: hashes, the add-user CLI, plain-text
refusal, Gradio's login route on a real server, one size limit for upload and loader."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mrg_core import auth
from mrg_core.engine import Engine
from mrg_core.io import load_study
from mrg_core.storage import Store
from ui import handlers as h
from tests.factories import launch_local
from ui.state import Session

ROOT = Path(__file__).resolve().parent.parent
FAST = 1_000  # iterations in tests; the CLI default is auth.DEFAULT_ITERATIONS


def app_module():
    spec = importlib.util.spec_from_file_location("mrg_app_auth", ROOT / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRG_", "GRADIO_SERVER"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def test_hash_verify_round_trip():
    encoded = auth.hash_password("correct horse", FAST)
    scheme, iterations, salt, digest = encoded.split("$")
    assert (scheme, iterations, len(salt), len(digest)) == ("pbkdf2_sha256", "1000", 32, 64)
    assert auth.verify_password("correct horse", encoded)
    assert not auth.verify_password("correct horse ", encoded)
    assert not auth.verify_password("", encoded)
    assert auth.hash_password("correct horse", FAST) != encoded  # a fresh salt each time
    assert auth.DEFAULT_ITERATIONS >= 600_000
    assert not auth.verify_password("x", "plain") and not auth.verify_password("x", "")


def test_checker_accepts_only_the_right_password(tmp_path):
    f = tmp_path / "users.txt"
    auth.add_user(f, "ada", "s3cret:with-colon", FAST)
    auth.add_user(f, "bob", "pw", FAST)
    auth.add_user(f, "ada", "new-one", FAST)  # replaces ada's line
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    check = auth.load_auth(f)
    assert check("ada", "new-one") and check("bob", "pw")
    assert not check("ada", "s3cret:with-colon") and not check("ada", "pw")
    assert not check("eve", "pw") and not check("", "")
    assert auth.load_auth(None) is None


@pytest.mark.parametrize("line", ["ada:hunter2", "ada:pbkdf2_sha256$1000$zz$00",
                                  "ada:pbkdf2_sha256$0$" + "ab" * 16 + "$" + "cd" * 32])
def test_plain_text_password_is_refused(tmp_path, line):
    f = tmp_path / "users.txt"
    f.write_text(f"# reviewers\n{auth.hash_password('ok', FAST).join(['bob:', ''])}\n{line}\n")
    with pytest.raises(auth.AuthFileError, match="Plain-text passwords are refused") as e:
        auth.read_auth_file(f)
    assert "line 3" in str(e.value) and line.partition(":")[2] not in str(e.value)
    with pytest.raises(SystemExit, match="Plain-text"):
        app_module().read_auth_file(f)


def test_malformed_and_empty_files_are_refused(tmp_path):
    f = tmp_path / "users.txt"
    for text in ("nopassword\n", "# only a comment\n", "a b:x\n"):
        f.write_text(text)
        with pytest.raises(auth.AuthFileError):
            auth.read_auth_file(f)
    with pytest.raises(auth.AuthFileError, match="cannot read"):
        auth.read_auth_file(tmp_path / "missing.txt")


def test_cli_add_user_reads_the_password_from_stdin(tmp_path):
    f = tmp_path / "users.txt"
    cmd = [sys.executable, "-m", "mrg_core.auth", "add-user", str(f), "ada",
           "--iterations", str(FAST)]
    out = subprocess.run(cmd, input="p@ss word\n", capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env=child_env())
    assert out.returncode == 0, out.stderr
    assert "p@ss word" not in out.stdout + out.stderr + f.read_text()
    assert f.read_text().startswith("ada:pbkdf2_sha256$1000$")
    assert auth.load_auth(f)("ada", "p@ss word")
    empty = subprocess.run(cmd, input="\n", capture_output=True, text=True, timeout=60,
                           cwd=ROOT, env=child_env())
    assert empty.returncode == 2 and "empty" in empty.stderr


def test_admin_role_in_the_auth_file(tmp_path):
    f = tmp_path / "users.txt"
    auth.add_user(f, "ada", "pw-ada", FAST)  # a file as the previous release wrote it
    assert auth.read_admins(f) == frozenset() and auth.load_auth(f)("ada", "pw-ada")
    out = subprocess.run([sys.executable, "-m", "mrg_core.auth", "add-user", str(f), "root",
                          "--admin", "--iterations", str(FAST)], input="pw-root\n",
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=child_env())
    assert out.returncode == 0 and "(admin)" in out.stdout, out.stderr
    check = auth.load_auth(f)
    assert check.admins == frozenset({"root"}) and check("root", "pw-root")
    assert auth.is_admin(check, "root") and not auth.is_admin(check, "ada")
    assert not auth.is_admin(None, "root") and not auth.is_admin(check, None)
    auth.add_user(f, "root", "pw-root2", FAST)  # replaced without --admin: the role goes
    assert auth.read_admins(f) == frozenset()
    f.write_text(f.read_text().replace("\n", ":superuser\n", 1))
    with pytest.raises(auth.AuthFileError, match="unknown role 'superuser'"):
        auth.read_auth_file(f)
    f.write_text("eve:hunter2:admin\n")  # still a plain-text password, role or not
    with pytest.raises(auth.AuthFileError, match="Plain-text") as err:
        auth.read_auth_file(f)
    assert "hunter2" not in str(err.value)


def test_admin_open_flag_and_environment(monkeypatch):
    app = app_module()
    monkeypatch.delenv("MRG_ADMIN_OPEN", raising=False)
    assert app.parse_args([]).admin_open is False
    assert app.parse_args(["--admin-open"]).admin_open is True
    monkeypatch.setenv("MRG_ADMIN_OPEN", "1")
    assert app.parse_args([]).admin_open is True
    monkeypatch.setenv("MRG_ADMIN_OPEN", "0")
    assert app.parse_args([]).admin_open is False


def test_app_refuses_a_plain_text_auth_file_at_start(tmp_path):
    f = tmp_path / "users.txt"
    f.write_text("ada:hunter2\n")
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--auth-file", str(f),
                          "--model-dir", str(tmp_path / "none"),
                          "--db-url", f"sqlite:///{tmp_path}/r.db"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=child_env())
    assert out.returncode != 0
    assert "Plain-text passwords are refused" in out.stderr and "hunter2" not in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def signed_in_app(tmp_path):
    """The page served as app.py serves it, with an auth file of one user."""
    from ui import build_app, launch_kwargs

    f = tmp_path / "users.txt"
    auth.add_user(f, "ada", "right-password", FAST)
    check = app_module().read_auth_file(f)
    engine = Engine(None, Store(f"sqlite:///{tmp_path}/r.db"),
                    app_module().load_limits(3))
    demo = build_app(engine, auth=check)
    try:
        launch_local(demo, auth=check, **launch_kwargs(engine))
        yield demo, engine, check
    finally:
        demo.close()
        engine.store.close()


def test_login_required_then_the_page(signed_in_app):
    demo, engine, check = signed_in_app
    assert check("ada", "right-password") and not check("ada", "wrong")
    with httpx.Client(base_url=demo.local_url, timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200
        assert '"auth_required":true' in page.text.replace(" ", "")
        assert "pneumonia probability" not in page.text and "model-admin" not in page.text
        assert c.get("/gradio_api/login_check").status_code == 401
        assert c.get("/config").status_code == 401
        assert c.post("/login", data={"username": "ada", "password": "wrong"}).status_code == 400
        assert c.post("/login", data={"username": "eve",
                                      "password": "right-password"}).status_code == 400
        ok = c.post("/login", data={"username": "ada", "password": "right-password"})
        assert ok.status_code == 200 and ok.json() == {"success": True}
        assert c.get("/gradio_api/login_check").status_code == 200
        page = c.get("/")
        assert "pneumonia probability" in page.text and '"username":"ada"' in page.text
    # The reviewer box is locked: the name comes from the login.
    reviewer = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "reviewer")
    assert reviewer.interactive is False
    # Gradio's upload limit is the loader's limit.
    assert demo.max_file_size == engine.limits.max_file_bytes == 3 * 2**20


def test_api_call_with_another_reviewer_is_stored_under_the_signed_in_user(signed_in_app,
                                                                          tmp_path):
    """A script (or a doctored page) calls the app's API as ada but names someone else as the
    reviewer: the saved correction and the export carry the login, never the name sent."""
    from gradio_client import Client, handle_file

    from tests import factories

    demo, engine, _ = signed_in_app
    src = tmp_path / "study.dcm"
    factories.write_mono1(src)
    client = Client(demo.local_url, auth=("ada", "right-password"), verbose=False,
                    download_files=str(tmp_path / "downloads"))
    loaded = client.predict([handle_file(str(src))], api_name="/load_files")
    assert str(loaded[0]).startswith("Loaded")
    saved, history = client.predict("Clear lungs.", "mallory", api_name="/save")
    assert saved.startswith("Saved as correction")
    rows = engine.store.history(load_study([src]).content_hash)
    assert [(r.final_text, r.reviewer) for r in rows] == [("Clear lungs.", "ada")]
    assert "mallory" not in history
    *files, msg = client.predict("Clear lungs.", "mallory", api_name="/export")
    paths = [f.get("value") if isinstance(f, dict) else f for f in files]  # gr.update(value=)
    texts = {Path(f).name.split(".", 1)[1]: Path(f).read_text(errors="replace")
             for f in paths if f}
    assert set(texts) == {"txt", "json", "fhir.json", "sr.dcm"}, msg
    assert json.loads(texts["json"])["reviewer"] == "ada"
    assert "Reviewed by: ada" in texts["txt"]
    assert not any("mallory" in t for t in texts.values())


def test_upload_limit_flag_and_environment(monkeypatch):
    app = app_module()
    monkeypatch.delenv("MRG_MAX_UPLOAD_MB", raising=False)
    assert app.load_limits(app.parse_args([]).max_upload_mb).max_file_bytes == 256 * 2**20
    monkeypatch.setenv("MRG_MAX_UPLOAD_MB", "12")
    assert app.parse_args([]).max_upload_mb == 12
    assert app.parse_args(["--max-upload-mb", "5"]).max_upload_mb == 5
    with pytest.raises(SystemExit):
        app.load_limits(0)


def test_oversized_upload_and_hostile_names_never_become_paths(tmp_path):
    """A file over the limit is refused by the loader with a readable message; a file name is
    only shown (escaped), and the export writes generated names inside its own folder."""
    from tests import factories

    engine = Engine(None, Store(f"sqlite:///{tmp_path}/r.db"), app_module().load_limits(0.01))
    big = tmp_path / "big.dcm"
    big.write_bytes(b"\0" * (engine.limits.max_file_bytes + 1))
    s = Session()
    res = h.load_files(engine, s, [str(big)])
    assert not res.ok and "big.dcm" in res.message and s.study is None

    src = tmp_path / "ok.dcm"
    factories.write_mono1(src)
    evil = "../../../tmp/evil_<b>x</b>.dcm"
    res = h.load_files(engine, s, [(evil, src.read_bytes())])
    assert res.ok and "<b>" not in res.message
    out = tmp_path / "export"
    paths, _ = h.export_files(engine, s, "Clear lungs.", "Dr Ada", out)
    assert [Path(p).parent for p in paths] == [out] * 4
    assert all(Path(p).name.startswith("report_" + s.study.content_hash[:10]) for p in paths)
    assert not any("evil" in p.name for p in tmp_path.rglob("*"))
    assert not Path("/tmp/evil_<b>x</b>.dcm").exists()
    engine.store.close()


def test_api_model_switch_by_a_user_without_the_admin_role_is_refused(signed_in_app, tmp_path):
    """The server checks the role on every call: a script calling the Model panel's endpoints
    directly gets the refusal, and the live model stays."""
    from gradio_client import Client

    demo, engine, _ = signed_in_app  # ada has no admin role
    client = Client(demo.local_url, auth=("ada", "right-password"), verbose=False,
                    download_files=str(tmp_path / "downloads"))
    from ui import models_panel as mp

    choices = mp.model_choices(engine)  # the dropdown accepts only a listed version
    folder = choices[0][1] if choices else None
    out = client.predict(folder, api_name="/use_model")
    assert "Only an administrator can switch the live model" in str(out[0])
    out = client.predict(folder, api_name="/run_finetune")
    assert "Only an administrator can start fine-tuning" in str(out[0] if isinstance(
        out, (list, tuple)) else out)
    assert engine.model is None
