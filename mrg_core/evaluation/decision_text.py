"""Decision–text agreement: does the draft say what the image classifier decided?

A reader trusts the "normal"/"abnormal" call shown next to the draft; a draft that describes
consolidation under a negative call (or nothing under a positive one) contradicts it. Findings
come from the rule-based extractor; lobes locate findings and are not abnormal by themselves. For
a negative call, findings that the model's finding head itself predicted for the study are
allowed (finding_prompt models state them before the report, whatever the pneumonia call).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from .clinical import LOBE_NAMES, NORMAL, extract_findings

NOT_ABNORMAL = frozenset(LOBE_NAMES) | {NORMAL}


def abnormal_findings(text: str, allowed: Iterable[str] = ()) -> set[str]:
    """Abnormal findings the text asserts, less `allowed`."""
    return extract_findings(text) - NOT_ABNORMAL - set(allowed)


def decision_text_agreement(preds: Mapping[str, dict]) -> dict:
    """preds: {id: {"label", "report", optional "findings"}} (run_model's output; entries with
    "error" are skipped). Share of negative calls whose draft states no abnormal finding, and of
    positive calls whose draft states at least one."""
    neg, pos = [], []
    for p in preds.values():
        if "error" in p:
            continue
        if int(p["label"]) == 1:
            pos.append(bool(abnormal_findings(p["report"])))
        else:
            neg.append(not abnormal_findings(p["report"], p.get("findings") or ()))
    return {"n_negative": len(neg),
            "negative_states_no_finding": sum(neg) / len(neg) if neg else None,
            "n_positive": len(pos),
            "positive_states_finding": sum(pos) / len(pos) if pos else None}
