"""app.py: flags, environment fallbacks, and a real start as a subprocess."""
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mrg_core.models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"


def load_app_module():
    spec = importlib.util.spec_from_file_location("mrg_app", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRG_", "GRADIO_SERVER"))}
    env.pop("SPACE_ID", None)
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", **extra)
    return env


def test_help():
    out = subprocess.run([sys.executable, str(APP), "--help"], capture_output=True, text=True,
                         timeout=60, env=child_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for flag in ("--host", "--port", "--model-dir", "--db-url", "--auth-file"):
        assert flag in out.stdout


def test_flags_fall_back_to_environment(monkeypatch, tmp_path):
    app = load_app_module()
    for k in ("MRG_HOST", "MRG_PORT", "GRADIO_SERVER_PORT", "MRG_MODEL_DIR", "MRG_DB_URL",
              "MRG_AUTH_FILE", "SPACE_ID", "MRG_PRECISION"):
        monkeypatch.delenv(k, raising=False)
    a = app.parse_args([])
    assert (a.host, a.port, a.model_dir, a.auth_file) == ("127.0.0.1", 7860,
                                                          Path("assets/model"), None)
    assert a.precision == "int8-weights"  # the app's serving form (as the report CLI's)
    monkeypatch.setenv("MRG_PRECISION", "INT4-Weights")
    assert app.parse_args([]).precision == "int4-weights"
    monkeypatch.setenv("SPACE_ID", "user/space")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7001")
    monkeypatch.setenv("MRG_DB_URL", "sqlite:///x.db")
    a = app.parse_args([])
    assert (a.host, a.port, a.db_url) == ("0.0.0.0", 7001, "sqlite:///x.db")
    monkeypatch.setenv("MRG_HOST", "10.0.0.5")
    monkeypatch.setenv("MRG_PORT", "7002")
    a = app.parse_args(["--port", "7003"])
    assert (a.host, a.port) == ("10.0.0.5", 7003)  # a flag beats the environment

    users = tmp_path / "users.txt"
    from mrg_core.auth import add_user
    add_user(users, "ada", "s3cret:with-colon")
    check = app.read_auth_file(users)
    assert check("ada", "s3cret:with-colon") and not check("ada", "wrong")
    users.write_text("bob:pw\n")  # plain-text passwords are refused, the app does not start
    with pytest.raises(SystemExit):
        app.read_auth_file(users)


def test_page_builds_without_a_model(tmp_path):
    """No model folder: the engine still starts and the page builds (viewing + manual reports)."""
    from mrg_core.engine import Engine, EngineSettings
    from ui import build_app

    engine = Engine.from_settings(EngineSettings(model_dir=tmp_path / "missing",
                                                 database_url=f"sqlite:///{tmp_path}/r.db"))
    assert engine.model is None
    demo = build_app(engine)
    assert demo.title == "MRG Studio"


def test_app_serves_page(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model(method="prompt", family="gpt2", seed=0).save_pretrained(model_dir)
    port = free_port()
    db = tmp_path / "app.db"
    log_path = tmp_path / "app.log"  # appended by the app, read by name (see test_space_start)
    log = open(log_path, "ab")  # noqa: SIM115 (closed in finally)
    uploads = tmp_path / "uploads"  # the app's own upload folder: emptied at start and stop
    (uploads / "h1").mkdir(parents=True)
    (uploads / "h1" / "previous_run.dcm").write_bytes(b"patient data")
    env = child_env(MRG_UPLOAD_DIR=str(uploads))
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, str(APP), "--port", str(port), "--model-dir", str(model_dir),
         "--db-url", f"sqlite:///{db}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url, deadline, status = f"http://127.0.0.1:{port}/", time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    status, body = r.status, r.read().decode("utf-8", "replace")
                break
            except OSError:
                time.sleep(0.5)
        for _ in range(40):  # the address line is printed just after the server answers
            output = log_path.read_text(encoding="utf-8", errors="replace")
            if "running on" in output or proc.poll() is not None:
                break
            time.sleep(0.25)
        assert status == 200, f"app did not serve the page; log:\n{output}"
        assert "MRG Studio" in body
        assert "Traceback" not in output
        assert "0.0.0.0" not in output  # local by default
        assert f"running on http://127.0.0.1:{port}" in output
        assert "share=True" not in output and "public link" not in output  # never shared
        # the previous run's upload is gone (the app's own empty view/export folders remain)
        assert uploads.is_dir() and not [p for p in uploads.rglob("*") if p.is_file()]
        (uploads / "h2").mkdir()
        (uploads / "h2" / "this_run.dcm").write_bytes(b"patient data")
        proc.terminate()  # SIGTERM, as a service stop
        proc.wait(timeout=20)
        assert not list(uploads.iterdir())  # emptied on the way out
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_start_up_hides_the_known_transformers_future_warning():
    import warnings

    from mrg_core.logging_setup import quiet_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. "
                      "Use `is_activation_checkpointing` instead.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)  # still shown
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
