"""Uploads are deleted once read, inside Gradio's upload folder only; the app's own upload
folder is emptied at start and stop (ui/upload_cache.py)."""
from ui.upload_cache import discard_uploads, empty_upload_folder, use_own_upload_folder


def test_only_files_inside_the_upload_folder_are_deleted(tmp_path):
    root = tmp_path / "uploads"
    (root / "abc123").mkdir(parents=True)
    up = root / "abc123" / "scan.dcm"
    up.write_bytes(b"x")
    outside = tmp_path / "sample.dcm"  # a sample or a CLI path: never touched
    outside.write_bytes(b"y")
    assert discard_uploads([str(up), str(outside), ("name.png", b"bytes")], root) == 1
    assert not up.exists() and not (root / "abc123").exists() and root.is_dir()
    assert outside.exists()
    sneaky = root / ".." / "sample.dcm"  # a path that only looks inside
    assert discard_uploads([str(sneaky)], root) == 0 and outside.exists()


def test_the_app_gets_its_own_upload_folder_emptied(tmp_path):
    env = {"MRG_UPLOAD_DIR": str(tmp_path / "own")}
    folder = use_own_upload_folder(env)
    assert env["GRADIO_TEMP_DIR"] == str(tmp_path / "own") and folder.is_dir()
    (folder / "h1").mkdir()
    (folder / "h1" / "a.dcm").write_bytes(b"x")
    (folder / "b.png").write_bytes(b"y")
    empty_upload_folder(folder)
    assert folder.is_dir() and not list(folder.iterdir())
    # the operator's GRADIO_TEMP_DIR is used as it is and never emptied (None: not ours)
    kept = {"GRADIO_TEMP_DIR": str(tmp_path / "theirs")}
    assert use_own_upload_folder(kept) is None and kept["GRADIO_TEMP_DIR"] == str(tmp_path / "theirs")


# ---------------------------------------------------------------------------- ui/file_access.py
# Caps, holders and purges of the upload folder (issue 19); the attacks themselves run against
# a real server in tests/e2e/test_file_access.py.
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ui import file_access as fa  # noqa: E402
from ui.file_access import MiB, FileAccess, FilePolicy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_caps_and_ttl_default_relative_to_the_upload_limits():
    from mrg_core.io import LoadLimits

    # default limits: 256 MiB a file, 2 GiB a study → a study's worth per user, 4 in total
    p = FilePolicy.from_env(LoadLimits(), environ={})
    assert (p.user_quota, p.total_quota, p.ttl_s, p.sweep_every_s, p.sweep_all) == \
        (2048 * MiB, 8192 * MiB, 3600, 300, False)
    p = FilePolicy.from_env(LoadLimits(max_file_bytes=1536 * MiB), environ={})  # --max-upload-mb
    assert (p.user_quota, p.total_quota) == (3072 * MiB, 12288 * MiB)
    p = FilePolicy.from_env(LoadLimits(), own_folder=True, environ={
        "MRG_USER_QUOTA_MB": "100", "MRG_UPLOAD_QUOTA_MB": "1000", "MRG_FILE_TTL_MIN": "0.5"})
    assert (p.user_quota, p.total_quota, p.ttl_s, p.sweep_every_s, p.sweep_all) == \
        (100 * MiB, 1000 * MiB, 30, 7.5, True)
    for bad in ("0", "-1", "abc", "inf", "nan"):
        with pytest.raises(ValueError, match="MRG_USER_QUOTA_MB must be a positive number"):
            FilePolicy.from_env(LoadLimits(), environ={"MRG_USER_QUOTA_MB": bad})


def test_the_app_refuses_to_start_with_a_bad_cap(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRG_", "GRADIO_"))}
    env.update(MRG_UPLOAD_DIR=str(tmp_path / "up"), MRG_FILE_TTL_MIN="soon",
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "app.py", "--model-dir", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 1
    assert "error: MRG_FILE_TTL_MIN must be a positive number, not 'soon'" in out.stderr


def _file(path: Path, data: bytes = b"x", age_s: float = 0.0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return os.path.realpath(path)


@pytest.fixture
def private(monkeypatch, tmp_path):
    """A fresh registry of private folders and of running servers (one another test left
    running must not keep these folders), the upload folder in tmp_path."""
    monkeypatch.setattr(fa, "_PRIVATE_DIRS", {})
    monkeypatch.setattr(fa, "_LIVE", set())
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "up"))
    return tmp_path / "up"


def test_a_file_goes_when_the_last_session_holding_it_ends(private):
    access = FileAccess(FilePolicy(MiB, MiB), root=private)
    shared = _file(private / "h1" / "view.png")  # the same study seen by two users
    own = _file(private / "h2" / "report.txt")
    public = _file(private / "h3" / "logo.png")
    access.public.add(public)
    access.holdings.hold(shared, "user:ada", "s-ada")
    access.holdings.hold(shared, "user:bob", "s-bob")
    access.holdings.hold(own, "user:ada", "s-ada")
    access.holdings.hold(public, "user:ada", "s-ada")
    assert access.end_session("s-ada") == 1
    assert not os.path.exists(own) and not (private / "h2").exists()  # its folder too
    assert os.path.exists(shared) and os.path.exists(public)
    assert access.may_read(shared, "user:bob") and not access.may_read(shared, "user:ada")
    assert access.end_session("s-bob") == 1 and not os.path.exists(shared)
    assert private.is_dir()


def test_the_sweep_deletes_what_outlived_the_ttl(private):
    hour, now = 3600, time.time()
    later = now + 2 * hour  # the sweep two hours on
    views = Path(fa.private_dir("mrg_views_"))
    old_view = _file(views / "view_1.png")
    shown_again = _file(views / "view_2.png")
    upload = _file(private / "h1" / "upload.dcm")
    not_ours = _file(private / "other-app" / "file.bin")
    access = FileAccess(FilePolicy(MiB, MiB, ttl_s=hour), root=private)
    access.holdings.hold(upload, "user:ada")
    access.holdings.hold(shown_again, "user:ada", "s1", when=later - hour / 2)
    assert access.sweep(now=now) == 0  # nothing is an hour old yet
    # an operator's GRADIO_TEMP_DIR: only what this app made or handed out
    assert access.sweep(now=later) == 2
    assert not os.path.exists(old_view) and not os.path.exists(upload)
    assert os.path.exists(shown_again) and os.path.exists(not_ours) and views.is_dir()
    # the app's own folder: everything, and the folders it leaves empty
    own = FileAccess(FilePolicy(MiB, MiB, ttl_s=hour, sweep_all=True), root=private)
    assert own.sweep(now=later) == 2
    assert not os.path.exists(not_ours) and not (private / "other-app").exists()
    assert not os.path.exists(shown_again) and views.is_dir()  # the page still writes there
    # at stop: the private folders go (no other server of this process runs)
    own.started = time.time()
    own.purge()
    assert not views.exists() and not fa._PRIVATE_DIRS


def test_only_file_values_in_replies_are_recorded(tmp_path):
    root = tmp_path / "up"
    a = _file(root / "h1" / "a b.png")
    b = _file(root / "h2" / "x.png")
    c = _file(root / "h3" / "y.png")
    access = FileAccess(FilePolicy(MiB, MiB), root=root)
    sent = []

    async def send(message):
        sent.append(message)

    rec = fa._Recorder(access, "user:ada", "s1", send)
    r = str(root).encode()
    # a file value; a path the user typed, echoed inside text; a diff cut in two chunks
    rec.feed(b'data: {"output":{"data":[{"path":"' + r + b'/h1/a b.png","url":"..."},'
             b'"see \\"path\\":\\"' + r + b'/h2/x.png\\""]}}\n\n')
    rec.feed(b'data: [["replace",[0,"path"],"' + r[:5])
    rec.feed(r[5:] + b'/h3/y.png"]]\n\n')
    assert sorted(access.holdings.paths()) == sorted([a, c])
    assert not access.may_read(b, "user:ada")
    # a request naming a file: anywhere in its JSON, relative or with extra slashes
    rel = os.path.relpath(b, os.getcwd()).replace("/", "//")
    body = f'{{"data":[{{"path":"{rel}"}}, "5/10 lobes"], "x": "{a}"}}'.encode()
    assert access.named_in_request(body) == {a, b}


def test_upload_caps_count_held_files_and_uploads_in_flight(tmp_path):
    root = tmp_path / "up"
    mine = _file(root / "h1" / "a.dcm", bytes(MiB))
    access = FileAccess(FilePolicy(user_quota=3 * MiB, total_quota=4 * MiB), root=root)
    access.holdings.hold(mine, "user:ada")
    assert access.refuse_upload("user:ada", MiB, access.measure("user:ada")) is None
    access.inflight[1] = ("user:ada", MiB)  # one more on its way
    code, why = access.refuse_upload("user:ada", MiB + 1, access.measure("user:ada"))
    assert code == 413 and "over your share of 3.0 MB" in why
    assert access.refuse_upload("user:bob", 2 * MiB, access.measure("user:bob")) is None
    code, why = access.refuse_upload("user:bob", 2 * MiB + 1, access.measure("user:bob"))
    assert code == 507 and "(2.0 MB of 4.0 MB used)" in why
