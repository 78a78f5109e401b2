"""Findings and Impression sections of a draft (issue 21).

The chest radiograph model writes both itself, IU style ("Findings: … Impression: …"). The CT
model's training reports (COV-CTR) hold findings only, so its language model writes the
Findings and the Impression states the image classifier's decision in words
(`ReportModelConfig.impression_phrases`, [negative, positive]): what the model decided, said
once, where a radiologist looks for the conclusion. Exports split the sections
(report_export.sections): FHIR's conclusion, the SR's Impressions.

Fine-tuning and grounding read the Findings only for such a model: the language model never
wrote the Impression (findings_text).
"""
from __future__ import annotations

from collections.abc import Iterator

from .report_export import sections

FINDINGS_HEADING = "Findings: "
IMPRESSION_HEADING = "\nImpression: "


def writes_impression(model) -> bool:
    """True when the draft's Impression is the decision in words (impression_phrases)."""
    return len(getattr(model.config, "impression_phrases", None) or []) == 2


def with_sections(model, pieces: Iterator[str], study, decision: int | None = None
                  ) -> Iterator[str]:
    """The language model's text as the Findings, then the decision as the Impression: the
    study's own, or `decision` (0/1, a series'); unchanged for a model that writes its own
    sections. The decision is read when the Impression is due, by whoever drives the draft
    (the engine: from the study's cached features, which it computes before the draft)."""
    if not writes_impression(model):
        yield from pieces
        return
    yield FINDINGS_HEADING
    yield from pieces
    label = model.predict(study).label if decision is None else int(decision)
    yield IMPRESSION_HEADING + model.config.impression_phrases[label]


def findings_span(model, text: str) -> tuple[int, int]:
    """Character span of what the language model wrote in `text` (a draft or the
    radiologist's edit of it): the Findings section for a model whose Impression is its
    decision in words, else the whole text."""
    if not writes_impression(model):
        return 0, len(text)
    part = sections(text)["findings"]
    if not part:
        return 0, 0
    start = text.find(part)
    return (start, start + len(part)) if start >= 0 else (0, len(text))


def findings_text(model, text: str) -> str:
    """The part of `text` the language model learns from and is grounded on."""
    a, b = findings_span(model, text)
    return text[a:b]
