"""Paediatric chest radiographs, normal vs pneumonia (Kermany et al. 2018, CC BY 4.0).

`$MRG_DATA_DIR/cxr_pneumonia`: images/{NORMAL,PNEUMONIA}/*.jpeg (224x224 re-saves, aspect ratio
not kept), labels.csv (image, label, pneumonia, patient) and splits.json (train/val/test grouped
by patient). One Example per image; there is no report text (report "").
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..paths import data_dir
from .example import Example

SPLITS = ("train", "val", "test")


def default_root() -> Path:
    return data_dir() / "cxr_pneumonia"


def load_cxr_pneumonia(root: str | Path | None = None) -> dict[str, list[Example]]:
    """{"train"|"val"|"test": [Example]} in splits.json order; label 1 = pneumonia."""
    root = Path(root) if root else default_root()
    rows = {}
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows[row["image"]] = row
    splits = json.loads((root / "splits.json").read_text(encoding="utf-8"))
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        out[split] = [Example(id=image, image_paths=[root / "images" / image], report="",
                              label=int(rows[image]["pneumonia"]),
                              meta={"source": "cxr_pneumonia", "patient": rows[image]["patient"],
                                    "kind": rows[image]["label"]})
                      for image in splits.get(split, [])]
    return out
