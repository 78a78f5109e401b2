import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mrg_core.paths import data_dir  # noqa: E402


def in_ci() -> bool:
    """CI sets CI=true (GitHub Actions, GitLab, .ci/run callers): every resource must be there."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require(condition, reason: str) -> None:
    """The one gate for tests that need something outside the Python packages (Chromium, Java,
    a PostgreSQL server, the shipped default model, the ../shared data folder).

    Missing on a developer machine: the test skips with `reason`. Missing under CI=true: the
    test fails, so a green CI run never hides a test that did not run.
    Use as `require(path.is_dir(), "shared data folder ... is absent")`.
    """
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: required, not skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data():
    """The read-only shared data folder (skips when absent, fails under CI=true)."""
    d = data_dir()
    require(d.is_dir(), f"shared data folder {d} is absent")
    return d
