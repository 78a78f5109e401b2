"""The shipped chest radiograph model (assets/cxr_model, issue 15) on real radiographs.

Its decisions on fixed cxr_pneumonia test images are pinned (PINNED below is the only place the
values live: when the model is replaced on purpose, rerun and update it). The bundled samples
are read in the app the way a new user would: routed to this model, one positive and one
negative, and a negative decision gets a report that states no pneumonia.
"""
from __future__ import annotations

import pytest

from conftest import require
from mrg_core.evaluation.cxr import pneumonia_statements
from mrg_core.paths import DEFAULT_CXR_MODEL_DIR, SAMPLES_DIR, data_dir

# cxr_pneumonia test image -> (decision, probability shown after calibration)
PINNED: dict[str, tuple[int, float]] = {
    "NORMAL/IM-0151-0001.jpeg": (0, 0.0197),
    "NORMAL/IM-0297-0001.jpeg": (0, 0.0054),
    "PNEUMONIA/person1014_bacteria_2945.jpeg": (1, 0.9992),
    "PNEUMONIA/person1034_virus_1728.jpeg": (1, 0.9997),
}
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def cxr_model():
    from mrg_core.models import ReportModel

    require((DEFAULT_CXR_MODEL_DIR / "config.json").is_file(),
            f"no chest radiograph model in {DEFAULT_CXR_MODEL_DIR}")
    return ReportModel.from_pretrained(DEFAULT_CXR_MODEL_DIR)


@pytest.fixture(scope="module")
def engine(cxr_model, tmp_path_factory):
    from mrg_core.engine import Engine
    from mrg_core.models import ReportModel
    from mrg_core.paths import DEFAULT_MODEL_DIR
    from mrg_core.storage import Store

    ct = ReportModel.from_pretrained(DEFAULT_MODEL_DIR)
    db = tmp_path_factory.mktemp("cxr") / "r.db"
    return Engine(ct, Store(f"sqlite:///{db}"), extra_models=[cxr_model])


def test_card_states_domain_and_label(cxr_model):
    c = cxr_model.config
    assert c.trained_on["kind"] == "chest_radiograph" and c.trained_on["population"]
    assert "pneumonia vs normal" in c.label_meaning
    assert not c.visual_context  # its text was not learned from paired images: it never
    card = (DEFAULT_CXR_MODEL_DIR / "README.md").read_text()  # sees the image tokens
    assert "not learned from paired images" in card


@pytest.mark.parametrize("name,decision", [("cxr_child_pneumonia.jpeg", 1),
                                           ("cxr_child_normal.jpeg", 0)])
def test_samples_are_routed_here_and_read(engine, cxr_model, name, decision):
    from mrg_core.io import load_study
    from mrg_core.models import GenerationSettings

    study = load_study([SAMPLES_DIR / name])
    a = engine.analyze(study)
    assert a.model["name"] == cxr_model.config.name and a.domain_warning is None
    assert a.routing.startswith("a chest radiograph (from the pixels")
    assert a.label == decision
    draft = "".join(engine.stream_report(study, GenerationSettings(max_new_tokens=60)))
    assert draft.lower().startswith("findings:") and len(draft.split()) > 8
    stated = pneumonia_statements(draft)
    assert bool(stated) == bool(decision), (draft, stated)


def test_save_and_load_give_the_same_probability_and_draft(cxr_model, tmp_path):
    from mrg_core.io import load_study
    from mrg_core.models import GenerationSettings, ReportModel

    study = load_study([SAMPLES_DIR / "cxr_child_pneumonia.jpeg"])
    s = GenerationSettings(max_new_tokens=20)
    cxr_model.save_pretrained(tmp_path / "again")
    again = ReportModel.from_pretrained(tmp_path / "again")
    assert again.predict(study).probability == cxr_model.predict(study).probability
    assert again.generate_report(study, s) == cxr_model.generate_report(study, s)


def test_pinned_decisions_on_real_test_radiographs(cxr_model):
    from mrg_core.io import load_study

    root = data_dir() / "cxr_pneumonia"
    require((root / "images").is_dir(), f"shared cxr_pneumonia folder {root} is absent")
    assert {d for d, _ in PINNED.values()} == {0, 1}
    for image, (decision, prob) in PINNED.items():
        pred = cxr_model.predict(load_study([root / "images" / image]))
        assert (pred.label, pred.probability) == (decision, pytest.approx(prob, abs=TOLERANCE)), \
            image
