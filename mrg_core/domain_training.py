"""Train the modality classifier of mrg_core.domain (needs requirements-eval.txt: scikit-learn).

    python -m mrg_core.domain_training [--out assets/domain] [--cxr-train 600]

Training images: COV-CTR train (CT slices), a sample of cxr_pneumonia train (chest
radiographs), and "other": generated pictures (noise, gradients, documents, shapes) and the MR /
colour test images that pydicom ships. Held out, scored once: COV-CTR val + test and the TCIA
series slices (CT); cxr_pneumonia test, cxr_ccby and the shared CR DICOMs (radiographs); other
kinds of generated picture (charts, photographs-like smooth fields) and matplotlib's sample
photographs (other). The linear layer is fitted by logistic regression on the frozen features;
its C is chosen by grouped cross-validation on train.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mrg_core.domain import KINDS, ModalityClassifier
from mrg_core.paths import data_dir


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _dicom_views(paths) -> list[np.ndarray]:
    from mrg_core.io import load_view

    out = []
    for p in paths:
        try:
            out += [v.display for v in load_view(p)]
        except Exception:  # noqa: BLE001 - a test file the loader refuses is simply not used
            continue
    return out


# ------------------------------------------------------------------ generated "other" pictures

def _noise(rng, s):
    return rng.integers(0, 256, (s, s)).astype(np.uint8)


def _gradient(rng, s):
    a, b = rng.uniform(-1, 1, 2)
    y, x = np.mgrid[0:s, 0:s] / s
    return ((a * x + b * y - min(0, a) - min(0, b)) / (abs(a) + abs(b) + 1e-6) * 255).astype(
        np.uint8)


def _document(rng, s):
    im = Image.new("L", (s, s), int(rng.integers(200, 256)))
    d = ImageDraw.Draw(im)
    y = int(rng.integers(5, 20))
    while y < s - 10:
        words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, rng.integers(2, 9)))
                         for _ in range(rng.integers(3, 9)))
        d.text((int(rng.integers(4, 20)), y), words, fill=int(rng.integers(0, 80)))
        y += int(rng.integers(10, 18))
    return np.asarray(im)


def _shapes(rng, s):
    im = Image.new("L", (s, s), int(rng.integers(0, 256)))
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(3, 12)):
        x0, y0 = rng.integers(0, s, 2)
        x1, y1 = x0 + rng.integers(10, s // 2), y0 + rng.integers(10, s // 2)
        box = [int(x0), int(y0), int(x1), int(y1)]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=int(rng.integers(0, 256)))
    return np.asarray(im)


def _chart(rng, s):
    im = Image.new("L", (s, s), 255)
    d = ImageDraw.Draw(im)
    d.line([(20, s - 20), (s - 10, s - 20)], fill=0, width=2)
    d.line([(20, 10), (20, s - 20)], fill=0, width=2)
    for _ in range(rng.integers(1, 4)):
        ys = np.cumsum(rng.normal(0, 8, 12)) + s / 2
        pts = [(20 + i * (s - 30) / 11, float(np.clip(y, 12, s - 22))) for i, y in enumerate(ys)]
        d.line(pts, fill=int(rng.integers(0, 150)), width=2)
    if rng.random() < 0.5:
        for i in range(rng.integers(3, 8)):
            h = int(rng.integers(10, s - 40))
            d.rectangle([30 + i * 25, s - 20 - h, 45 + i * 25, s - 20], fill=int(rng.integers(60, 200)))
    return np.asarray(im)


def _smooth_field(rng, s):
    small = rng.random((8, 8)) * 255
    return np.asarray(Image.fromarray(small.astype(np.uint8)).resize((s, s), Image.BICUBIC))


TRAIN_MAKERS = (_noise, _gradient, _document, _shapes)
HELDOUT_MAKERS = (_chart, _smooth_field)


def generated(makers, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [makers[i % len(makers)](rng, int(rng.choice([128, 224, 320]))) for i in range(n)]


# ------------------------------------------------------------------ the data

def collect(cxr_train: int = 600, seed: int = 0) -> tuple[dict, dict]:
    """{kind: [uint8 image]} for train and for held-out."""
    import matplotlib
    import pydicom

    root = data_dir()
    splits = json.loads((root / "covctr" / "splits.json").read_text())
    ct_path = {p.name: p for p in (root / "covctr" / "images").rglob("*") if p.is_file()}
    ct = {k: [_grey(ct_path[i]) for i in v if i in ct_path] for k, v in splits.items()}
    cxr_splits = json.loads((root / "cxr_pneumonia" / "splits.json").read_text())
    cxr_train_ids = random.Random(seed).sample(cxr_splits["train"], cxr_train)
    cxr_dir = root / "cxr_pneumonia" / "images"
    ccby = [p for p in (root / "cxr_ccby" / "images").iterdir() if p.is_file()]
    tests = Path(pydicom.__file__).parent / "data" / "test_files"
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    train = {
        "ct_slice": ct["train"],
        "chest_radiograph": [_grey(cxr_dir / i) for i in cxr_train_ids],
        "other": generated(TRAIN_MAKERS, 400, seed) + _dicom_views(
            sorted(tests.glob("MR_small*.dcm")) + sorted(tests.glob("SC_rgb*.dcm"))),
    }
    held = {
        "ct_slice": ct["val"] + ct["test"] + _dicom_views(
            sorted((root / "ct_series").rglob("*.dcm"))),
        "chest_radiograph": [_grey(cxr_dir / i) for i in cxr_splits["test"]]
        + [_grey(p) for p in ccby]
        + _dicom_views(sorted((root / "dicom").glob("*.dcm"))),
        "other": generated(HELDOUT_MAKERS, 200, seed + 1)
        + [_grey(p) for p in sorted(sample.glob("*.jpg")) + sorted(sample.glob("*.png"))],
    }
    return train, held


def featurise(clf: ModalityClassifier, images: list[np.ndarray], batch: int = 32) -> np.ndarray:
    return np.concatenate([clf.features(images[i:i + batch]).numpy()
                           for i in range(0, len(images), batch)])


def main(argv=None) -> int:
    from safetensors.numpy import save_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("assets/domain"))
    ap.add_argument("--cxr-train", type=int, default=600)
    a = ap.parse_args(argv)
    train, held = collect(a.cxr_train)
    probe = ModalityClassifier(np.zeros((3, 1280)), np.zeros(3))
    xs, ys = [], []
    for k, kind in enumerate(KINDS):
        xs.append(featurise(probe, train[kind]))
        ys += [k] * len(train[kind])
    x, y = np.concatenate(xs), np.array(ys)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    best = max((float(cross_val_score(
        LogisticRegression(C=c, max_iter=3000), (x - mu) / sd, y,
        cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()), c)
        for c in (0.01, 0.1, 1.0))
    lr = LogisticRegression(C=best[1], max_iter=3000).fit((x - mu) / sd, y)
    # fold the standardisation into the linear layer: w' = w / sd, b' = b - w'·mu
    # C order: sklearn's coef_ can be Fortran-ordered, which safetensors would store scrambled
    weight = np.ascontiguousarray(lr.coef_ / sd, dtype=np.float32)
    bias = np.ascontiguousarray(lr.intercept_ - weight @ mu, dtype=np.float32)
    clf = ModalityClassifier(weight, bias)
    report = {"train_counts": {k: len(v) for k, v in train.items()},
              "train_cv_accuracy": round(best[0], 4), "C": best[1],
              "heldout_counts": {k: len(v) for k, v in held.items()}, "heldout": {}}
    correct = total = 0
    for k, kind in enumerate(KINDS):
        pred = np.concatenate([clf.probabilities(held[kind][i:i + 32]).argmax(1)
                               for i in range(0, len(held[kind]), 32)])
        report["heldout"][kind] = {"accuracy": round(float((pred == k).mean()), 4),
                                   "confused_with": {KINDS[j]: int((pred == j).sum())
                                                     for j in range(3) if j != k}}
        correct += int((pred == k).sum())
        total += len(pred)
    report["heldout_accuracy"] = round(correct / total, 4)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight, "bias": bias}, str(a.out / "model.safetensors"))
    (a.out / "config.json").write_text(json.dumps(
        {"kinds": list(KINDS), "image_size": 224, "features": "efficientnet-lite0 ImageNet, "
         "global average of the last feature map (1280)", **report}, indent=2) + "\n")
    # what was saved is what was scored: reload it and compare on the held-out images
    loaded = ModalityClassifier.from_folder(a.out)
    for kind in KINDS:
        same = np.allclose(loaded.probabilities(held[kind][:32]), clf.probabilities(
            held[kind][:32]), atol=1e-5)
        if not same:
            raise RuntimeError(f"the saved classifier differs from the scored one ({kind})")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
