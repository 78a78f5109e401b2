"""IU X-ray (Open-i) report text with a pneumonia text class, for drafts learned from text alone.

`$MRG_DATA_DIR/iu_reports/iu_reports.csv` (CC BY-NC-ND 4.0): findings, impression and MeSH
terms per report, no images. The text class is defined from the MeSH *major* terms:
- 1 (pneumonia-compatible): a major term names Pneumonia, Airspace Disease, Consolidation or
  Infiltrate (213 reports). Only 42 name Pneumonia itself; radiologists mostly describe what
  they see, and these are the words a radiograph with pneumonia is reported in.
- 0 (normal): the major terms are exactly "normal" (1,391 reports).
- every other report (cardiomegaly, effusion alone, devices, ...) is left out: the image model
  decides pneumonia vs normal only, so a draft must not state findings it never looked for.
The text keeps IU's two sections: "findings : ... impression : ...". Within it, only sentences
that name a pneumonia-type finding or say something is normal or absent are kept
(`decision_sentences`): "There is moderate left pleural effusion" or "Degenerative change of the
spine" would otherwise be written into drafts of a model that never looked for them.
A pneumonia-compatible report always says where ("left lower lobe airspace disease"); the image
model does not localise, so in those texts every side, lobe and zone becomes the placeholder
"[location]" (`unlocalised`): the draft leaves the place for the radiologist to fill in instead
of guessing one.
"""
from __future__ import annotations

import csv
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..paths import data_dir

PNEUMONIA_TERMS = ("pneumonia", "airspace disease", "consolidation", "infiltrate")
# words of a sentence that states a pneumonia-type finding, and words that negate or normalise
PNEUMONIA_WORDS = re.compile(r"airspace|consolidat|infiltrat|opacit|pneumonia", re.IGNORECASE)
NEGATION = re.compile(r"\b(no|not|without|negative|clear|resolved|free of|normal|unremarkable)\b",
                      re.IGNORECASE)

# sides, lobes and zones of the lung, with their modifiers ("right lower lobe", "bibasilar",
# "left lung base", "lingula")
LOCATION = re.compile(
    r"\b(?:right|left|bilateral|bibasilar|bibasal|basilar|retrocardiac|lingular|perihilar|both)"
    r"(?:\s+(?:upper|middle|mid|lower))?"
    r"(?:\s+(?:lung bases?|lung apex|lobes?|lungs?|bases?|midlung|hemithorax|apex|apices"
    r"|zones?))?\b"
    r"|\b(?:upper|middle|mid|lower)\s+(?:lobes?|lungs?|lung zones?|zones?)\b"
    r"|\b(?:lingula|midlung|lung bases?)\b", re.IGNORECASE)
PLACEHOLDER = "[location]"


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


def decision_sentences(text: str) -> str:
    """The sentences of `text` that name a pneumonia-type finding or state normality/absence;
    any other positive statement is dropped."""
    keep = [s for s in re.split(r"(?<=[.!?])\s+", text.strip())
            if s and (PNEUMONIA_WORDS.search(s) or NEGATION.search(s))]
    return " ".join(keep)


def unlocalised(text: str) -> str:
    """Every side/lobe/zone phrase replaced by PLACEHOLDER (runs of them by one)."""
    t = LOCATION.sub(PLACEHOLDER, text)
    return re.sub(r"\[location\](?:\s*(?:and|,|/)?\s*\[location\])+", PLACEHOLDER, t)


def sectioned(findings: str, impression: str) -> str:
    """IU's sections in one text (decision_sentences of each); de-identification marks (XXXX)
    dropped."""
    parts = [f"{name} : {t}" for name, t in (("findings", decision_sentences(findings)),
                                             ("impression", decision_sentences(impression)))
             if t]
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
            if label == 1:  # the image model does not say where: neither may the text
                text = unlocalised(text)
            split = "val" if zlib.crc32(row["uid"].encode()) % 1000 < val_share * 1000 else "train"
            out[split].append(LabelledText(row["uid"], text, label))
    return out
