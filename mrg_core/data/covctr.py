"""COV-CTR loader: reports.tsv + splits.json + images/{covid,noncovid}/<image_id>.

Decisions (see data/covctr/README.md):
- One Example per image id, so split sizes equal splits.json (468/72/114).
- Ids without a report (25 here) are kept with report="" and the label taken from the image
  folder: they still train and test the classifier; text losses and caption metrics skip them.
- Six ids appear twice in reports.tsv with different texts. Both texts are kept, in source order,
  as `references` (multi-reference metrics); the first one is the training target, so no image
  is weighted twice in training.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..paths import data_dir
from .example import Example

SPLITS = ("train", "val", "test")


def default_root() -> Path:
    return data_dir() / "covctr"


def _read_reports(path: Path) -> dict[str, tuple[int, list[str]]]:
    out: dict[str, tuple[int, list[str]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)  # header
        for row in reader:
            if not row or not row[0].strip():
                continue
            image_id, covid = row[0].strip(), int(row[1])
            text = row[2].strip() if len(row) > 2 else ""
            label, texts = out.get(image_id, (covid, []))
            if label != covid:
                raise ValueError(f"{path}: conflicting labels for {image_id}")
            if text:
                texts.append(text)
            out[image_id] = (label, texts)
    return out


def _find_image(root: Path, image_id: str) -> tuple[Path, int]:
    for folder, label in (("covid", 1), ("noncovid", 0)):
        p = root / "images" / folder / image_id
        if p.is_file():
            return p, label
    raise FileNotFoundError(f"COV-CTR image {image_id} not found under {root / 'images'}")


def load_covctr(root: str | Path | None = None) -> dict[str, list[Example]]:
    """{"train"|"val"|"test": [Example]} in splits.json order."""
    root = Path(root) if root else default_root()
    reports = _read_reports(root / "reports.tsv")
    splits = json.loads((root / "splits.json").read_text(encoding="utf-8"))
    seen: dict[str, str] = {}
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        examples = []
        for image_id in splits.get(split, []):
            if image_id in seen:
                raise ValueError(f"{image_id} is in both {seen[image_id]} and {split}")
            seen[image_id] = split
            path, folder_label = _find_image(root, image_id)
            label, texts = reports.get(image_id, (folder_label, []))
            examples.append(Example(id=image_id, image_paths=[path],
                                    report=texts[0] if texts else "", label=int(label),
                                    references=tuple(texts), meta={"source": "covctr"}))
        out[split] = examples
    return out
