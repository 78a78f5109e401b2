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
