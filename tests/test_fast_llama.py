"""The lean Llama decoder (mrg_core/models/fast_llama.py) against transformers: the same logits
at every step (grouped-query attention, RoPE, RMSNorm), the same drafts through ReportModel,
and a restricted output layer that changes nothing while the best token is inside it."""
from __future__ import annotations

import pytest
import torch

from mrg_core.models.fast_llama import MASKED, FastLlamaDecoder, supports_fast_llama


def _llama(seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      rope_theta=10000.0)
    return LlamaForCausalLM(cfg).eval()


def test_logits_match_transformers_at_every_step():
    """Prefix of 7 embeddings, then 6 tokens for a batch of two, with room for only 3 new
    tokens (the cache grows): the logits agree with transformers' to float32 rounding."""
    lm = _llama()
    assert supports_fast_llama(lm)
    dec = FastLlamaDecoder(lm, room=3)
    embeds = torch.randn(2, 7, 64)
    with torch.inference_mode():
        logits, cache = dec.prefill(embeds)
        ref = lm(inputs_embeds=embeds, use_cache=True)
        assert torch.allclose(logits, ref.logits[:, -1], atol=1e-5)
        past, tok = ref.past_key_values, torch.tensor([5, 9])
        for _ in range(6):
            logits, cache = dec.step(tok, cache)
            ref = lm(input_ids=tok[:, None], past_key_values=past, use_cache=True)
            past = ref.past_key_values
            assert torch.allclose(logits, ref.logits[:, -1], atol=1e-5)
            tok = logits.argmax(-1)
    assert cache.length == 13


def test_rows_of_different_lengths_decode_together_as_each_alone():
    """Prefixes of 4, 9 and 6 embeddings prefilled apart, joined into one cache, then 5 tokens
    per step for the three rows (the cache grows on the way): every row's logits are those of
    its own single-row decode, and each row's length is its own."""
    lm = _llama(seed=2)
    dec = FastLlamaDecoder(lm, room=2)
    prefixes = [torch.randn(1, n, 64) for n in (4, 9, 6)]
    with torch.inference_mode():
        alone = [dec.prefill(e) for e in prefixes]
        joined = dec.join(*[c for _, c in [dec.prefill(e) for e in prefixes]])
        assert joined.lengths == [4, 9, 6]
        toks = torch.tensor([11, 22, 33])
        for _ in range(5):
            logits, joined = dec.step(toks, joined)
            for r, (_, cache) in enumerate(alone):
                own, _ = dec.step(toks[r:r + 1], cache)
                assert torch.allclose(logits[r], own[0], atol=1e-5)
            toks = logits.argmax(-1)
    assert joined.lengths == [9, 14, 11]


def test_guidance_over_prompts_of_unequal_length_joins_them_exactly():
    """Label guidance whose two prompts differ in length (5 and 8 embeddings) runs as one
    joined batch on the lean decoder; its guided scores are those of the two caches decoded
    in lockstep (a decoder that cannot join)."""
    from mrg_core.models.generation import GuidedDecoder

    class Lockstep:  # the lean decoder without `join`
        def __init__(self, dec):
            self.prefill, self.step = dec.prefill, dec.step

    dec = FastLlamaDecoder(_llama(seed=4))
    cond, contrast = torch.randn(1, 5, 64), torch.randn(1, 8, 64)
    joined, apart = GuidedDecoder(dec, contrast, 1.5), GuidedDecoder(Lockstep(dec), contrast, 1.5)
    with torch.inference_mode():
        (sj, cj), (sa, ca) = joined.prefill(cond), apart.prefill(cond)
        assert cj.both is not None and ca.both is None
        for _ in range(4):
            assert torch.allclose(sj, sa, atol=1e-4)
            tok = sj.argmax(-1)
            (sj, cj), (sa, ca) = joined.step(tok, cj), apart.step(tok, ca)
        assert torch.allclose(sj, sa, atol=1e-4)


def test_guidance_computes_the_prompts_common_beginning_once():
    """A guided pair whose prompts begin alike (the image and the instruction; they differ in
    the stated decision): the lean decoder computes the 5 common positions once and the two
    ends (3 and 2) as one batch; the guided scores are those of the prompts decoded apart."""
    from mrg_core.models.generation import GuidedDecoder, shared_length

    class Lockstep:  # the lean decoder without `join` or `prefill_shared`
        def __init__(self, dec):
            self.prefill, self.step = dec.prefill, dec.step

    dec = FastLlamaDecoder(_llama(seed=4))
    common = torch.randn(1, 5, 64)
    cond = torch.cat([common, torch.randn(1, 3, 64)], 1)
    contrast = torch.cat([common, torch.randn(1, 2, 64)], 1)
    assert shared_length(cond, contrast) == 5
    assert shared_length(cond, cond) == 7  # each prompt keeps a position of its own
    assert shared_length(cond.expand(2, -1, -1), contrast.expand(2, -1, -1)) == 0  # beams
    calls, own = [], dec.prefill_shared
    dec.prefill_shared = lambda c, ends: (calls.append((c.shape[1], [e.shape[1] for e in ends])),
                                          own(c, ends))[1]
    shared, apart = GuidedDecoder(dec, contrast, 1.5), GuidedDecoder(Lockstep(dec), contrast, 1.5)
    with torch.inference_mode():
        (ss, cs), (sa, ca) = shared.prefill(cond), apart.prefill(cond)
        assert calls == [(5, [3, 2])] and cs.both.lengths == [8, 7]
        for _ in range(4):
            assert torch.allclose(ss, sa, atol=1e-4)
            tok = ss.argmax(-1)
            (ss, cs), (sa, ca) = shared.step(tok, cs), apart.step(tok, ca)
        assert torch.allclose(ss, sa, atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "int4", "int4 but q, k, v int8"])
@pytest.mark.parametrize("lengths", [(6, 6), (4, 9)], ids=["same length", "ragged"])
def test_quantized_weight_steps_run_as_torchscript_with_the_same_logits(lengths, kind):
    """int8- and int4-weights layers, and the mix int4-weights makes of a LoRA model: a
    one-token step is one TorchScript call through every layer, with q, k, v (and gate, up) in
    one joined kernel call; the logits equal those of the layers called one by one in Python
    bit for bit, for rows of the same and of different lengths, and the joined weights are the
    layers' own storage (each layer keeps a view: no memory added). (int4: sizes in whole
    blocks of the kernel's 64 packed rows.)"""
    from mrg_core.models.fast_llama import token_step
    from mrg_core.models.quantize import (Int4WeightLinear, Int8WeightLinear,
                                          quantize_linear_weights)

    layer = Int8WeightLinear if kind == "int8" else Int4WeightLinear
    width = 64 if kind == "int8" else 128
    lm = _llama(seed=5, hidden=width).to(torch.bfloat16)
    qkv_int8 = {f"layers.{i}.self_attn.{n}_proj" for i in range(3) for n in "qkv"}
    quantize_linear_weights(lm.model, layer, keep_int8=qkv_int8 if "but" in kind else ())
    joined = FastLlamaDecoder(lm)
    separate = FastLlamaDecoder(lm)
    separate._quantized = None  # each layer called on its own, in Python
    groups = {"int8": [0] * 4, "int4": [32] * 4, "int4 but q, k, v int8": [0, 32, 32, 32]}
    assert joined._quantized is not None and joined._quantized[1] == groups[kind]
    assert isinstance(token_step(), torch.jit.ScriptFunction)
    att = lm.model.layers[1].self_attn
    assert type(att.o_proj) is layer
    w = "weight_int8" if type(att.q_proj) is Int8WeightLinear else "weight_int4"
    assert getattr(att.q_proj, w).untyped_storage().data_ptr() == \
        getattr(att.v_proj, w).untyped_storage().data_ptr()
    prefixes = [torch.randn(1, n, width) for n in lengths]

    def prefill(dec):
        parts = [dec.prefill(e) for e in prefixes]
        return torch.cat([lg for lg, _ in parts]), dec.join(*[c for _, c in parts])

    with torch.inference_mode():
        (lj, cj), (ls, cs) = prefill(joined), prefill(separate)
        for _ in range(4):
            tok = lj.argmax(-1)
            (lj, cj), (ls, cs) = joined.step(tok, cj), separate.step(tok, cs)
            assert torch.equal(lj, ls)
    assert cj.lengths == [n + 4 for n in lengths]


def test_int4_projections_join_only_in_whole_packed_blocks():
    """torch packs int4 weights in blocks of 64 rows: k and v of 32 rows each cannot be joined
    with q (joined, they gave other numbers). Such layers stay apart, and the decoder still
    gives transformers' logits on the same int4 layers."""
    from mrg_core.models.fast_llama import joined_weights
    from mrg_core.models.quantize import Int4WeightLinear, quantize_linear_weights

    lm = _llama(seed=6, hidden=64).to(torch.bfloat16)  # q 64 rows, k and v 32 each
    quantize_linear_weights(lm.model, Int4WeightLinear)
    dec = FastLlamaDecoder(lm)
    assert joined_weights(lm.model.layers[0].self_attn, ("q_proj", "k_proj", "v_proj")) is None
    assert dec._quantized is None
    embeds = torch.randn(1, 5, 64)
    with torch.inference_mode():
        logits, cache = dec.prefill(embeds)
        ref = lm(inputs_embeds=embeds.to(torch.bfloat16), use_cache=True)
        assert torch.allclose(logits, ref.logits[:, -1].float(), atol=0.05)
        tok = logits.argmax(-1)
        logits, cache = dec.step(tok, cache)
        ref = lm(input_ids=tok[:, None], past_key_values=ref.past_key_values, use_cache=True)
        assert torch.allclose(logits, ref.logits[:, -1].float(), atol=0.05)


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
def test_extend_checks_several_tokens_with_the_logits_of_one_token_steps(kind):
    """Speculative decoding's pass: rows of different lengths (a joined pair) take 5 tokens
    each in one pass; every position's logits are those of five one-token steps, bit for bit
    with int8/int4 weights (so speculation changes no draft, and only there it is on), to
    float rounding in fp32. rewind() then forgets the proposals not taken: the next step
    equals one from a cache that never saw them."""
    from mrg_core.models.quantize import (Int4WeightLinear, Int8WeightLinear,
                                          quantize_linear_weights)

    lm = _llama(seed=3, hidden=128)
    if kind != "fp32":
        lm = lm.to(torch.bfloat16)
        quantize_linear_weights(lm.model, Int8WeightLinear if kind == "int8"
                                else Int4WeightLinear)
    dec = FastLlamaDecoder(lm, room=3)  # the pass outgrows the room: the cache grows
    assert dec.can_extend == (kind != "fp32")
    prefixes = [torch.randn(1, n, 128) for n in (5, 9)]
    toks = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        stepped = dec.join(*[dec.prefill(e)[1] for e in prefixes])
        one_by_one = torch.stack([dec.step(toks[:, j], stepped)[0] for j in range(5)], 1)
        passed = dec.join(*[dec.prefill(e)[1] for e in prefixes])
        every, passed = dec.extend(toks, passed)
        assert passed.lengths == stepped.lengths == [10, 14]
        if kind == "fp32":
            assert torch.allclose(every, one_by_one, atol=1e-5)
        else:
            assert torch.equal(every, one_by_one)
        kept = dec.join(*[dec.prefill(e)[1] for e in prefixes])
        for j in range(2):
            dec.step(toks[:, j], kept)
        dec.rewind(passed, 3)  # two of five kept
        assert passed.lengths == kept.lengths == [7, 11]
        nxt = torch.tensor([7, 8])
        a, b = dec.step(nxt, passed)[0], dec.step(nxt, kept)[0]
        assert torch.equal(a, b) if kind != "fp32" else torch.allclose(a, b, atol=1e-5)


def test_the_step_is_scripted_from_the_file_it_was_imported_from(tmp_path):
    """TorchScript reads a function's source from its file. A file replaced under a running
    process (an upgrade in place) must not change what the step compiles to: compiled at
    first use, it once compiled the function that had moved to those lines, and every draft
    failed at its first step."""
    import importlib.util
    import shutil

    from mrg_core.models import fast_llama

    copy = tmp_path / "fast_llama_copy.py"
    shutil.copy(fast_llama.__file__, copy)
    spec = importlib.util.spec_from_file_location("fast_llama_copy", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy.write_text("# replaced in place\n" * 3 + copy.read_text())
    step = module.token_step()
    assert isinstance(step, torch.jit.ScriptFunction)
    assert "_qmm" in step.code and "gate_up_w" in step.code


def test_restricted_head_scores_only_its_rows():
    lm = _llama()
    keep = [3, 17, 42, 299]
    embeds = torch.randn(1, 5, 64)
    full, _ = FastLlamaDecoder(lm).prefill(embeds)
    part, _ = FastLlamaDecoder(lm, keep).prefill(embeds)
    assert torch.allclose(part[:, keep], full[:, keep])
    others = torch.ones(300, dtype=torch.bool)
    others[keep] = False
    assert (part[:, others] == MASKED).all()


def test_a_bf16_lms_output_layer_computes_in_float32():
    """int8-weights runs the layers in bf16, but the output layer in float32: logits rounded to
    bf16 (steps of 0.06 at 10) made near ties, and a restricted layer's draft parted from the
    whole vocabulary's on a val study. Restricted rows are the whole layer's to float32
    rounding, and a row's logits do not depend on how many rows the call holds, bit for bit
    (extend's passes rely on it)."""
    from mrg_core.models.quantize import quantize_linear_int8_weights

    lm = _llama(seed=5).to(torch.bfloat16)
    quantize_linear_int8_weights(lm.model)
    keep = [3, 17, 42, 299]
    full, part = FastLlamaDecoder(lm), FastLlamaDecoder(lm, keep)
    x = torch.randn(6, 64).to(torch.bfloat16)
    with torch.inference_mode():
        logits = full._logits(x)
        assert logits.dtype == torch.float32
        assert not torch.equal(logits, logits.to(torch.bfloat16).float())  # not bf16 numbers
        ref = x.float() @ lm.lm_head.weight.float().t()
        assert torch.allclose(logits, ref, atol=1e-5, rtol=0)
        assert torch.allclose(part._logits(x)[:, keep], logits[:, keep], atol=1e-6, rtol=0)
        assert all(torch.equal(full._logits(x[:n]), logits[:n]) for n in (1, 2, 3))
        assert all(torch.equal(full._logits(x[k:k + 1]), logits[k:k + 1]) for k in range(6))
        threads = torch.get_num_threads()
        try:  # a shared step may run on a thread with another count than a lone draft's
            torch.set_num_threads(1 if threads > 1 else 2)
            assert torch.equal(full._logits(x), logits)
            assert torch.equal(full._logits(x[:1]), logits[:1])
        finally:
            torch.set_num_threads(threads)


def test_a_bf16_lms_attention_reads_a_float32_cache_with_a_bf16_products_roundings():
    """A bf16 LM's keys and values are kept in float32 (exact: no conversion per step) and
    attention computes in float32, rounding the scores, the weights and the output where a bf16
    product rounds them: the bf16 product's numbers but for the order of the sums (a last-bit
    difference in a few elements), and far from float32 attention without those roundings,
    which changed 30 of 72 val drafts. A float32 LM's attention is plain float32."""
    from mrg_core.models.fast_llama import _attend

    lm = _llama(seed=3).to(torch.bfloat16)
    dec = FastLlamaDecoder(lm)
    with torch.inference_mode():
        _, cache = dec.prefill(torch.randn(2, 5, 64))
        dec.step(torch.tensor([7, 9]), cache)
    assert cache.k.dtype == cache.v.dtype == torch.float32
    filled = cache.k[:, :, :, :6]
    assert filled.abs().sum() > 0 and torch.equal(filled, filled.bfloat16().float())

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 3, n, 64, generator=gen).mul(2).bfloat16() for n in (3, 90, 90))
    mask = torch.zeros(16, 1, 1, 90).masked_fill_(torch.rand(16, 1, 1, 90, generator=gen) < 0.2,
                                                  float("-inf"))
    s = torch.matmul(q, k.transpose(-1, -2)).float() * 64 ** -0.5  # the bf16 product's form
    ref = torch.matmul(torch.softmax(s + mask, -1).bfloat16(), v)
    got = _attend(q, k.float(), v.float(), mask, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    unrounded = _attend(q, k.float(), v.float(), mask, torch.float32)
    differ = lambda a: (a.float() != ref.float()).float().mean().item()  # noqa: E731
    assert differ(got) < 0.01 and differ(unrounded.bfloat16()) > 0.1
    assert torch.allclose(got.float(), ref.float(), atol=0, rtol=2 ** -7)
    plain = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * 64 ** -0.5
                          + mask, -1) @ v.float()
    assert torch.allclose(unrounded, plain, atol=1e-6)


def test_peft_wrapped_and_gpt2_models_take_other_paths():
    from mrg_core.models.factory import tiny_model

    m = tiny_model("medvlm", family="llama")  # LoRA not merged: a peft wrapper
    assert not supports_fast_llama(m.lm) and supports_fast_llama(m.base_lm)
    assert not supports_fast_llama(tiny_model("medvlm", family="gpt2").base_lm)


def _trained_lora(model, seed=3):
    """LoRA starts as a no-op (B = 0): give it weights so merging really changes the LM."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_merged_llama_drafts_like_the_transformers_path(guidance):
    """A MedVLM on a (tiny) Llama with trained LoRA: the fp32 draft (peft, transformers'
    cache) and the fp32-merged draft (the lean decoder) are the same tokens, with and without
    label guidance (a batch of two through the cache)."""
    from mrg_core.models import GenerationSettings
    from mrg_core.models.factory import tiny_model
    from mrg_core.models.quantize import apply_precision
    from mrg_core.samples import make_ct_phantom
    from mrg_core.study import study_from_arrays

    study = study_from_arrays([make_ct_phantom(seed=4, covid=True)])
    drafts = []
    for precision in ("fp32", "fp32-merged"):
        m = _trained_lora(tiny_model("medvlm", family="llama", seed=1))
        m.config.label_prompt, m.config.label_guidance = True, guidance
        m = apply_precision(m, precision)
        assert isinstance(m._decoder(), FastLlamaDecoder) == (precision == "fp32-merged")
        drafts.append(list(m._report_tokens(study, GenerationSettings(
            max_new_tokens=30, repetition_penalty=1.0, no_repeat_ngram_size=0))))
    assert len(drafts[0]) >= 10 and drafts[0] == drafts[1]


def test_head_vocab_keeps_drafts_whose_tokens_it_holds():
    """Restricting the output layer to a set that holds every token of the full draft leaves
    the draft unchanged; leaving one of them out changes it, and every token stays inside."""
    from mrg_core.models import GenerationSettings
    from mrg_core.models.factory import tiny_model
    from mrg_core.models.quantize import apply_precision
    from mrg_core.samples import make_ct_phantom
    from mrg_core.study import study_from_arrays

    study = study_from_arrays([make_ct_phantom(seed=5, covid=False)])
    s = GenerationSettings(max_new_tokens=25, repetition_penalty=1.0, no_repeat_ngram_size=0)
    m = apply_precision(_trained_lora(tiny_model("medvlm", family="llama", seed=2)),
                        "fp32-merged")
    full = list(m._report_tokens(study, s))
    eos = m.tokenizer.eos_token_id
    m.config.head_vocab = sorted(set(full) | {eos, 7, 8})
    assert list(m._report_tokens(study, s)) == full
    m.config.head_vocab = sorted((set(full) - {full[0]}) | {eos})
    fewer = list(m._report_tokens(study, s))
    assert fewer != full and set(fewer) <= set(m.config.head_vocab)


def test_learn_vocabulary_grows_only_a_restricted_head():
    from mrg_core.models.factory import tiny_model

    m = tiny_model("medvlm", family="llama")
    m.learn_vocabulary(["patchy ground glass shadow ."])
    assert m.config.head_vocab is None  # the whole vocabulary stays the whole vocabulary
    m.config.head_vocab = m.report_vocabulary(["the thorax was symmetrical ."])
    before = set(m.config.head_vocab)
    assert m.tokenizer.eos_token_id in before
    m.learn_vocabulary(["patchy ground glass shadow ."])
    grown = set(m.config.head_vocab)
    assert before < grown
    assert set(m.tokenizer("patchy ground glass shadow .", add_special_tokens=False)
               ["input_ids"]) <= grown


def test_fine_tuning_lets_a_restricted_head_write_the_corrections_words():
    """A radiologist's words outside the training reports' vocabulary must become writable
    after fine-tuning on their corrections (finetune.train_model grows head_vocab)."""
    from mrg_core.finetune import FinetuneConfig, train_model
    from mrg_core.models.factory import tiny_model

    m = tiny_model("medvlm", family="llama")
    m.config.head_vocab = m.report_vocabulary(["the thorax was symmetrical ."])
    text = "patchy ground glass shadow in the lower lobe ."
    new = set(m.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert not new <= set(m.config.head_vocab)
    items = [(torch.rand(1, 1, 64, 64), text, 1.0)]
    train_model(m, items, FinetuneConfig(epochs=1, batch_size=1, augment=False))
    assert new <= set(m.config.head_vocab)


@pytest.mark.parametrize("precision", ["fp32", "int8-weights"])
def test_prompts_with_a_shared_beginning_compute_it_once(precision):
    """Two prompts that begin alike (a guided draft's pair): the beginning is computed once,
    the two ends as one batch (the shorter padded); each row's logits and its next steps are
    those of its own prompt prefilled alone, and each row keeps its own length (the cache
    grows on the way)."""
    from mrg_core.models.quantize import quantize_linear_int8_weights

    lm = _llama(seed=6)
    if precision == "int8-weights":
        lm = lm.to(torch.bfloat16)
        quantize_linear_int8_weights(lm.model)
    dec = FastLlamaDecoder(lm, room=2)
    common, ends = torch.randn(1, 5, 64), [torch.randn(1, 3, 64), torch.randn(1, 1, 64)]
    # int8-weights runs in bf16: the shared beginning's attention is a matmul of another shape,
    # which an AVX2-only CPU (no native bf16) rounds differently, by one bf16 step (~1e-3 here;
    # bit for bit on the earlier AVX-512 hosts). A wrong mask or position is off by far more.
    tol = 1e-5 if precision == "fp32" else 2 ** -8
    with torch.inference_mode():
        logits, shared = dec.prefill_shared(common, ends)
        apart = [dec.prefill(torch.cat([common, e], 1)) for e in ends]
        assert shared.lengths == [8, 6]
        joined = dec.join(*[c for _, c in apart])
        ref = torch.cat([lg for lg, _ in apart])
        toks = torch.tensor([7, 7])
        for _ in range(4):
            assert torch.allclose(logits, ref, atol=tol, rtol=0)
            (logits, shared), (ref, joined) = dec.step(toks, shared), dec.step(toks, joined)
            toks = ref.argmax(-1)
    assert shared.lengths == [12, 10]


def _prefix_tuned(lm, n_virtual: int = 5, seed: int = 8):
    """peft prefix tuning (P-Tuning v2) on `lm` with learned-looking (random, non-zero) keys
    and values, and the lean decoder's copy of them ([L, H_kv, P, D] each)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from mrg_core.models.adapters import learned_prefix

    peft_lm = get_peft_model(lm, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                    num_virtual_tokens=n_virtual)).eval()
    with torch.no_grad():
        emb = peft_lm.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)))
    return peft_lm, learned_prefix(peft_lm)


def test_learned_prefix_gives_the_logits_of_peft_prefix_tuning():
    """P-Tuning v2 on the lean decoder: the learned keys and values sit before the prompt,
    unrotated, and the prompt takes the rotary positions after them. Prefill and every step
    agree with peft's forward (the prefix as transformers' past) to float32 rounding, for a
    batch of two (grouped-query attention: 4 heads, 2 key/value heads)."""
    from mrg_core.models.generation import KVDecoder

    base = _llama(seed=9)
    peft_lm, prefix = _prefix_tuned(base)
    assert prefix[0].shape == (3, 2, 5, 16)
    fast, ref = FastLlamaDecoder(base, room=3, prefix=prefix), KVDecoder(peft_lm, base)
    embeds = torch.randn(2, 6, 64)
    with torch.inference_mode():
        (logits, cache), (want, past) = fast.prefill(embeds), ref.prefill(embeds)
        assert cache.lengths == [11, 11]
        assert not torch.allclose(want, FastLlamaDecoder(base).prefill(embeds)[0], atol=1e-2)
        tok = torch.tensor([5, 9])
        for _ in range(6):
            assert torch.allclose(logits, want, atol=1e-5)
            (logits, cache), (want, past) = fast.step(tok, cache), ref.step(tok, past)
            tok = want.argmax(-1)
        assert torch.allclose(logits, want, atol=1e-5)
        # a guided pair's shared beginning goes after the prefix too
        common, ends = embeds[:1, :4], [embeds[:1, 4:], embeds[1:, 4:5]]
        shared, _ = fast.prefill_shared(common, ends)
        apart = torch.cat([ref.prefill(torch.cat([common, e], 1))[0] for e in ends])
        assert torch.allclose(shared, apart, atol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_p_tuning_v2_drafts_like_the_transformers_path(guidance):
    """A MedVLM with P-Tuning v2 (a tiny Llama, trained-looking prefix) decodes on the lean
    decoder, with the transformers path's tokens, with and without label guidance."""
    from mrg_core.models import GenerationSettings
    from mrg_core.models.factory import tiny_model
    from mrg_core.samples import make_ct_phantom
    from mrg_core.study import study_from_arrays

    study = study_from_arrays([make_ct_phantom(seed=4, covid=True)])
    m = tiny_model("medvlm", family="llama", seed=1, adapter="prefix")
    m.config.label_prompt, m.config.label_guidance = True, guidance
    with torch.no_grad():
        emb = m.lm.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(2)) * 2)
    s = GenerationSettings(max_new_tokens=30, repetition_penalty=1.0, no_repeat_ngram_size=0)
    drafts = []
    for fast in (False, True):
        m.fast_decode = fast
        assert isinstance(m._decoder(), FastLlamaDecoder) == fast
        drafts.append(list(m._report_tokens(study, s)))
    assert len(drafts[0]) >= 10 and drafts[0] == drafts[1]
