"""IU X-ray (Open-i) report text with a pneumonia text class, for drafts learned from text alone.

`$MRG_DATA_DIR/iu_reports/iu_reports.csv` (CC BY-NC-ND 4.0): findings, impression and MeSH
terms per report, no images. The text class is defined from the MeSH *major* terms:
- 1 (pneumonia-compatible): a major term names Pneumonia, Airspace Disease, Consolidation or
  Infiltrate (213 reports). Only 42 name Pneumonia itself; radiologists mostly describe what
  they see, and these are the words a radiograph with pneumonia is reported in.
- 0 (normal): the major terms are exactly "normal" (1,391 reports).
- every other report (cardiomegaly, effusion alone, devices, ...) is left out: the image model
  decides pneumonia vs normal only, so a draft must not state findings it never looked for.
The text keeps IU's two sections: "findings : ... impression : ...".
"""
from __future__ import annotations

import csv
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..paths import data_dir

PNEUMONIA_TERMS = ("pneumonia", "airspace disease", "consolidation", "infiltrate")


@dataclass(frozen=True)
class LabelledText:
    uid: str
    text: str
    label: int  # 1 pneumonia-compatible, 0 normal


def default_path() -> Path:
    return data_dir() / "iu_reports" / "iu_reports.csv"


def text_class(mesh_major: str) -> int | None:
    terms = [t.strip().lower() for t in (mesh_major or "").split(";") if t.strip()]
    if any(any(w in t for w in PNEUMONIA_TERMS) for t in terms):
        return 1
    if terms == ["normal"]:
        return 0
    return None


def sectioned(findings: str, impression: str) -> str:
    """IU's sections in one text; de-identification marks (XXXX) dropped."""
    parts = [f"{name} : {t.strip()}" for name, t in (("findings", findings),
                                                     ("impression", impression)) if t.strip()]
    text = re.sub(r"\bx-X{2,}", "x-ray", " ".join(parts), flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", re.sub(r"\bX{2,}\b", " ", text)).strip()


def load_iu_labelled(path: str | Path | None = None, val_share: float = 0.1
                     ) -> dict[str, list[LabelledText]]:
    """{"train"|"val": [LabelledText]}: reports with a text class, split by a hash of the uid
    (stable across runs and machines)."""
    out: dict[str, list[LabelledText]] = {"train": [], "val": []}
    with open(path or default_path(), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = text_class(row.get("mesh_major", ""))
            text = sectioned(row.get("findings", ""), row.get("impression", ""))
            if label is None or not text:
                continue
            split = "val" if zlib.crc32(row["uid"].encode()) % 1000 < val_share * 1000 else "train"
            out[split].append(LabelledText(row["uid"], text, label))
    return out
