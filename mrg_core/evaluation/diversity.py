"""Draft diversity: does a system write a report for each study, or one of a few templates?

Caption metrics reward the most common phrasing, so a system that emits two fixed texts can score
close to a real one. Two numbers expose that: distinct (cleaned) drafts per study, and, over
pairs of studies whose reference reports name different findings, the share of pairs that got
different drafts (1.0: every clinically different pair is told apart; a single template: 0.0).
Pairs are counted through group sizes (by draft, by finding set, by both), not enumerated.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ..text import clean_report
from .clinical import extract_findings


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def draft_diversity(drafts: Mapping[str, str], references: Mapping[str, str]) -> dict:
    """drafts: {id: text}; references: {id: first reference} (ids without one are left out of
    the pair share, not of the distinct count)."""
    cleaned = {k: clean_report(v) for k, v in drafts.items()}
    keys = [k for k in cleaned if (references.get(k) or "").strip()]
    findings = {k: frozenset(extract_findings(references[k])) for k in keys}
    by_findings = Counter(findings.values())
    by_draft = Counter(cleaned[k] for k in keys)
    by_both = Counter((cleaned[k], findings[k]) for k in keys)
    differ = _pairs(len(keys)) - sum(map(_pairs, by_findings.values()))
    # same draft, different findings = same draft - same draft and same findings
    same_draft = sum(map(_pairs, by_draft.values())) - sum(map(_pairs, by_both.values()))
    n = len(cleaned)
    return {"n": n, "distinct_drafts": len(set(cleaned.values())),
            "distinct_ratio": len(set(cleaned.values())) / n if n else None,
            "n_pairs_different_findings": differ,
            "different_findings_different_drafts": 1 - same_draft / differ if differ else None}
