"""On a Hugging Face Space the corrections go to the persistent /data volume, and the page says
so plainly when a Space keeps them where a restart wipes them."""
from __future__ import annotations

from mrg_core.engine import Engine
from mrg_core.storage import Store
from mrg_core.storage.space import default_database_url, ephemeral_store_warning
from ui.handlers import model_info_markdown

SPACE = {"SPACE_ID": "mrg/studio"}


def test_space_with_persistent_storage_keeps_the_store_there(tmp_path):
    data, repo = tmp_path / "data", tmp_path / "repo"
    data.mkdir()
    assert default_database_url(repo, SPACE, space_data=data) == f"sqlite:///{data}/mrg_studio.db"
    # not a Space, or a Space without /data: the repository, as on a workstation
    assert default_database_url(repo, {}, space_data=data) == f"sqlite:///{repo}/mrg_studio.db"
    assert default_database_url(repo, SPACE, space_data=tmp_path / "none") == \
        f"sqlite:///{repo}/mrg_studio.db"


def test_ephemeral_store_on_a_space_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert ephemeral_store_warning(f"sqlite:///{data}/m.db", SPACE, data) is None
    assert ephemeral_store_warning(f"sqlite:///{data}/sub/m.db", SPACE, data) is None
    lost = ephemeral_store_warning(f"sqlite:///{tmp_path}/m.db", SPACE, data)
    assert lost and "lost when it restarts" in lost and "/data" in lost
    assert "lost" in ephemeral_store_warning(f"sqlite:///{data}x/m.db", SPACE, data)  # a sibling
    assert ephemeral_store_warning("sqlite://", SPACE, data)  # in memory
    assert ephemeral_store_warning(f"sqlite:///{tmp_path}/m.db", {}, data) is None  # no Space
    assert ephemeral_store_warning("postgresql+psycopg://u@h/db", SPACE, data) is None


def test_page_header_carries_the_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "mrg/studio")
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")  # not under /data
    try:
        engine = Engine(None, store)
        assert engine.store_warning and engine.store_warning in model_info_markdown(engine)
        monkeypatch.delenv("SPACE_ID")
        quiet = Engine(None, store)
        assert quiet.store_warning is None and "lost" not in model_info_markdown(quiet)
    finally:
        store.engine.dispose()


def test_docker_space_installs_what_the_readme_installs():
    """The Space is a Docker Space: its front matter names the port the Dockerfile exposes,
    and the Dockerfile installs the same requirement files as the README's first command, the
    LLM package with --no-deps (a plain `sdk: gradio` Space cannot)."""
    import re

    from mrg_core.paths import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    front = readme.split("---")[1]
    assert re.search(r"^sdk: docker$", front, re.M)
    port = re.search(r"^app_port: (\d+)$", front, re.M).group(1)
    docker = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"EXPOSE {port}" in docker
    start = next(line for line in readme.splitlines() if "python app.py" in line
                 and line.startswith("    python3 -m venv"))
    for req in re.findall(r"pip install (?:--no-deps )?-r (\S+)", start):
        assert f"-r {req}" in docker, req
    assert "--no-deps -r requirements-llm.txt" in start and \
        "--no-deps -r requirements-llm.txt" in docker
    assert "download.pytorch.org/whl/cpu" in docker  # not the multi-GB CUDA wheel


def test_every_tracked_binary_file_goes_to_lfs_on_the_hub():
    """A Space (the Hub) refuses binary blobs outside LFS/Xet: `.gitattributes` must cover each
    tracked binary file (a NUL byte in its first 8 KiB), e.g. the model's safetensors."""
    import subprocess

    from mrg_core.paths import REPO_ROOT

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout

    files = [f for f in git("ls-files", "-z").split("\0") if f]
    binary = [f for f in files if (REPO_ROOT / f).is_file()
              and b"\0" in (REPO_ROOT / f).read_bytes()[:8192]]
    assert "assets/model/model.safetensors" in binary  # the check sees binaries at all
    attrs = git("check-attr", "filter", "--", *binary).splitlines()
    not_lfs = [line.split(": filter:")[0] for line in attrs if not line.endswith(": lfs")]
    assert not not_lfs, f"binary files without an LFS attribute: {not_lfs}"
