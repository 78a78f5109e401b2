"""Model versions on disk: the shipped default model and fine-tuned versions.

A model version is a ReportModel folder (config.json with a "method" key; see models/io.py).
Fine-tuned versions also hold lineage.json (written by mrg_core.finetune) naming their parent.

Roots scanned by default: the default model folder ($MRG_MODEL_DIR, else assets/model) and the
models folder ($MRG_MODELS_DIR, else <repo>/models/, which is not committed).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mrg_core.paths import DEFAULT_MODEL_DIR, REPO_ROOT


@dataclass
class ModelVersion:
    name: str
    version: str
    path: Path
    parent_version: str | None  # None for a model trained from scratch
    created_at: str  # ISO 8601 UTC; lineage.json's, else the config file's modification time


def models_dir() -> Path:
    """Where fine-tuned versions are written: $MRG_MODELS_DIR, else <repo>/models/."""
    env = os.environ.get("MRG_MODELS_DIR")
    return Path(env) if env else REPO_ROOT / "models"


def default_roots() -> list[Path]:
    default = Path(os.environ["MRG_MODEL_DIR"]) if os.environ.get("MRG_MODEL_DIR") \
        else DEFAULT_MODEL_DIR
    return [default, models_dir()]


def read_model_version(folder: str | Path) -> ModelVersion | None:
    """The version stored in one folder; None when it is not a ReportModel folder (an LM's own
    config.json, a half-written folder, unreadable JSON)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or "method" not in cfg:
        return None
    lineage = {}
    try:
        lineage = json.loads((folder / "lineage.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    parent = (lineage.get("parent") or {}).get("version") if isinstance(lineage, dict) else None
    created = lineage.get("created_at") if isinstance(lineage, dict) else None
    if not created:
        mtime = (folder / "config.json").stat().st_mtime
        created = datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")
    return ModelVersion(name=str(cfg.get("name", folder.name)),
                        version=str(cfg.get("version", "")), path=folder.resolve(),
                        parent_version=parent, created_at=str(created))


def list_model_versions(roots: list[Path] | None = None) -> list[ModelVersion]:
    """Every model folder that is a root itself or a direct child of a root, oldest first.
    Missing roots are skipped; a folder reached twice is listed once."""
    found: dict[Path, ModelVersion] = {}
    for root in (default_roots() if roots is None else roots):
        root = Path(root)
        if not root.is_dir():
            continue
        mv = read_model_version(root)
        candidates = [mv] if mv else [read_model_version(c) for c in sorted(root.iterdir())
                                      if c.is_dir()]
        for m in candidates:
            if m is not None:
                found.setdefault(m.path, m)
    return sorted(found.values(), key=lambda m: (m.created_at, m.name, m.version))
