"""The lean GPT-2 decode step gives the same tokens as transformers' forward."""
import numpy as np
import pytest
import torch

from mrg_core.models import GenerationSettings, tiny_model
from mrg_core.models.fast_decode import FastGPT2Decoder, supports_fast_step
from mrg_core.models.quantize import apply_precision
from mrg_core.study import study_from_arrays


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(3)
    return study_from_arrays([rng.integers(0, 256, (72, 80)).astype(np.uint8)])


def merged_model(label_prompt: bool):
    from tests.test_models_generation import label_prompt_model

    model = label_prompt_model(["no pneumonia .", "pneumonia present ."]) if label_prompt \
        else tiny_model("medvlm", "gpt2")
    with torch.no_grad():  # LoRA B starts at zero: give the adapter something to merge
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return apply_precision(model, "fp32-merged")


def test_only_plain_float32_gpt2_takes_the_fast_step():
    assert not supports_fast_step(tiny_model("medvlm", "gpt2").lm)  # peft wrapper
    assert not supports_fast_step(tiny_model("prompt", "llama").lm)
    assert supports_fast_step(merged_model(False).lm)
    assert not supports_fast_step(apply_precision(tiny_model("medvlm", "gpt2"), "int8").lm)


def test_step_logits_match_transformers(study):
    model = merged_model(False)
    enc = model.encode(study)
    embeds = torch.cat([enc.prefix, model._embed(torch.tensor([model.head_ids()]))], dim=1)
    embeds = torch.cat([embeds, embeds * 0.5])  # a batch of two
    fast = FastGPT2Decoder(model.lm)
    with torch.inference_mode():
        logits, cache = fast.prefill(embeds)
        ids = []
        for tok in ([5, 7], [9, 2], [3, 3]):
            t = torch.tensor(tok)
            ids.append(t)
            got, cache = fast.step(t, cache)
            full = torch.cat([embeds, model._embed(torch.stack(ids, 1))], dim=1)
            want = model.lm(inputs_embeds=full).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=30, repetition_penalty=1.0, no_repeat_ngram_size=0),
    dict(max_new_tokens=30, num_beams=3),
    dict(max_new_tokens=30, label_guidance=0.5),
    dict(max_new_tokens=30, label_guidance=1.0, num_beams=2),
    dict(max_new_tokens=30, do_sample=True, temperature=0.9, seed=4)])
def test_drafts_equal_the_transformers_path(study, settings):
    """Whole drafts: the same token ids, as many of them, and the same text. The tiny model
    never picks EOS in 30 steps, so a draft cut short fails the length check."""
    model = merged_model(True)
    s = GenerationSettings(**settings)
    assert model.fast_decode and supports_fast_step(model.lm)
    with torch.inference_mode():
        fast_ids = list(model._report_tokens(study, s))
    fast = model.generate_report(study, s)
    model.fast_decode = False
    with torch.inference_mode():
        slow_ids = list(model._report_tokens(study, s))
    slow = model.generate_report(study, s)
    assert len(slow_ids) >= 25 and fast_ids == slow_ids
    assert fast == slow and fast
