"""Reviewed reports exported by the store (`Store.export_pairs(folder)`).

Layout: folder/corrections.jsonl, one JSON object a line:
{"id", "image_path": [paths relative to folder], "report" (the reviewer's final text), "label",
 "kind", "findings" ({label name: 0/1}: the reader's finding chips, or null), "finding_flips"
 (the chips they changed), "draft", "probability", "model_version", "created_at"}, and the image
files under folder/images/.

"kind" is "corrected" (the reviewer edited the draft), "written" (no draft) or "accepted" (the
draft saved unchanged, "accepted as drafted"; files exported before the field existed have no
"kind" and count as corrections). Accepted drafts are left out by default, as in
finetune.select_corrections: their report is the model's own output, so they add no
supervision the model lacks and would pull it towards its own drafts. Pass
include_accepted=True to keep them as positive examples (Example.meta["kind"] still tells).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .example import Example

META_KEYS = ("kind", "draft", "probability", "model_version", "created_at", "findings",
             "finding_flips")


def load_corrections(folder: str | Path, include_accepted: bool = False) -> list[Example]:
    folder = Path(folder)
    examples = []
    with open(folder / "corrections.jsonl", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("kind") == "accepted" and not include_accepted:
                continue
            paths = rec.get("image_path") or []
            if isinstance(paths, str):
                paths = [paths]
            resolved = []
            for p in paths:
                p = folder / p
                if not p.exists() and (folder / "images" / Path(p).name).exists():
                    p = folder / "images" / Path(p).name  # tolerate bare file names
                resolved.append(p)
            label = rec.get("label")
            examples.append(Example(
                id=str(rec.get("id", line_no)), image_paths=resolved,
                report=(rec.get("report") or "").strip(),
                label=-1 if label is None else int(label),
                meta={"source": "corrections", **{k: rec.get(k) for k in META_KEYS}}))
    return examples


def split_by_id(examples: list[Example], val_fraction: float = 0.15
                ) -> dict[str, list[Example]]:
    """Stable train/val split by a hash of the id: adding corrections never moves old ones."""
    out: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for ex in examples:
        h = int(hashlib.sha256(ex.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        out["val" if h < val_fraction else "train"].append(ex)
    return out
