"""Where things live. Data is reached through a configurable path, never copied into the repo."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
DEFAULT_MODEL_DIR = ASSETS_DIR / "model"
# the chest radiograph model the engine routes radiographs to (issue 15)
DEFAULT_CXR_MODEL_DIR = ASSETS_DIR / "cxr_model"
SAMPLES_DIR = ASSETS_DIR / "samples"
# the language model's inference form the app and the report CLI use unless told otherwise
# (models/quantize.PRECISIONS; here, not there, so that --help needs no torch import)
SERVING_PRECISION = "int8-weights"


def data_dir() -> Path:
    """Shared data folder: $MRG_DATA_DIR, else ../shared/data beside the repository."""
    env = os.environ.get("MRG_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"
