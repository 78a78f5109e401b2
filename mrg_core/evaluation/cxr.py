"""The chest radiograph model, measured (issue 15):

    python -m mrg_core.evaluation.cxr [--model assets/cxr_model] [--split val|test]
                                      [--drafts N] [--out FILE.json]

- the classifier on cxr_pneumonia `split` (paediatric, normal vs pneumonia): AUC, accuracy,
  sensitivity, specificity, ECE on the shown (calibrated) probability, at the model's threshold;
- sensitivity on the adult cxr_ccby radiographs (COVID-19, Pneumocystis, ARDS: all lung
  disease the model should call) and specificity on its "No Finding" images, at their own
  aspect ratio (the training images were squashed to 224 x 224);
- drafts for N studies of the split (half each decision when there are enough): distinct drafts,
  and whether the text says what the decision says (`pneumonia_statements`: a sentence naming
  airspace disease, consolidation, infiltrate, opacity or pneumonia without negating it);
- seconds per analysis and per draft on this machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from mrg_core.data.iu_reports import NEGATION, PNEUMONIA_WORDS
from mrg_core.paths import DEFAULT_CXR_MODEL_DIR, data_dir


def pneumonia_statements(text: str) -> list[str]:
    """Sentences that state pneumonia-type findings (not negated: "no focal consolidation" is
    a normal report's sentence)."""
    sentences = re.split(r"(?<=[.!?])\s+|\b(?:findings|impression)\s*:", text)
    return [s.strip() for s in sentences
            if s and PNEUMONIA_WORDS.search(s) and not NEGATION.search(s)]


def _probabilities(model, paths: list[Path]) -> np.ndarray:
    """Raw P(pneumonia) of each image classified on its own, in batches."""
    from mrg_core.io import load_study
    from mrg_core.study import Study

    out = []
    for i in range(0, len(paths), 32):
        views = tuple(v for p in paths[i:i + 32] for v in load_study([p]).views)
        out.append(model.view_probabilities(Study(views=views)))
    return np.concatenate(out)


def evaluate(model_dir: Path, split: str = "test", n_drafts: int = 40) -> dict:
    from mrg_core.data.cxr_pneumonia import load_cxr_pneumonia
    from mrg_core.evaluation.classification import classification_metrics
    from mrg_core.io import load_study
    from mrg_core.models import GenerationSettings, ReportModel

    model = ReportModel.from_pretrained(model_dir)
    cal = np.vectorize(model.calibrated)
    t_raw, t_shown = model.config.threshold, model.calibrated(model.config.threshold)
    examples = load_cxr_pneumonia()[split]
    paths = [ex.image_paths[0] for ex in examples]
    y = np.array([ex.label for ex in examples])
    t0 = time.perf_counter()
    raw = _probabilities(model, paths)
    per_image = (time.perf_counter() - t0) / len(paths)
    out = {"model": {"name": model.config.name, "version": model.config.version},
           "split": split,
           "classifier": {k: v for k, v in classification_metrics(y, cal(raw), t_shown).items()
                          if k != "reliability"},
           "threshold_raw": t_raw, "seconds_per_image_batched": round(per_image, 4)}

    ccby = data_dir() / "cxr_ccby"
    if (ccby / "manifest.csv").is_file():
        rows = list(csv.DictReader(open(ccby / "manifest.csv", newline="", encoding="utf-8")))
        ill = [ccby / "images" / r["filename"] for r in rows if r["finding"] != "No Finding"]
        clear = [ccby / "images" / r["filename"] for r in rows if r["finding"] == "No Finding"]
        p_ill, p_clear = _probabilities(model, ill), _probabilities(model, clear)
        covid = np.array([r["finding"] == "COVID-19" for r in rows if r["finding"] != "No Finding"])
        out["cxr_ccby_adults"] = {
            "n_disease": len(ill), "sensitivity_disease": float(np.mean(p_ill >= t_raw)),
            "n_covid": int(covid.sum()),
            "sensitivity_covid": float(np.mean(p_ill[covid] >= t_raw)),
            "n_no_finding": len(clear),
            "specificity_no_finding": float(np.mean(p_clear < t_raw))}

    if n_drafts:
        pos, neg = np.flatnonzero(raw >= t_raw), np.flatnonzero(raw < t_raw)
        k = n_drafts // 2
        pick = list(pos[:: max(1, len(pos) // k)][:k]) + list(neg[:: max(1, len(neg) // k)][:k])
        drafts, seconds = [], []
        settings = GenerationSettings(max_new_tokens=model.config.max_report_tokens)
        for i in pick:
            study = load_study([paths[i]])
            t1 = time.perf_counter()
            text = model.generate_report(study, settings)
            seconds.append(time.perf_counter() - t1)
            drafts.append({"image": examples[i].id, "label": int(y[i]),
                           "decision": int(raw[i] >= t_raw), "draft": text,
                           "pneumonia_statements": pneumonia_statements(text)})
        by = {d: [x for x in drafts if x["decision"] == d] for d in (0, 1)}
        out["drafts"] = {
            "n": len(drafts), "distinct": len({x["draft"] for x in drafts}),
            "negative_decision_without_pneumonia_statement":
                float(np.mean([not x["pneumonia_statements"] for x in by[0]])) if by[0] else None,
            "positive_decision_with_pneumonia_statement":
                float(np.mean([bool(x["pneumonia_statements"]) for x in by[1]])) if by[1] else None,
            "seconds_per_draft_median": round(float(np.median(seconds)), 2),
            "examples": drafts}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrg_core.evaluation.cxr", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_CXR_MODEL_DIR)
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--drafts", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    res = evaluate(args.model, args.split, args.drafts)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text if not args.out else json.dumps({k: v for k, v in res.items()
                                                 if k != "drafts"} | {
        "drafts": {k: v for k, v in res.get("drafts", {}).items() if k != "examples"}},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
