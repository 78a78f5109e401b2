"""Report export: text, JSON and a FHIR R4 DiagnosticReport without patient identifiers."""
import base64
import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from mrg_core import report_export as rx

TEXT = "Findings: patchy consolidation in the right lower lobe.\nImpression: pneumonia — é ü."
INFO = {"name": "mrg-tiny", "version": "0.1.0", "trained_on": {"modality": "CT"},
        "threshold": 0.5}
SUMMARY = {"content_hash": "ab" * 32, "n_views": 2,
           "views": [{"modality": "CT", "body_part": "CHEST", "rows": 64, "columns": 64}] * 2}
WHEN = datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=timezone(timedelta(hours=1)))
FHIR_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def fhir(**kw):
    args = dict(final_text=TEXT, probability=0.873, threshold=0.5, model_info=INFO,
                effective=WHEN, study_summary=SUMMARY)
    args.update(kw)
    return rx.to_fhir_diagnostic_report(**args)


def test_fhir_structure():
    r = fhir()
    assert r["resourceType"] == "DiagnosticReport"
    assert r["status"] == "final"
    cat = r["category"][0]["coding"][0]
    assert cat == {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                   "display": "Radiology"}
    code = r["code"]["coding"][0]
    assert code["system"] == "http://loinc.org" and code["code"] == "18748-4"
    assert FHIR_DATETIME.match(r["effectiveDateTime"]) and FHIR_DATETIME.match(r["issued"])
    assert r["effectiveDateTime"] == "2026-03-04T05:06:07+01:00"
    assert r["conclusion"] == "pneumonia — é ü."  # the impression only
    assert r["conclusionCode"][0]["coding"] == [
        {"system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}]
    # Model name/version and probability travel in an extension in the project's namespace.
    ext = r["extension"][0]
    assert ext["url"] == rx.AI_EXTENSION_URL == "https://mrg-studio.org/fhir/StructureDefinition/ai-draft"
    assert ext["url"].startswith(rx.FHIR_BASE) and "example.org" not in json.dumps(r)
    values = {e["url"]: next(v for k, v in e.items() if k.startswith("value"))
              for e in ext["extension"]}
    assert values["modelName"] == "mrg-tiny" and values["modelVersion"] == "0.1.0"
    assert values["pneumoniaProbability"] == pytest.approx(0.873)
    assert values["threshold"] == 0.5
    json.dumps(r)  # JSON-serialisable as is


def test_fhir_presented_form_base64_round_trip():
    form = fhir()["presentedForm"][0]
    assert form["contentType"] == "text/plain; charset=utf-8"
    assert form["title"]
    assert base64.b64decode(form["data"], validate=True).decode("utf-8") == TEXT


def test_fhir_has_no_patient_identifiers():
    r = fhir()
    for key in ("subject", "identifier", "encounter", "performer", "basedOn", "specimen"):
        assert key not in r
    assert SUMMARY["content_hash"] not in json.dumps(r)


def test_fhir_status_and_defaults():
    r = fhir(status="preliminary", probability=None, threshold=None, model_info=None,
             effective=None, study_summary=None)
    assert r["status"] == "preliminary"
    assert FHIR_DATETIME.match(r["effectiveDateTime"])
    urls = [e["url"] for e in r["extension"][0]["extension"]]
    assert "pneumoniaProbability" not in urls and "modelName" in urls
    with pytest.raises(ValueError):
        fhir(status="done")


def test_naive_datetime_is_taken_as_utc():
    r = fhir(effective=datetime(2026, 1, 2, 3, 4, 5))
    assert r["effectiveDateTime"] == "2026-01-02T03:04:05+00:00"


def test_text_export():
    t = rx.to_text(TEXT, 0.873, 0.5, INFO, WHEN, SUMMARY, reviewer="Dr Who")
    assert TEXT in t
    assert "Pneumonia probability 0.87 (threshold 0.50 → positive)" in t
    assert "mrg-tiny 0.1.0" in t and "Dr Who" in t and "CT CHEST, 2 view(s)" in t
    assert "not for clinical use" in t


def test_json_export():
    doc = json.loads(rx.to_json(TEXT, 0.2, 0.5, INFO, WHEN, SUMMARY, reviewer="Dr Who",
                                draft_text="draft"))
    assert doc["report"] == TEXT and doc["draft"] == "draft"
    assert doc["positive"] is False and doc["probability"] == 0.2
    assert doc["model"]["version"] == "0.1.0" and doc["study"]["n_views"] == 2
    assert doc["effective"] == "2026-03-04T05:06:07+01:00"


def r4b_report():
    # requirements-dev.txt pins fhir.resources; since 7.x its R4 models are under R4B, whose
    # DiagnosticReport has the same elements as R4's.
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    return DiagnosticReport


@pytest.mark.parametrize("kw", [
    {},
    {"status": "preliminary", "probability": None, "threshold": None, "model_info": None,
     "effective": None, "study_summary": None},
    {"final_text": "Bilateral opacities <5 mm> & 'small' effusion.\n\nNo impression heading.",
     "probability": 0.1},
    {"model_info": dict(INFO, label_meaning="COVID-19 pneumonia vs other findings")},
])
def test_fhir_resource_validates_with_fhir_resources(kw):
    DiagnosticReport = r4b_report()
    doc = fhir(**kw)
    parsed = DiagnosticReport.model_validate(doc)
    assert parsed.status == doc["status"] and parsed.text.status == "generated"
    assert json.loads(parsed.model_dump_json())["resourceType"] == "DiagnosticReport"
    # The validator is real: a missing required element or an unknown one is refused.
    # (fhir.resources does not check code bindings: test_fhir_status_and_defaults does that.)
    from pydantic import ValidationError

    for bad in ({k: v for k, v in doc.items() if k != "code"}, dict(doc, impression="x"),
                dict(doc, extension=[{"valueString": "no url"}])):
        with pytest.raises(ValidationError):
            DiagnosticReport.model_validate(bad)


def test_fhir_narrative_is_xhtml_with_the_whole_report():
    import xml.etree.ElementTree as ET

    text = "Findings: <3 mm> nodule & 'GGO'.\nSecond line.\n\nImpression: pneumonia."
    div = fhir(final_text=text)["text"]["div"]
    root = ET.fromstring(div)  # well-formed, and in the XHTML namespace as FHIR requires
    assert root.tag == "{http://www.w3.org/1999/xhtml}div"
    flat = "".join(root.itertext())
    assert "Findings: <3 mm> nodule & 'GGO'." in flat and "Impression: pneumonia." in flat
    assert "Pneumonia probability 0.87" in flat and rx.DISCLAIMER in flat


@pytest.mark.parametrize("text,expected", [
    (TEXT, "pneumonia — é ü."),
    ("IMPRESSION:\nPneumonia in the RLL.\nNo effusion.\n\nRecommendation: CT in 6 weeks.",
     "Pneumonia in the RLL.\nNo effusion."),
    ("Findings: clear.\nConclusion - no acute disease.", "no acute disease."),
    ("Impression: Pneumonia in RLL: extensive.", "Pneumonia in RLL: extensive."),
    ("Ground glass opacity in the right lower lobe. No effusion.", None),
    ("Impression:   ", None),
    # the chest radiograph model's one-line draft: the heading after a sentence counts
    ("Findings: the lungs are clear. Impression: no acute cardiopulmonary abnormality.",
     "no acute cardiopulmonary abnormality."),
    ("Findings: no focal impression: of consolidation.", None),  # not after a sentence
])
def test_conclusion_is_the_impression_or_absent(text, expected):
    assert rx.impression(text) == expected
    doc = fhir(final_text=text)
    assert doc.get("conclusion") == expected
    assert base64.b64decode(doc["presentedForm"][0]["data"]).decode("utf-8") == text


def test_conclusion_code_only_for_a_positive_decision():
    assert fhir(probability=0.5, threshold=0.5)["conclusionCode"][0]["coding"][0]["code"] == (
        "233604007")
    for kw in ({"probability": 0.49}, {"probability": None}, {"threshold": None}):
        assert "conclusionCode" not in fhir(**kw)


def test_every_export_says_what_the_probability_is_of():
    """The CT model's probability is of COVID-19 pneumonia against other findings, not of
    pneumonia in general: text, JSON and FHIR say so when the model's card does."""
    meaning = "COVID-19 pneumonia vs other findings on a chest CT slice"
    info = dict(INFO, label_meaning=meaning)
    text = rx.to_text(TEXT, 0.873, 0.5, info, WHEN, SUMMARY)
    assert f"Pneumonia probability 0.87 (threshold 0.50 → positive); the model's label: {meaning}" \
        in text
    assert json.loads(rx.to_json(TEXT, 0.873, 0.5, info, WHEN, SUMMARY))[
        "probability_meaning"] == meaning
    doc = fhir(model_info=info)
    ext = {e["url"]: e for e in doc["extension"][0]["extension"]}
    assert ext["probabilityMeaning"]["valueString"] == meaning and meaning in doc["text"]["div"]
    assert "the model's label" not in rx.to_text(TEXT, 0.873, 0.5, INFO, WHEN, SUMMARY)


@pytest.mark.parametrize("text,findings,impression", [
    ("Findings: there is [location] airspace disease. No pneumothorax. Impression: [location] "
     "airspace disease.", "there is [location] airspace disease. No pneumothorax.",
     "[location] airspace disease."),
    ("FINDINGS:\nClear lungs.\n\nIMPRESSION:\nNormal chest.", "Clear lungs.", "Normal chest."),
    ("Ground glass opacity in the right lower lobe.",  # no headings: all findings
     "Ground glass opacity in the right lower lobe.", None),
])
def test_json_keeps_findings_and_impression_apart(text, findings, impression):
    doc = json.loads(rx.to_json(text))
    assert doc["sections"] == {"findings": findings, "impression": impression}
    assert doc["report"] == text  # the report itself is kept whole

