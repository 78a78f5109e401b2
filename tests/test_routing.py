"""Studies routed to the model whose card matches what they look like (issue 15): DICOM tags,
else the pixels; a study no loaded model reads is refused, never sent to the wrong model."""
import json
import subprocess
import sys

import pytest

from mrg_core.engine import Engine, NoModelForStudy
from mrg_core.io import load_study
from mrg_core.models import tiny_model
from mrg_core.models.generation import GenerationSettings
from mrg_core.paths import REPO_ROOT, SAMPLES_DIR
from mrg_core.storage import Store

CXR_CARD = {"modality": "CR", "body_part": "CHEST", "kind": "chest_radiograph",
            "population": "children aged 1-5", "description": "paediatric radiographs"}
SETTINGS = GenerationSettings(max_new_tokens=8)


def cxr_tiny(seed=3):
    m = tiny_model("medvlm", "gpt2", seed=seed)
    m.config.name, m.config.trained_on = "tiny-cxr", dict(CXR_CARD)
    m.config.label_meaning = "pneumonia vs normal on a chest radiograph"
    return m


@pytest.fixture(scope="module")
def models():
    ct = tiny_model("medvlm", "gpt2", seed=1)  # the tiny config's card: CT, CHEST
    return ct, cxr_tiny()


@pytest.fixture
def studies(tmp_path):
    from tests import factories

    mr = tmp_path / "mr.dcm"
    factories.write_mono2(mr, (factories.ct_hu_pattern(48, 48) % 4096).astype("uint16"), 12,
                          modality="MR", BodyPartExamined="CHEST")
    return {"ct": load_study([SAMPLES_DIR / "ct_phantom_covid.dcm"]),
            "cr": load_study([SAMPLES_DIR / "cr_phantom_pa.dcm"]),
            "cxr_jpeg": load_study([SAMPLES_DIR / "cxr_child_pneumonia.jpeg"]),
            "mr": load_study([mr])}


def test_each_study_goes_to_the_model_that_reads_it(models, studies, tmp_path):
    ct, cxr = models
    engine = Engine(ct, Store(f"sqlite:///{tmp_path / 'r.db'}"), extra_models=[cxr])
    for name, want, why in (("ct", ct, "a CT slice (DICOM tags)"),
                            ("cr", cxr, "a chest radiograph (DICOM tags)"),
                            ("cxr_jpeg", cxr, "a chest radiograph (from the pixels")):
        study = studies[name]
        a = engine.analyze(study)
        assert a.model["name"] == want.config.name, name
        assert a.routing.startswith(why) and want.config.name in a.routing, a.routing
        assert a.domain_warning is None, (name, a.domain_warning)  # each in its own domain
        assert a.probability == pytest.approx(want.predict(study).probability)
        assert a.label_meaning == want.config.label_meaning
        # the draft is the routed model's own (greedy: the same text as calling it directly)
        assert "".join(engine.stream_report(study, SETTINGS)) == \
            want.generate_report(study, SETTINGS), name
        assert engine.draft_record("x", a).model_name == want.config.name
    assert "children aged 1-5" in engine.analyze(studies["cr"]).routing


def test_a_study_no_model_reads_is_refused(models, studies, tmp_path):
    ct, cxr = models
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    both = Engine(ct, store, extra_models=[cxr])
    with pytest.raises(NoModelForStudy, match="neither a CT slice nor a chest radiograph"):
        both.analyze(studies["mr"])
    with pytest.raises(NoModelForStudy):
        next(both.stream_report(studies["mr"], SETTINGS))
    assert "tiny-cxr" in both.domain_warning(studies["mr"])  # says what is loaded
    # a routed engine with the CT model alone refuses a radiograph instead of misreading it
    ct_only = Engine(ct, store, extra_models=[])
    with pytest.raises(NoModelForStudy, match="a chest radiograph"):
        ct_only.analyze(studies["cr"])
    assert ct_only.analyze(studies["ct"]).model["name"] == ct.config.name
    # unrouted (one model for everything, as a library user may want): a warning, not a refusal
    single = Engine(ct, store)
    a = single.analyze(studies["cr"])
    assert a.domain_warning.startswith("Out of domain") and a.routing == ""


def test_refused_study_in_the_page_handlers(models, studies, tmp_path):
    from ui import handlers as h
    from ui.state import Session

    ct, _ = models
    engine = Engine(ct, Store(f"sqlite:///{tmp_path / 'r.db'}"), extra_models=[])
    session = Session()
    session.study = studies["cr"]
    view = h.analyze(engine, session)
    assert view.warning.startswith("No model here reads this study") and \
        view.probability == h.NOT_READ
    updates = list(h.stream_draft(engine, session, ""))
    assert len(updates) == 1 and updates[0].done and "No draft" in updates[0].notice
    session.study = studies["ct"]
    session.analysis = None
    assert "Read as a CT slice (DICOM tags)" in h.analyze(engine, session).probability


def test_fine_tuning_uses_only_its_own_models_corrections(models, studies, tmp_path):
    from mrg_core.finetune import FinetuneConfig, TooFewCorrections

    ct, cxr = models
    engine = Engine(ct, Store(f"sqlite:///{tmp_path / 'r.db'}"), extra_models=[cxr])
    for i, name in enumerate(("cr", "cxr_jpeg", "ct")):
        a = engine.analyze(studies[name])
        engine.save(studies[name], engine.draft_record("draft", a), f"edited report {i}",
                    "Dr R")
    with pytest.raises(TooFewCorrections) as err:
        engine.finetune(tmp_path / "out", FinetuneConfig(min_corrections=2))
    assert err.value.n == 1  # the CT study only; the two radiographs are the CXR model's


def test_report_cli_routes_and_refuses(models, studies, tmp_path):
    ct, cxr = models
    ct.save_pretrained(tmp_path / "ct")
    cxr.save_pretrained(tmp_path / "cxr")
    from tests import factories

    mr_file = tmp_path / "mr.dcm"
    factories.write_mono2(mr_file, (factories.ct_hu_pattern(48, 48) % 4096).astype("uint16"),
                          12, modality="MR", BodyPartExamined="CHEST")
    out = subprocess.run([sys.executable, "-m", "mrg_core", "report",
                          str(SAMPLES_DIR / "ct_phantom_covid.dcm"),
                          str(SAMPLES_DIR / "cr_phantom_pa.dcm"), str(mr_file),
                          "--model", str(tmp_path / "ct"), "--extra-model", str(tmp_path / "cxr"),
                          "--jsonl", "--max-new-tokens", "4"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert out.returncode == 2, out.stderr  # one study refused
    assert [r.get("model", {}).get("name") for r in rows[:2]] == ["mrg-studio-tiny", "tiny-cxr"]
    assert rows[1]["routing"].startswith("a chest radiograph (DICOM tags) → tiny-cxr")
    assert rows[1]["domain"]["kind"] == "chest_radiograph" and not rows[1]["out_of_domain"]
    assert rows[2]["error"] == "no_model_for_study" and "neither" in rows[2]["message"]
    assert "probability" not in rows[2]


def test_exports_name_the_model_that_read_the_study(models, studies, tmp_path):
    """Text, JSON, FHIR and SR exports of a routed study carry the routed model's name and
    label meaning, not the primary model's."""
    import pydicom

    from ui import handlers as h
    from ui.state import Session

    ct, cxr = models
    engine = Engine(ct, Store(f"sqlite:///{tmp_path / 'x.db'}"), extra_models=[cxr])
    s = Session()
    assert h.load_files(engine, s, [str(SAMPLES_DIR / "cr_phantom_pa.dcm")]).ok
    h.analyze(engine, s)
    paths, _ = h.export_files(engine, s, "Clear lungs.", "Dr Ada", tmp_path / "out")
    doc = json.loads(open(paths[1], encoding="utf-8").read())
    assert doc["model"]["name"] == "tiny-cxr"
    assert doc["probability_meaning"] == cxr.config.label_meaning
    assert "tiny-cxr" in open(paths[0], encoding="utf-8").read()
    fhir = json.loads(open(paths[2], encoding="utf-8").read())
    assert {"url": "modelName", "valueString": "tiny-cxr"} in fhir["extension"][0]["extension"]
    sr = pydicom.dcmread(paths[3])
    names = [i.TextValue for i in sr.ContentSequence
             if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"]
    assert names == ["tiny-cxr"]
