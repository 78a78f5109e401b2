"""Speculative decoding of greedy drafts (models/generation.py: DraftNgrams, sample_tokens):
proposals from earlier drafts, checked in one pass (FastLlamaDecoder.extend), change no token
and save passes; wrong proposals cost nothing but the pass."""
import copy

import numpy as np
import pytest
import torch

from conftest import require
from mrg_core.models import GenerationSettings, tiny_model
from mrg_core.models.fast_llama import FastLlamaDecoder
from mrg_core.models.generation import DraftNgrams
from mrg_core.models.quantize import apply_precision
from mrg_core.study import study_from_arrays

PLAIN = dict(repetition_penalty=1.0, no_repeat_ngram_size=0)


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(5)
    return study_from_arrays([rng.integers(0, 256, (80, 60)).astype(np.uint8)])


def draft(model, study, k, **kw):
    with torch.inference_mode():
        return list(model._report_tokens(study, GenerationSettings(speculative_tokens=k, **kw)))


@pytest.fixture
def passes(monkeypatch):
    """How many decoder passes drafts make: one-token steps and multi-token checks."""
    count = {"step": 0, "extend": 0}
    for name in count:
        orig = getattr(FastLlamaDecoder, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            count[_name] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(FastLlamaDecoder, name, counted)
    return count


def guided_llama():
    """A tiny Llama MedVLM that states its decision in words: drafts use label guidance over
    two prompts of different length (one shared beginning, ragged rows)."""
    from mrg_core.models import ReportModel
    from mrg_core.models.factory import SAMPLE_REPORTS, tiny_config
    from mrg_core.text import train_tokenizer

    phrases = ["no pneumonia .", "pneumonia ."]
    cfg = tiny_config("medvlm", "llama")
    cfg.label_prompt, cfg.label_phrases = True, phrases
    tok = train_tokenizer(list(SAMPLE_REPORTS) + [cfg.instruction] + phrases, min_frequency=1)
    torch.manual_seed(4)
    return ReportModel.build(cfg, tok).eval()


@pytest.mark.parametrize("guidance", [0.0, 2.0], ids=["plain", "label guidance"])
def test_proposals_from_earlier_drafts_change_no_token_and_save_passes(study, passes,
                                                                       guidance):
    """int8-weights, with a processor that depends on the tokens so far (no repeated
    trigram): the draft is the same with and without proposals; proposals learned from the
    same draft take a third of the passes or fewer; proposals that are all wrong are checked
    and dropped, and the draft is still the same."""
    model = guided_llama() if guidance else tiny_model(method="medvlm", family="llama", seed=4)
    model = apply_precision(model, "int8-weights")
    kw = dict(max_new_tokens=40, label_guidance=guidance, repetition_penalty=1.0,
              no_repeat_ngram_size=3)
    ref = draft(model, study, 0, **kw)
    assert len(ref) == 40 and len(set(ref)) > 5 and passes["extend"] == 0
    one_by_one = passes["step"]
    # the draft just written taught the proposals: the same study again takes fewer passes
    passes.update(step=0, extend=0)
    assert draft(model, study, 4, **kw) == ref
    assert passes["extend"] > 0 and passes["step"] + passes["extend"] <= one_by_one / 3
    # proposals that are all wrong: every pass checks them, none is taken, the draft is kept
    wrong = DraftNgrams()
    for i in range(len(ref) - 3):
        wrong.learn(ref[i:i + 3] + [(t + 7) % 90 + 5 for t in ref[i + 3:i + 11]])
    model.draft_ngrams = wrong
    passes.update(step=0, extend=0)
    assert draft(model, study, 4, **kw) == ref
    assert passes["extend"] > 0


def test_no_speculation_where_the_pass_is_not_exact(study, passes):
    """fp32 (LoRA merged): extend() agrees with the steps only to rounding, so greedy drafts
    keep one-token steps; sampled drafts never speculate."""
    model = apply_precision(tiny_model(method="medvlm", family="llama", seed=4), "fp32-merged")
    ref = draft(model, study, 0, max_new_tokens=20, **PLAIN)
    assert draft(model, study, 4, max_new_tokens=20, **PLAIN) == ref
    assert passes["extend"] == 0 and passes["step"] > 0
    quant = apply_precision(tiny_model(method="medvlm", family="llama", seed=4), "int8-weights")
    sampled = draft(quant, study, 0, max_new_tokens=20, do_sample=True, seed=3, **PLAIN)
    passes.update(step=0, extend=0)
    assert draft(quant, study, 4, max_new_tokens=20, do_sample=True, seed=3, **PLAIN) == sampled
    assert passes["extend"] == 0


def test_draft_ngrams_keep_the_latest_continuation_and_a_bounded_table():
    ng = DraftNgrams(n=2, keep=3, max_entries=4)
    ng.learn([1, 2, 3, 4, 5, 6])
    assert ng.propose([9, 1, 2], 5) == [3, 4, 5] and ng.propose([1, 2], 2) == [3, 4]
    assert ng.propose([2], 4) == [] and ng.propose([1, 2], 0) == []
    ng.learn([9, 1, 2, 3])
    assert ng.propose([1, 2], 4) == [3, 4, 5]  # cut short by a draft's end: the longer stays
    ng.learn([1, 2, 7])
    assert ng.propose([1, 2], 4) == [7]  # the latest draft wins
    ng.learn([10, 11, 12, 13, 14, 15])
    assert len(ng._next) == 4 and ng.propose([1, 2], 4) == []  # the oldest runs went
    copied = copy.deepcopy(ng)  # a model copied whole (fine-tuning an in-memory model)
    assert copied.propose([10, 11], 3) == ng.propose([10, 11], 3) == [12, 13, 14]
    copied.learn([10, 11, 99])
    assert ng.propose([10, 11], 1) == [12]  # its own table


def test_a_model_with_proposals_learned_can_be_copied_whole(study):
    model = tiny_model(method="medvlm", family="llama", seed=4)
    model.draft_ngrams.learn([5, 6, 7, 8, 9])
    assert copy.deepcopy(model).draft_ngrams.propose([5, 6, 7], 2) == [8, 9]


def test_the_shipped_model_ends_its_draft_where_it_would_without_proposals():
    """The real default model (int8-weights, label guidance): a proposal that contains the end
    token is not taken past it; the draft, to its end, is the one made step by step."""
    from mrg_core.io import load_study
    from mrg_core.models import ReportModel
    from mrg_core.paths import DEFAULT_MODEL_DIR, SAMPLES_DIR

    require((DEFAULT_MODEL_DIR / "config.json").is_file(), "no default model in assets/model")
    model = apply_precision(ReportModel.from_pretrained(DEFAULT_MODEL_DIR), "int8-weights")
    sample = load_study([SAMPLES_DIR / "ct_phantom_covid.dcm"])
    ref = draft(model, sample, 0)
    eos = model.tokenizer.eos_token_id
    assert 20 < len(ref) < GenerationSettings().max_new_tokens  # it ended by itself
    model.draft_ngrams = DraftNgrams()
    model.draft_ngrams.learn(ref + [eos] + ref[:8])  # after its last words: the end, and more
    assert draft(model, sample, 4) == ref


def test_sample_drafts_seed_the_proposals_before_the_first_user(tmp_path):
    """Engine.seed_drafts (app.py's warm-up, on the bundled phantoms): each sample a model reads
    is drafted through the users' path and its tokens become proposals, so the first user's
    draft does not start from an empty table; a file that does not load is skipped."""
    from mrg_core.engine import Engine
    from mrg_core.paths import SAMPLES_DIR
    from mrg_core.storage import Store

    model = guided_llama()
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    engine = Engine(model, store)
    (tmp_path / "broken.dcm").write_bytes(b"not a DICOM file")
    samples = [SAMPLES_DIR / "ct_phantom_covid.dcm", tmp_path / "broken.dcm",
               SAMPLES_DIR / "ct_phantom_normal.dcm"]
    try:
        study = engine.load([str(SAMPLES_DIR / "ct_phantom_normal.dcm")])
        with torch.inference_mode():  # the sample's draft, by a copy (its table learns, not this)
            made = list(copy.deepcopy(model)._report_tokens(study, GenerationSettings()))
        n = model.draft_ngrams.n
        assert model.draft_ngrams.propose(made[:n], 1) == []  # nothing learned yet
        assert engine.seed_drafts(samples) == 2
        # the last sample's draft: every run of n tokens proposes what followed it
        assert len(made) > n + 1
        assert model.draft_ngrams.propose(made[:n], 1) == made[n:n + 1]
    finally:
        store.close()
