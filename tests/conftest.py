import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mrg_core.paths import data_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """The read-only shared data folder; tests that need it skip cleanly when it is absent."""
    d = data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data folder {d} is absent")
    return d
