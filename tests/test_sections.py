"""Findings and Impression sections of a CT draft (issue 21): the LM writes the Findings, the
Impression is the classifier's decision in words; exports keep them apart; fine-tuning and
grounding read what the LM wrote. A real tiny MedVLM, a real SQLite file, the real CT sample."""
import json
from datetime import datetime, timezone

import numpy as np
import pytest

from mrg_core import report_export
from mrg_core.engine import Engine
from mrg_core.io import load_study
from mrg_core.models import tiny_model
from mrg_core.paths import SAMPLES_DIR
from mrg_core.sections import findings_span, findings_text, with_sections, writes_impression
from mrg_core.storage import Store

PHRASES = ["Not typical of COVID-19 pneumonia.", "Compatible with COVID-19 pneumonia."]
CT = SAMPLES_DIR / "ct_phantom_covid.dcm"


@pytest.fixture(scope="module")
def model():
    m = tiny_model("medvlm", "gpt2", seed=2)
    m.config.impression_phrases = list(PHRASES)
    return m


@pytest.fixture
def engine(model, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    yield Engine(model, store)
    store.close()


def test_a_draft_has_the_lms_findings_then_the_decision_as_impression(model, engine):
    study = load_study([str(CT)])
    engine.analyze(study)
    lm = model.generate_report(study)
    draft = "".join(engine.stream_report(study))
    label = model.predict(study).label
    assert draft == f"Findings: {lm}\nImpression: {PHRASES[label]}"
    parts = report_export.sections(draft)
    assert parts == {"findings": lm.strip(), "impression": PHRASES[label]}
    fhir = report_export.to_fhir_diagnostic_report(draft, 0.5, 0.5)
    assert fhir["conclusion"] == PHRASES[label]
    # a series' decision (or any given one) is the one the Impression states
    both = {"".join(with_sections(model, iter(["x."]), study, d)) for d in (0, 1)}
    assert both == {f"Findings: x.\nImpression: {p}" for p in PHRASES}


def test_a_model_that_writes_its_own_sections_is_left_alone(engine):
    plain = tiny_model("medvlm", "gpt2", seed=2)
    assert not writes_impression(plain)
    study = load_study([str(CT)])
    assert "".join(with_sections(plain, iter(["a", "b"]), study)) == "ab"
    assert findings_text(plain, "Findings: a.\nImpression: b.") == "Findings: a.\nImpression: b."


def test_findings_span_is_what_the_lm_wrote_even_after_edits(model):
    text = "Findings: Patchy shadow in the left lung.\nImpression: Compatible with it."
    a, b = findings_span(model, text)
    assert text[a:b] == "Patchy shadow in the left lung."
    assert findings_text(model, "Patchy shadow only.") == "Patchy shadow only."  # no headings
    assert findings_span(model, "Impression: only this.") == (0, 0)


def test_grounding_reads_the_findings_and_keeps_spans_in_the_draft(model, engine):
    study = load_study([str(CT)])
    engine.analyze(study)
    draft = "Findings: Lungs are clear. No effusion.\nImpression: " + PHRASES[0]
    _, found = engine.ground(study, draft)
    assert [draft[g.start:g.end] for g in found] == [g.text for g in found]
    assert [g.text for g in found] == ["Lungs are clear.", "No effusion."]


def test_finetuning_learns_the_findings_not_the_impression(model):
    from mrg_core.finetune import training_items
    from mrg_core.storage.records import CorrectionExample

    img = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    ex = CorrectionExample(1, "h", [img], "Findings: Ground glass in the right lung.\n"
                           "Impression: " + PHRASES[1], 1, "d", "v", 0.9,
                           datetime.now(timezone.utc))
    assert training_items([ex], model)[0][1] == "Ground glass in the right lung."
    plain = tiny_model("medvlm", "gpt2", seed=2)
    assert training_items([ex], plain)[0][1] == ex.final_text


def test_json_export_of_a_ct_draft_keeps_the_sections_apart(model, engine):
    study = load_study([str(CT)])
    engine.analyze(study)
    draft = "".join(engine.stream_report(study))
    doc = json.loads(report_export.to_json(draft, 0.5, 0.5))
    assert doc["sections"]["impression"] in PHRASES
    assert not doc["sections"]["findings"].startswith("Findings")
