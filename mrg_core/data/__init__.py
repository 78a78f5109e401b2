"""Datasets: COV-CTR, R2Gen annotation.json, corrections exported by the store.

`load_splits(spec)` is what training and evaluation call; a spec is a dict
{"kind": "covctr"|"cxr_pneumonia"|"r2gen"|"corrections", ...} or a path (auto-detected).
"""
from __future__ import annotations

from pathlib import Path

from .corrections import load_corrections, split_by_id
from .covctr import load_covctr
from .cxr_pneumonia import load_cxr_pneumonia
from .example import Example
from .images import ImageCache, file_format, is_png_only
from .r2gen import load_r2gen

__all__ = ["Example", "ImageCache", "file_format", "is_png_only", "load_corrections",
           "load_covctr", "load_cxr_pneumonia", "load_r2gen", "load_splits",
           "resolve_data_spec", "split_by_id"]


def resolve_data_spec(path: str | Path) -> dict:
    """Guess the dataset kind of a path: annotation.json, a COV-CTR folder, a corrections export,
    or a data folder that holds covctr/."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return {"kind": "r2gen", "annotation": str(p)}
    if (p / "corrections.jsonl").is_file():
        return {"kind": "corrections", "folder": str(p)}
    if (p / "annotation.json").is_file():
        return {"kind": "r2gen", "annotation": str(p / "annotation.json")}
    if (p / "reports.tsv").is_file():
        return {"kind": "covctr", "root": str(p)}
    if (p / "covctr" / "reports.tsv").is_file():
        return {"kind": "covctr", "root": str(p / "covctr")}
    raise FileNotFoundError(f"no dataset recognised at {p}")


def load_splits(spec: dict | str | Path | None = None) -> dict[str, list[Example]]:
    """{"train"|"val"|"test": [Example]} for a data spec (None → COV-CTR in the shared data)."""
    if spec is None:
        spec = {"kind": "covctr"}
    elif not isinstance(spec, dict):
        spec = resolve_data_spec(spec)
    kind = spec.get("kind", "covctr")
    if kind == "covctr":
        return load_covctr(spec.get("root"))
    if kind == "cxr_pneumonia":
        return load_cxr_pneumonia(spec.get("root"))
    if kind == "r2gen":
        return load_r2gen(spec["annotation"], spec.get("images"))
    if kind == "corrections":
        return split_by_id(load_corrections(spec["folder"], bool(spec.get("include_accepted"))),
                           spec.get("val_fraction", 0.15))
    raise ValueError(f"unknown data kind {kind!r}")
