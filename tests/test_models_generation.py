"""Decoding: KV cache == full recomputation, streaming == non-streaming, prefix tuning is used."""
import numpy as np
import pytest
import torch

from mrg_core.models import GenerationSettings, tiny_model
from mrg_core.study import study_from_arrays

PLAIN = dict(repetition_penalty=1.0, no_repeat_ngram_size=0)
# Drafts are compared whole: the same tokens and as many. The tiny random models never pick EOS
# in these few steps, so a reference shorter than this means the test lost its power.
MIN_TOKENS = 10


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(0)
    return study_from_arrays([rng.integers(0, 256, (80, 60)).astype(np.uint8)])


def tokens(model, study, **kw):
    with torch.inference_mode():
        return list(model._report_tokens(study, GenerationSettings(**kw)))


def full_recompute_greedy(model, study, n, no_repeat_bigrams=False):
    """Reference: no cache, the whole sequence through the (peft) LM at every step.
    no_repeat_bigrams: never pick a token that would repeat a bigram already in the draft."""
    enc = model.encode(study)
    head = torch.tensor([model.instruction_ids + [model.tokenizer.bos_token_id]])
    tok = model.tokenizer
    never = [tok.pad_token_id, tok.bos_token_id, tok.unk_token_id]  # suppressed in decoding
    out = []
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.cat([head, torch.tensor([out], dtype=torch.long)], dim=1)
            embeds = torch.cat([enc.prefix, model._embed(ids)], dim=1)
            logits = model.lm(inputs_embeds=embeds).logits[0, -1]
            logits[never] = float("-inf")
            if no_repeat_bigrams and out:
                logits[[b for a, b in zip(out, out[1:]) if a == out[-1]]] = float("-inf")
            t = int(logits.argmax())
            if t == model.tokenizer.eos_token_id:
                break
            out.append(t)
    return out


@pytest.mark.parametrize("method,family,adapter", [
    ("prompt", "gpt2", "lora"), ("promptbook", "llama", "lora"), ("medvlm", "qwen2", "lora"),
    ("medvlm", "gpt2", "prefix"), ("medvlm", "llama", "prefix")])
def test_kv_cache_matches_full_recomputation(study, method, family, adapter):
    model = tiny_model(method, family, adapter=adapter)
    got = tokens(model, study, max_new_tokens=12, **PLAIN)
    ref = full_recompute_greedy(model, study, 12)
    assert len(ref) >= MIN_TOKENS
    assert got == ref


@pytest.mark.parametrize("method,adapter", [("prompt", "lora"), ("medvlm", "prefix")])
@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=3),
    dict(max_new_tokens=20, do_sample=True, temperature=0.8, top_p=0.9, seed=3)])
def test_stream_equals_generate(study, method, adapter, settings):
    model = tiny_model(method, "gpt2", adapter=adapter)
    s = GenerationSettings(**settings)
    pieces = list(model.stream_report(study, s))
    text = model.generate_report(study, s)
    assert "".join(pieces) == text and text.strip()
    if s.num_beams == 1:
        assert len(pieces) > 1  # really streamed, token by token


def test_sampling_is_seeded(study):
    model = tiny_model("prompt", "gpt2")
    a = GenerationSettings(max_new_tokens=15, do_sample=True, seed=1)
    b = GenerationSettings(max_new_tokens=15, do_sample=True, seed=2)
    assert model.generate_report(study, a) == model.generate_report(study, a)
    assert tokens(model, study, max_new_tokens=15, do_sample=True, seed=1) != \
        tokens(model, study, max_new_tokens=15, do_sample=True, seed=2) or \
        model.generate_report(study, a) != model.generate_report(study, b)


def test_no_repeat_ngram_is_applied(study):
    model = tiny_model("prompt", "gpt2")
    free = tokens(model, study, max_new_tokens=40, **PLAIN)
    assert len(set(zip(free, free[1:]))) < len(free) - 1  # unconstrained, this model repeats
    toks = tokens(model, study, max_new_tokens=40, repetition_penalty=1.0, no_repeat_ngram_size=2)
    bigrams = list(zip(toks, toks[1:]))
    assert len(bigrams) == len(set(bigrams))
    ref = full_recompute_greedy(model, study, 40, no_repeat_bigrams=True)
    assert len(ref) >= 30 and toks == ref  # the whole draft: greedy under the bigram rule


def test_prefix_tuning_generation_uses_the_prefix(study):
    model = tiny_model("medvlm", "gpt2", adapter="prefix")
    before = tokens(model, study, max_new_tokens=15, **PLAIN)
    assert before == tokens(model, study, max_new_tokens=15, **PLAIN)
    emb = model.lm.prompt_encoder["default"].embedding.weight
    afters = []
    for seed in (1, 2):
        with torch.no_grad():
            emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)) * 3)
        afters.append(tokens(model, study, max_new_tokens=15, **PLAIN))
    assert any(a != before for a in afters)


def test_encoder_runs_once_per_study(study):
    model = tiny_model("prompt", "gpt2")
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    model.analyze(study)
    model.predict(study)
    model.generate_report(study, GenerationSettings(max_new_tokens=5))
    assert len(calls) == 1
    other = study_from_arrays([np.zeros((64, 64), np.uint8)])
    model.predict(other)
    assert len(calls) == 2


def test_encode_cache_is_a_bounded_lru():
    from mrg_core.models.report_model import CACHE_SIZE
    model = tiny_model("prompt", "gpt2")
    studies = [study_from_arrays([np.full((64, 64), i, np.uint8)]) for i in range(CACHE_SIZE + 2)]
    for st in studies:
        model.encode(st)
    assert len(model._cache) == CACHE_SIZE
    assert studies[0].content_hash not in model._cache
    assert studies[-1].content_hash in model._cache
    model.to("cpu")  # moving the model drops cached tensors that would not follow
    assert len(model._cache) == 0


def label_prompt_model(phrases):
    from mrg_core.models import ReportModel
    from mrg_core.models.factory import SAMPLE_REPORTS, tiny_config
    from mrg_core.text import train_tokenizer

    cfg = tiny_config("medvlm", "gpt2")
    cfg.label_prompt, cfg.label_phrases = True, phrases
    tok = train_tokenizer(list(SAMPLE_REPORTS) + [cfg.instruction] + phrases, min_frequency=1)
    torch.manual_seed(1)
    return ReportModel.build(cfg, tok).eval()


def guided_reference(model, study, scale, n):
    """Label guidance recomputed from scratch: both prompts through the LM at every step."""
    enc = model.encode(study)
    label = model._prediction(enc.logits).label
    tok = model.tokenizer
    never = [tok.pad_token_id, tok.bos_token_id, tok.unk_token_id]
    out = []
    with torch.inference_mode():
        for _ in range(n):
            lp = []
            for lab in (label, 1 - label):
                ids = torch.tensor([model.head_ids(lab) + out])
                embeds = torch.cat([enc.prefix, model._embed(ids)], dim=1)
                lp.append(torch.log_softmax(model.lm(inputs_embeds=embeds).logits[0, -1], -1))
            mixed = (1 + scale) * lp[0] - scale * lp[1]
            mixed[never] = float("-inf")
            t = int(mixed.argmax())
            if t == tok.eos_token_id:
                break
            out.append(t)
    return out


@pytest.mark.parametrize("phrases", [
    ["no pneumonia .", "pneumonia present ."],  # equal length: one batch of two
    ["no pneumonia .", "pneumonia ."]])  # unequal: two caches in lockstep
def test_label_guidance_matches_recomputation(study, phrases):
    model = label_prompt_model(phrases)
    got = tokens(model, study, max_new_tokens=12, label_guidance=2.0, **PLAIN)
    ref = guided_reference(model, study, 2.0, 12)
    assert len(ref) >= MIN_TOKENS and got == ref
    off = tokens(model, study, max_new_tokens=12, label_guidance=0.0, **PLAIN)
    ref_off = guided_reference(model, study, 0.0, 12)
    assert len(ref_off) >= MIN_TOKENS and off == ref_off  # off = plain decode


@pytest.mark.parametrize("phrases", [["no pneumonia .", "pneumonia present ."],
                                     ["no pneumonia .", "pneumonia ."]])
def test_label_guidance_with_beams_and_model_default(study, phrases):
    model = label_prompt_model(phrases)
    s = GenerationSettings(max_new_tokens=15, num_beams=3, label_guidance=1.0)
    assert "".join(model.stream_report(study, s)) == model.generate_report(study, s)
    # the model's own decoding defaults apply to the fields settings leave at None
    model.config.label_guidance = 1.0
    model.config.repetition_penalty, model.config.no_repeat_ngram_size = 1.0, 0
    default = tokens(model, study, max_new_tokens=12)
    assert len(default) >= MIN_TOKENS
    assert default == tokens(model, study, max_new_tokens=12, label_guidance=1.0, **PLAIN)
    model.config.no_repeat_ngram_size = 2
    got = tokens(model, study, max_new_tokens=40, label_guidance=1.0)
    pairs = list(zip(got, got[1:]))
    assert len(got) >= 30 and len(pairs) == len(set(pairs))  # the model's 2 was used


def test_guidance_plausibility_keeps_only_tokens_the_prompt_finds_likely():
    """A strong contrast lifts tokens both prompts find absurd (the cond/contrast ratio of two
    tiny probabilities); with `plausible` only tokens within that share of the conditional
    prompt's best token can win (contrastive decoding's constraint). 0 = off."""
    import math

    from mrg_core.models.generation import GuidedDecoder

    cond = torch.log(torch.tensor([[0.60, 0.30, 0.0999, 0.0001]]))
    contrast = torch.log(torch.tensor([[0.60, 0.30, 0.0999999, 0.0000001]]))
    off = GuidedDecoder(None, None, 1.5)._mix(cond, contrast)
    assert int(off.argmax()) == 3  # the absurd token wins without the constraint
    on = GuidedDecoder(None, None, 1.5, plausible=0.1)._mix(cond, contrast)
    assert int(on.argmax()) == 0 and math.isinf(on[0, 3]) and on[0, 3] < 0
    assert torch.isfinite(on[0, :3]).all()  # 0.30 and 0.0999 >= 0.1 * 0.60 stay
