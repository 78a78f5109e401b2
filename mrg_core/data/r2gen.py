"""R2Gen `annotation.json`: {"train"|"val"|"test": [{"id", "report", "image_path": [...]}]}.

image_path entries are relative to an images root (R2Gen's `--image_dir`); "label" is optional
(-1 when absent). This is the format of IU X-ray / MIMIC-CXR in the report-generation literature.
"""
from __future__ import annotations

import json
from pathlib import Path

from .example import Example


def load_r2gen(annotation: str | Path, images_root: str | Path | None = None
               ) -> dict[str, list[Example]]:
    annotation = Path(annotation)
    root = Path(images_root) if images_root else annotation.parent / "images"
    data = json.loads(annotation.read_text(encoding="utf-8"))
    out: dict[str, list[Example]] = {}
    for split, items in data.items():
        examples = []
        for item in items:
            paths = item.get("image_path") or []
            if isinstance(paths, str):
                paths = [paths]
            examples.append(Example(
                id=str(item["id"]), image_paths=[root / p for p in paths],
                report=(item.get("report") or "").strip(), label=int(item.get("label", -1)),
                meta={"source": "r2gen"}))
        out[split] = examples
    return out
