"""One evaluation of a ReportModel on one split, next to three baselines on the same split.

Besides caption, clinical and classifier metrics, "draft quality" checks what those miss: draft
diversity of every system (a template scores well on captions), the share of the model's
Grad-CAM mass on the lung fields (does the classifier look at the lungs?) and whether the model's
drafts agree with its own positive/negative call.

Writes to out_dir: metrics.json (everything), metrics.md (the tables), generations.jsonl (per
study: reference, model draft, baselines, probability, lung share of the saliency) and roc.png /
reliability.png / training_curves.png.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.example import Example
from ..data.images import ImageCache, is_png_only
from .baselines import MostFrequentBaseline, RetrievalBaseline, TemplateBaseline, pixel_features
from .caption import METRIC_NAMES, CaptionScorer
from .classification import classification_metrics
from .clinical import (ReportTextClassifier, diagnostic_accuracy, extract_findings,
                       finding_scores, label_agreement)
from .decision_text import decision_text_agreement
from .diversity import draft_diversity
from .plots import plot_reliability, plot_roc, plot_training_curves
from .saliency import saliency_summary, study_lung_share


def run_model(model, examples: list[Example], cache: ImageCache, settings=None) -> dict:
    """{id: {"probability", "label", "report"}} (+ "error" for studies that fail to load).

    Models with `analyze` (one forward + backward that also yields Grad-CAM maps, no extra
    forward pass) add "lung_share" and "lung_mask" (see saliency.py)."""
    from ..io import StudyLoadError

    analyze = getattr(model, "analyze", None)
    out = {}
    for ex in tqdm(examples, desc="model: predict + generate", leave=False):
        try:
            study = cache.load_study(ex)
        except StudyLoadError as e:
            out[ex.id] = {"error": f"{e.code}: {e.message}"}
            continue
        saliency = {}
        if analyze is not None:
            pred, maps = analyze(study)
            share, found = study_lung_share([v.display for v in study.views], maps)
            saliency = {"lung_share": None if share is None else round(share, 4),
                        "lung_mask": found}
        else:
            pred = model.predict(study)
        text = model.generate_report(study, settings) if settings is not None \
            else model.generate_report(study)
        out[ex.id] = {"probability": float(pred.probability), "label": int(pred.label),
                      "report": text, **saliency}
        if getattr(model, "finding_names", None):
            out[ex.id]["finding_probabilities"] = {k: round(float(pred.labels[k]), 4)
                                                   for k in model.finding_names}
            out[ex.id]["findings"] = list(pred.findings)
    return out


def evaluate_model(model, examples: list[Example], train_examples: list[Example],
                   out_dir: str | Path, settings=None, split: str = "test",
                   history: dict | None = None, meteor: bool = True, clinical: bool = True,
                   text_classifier: ReportTextClassifier | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cache = ImageCache(model.config.preprocess)
    # the threshold on the scale of the probabilities the model reports (calibrated or raw)
    threshold = model.calibrated(model.config.threshold)

    preds = run_model(model, examples, cache, settings)
    ok = [ex for ex in examples if "error" not in preds[ex.id]]
    refs = {ex.id: list(ex.references) for ex in ok if ex.has_report}
    labels = {ex.id: ex.label for ex in ok}

    # ---- baselines (fitted on train only) --------------------------------------------------
    prob = {k: v["probability"] for k, v in preds.items() if "error" not in v}
    systems = {"model": {k: v["report"] for k, v in preds.items() if "error" not in v}}
    baselines = [MostFrequentBaseline(train_examples),
                 RetrievalBaseline(train_examples, pixel_features(cache)),
                 TemplateBaseline(train_examples, lambda ex: prob[ex.id], threshold)]
    for b in baselines:
        systems[b.name] = {ex.id: b.generate(ex) for ex in ok}

    # ---- text metrics ----------------------------------------------------------------------
    clf = text_classifier
    if clinical and clf is None:
        clf = ReportTextClassifier.for_examples(train_examples)
    table = {}
    with CaptionScorer(meteor=meteor) as scorer:
        for name, hyps in tqdm(systems.items(), desc="scoring", leave=False):
            row = scorer.score(refs, hyps)
            fs = finding_scores(refs, hyps)
            row |= {"finding_micro_f1": fs.get("micro_f1"), "finding_macro_f1": fs.get("macro_f1"),
                    "findings": fs}
            if clf is not None:
                row["diagnostic_accuracy"] = diagnostic_accuracy(clf, hyps, labels)["accuracy"]
            table[name] = row

    # ---- classifier ------------------------------------------------------------------------
    y = np.array([ex.label for ex in ok])
    p = np.array([prob[ex.id] for ex in ok])
    png = np.array([is_png_only(ex) for ex in ok], dtype=bool)
    classifier = classification_metrics(y, p, threshold)
    classifier["png_only"] = classification_metrics(y[png], p[png], threshold)
    classifier["png_only"].pop("reliability", None)

    metrics = {"split": split, "n_examples": len(examples), "n_scored_reports": len(refs),
               "load_errors": {k: v["error"] for k, v in preds.items() if "error" in v},
               "systems": table, "classifier": classifier}
    if getattr(model, "finding_names", None):
        metrics["finding_heads"] = finding_head_metrics(model, ok, preds)
    metrics["draft_quality"] = draft_quality(systems, refs, preds, labels)
    if clf is not None:
        ref_texts = {k: r[0] for k, r in refs.items()}
        metrics["reference_diagnostic_accuracy"] = \
            diagnostic_accuracy(clf, ref_texts, labels)["accuracy"]
        text_labels = diagnostic_accuracy(clf, systems["model"], labels).get("predicted", {})
        metrics["agreement"] = label_agreement({k: v["label"] for k, v in preds.items()
                                                if "error" not in v}, text_labels)
    info = getattr(model, "info", None)
    metrics["model"] = info if isinstance(info, dict) else \
        {"name": model.config.name, "version": model.config.version}
    from mrg_core.models.quantize import model_precision

    metrics["precision"] = model_precision(model)  # the LM's form that wrote the drafts

    # ---- files -----------------------------------------------------------------------------
    plots = {"roc": plot_roc(y, p, out_dir / "roc.png").name,
             "reliability": plot_reliability(classifier["reliability"],
                                             out_dir / "reliability.png").name}
    if history:
        plots["training_curves"] = plot_training_curves(history,
                                                        out_dir / "training_curves.png").name
    metrics["plots"] = plots
    metrics["seconds"] = round(time.time() - t0, 1)
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    (out_dir / "metrics.md").write_text(metrics_markdown(metrics))
    with open(out_dir / "generations.jsonl", "w", encoding="utf-8") as f:
        for ex in examples:
            pred = {("predicted_label" if k == "label" else k): v for k, v in preds[ex.id].items()}
            rec = {"id": ex.id, "label": ex.label, "reference": ex.report, **pred}
            rec.update({n: systems[n].get(ex.id) for n in systems if n != "model"})
            f.write(json.dumps(rec) + "\n")
    return metrics


def draft_quality(systems: dict, refs: dict, preds: dict, labels: dict) -> dict:
    """Diversity of every system's drafts; saliency on the lungs and decision-text agreement of
    the model (saliency only for models with `analyze`)."""
    first = {k: r[0] for k, r in refs.items()}
    out = {"diversity": {name: draft_diversity(hyps, first) for name, hyps in systems.items()},
           "decision_text": decision_text_agreement(preds)}
    analysed = {k: v for k, v in preds.items() if "lung_mask" in v}
    if analysed:
        out["saliency"] = saliency_summary(analysed, labels)
    return out


def finding_head_metrics(model, examples: list[Example], preds: dict) -> dict:
    """Per finding head (finding_prompt models): AUC of its probability and F1 of its stated
    decision against the findings the reference report names."""
    from sklearn.metrics import f1_score, roc_auc_score

    said = [(extract_findings(ex.report), preds[ex.id]) for ex in examples if ex.has_report]
    out = {}
    for name in model.finding_names:
        y = np.array([name in ref for ref, _ in said], dtype=int)
        p = np.array([pr["finding_probabilities"][name] for _, pr in said])
        stated = np.array([name in pr["findings"] for _, pr in said], dtype=int)
        out[name] = {"n_positive": int(y.sum()),
                     "auc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None,
                     "f1": float(f1_score(y, stated, zero_division=0)),
                     "stated": int(stated.sum())}
    return out


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def metrics_markdown(m: dict) -> str:
    lines = [f"# Evaluation on `{m['split']}` ({m['n_examples']} studies, "
             f"{m['n_scored_reports']} with a reference report)", "",
             "Caption metrics via pycocoevalcap on cleaned text; diagnostic accuracy = "
             "MiniLM+LR report classifier vs the study label; finding F1 = rule-based findings "
             "and lobes, micro/macro. Baselines are fitted on the training split.", ""]
    cols = list(METRIC_NAMES) + ["diagnostic_accuracy", "finding_micro_f1", "finding_macro_f1"]
    lines.append("| system | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, row in m["systems"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    if "reference_diagnostic_accuracy" in m:
        lines += ["", f"Text classifier on the reference reports (ceiling): "
                      f"{_fmt(m['reference_diagnostic_accuracy'])}. Agreement between the image "
                      f"classifier's label and the text classifier's label on the model's "
                      f"reports: {_fmt(m['agreement'].get('agreement'))} "
                      f"(kappa {_fmt(m['agreement'].get('kappa'))})."]
    c, png = m["classifier"], m["classifier"]["png_only"]
    lines += ["", f"## Image classifier (threshold {c.get('threshold', 0.5):.2f})", "",
              "| subset | n | AUC | accuracy | F1 | sensitivity | specificity | Brier | ECE |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in (("all", c), ("PNG-only", png)):
        lines.append(f"| {name} | {r.get('n', 0)} | " + " | ".join(
            _fmt(r.get(k)) for k in ("auc", "accuracy", "f1", "sensitivity", "specificity",
                                     "brier", "ece")) + " |")
    lines += ["", "PNG-only: every COVID image in COV-CTR is a PNG; the subset removes the "
              "file-format shortcut.", ""]
    if m.get("finding_heads"):
        lines += ["## Finding heads (image → findings stated before the report)", "",
                  "| finding | positives | AUC | F1 of the stated finding | stated |",
                  "|---|---|---|---|---|"]
        for name, r in m["finding_heads"].items():
            lines.append(f"| {name} | {r['n_positive']} | {_fmt(r['auc'])} | {_fmt(r['f1'])} "
                         f"| {r['stated']} |")
        lines.append("")
    if m.get("draft_quality"):
        lines += draft_quality_markdown(m["draft_quality"])
    for name, file in m.get("plots", {}).items():
        lines.append(f"![{name}]({file})")
    return "\n".join(lines) + "\n"


def draft_quality_markdown(q: dict) -> list[str]:
    lines = ["## Draft quality", "",
             "Distinct = distinct cleaned drafts / studies; told apart = share of study pairs "
             "whose reference findings differ that got different drafts.", "",
             "| system | distinct drafts | distinct / studies | told apart |", "|---|---|---|---|"]
    for name, d in q["diversity"].items():
        lines.append(f"| {name} | {d['distinct_drafts']} | {_fmt(d['distinct_ratio'])} "
                     f"| {_fmt(d['different_findings_different_drafts'])} |")
    t = q["decision_text"]
    lines += ["", f"Model drafts that agree with the image classifier's call: negative calls "
                  f"stating no abnormal finding (other than the finding heads' own) "
                  f"{_fmt(t['negative_states_no_finding'])} (n={t['n_negative']}); positive "
                  f"calls stating at least one {_fmt(t['positive_states_finding'])} "
                  f"(n={t['n_positive']})."]
    if "saliency" in q:
        s = q["saliency"]
        lines += ["", f"Grad-CAM mass on the lung fields (classical lung mask from the pixels; "
                      f"a uniform map scores the mask's area share): all "
                      f"{_fmt(s['lung_share_mean'])} (n={s['n_scored']}), positive-label "
                      f"studies {_fmt(s['lung_share_positive_mean'])} "
                      f"(n={s['n_positive_scored']}); {s['n_with_mask']} of {s['n_studies']} "
                      f"studies have a lung mask, {s['n_excluded']} left out."]
    return lines + [""]


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
