"""Sentence grounding (issue 21, experimental): each statement of a draft gets its own saliency
map (captum gradient x activation of the statement's log-likelihood through the visual tokens),
on the view the draft is written from; a model whose text does not see the image has none."""
import json

import numpy as np
import pytest
import torch

from mrg_core.grounding import NoGrounding, ground_sentences, region_name, split_statements
from mrg_core.paths import DEFAULT_MODEL_DIR, SAMPLES_DIR

def test_statements_are_sentences_and_clauses():
    text = "Findings: Patchy opacity, right base. No effusion.\nImpression: Pneumonia."
    spans = split_statements(text)
    assert [text[a:b] for a, b in spans] == [
        "Findings: Patchy opacity,", "right base.", "No effusion.", "Impression: Pneumonia."]
    assert split_statements(" . , ") == []
    assert region_name(0.1, 0.2) == "upper image-left"
    assert region_name(0.9, 0.8) == "lower image-right"


def test_the_shipped_models(capsys):
    """The CT model grounds each statement of its real draft's Findings (through the CLI, as
    the app: int8-weights); the radiograph model's text does not see the image, so it has no
    grounding and says why. (Grounding the shipped CT model in float32, as trained:
    test_engine_grounds_a_series_on_its_key_slice.)"""
    from mrg_core.cli.report import main
    from mrg_core.io import load_study
    from mrg_core.models import ReportModel

    ct = SAMPLES_DIR / "ct_phantom_covid.dcm"
    assert main([str(ct), str(SAMPLES_DIR / "cxr_child_normal.jpeg"), "--ground", "--jsonl",
                 "--max-new-tokens", "60"]) == 0
    ct_rec, cxr_rec = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x]
    report, statements = ct_rec["report"], ct_rec["grounding"]["statements"]
    assert ct_rec["grounding"]["view"] == 0
    assert {"text", "span", "peak", "peak_region", "lung_share", "log_likelihood"} <= set(
        statements[0])
    # every statement of the Findings, each span pointing at its words in the report
    assert [report[a:b] for a, b in (s["span"] for s in statements)] == \
        [s["text"] for s in statements]
    assert len(statements) == len(split_statements(ct_rec["sections"]["findings"])) >= 2
    # lung masks come with the dev requirements (scipy): every statement has a share
    assert all(0 <= s["lung_share"] <= 1 for s in statements)
    assert len({(tuple(s["peak"]), s["lung_share"]) for s in statements}) > 1  # maps differ
    assert "not conditioned on the image" in cxr_rec["grounding"]["error"]
    model = ReportModel.from_pretrained(DEFAULT_MODEL_DIR)
    with pytest.raises(NoGrounding, match="empty|no statement"):
        ground_sentences(model, load_study([ct]), " ")


def test_engine_grounds_a_series_on_its_key_slice():
    """A series is drafted from its key slice with the series' decision: it is grounded there,
    and the view index says which slice that is."""
    from mrg_core.engine import Engine
    from mrg_core.io import load_studies
    from mrg_core.models import ReportModel

    model = ReportModel.from_pretrained(DEFAULT_MODEL_DIR)
    engine = Engine(model, None, extra_models=None)
    series = load_studies([SAMPLES_DIR / "tcia_lung_dx_a0002_ct_8_slices.zip"])[0]
    analysis = engine.analyze(series)
    view, statements = engine.ground(series, "Patchy shadow in the lower lobe of the right "
                                             "lung. No pleural effusion.")
    assert view == analysis.key_views[0] and len(statements) == 2
    assert statements[0].maps[0].shape == series.views[view].display.shape


def test_a_study_decision_replaces_the_views_label_and_its_findings():
    """What a draft states before its words (shared by drafting and grounding): a series'
    decision replaces its key view's label, and the view's findings go with a changed label."""
    from mrg_core.models import ReportModel
    from mrg_core.models.factory import tiny_config
    from mrg_core.models.report_model import Prediction
    from mrg_core.text import train_tokenizer

    cfg = tiny_config("medvlm")
    cfg.label_prompt = True
    model = ReportModel.build(cfg, train_tokenizer(["no pneumonia . pneumonia present ."],
                                                   min_frequency=1))
    pred = Prediction(probability=0.9, threshold=0.5, label=1, labels={},
                      findings=("ground_glass",))
    assert model.stated(pred) == (1, ("ground_glass",))
    assert model.stated(pred, decision=1) == (1, ("ground_glass",))
    assert model.stated(pred, decision=0) == (0, ())


def test_each_sentence_peaks_on_its_own_finding_in_synthetic_studies():
    """Localisation with known answers (mrg_core.grounding_check): a tiny MedVLM trained on
    synthetic slices with a nodule and a cavity placed independently; on fresh slices with both
    in different quadrants, each sentence's map must peak in its own finding's quadrant. One
    map shared by both sentences (e.g. every sentence attributed with one target) can be
    right for at most half of them; the seeds measured put 78-98 % in place."""
    from mrg_core.grounding_check import localisation, train_model

    torch.set_num_threads(2)
    model = train_model(seed=2, steps=1500)
    got = localisation(model, n=20)
    assert got["sentences"] == 40
    assert got["in_own_quadrant"] >= 0.75, got


def test_without_native_bf16_grounding_runs_a_bf16_lms_output_layer_in_float32(monkeypatch):
    """On a CPU without native bf16 (quantize.grad_dtype: float32) the output layer of an
    int8-weights LM runs in float32 while a statement is grounded (its bf16 backward took 21 s a
    statement on an AVX2 host), and is put back afterwards; the maps are those of the bf16
    pass up to rounding."""
    import mrg_core.models.quantize as quantize
    from mrg_core.models import tiny_model
    from mrg_core.models.quantize import apply_precision
    from mrg_core.io import load_study

    model = apply_precision(tiny_model(method="medvlm", family="llama", seed=1), "int8-weights")
    study = load_study([SAMPLES_DIR / "ct_phantom_covid.dcm"])
    draft = "Patchy shadow in the right lung. No pleural effusion."
    head = model.lm.get_output_embeddings()
    assert head.weight.dtype == torch.bfloat16
    maps, dtypes = {}, []
    model.lm.register_forward_hook(lambda m, a, out: dtypes.append(out.logits.dtype))
    for dt in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(quantize, "grad_dtype", lambda dt=dt: dt)
        dtypes.clear()
        got = ground_sentences(model, study, draft, lungs=False)
        assert set(dtypes) == {dt}  # every pass: the scores and each statement's map
        assert model.lm.get_output_embeddings() is head  # put back
        maps[dt] = np.stack([g.maps[0] for g in got])
    a, b = maps[torch.bfloat16].ravel(), maps[torch.float32].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.98
