"""Tiny synthetic datasets in the real on-disk layouts, for tests and smoke runs (no real data).

COVID-like images carry bright blobs in a lobe, with a matching report; normal ones do not.
Like COV-CTR, positives are PNG and some negatives are JPEG (so the PNG-only path is exercised).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

_SIDES = ["right", "left"]
_LOBES = ["upper", "lower"]
NORMAL_REPORT = ("The thorax was symmetrical, no enlarged lymph nodes were seen in the "
                 "mediastinum, the texture of both lungs was clear, and no abnormal density "
                 "shadow was seen in the bilateral thoracic cavity.")


def covid_report(side: str, lobe: str) -> str:
    return ("The thorax was symmetrical, no enlarged lymph nodes were seen in the mediastinum, "
            f"patchy ground glass shadows were seen in the {lobe} lobe of the {side} lung with "
            "unclear margins, and no abnormal density shadow was seen in the bilateral thoracic "
            "cavity.")


def synthetic_image(label: int, side: str, lobe: str, rng: np.random.Generator,
                    size: int = 48) -> np.ndarray:
    img = rng.normal(60, 12, (size, size))
    yy, xx = np.mgrid[:size, :size]
    for cx in (size * 0.3, size * 0.7):  # two dark "lungs"
        img -= 40 * (((xx - cx) / (size * 0.18)) ** 2 + ((yy - size / 2) / (size * 0.35)) ** 2 < 1)
    if label:
        cx = size * (0.3 if side == "right" else 0.7)  # radiological convention: right on left
        cy = size * (0.35 if lobe == "upper" else 0.65)
        img += 140 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size * 0.08) ** 2)))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_covctr(root: str | Path, n: dict | None = None, size: int = 48,
                           seed: int = 0, missing_reports: int = 1) -> Path:
    """COV-CTR layout: images/{covid,noncovid}/, reports.tsv, splits.json. The last
    `missing_reports` training ids get no report row (as 25 real ones do)."""
    root = Path(root)
    n = n or {"train": 16, "val": 6, "test": 6}
    rng = np.random.default_rng(seed)
    for d in ("covid", "noncovid"):
        (root / "images" / d).mkdir(parents=True, exist_ok=True)
    rows, splits = [], {}
    k = 0
    for split, count in n.items():
        ids = []
        for i in range(count):
            label = i % 2
            side, lobe = _SIDES[(i // 2) % 2], _LOBES[(i // 4) % 2]
            img = synthetic_image(label, side, lobe, rng, size)
            if label:
                image_id = f"{split}-{i}%0.png"
                Image.fromarray(img).save(root / "images" / "covid" / image_id)
            else:
                jpeg = k % 2 == 0
                image_id = f"{split}-{i}.{'jpg' if jpeg else 'png'}"
                rgb = np.repeat(img[..., None], 3, axis=2)  # RGB files, as many sources are
                Image.fromarray(rgb).save(root / "images" / "noncovid" / image_id,
                                          quality=95) if jpeg else \
                    Image.fromarray(rgb).save(root / "images" / "noncovid" / image_id)
                k += 1
            ids.append(image_id)
            if not (split == "train" and i >= count - missing_reports):
                rows.append((image_id, label, covid_report(side, lobe) if label else NORMAL_REPORT))
        splits[split] = ids
    with open(root / "reports.tsv", "w", encoding="utf-8") as f:
        f.write("image_id\tcovid\treport_en\n")
        for r in rows:
            f.write(f"{r[0]}\t{r[1]}\t{r[2]}\n")
    (root / "splits.json").write_text(json.dumps(splits))
    return root


def write_synthetic_r2gen(root: str | Path, n: dict | None = None, views: int = 2,
                          size: int = 48, seed: int = 1) -> Path:
    """R2Gen layout: annotation.json + images/<id>/<k>.png; returns the annotation path."""
    root = Path(root)
    n = n or {"train": 6, "val": 2, "test": 2}
    rng = np.random.default_rng(seed)
    ann = {}
    for split, count in n.items():
        items = []
        for i in range(count):
            label = i % 2
            sid = f"{split}_{i}"
            (root / "images" / sid).mkdir(parents=True, exist_ok=True)
            paths = []
            for v in range(views):
                rel = f"{sid}/{v}.png"
                Image.fromarray(synthetic_image(label, "right", "lower", rng, size)).save(
                    root / "images" / rel)
                paths.append(rel)
            report = covid_report("right", "lower") if label else NORMAL_REPORT
            items.append({"id": sid, "report": report, "image_path": paths, "label": label})
        ann[split] = items
    (root / "annotation.json").write_text(json.dumps(ann))
    return root / "annotation.json"
