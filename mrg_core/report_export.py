"""A finished report as plain text, JSON, or a FHIR R4 DiagnosticReport.

Pure functions over plain values: no model, no database, no patient identifiers. What comes in
is the radiologist's text, the model's probability/threshold, `Engine.model_info` and
`Study.summary()` (already free of PS3.15 attributes).
"""
from __future__ import annotations

import base64
import html
import json
import re
from datetime import datetime, timezone

DISCLAIMER = "Draft produced with a research demo model, not for clinical use."
FHIR_STATUSES = frozenset({"registered", "partial", "preliminary", "final", "amended",
                           "corrected", "appended", "cancelled", "entered-in-error", "unknown"})
# The project's own FHIR namespace: every canonical URL we define starts with it.
FHIR_BASE = "https://mrg-studio.org/fhir"
# Complex extension: how the AI draft was made (model, probability, threshold, disclaimer).
AI_EXTENSION_URL = f"{FHIR_BASE}/StructureDefinition/ai-draft"
# SNOMED CT 233604007 |Pneumonia (disorder)|: the coded conclusion of a positive decision.
# A negative decision gets no code: "no pneumonia" is a situation (absence of finding) with no
# single well-established concept we can vouch for, and a wrong code is worse than none.
SNOMED = "http://snomed.info/sct"
PNEUMONIA = {"system": SNOMED, "code": "233604007", "display": "Pneumonia"}
# "Impression:" / "IMPRESSION -" / "Conclusion:" at the start of a line, or after a sentence on
# the same line (the chest radiograph model's drafts are one line: "Findings: … Impression: …");
# the section runs to the next "Heading:" line or the end. (Findings-only drafts have none: see
# impression().)
_IMPRESSION = re.compile(r"(?:^[ \t]*|(?<=[.!?])[ \t]+)"
                         r"(?:impression|conclusions?)[ \t]*[:\-–][ \t]*",
                         re.IGNORECASE | re.MULTILINE)
_HEADING = re.compile(r"^[ \t]*[A-Za-z][A-Za-z /]{0,40}:", re.MULTILINE)


def _aware(dt: datetime | None) -> datetime:
    """Timezone-aware timestamp to the second (naive values are taken as UTC)."""
    dt = dt or datetime.now(timezone.utc)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.replace(microsecond=0)


def _study_facts(study_summary: dict | None) -> dict:
    """Modality / body part / number of views: enough to describe the study, nothing more."""
    if not study_summary:
        return {}
    views = study_summary.get("views") or [{}]
    first = views[0]
    return {"n_views": study_summary.get("n_views", len(views)),
            "modality": first.get("modality"), "body_part": first.get("body_part")}


def _model_facts(model_info: dict | None) -> dict:
    info = model_info or {}
    return {"name": str(info.get("name") or "none"), "version": str(info.get("version") or "none")}


def _probability_line(probability: float | None, threshold: float | None,
                      meaning: str | None = None) -> str | None:
    if probability is None:
        return None
    line = f"Pneumonia probability {probability:.2f}"
    if threshold is not None:
        call = "positive" if probability >= threshold else "negative"
        line += f" (threshold {threshold:.2f} → {call})"
    if meaning:  # what the model's label is (its card): the probability means nothing else
        line += f"; the model's label: {meaning}"
    return line


def _meaning(model_info: dict | None) -> str | None:
    return str((model_info or {}).get("label_meaning") or "") or None


def impression(final_text: str) -> str | None:
    """The report's impression section, or None when it has none.

    FHIR's DiagnosticReport.conclusion is the impression, not the report (the whole text is in
    presentedForm and the narrative). Without an "Impression:" (or "Conclusion:") heading, the
    field is left out rather than guessed: the last sentence of a findings narrative is a
    finding, and presenting it as the radiologist's conclusion would be wrong."""
    m = _IMPRESSION.search(final_text or "")
    if m is None:
        return None
    rest = final_text[m.end():]
    nxt = _HEADING.search(rest, 1)  # from 1: only a heading at the start of a later line
    text = (rest[:nxt.start()] if nxt else rest).strip()
    return text or None


_FINDINGS = re.compile(r"^\s*findings[ \t]*[:\-–][ \t]*", re.IGNORECASE)


def sections(final_text: str) -> dict:
    """{"findings", "impression"}: the impression as impression() finds it (None without one),
    the findings everything before it, without a leading "Findings:" heading."""
    text = final_text or ""
    m = _IMPRESSION.search(text)
    findings = _FINDINGS.sub("", text[:m.start()] if m else text, count=1).strip()
    return {"findings": findings or None, "impression": impression(text)}


def _narrative(final_text: str, status: str, prob_line: str | None, model: dict,
               study: dict) -> dict:
    """FHIR Narrative (status "generated"): the report's paragraphs, then how it was made."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", final_text.strip()) if p.strip()]
    body = "".join("<p>" + "<br/>".join(html.escape(line) for line in p.splitlines()) + "</p>"
                   for p in paras)
    facts = []
    if study:
        part = " ".join(x for x in (study.get("modality"), study.get("body_part")) if x)
        facts.append(f"Study: {part or 'unknown modality'}, {study['n_views']} view(s)")
    facts.append(f"Status: {status}")
    if prob_line:
        facts.append(prob_line)
    facts.append(f"Model: {model['name']} {model['version']}")
    facts.append(DISCLAIMER)
    items = "".join(f"<li>{html.escape(f)}</li>" for f in facts)
    return {"status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><h3>Radiology report</h3>'
                   f"{body}<ul>{items}</ul></div>"}


def to_text(final_text: str, probability: float | None = None, threshold: float | None = None,
            model_info: dict | None = None, effective: datetime | None = None,
            study_summary: dict | None = None, reviewer: str | None = None) -> str:
    """Human-readable report: the text first, then how it was made."""
    model, study = _model_facts(model_info), _study_facts(study_summary)
    lines = ["RADIOLOGY REPORT", "", final_text.strip(), "", "---"]
    if study:
        part = " ".join(x for x in (study.get("modality"), study.get("body_part")) if x)
        lines.append(f"Study: {part or 'unknown modality'}, {study['n_views']} view(s)")
    if reviewer:
        lines.append(f"Reviewed by: {reviewer}")
    lines.append(f"Date: {_aware(effective).isoformat()}")
    prob = _probability_line(probability, threshold, _meaning(model_info))
    if prob:
        lines.append(prob)
    lines.append(f"Model: {model['name']} {model['version']}")
    lines.append(DISCLAIMER)
    return "\n".join(lines) + "\n"


def to_json(final_text: str, probability: float | None = None, threshold: float | None = None,
            model_info: dict | None = None, effective: datetime | None = None,
            study_summary: dict | None = None, reviewer: str | None = None,
            draft_text: str | None = None) -> str:
    """Machine-readable report (UTF-8 JSON text)."""
    doc = {
        "report": final_text,
        "sections": sections(final_text),  # findings and impression kept apart
        "draft": draft_text,
        "reviewer": reviewer,
        "effective": _aware(effective).isoformat(),
        "probability": probability,
        "probability_meaning": _meaning(model_info),
        "threshold": threshold,
        "positive": None if probability is None or threshold is None
        else bool(probability >= threshold),
        "model": dict(model_info or {}) or _model_facts(None),
        "study": study_summary or {},
        "disclaimer": DISCLAIMER,
    }
    return json.dumps(doc, ensure_ascii=False, indent=2, default=str)


def to_fhir_diagnostic_report(final_text: str, probability: float | None = None,
                              threshold: float | None = None, model_info: dict | None = None,
                              status: str = "final", effective: datetime | None = None,
                              study_summary: dict | None = None,
                              issued: datetime | None = None) -> dict:
    """FHIR R4 DiagnosticReport (no subject: the app holds no patient identity).

    - `conclusion`: the impression section only (impression()), left out when there is none;
    - `conclusionCode`: SNOMED CT Pneumonia when the model's decision is positive
      (probability >= threshold), absent otherwise (see PNEUMONIA);
    - `text`: a generated XHTML narrative of the report and how it was made;
    - `presentedForm`: the full report text; the model facts in the AI_EXTENSION_URL
      extension (the project's namespace, FHIR_BASE)."""
    if status not in FHIR_STATUSES:
        raise ValueError(f"not a FHIR R4 DiagnosticReport status: {status!r}")
    model, study = _model_facts(model_info), _study_facts(study_summary)
    ext = [{"url": "modelName", "valueString": model["name"]},
           {"url": "modelVersion", "valueString": model["version"]}]
    if probability is not None:
        ext.append({"url": "pneumoniaProbability", "valueDecimal": round(float(probability), 4)})
    if threshold is not None:
        ext.append({"url": "threshold", "valueDecimal": round(float(threshold), 4)})
    if probability is not None and _meaning(model_info):
        ext.append({"url": "probabilityMeaning", "valueString": _meaning(model_info)})
    ext.append({"url": "disclaimer", "valueString": DISCLAIMER})
    code_text = "Diagnostic imaging study"
    if study.get("modality"):
        code_text += f" ({study['modality']}" + (f" {study['body_part']})" if study.get(
            "body_part") else ")")
    doc = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "text": _narrative(final_text, status, _probability_line(
            probability, threshold, _meaning(model_info)), model, study),
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
            "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4",
                             "display": "Diagnostic imaging study"}],
                 "text": code_text},
        "effectiveDateTime": _aware(effective).isoformat(),
        "issued": _aware(issued).isoformat(),
    }
    conclusion = impression(final_text)
    if conclusion:
        doc["conclusion"] = conclusion
    if probability is not None and threshold is not None and probability >= threshold:
        doc["conclusionCode"] = [{
            "coding": [dict(PNEUMONIA)],
            "text": f"Pneumonia (model decision: probability {probability:.2f} >= threshold "
                    f"{threshold:.2f})"}]
    doc["presentedForm"] = [{
        "contentType": "text/plain; charset=utf-8",
        "data": base64.b64encode(final_text.encode("utf-8")).decode("ascii"),
        "title": "Radiology report"}]
    doc["extension"] = [{"url": AI_EXTENSION_URL, "extension": ext}]
    return doc
