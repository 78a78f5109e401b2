"""Shapes, one optimizer step, what is frozen and what trains, for every method x LM family."""
import copy

import numpy as np
import pytest
import torch

from mrg_core.models import ReportModel, ReportModelConfig, tiny_config
from mrg_core.models.config import EncoderConfig
from mrg_core.models.encoder import EncoderOutput
from mrg_core.models.factory import SAMPLE_REPORTS
from mrg_core.study import study_from_arrays
from mrg_core.text import train_tokenizer

REPORTS = ["The lungs are clear bilaterally.", "Patchy consolidation in the right lower lobe."]
CASES = ([(m, f, "none") for m in ("prompt", "promptbook") for f in ("gpt2", "llama", "qwen2")]
         + [("medvlm", f, a) for f in ("gpt2", "llama", "qwen2")
            for a in ("lora", "prefix", "unfreeze")])


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SAMPLE_REPORTS, min_frequency=1)


def build(tokenizer, method="prompt", family="gpt2", adapter="lora", **enc):
    cfg = tiny_config(method, family, adapter)
    for k, v in enc.items():
        setattr(cfg.encoder, k, v)
    torch.manual_seed(0)
    return ReportModel.build(cfg, tokenizer)


def lm_group(name: str) -> str:
    if not name.startswith("lm."):
        return name.split(".")[0]
    return "adapter" if ("lora_" in name or "prompt_encoder" in name) else "lm"


@pytest.mark.parametrize("method,family,adapter", CASES)
def test_one_step_trains_only_what_it_should(tokenizer, method, family, adapter):
    model = build(tokenizer, method, family, adapter).train()
    x = torch.randn(2, 2, 1, 64, 64)
    enc = model.encoder(x)
    prefix = model.bridge(enc)
    width = model.lm.get_input_embeddings().weight.shape[1]
    n_prefix = 4 + 4 if method != "medvlm" else 4  # visual tokens + prompt length / queries
    assert prefix.shape == (2, n_prefix, width) and enc.logits.shape == (2, 1)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model.compute_loss(x, REPORTS, torch.tensor([0.0, 1.0]))
    assert set(out) == {"loss", "lm_loss", "cls_loss"} and torch.isfinite(out["loss"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out["loss"].backward()
    opt.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable  # frozen weights are bit-identical
    groups = {lm_group(n) for n in changed}
    assert {"encoder", "bridge"} <= groups
    lm_trainable = {n for n in trainable if n.startswith("lm.")}
    if method != "medvlm":
        assert not lm_trainable
    elif adapter in ("lora", "prefix"):
        assert lm_trainable and all(lm_group(n) == "adapter" for n in lm_trainable)
        assert "adapter" in groups
    elif adapter == "unfreeze":
        assert lm_trainable and "lm" in groups
        n_layers = 2
        assert all(f".{n_layers - 1}." in n for n in lm_trainable)  # only the last block


def test_customized_prompts_depend_on_the_image(tokenizer):
    for method in ("prompt", "promptbook"):
        model = build(tokenizer, method).eval()
        feats = model.encoder(torch.randn(2, 1, 1, 64, 64)).global_feat
        prompts, weights = model.bridge.prompts(feats)
        assert prompts.shape == (2, 4, 64)
        assert not torch.allclose(prompts[0], prompts[1])
        if method == "promptbook":
            assert torch.allclose(weights.sum(-1), torch.ones(2))
            assert (weights.max(-1).values < 0.999).all()  # a mixture, not one-hot
            assert not torch.allclose(weights[0], weights[1])


def test_medvlm_bridge_output_depends_on_the_classifier_probabilities(tokenizer):
    """The discrimination-enhanced bridge: the same visual tokens with other label
    probabilities give another LM prefix, both when the probabilities are passed (label
    teacher forcing) and when the bridge reads the classifier's own logits (inference)."""
    model = build(tokenizer, "medvlm").eval()

    def gap(a, b):  # per study, the change relative to the prefix's own size; the smallest
        return ((a - b).norm(dim=(1, 2)) / b.norm(dim=(1, 2))).min().item()

    with torch.no_grad():
        enc = model.encoder(torch.randn(2, 1, 1, 64, 64))
        out = {p: model.bridge(enc, probs=torch.full((2, 1), p)) for p in (0.0, 0.5, 1.0)}
        assert torch.equal(out[0.0], model.bridge(enc, probs=torch.zeros(2, 1)))  # no dropout
        assert gap(out[1.0], out[0.0]) > 1e-2 and gap(out[0.5], out[0.0]) > 5e-3
        # the default path: only the classifier's logits differ between the two calls
        sure_no = EncoderOutput(enc.global_feat, enc.tokens, torch.full((2, 1), -6.0),
                                enc.view_weights)
        sure_yes = EncoderOutput(enc.global_feat, enc.tokens, torch.full((2, 1), 6.0),
                                 enc.view_weights)
        assert gap(model.bridge(sure_yes), model.bridge(sure_no)) > 1e-2
    # end to end: a study's prefix follows what the classifier head decides
    study = study_from_arrays([np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)])
    head = model.encoder.classifier[-1]
    prefixes = []
    for bias in (-6.0, 6.0):
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(bias)
        model._cache.clear()
        assert model.predict(study).label == int(bias > 0)
        prefixes.append(model.encode(study).prefix)
    assert gap(prefixes[1], prefixes[0]) > 1e-2


def test_prompt_position_is_configurable(tokenizer):
    model = build(tokenizer, "prompt").eval()
    model.bridge.position = "before_visual"
    enc = model.encoder(torch.randn(1, 1, 1, 64, 64))
    prompts, _ = model.bridge.prompts(enc.global_feat)
    assert torch.allclose(model.bridge(enc)[:, :4], prompts)
    model.bridge.position = "after_visual"
    assert torch.allclose(model.bridge(enc)[:, 4:], prompts)


def test_instruction_tokens_are_not_scored(tokenizer):
    model = build(tokenizer)
    ids, mask, labels = model.tokenize_reports(["The lungs are clear.", "No effusion"])
    n_head = len(model.instruction_ids) + 1  # instruction + BOS
    assert n_head > 1
    assert (labels[:, :n_head] == -100).all()
    assert ids[0, n_head - 1] == tokenizer.bos_token_id
    n0 = int(mask[0].sum())
    assert torch.equal(labels[0, n_head:n0], ids[0, n_head:n0])
    assert ids[0, n0 - 1] == tokenizer.eos_token_id
    n1 = int(mask[1].sum())
    assert (labels[1, n1:] == -100).all() and (ids[1, n1:] == tokenizer.pad_token_id).all()


def test_reports_truncated_and_labels_may_be_multi_or_unknown(tokenizer):
    model = build(tokenizer)
    model.config.max_report_tokens = 3
    ids, mask, labels = model.tokenize_reports(["the lungs are clear bilaterally ."])
    assert int((labels != -100).sum()) == 4  # 3 report tokens + EOS
    out = model.compute_loss(torch.randn(2, 1, 1, 64, 64), ["a", "b"],
                             torch.tensor([[1.0], [float("nan")]]))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("kind", ["convnext", "swin", "vit"])
def test_other_encoder_kinds(tokenizer, kind):
    enc = dict(kind=kind, hidden_sizes=[16, 32], depths=[1, 1], embedding_size=16,
               num_heads=[2, 2], window_size=4, fusion="attention")
    model = build(tokenizer, "prompt", **enc).train()
    out = model.compute_loss(torch.randn(2, 3, 1, 64, 64), REPORTS, torch.tensor([0.0, 1.0]))
    out["loss"].backward()
    e = model.encoder(torch.randn(2, 3, 1, 64, 64))
    assert torch.allclose(e.view_weights.sum(-1), torch.ones(2))
    assert e.tokens.shape[:2] == (2, 4)


def test_pretrained_rgb_encoder_folder(tokenizer, tmp_path):
    from transformers import ResNetConfig, ResNetModel
    ResNetModel(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32],
                             depths=[1, 1])).save_pretrained(tmp_path / "rgb")
    model = build(tokenizer, "prompt", pretrained_path=str(tmp_path / "rgb"))
    assert model.encoder.in_channels == 3 and model.config.encoder.backbone_config
    out = model.compute_loss(torch.randn(1, 1, 1, 64, 64), REPORTS[:1], torch.tensor([1.0]))
    assert torch.isfinite(out["loss"])


def test_config_json_round_trip():
    import json
    cfg = tiny_config("medvlm", "qwen2", "prefix")
    cfg.encoder = EncoderConfig(kind="swin", fusion="attention")
    back = ReportModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.to_dict() == copy.deepcopy(cfg).to_dict()


def test_label_prompt_states_the_decision_and_is_not_scored():
    """label_prompt: the classifier's decision is written after the instruction in words; it
    conditions the report but is never a training target; teacher forcing uses true labels."""
    from mrg_core.models import ReportModel
    from mrg_core.models.factory import tiny_config
    from mrg_core.text import train_tokenizer

    cfg = tiny_config("medvlm", "gpt2")
    cfg.label_prompt, cfg.label_prompt_teacher_forcing = True, 1.0
    texts = ["no pneumonia . lungs are clear .", "pneumonia . ground glass opacity ."]
    tok = train_tokenizer(texts + [cfg.instruction], min_frequency=1)
    torch.manual_seed(0)
    model = ReportModel.build(cfg, tok)
    neg, pos = model.head_ids(0), model.head_ids(1)
    assert neg != pos and tok.unk_token_id not in neg + pos
    assert tok.convert_tokens_to_ids("no") in neg and tok.convert_tokens_to_ids("no") not in pos
    ids, _, labels = model.tokenize_reports(["lungs are clear .", "ground glass ."],
                                            [(0, ()), (1, ())])
    assert ids[0, : len(neg)].tolist() == neg and ids[1, : len(pos)].tolist() == pos
    assert (labels[0, : len(neg)] == -100).all() and (labels[1, : len(pos)] == -100).all()
    assert labels[0, len(neg)] != -100  # the first report token is scored
    model.train()
    enc = model.encoder(torch.rand(2, 1, 1, 64, 64))
    assert model._heads(enc, torch.tensor([1.0, 0.0])) == [(1, ()), (0, ())]  # forcing = truth
    out = model.compute_loss(torch.rand(2, 1, 1, 64, 64), texts, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(out["loss"])


def test_finding_prompt_states_predicted_findings_and_trains_their_heads(tmp_path):
    """finding_prompt: a token-grid head predicts findings; those past their threshold are
    written after the decision; training states the report's own findings and scores the
    finding heads; the phrases and thresholds survive save/load."""
    import numpy as np

    from mrg_core.study import study_from_arrays

    cfg = tiny_config("medvlm", "gpt2")
    cfg.labels = ["pneumonia", "ground_glass", "RLL"]
    cfg.label_prompt, cfg.finding_prompt, cfg.label_prompt_teacher_forcing = True, True, 1.0
    cfg.finding_phrases = {"ground_glass": "ground glass opacity", "RLL": "right lower lobe"}
    texts = ["no pneumonia . lungs are clear .",
             "pneumonia present . ground glass opacity , right lower lobe ."]
    tok = train_tokenizer(texts + [cfg.instruction], min_frequency=1)
    torch.manual_seed(0)
    model = ReportModel.build(cfg, tok)
    assert model.finding_names == ["ground_glass", "RLL"]
    both, one = model.head_ids(1, ("ground_glass", "RLL")), model.head_ids(1, ("RLL",))
    glass, lower = tok.convert_tokens_to_ids("glass"), tok.convert_tokens_to_ids("lower")
    assert glass in both and lower in both and glass not in one and lower in one
    assert tok.unk_token_id not in both
    # thresholds decide what is stated: everything passes 0, nothing passes 1
    cfg.label_thresholds = {"ground_glass": 0.0, "RLL": 1.0}
    assert model.findings_from([0.9, 0.2, 0.99]) == ("ground_glass",)
    # a negative decision reads its own thresholds (absent ones: the shared ones)
    cfg.negative_label_thresholds = {"ground_glass": 0.5}
    assert model.findings_from([0.9, 0.2, 0.99]) == ("ground_glass",)  # positive call
    assert model.findings_from([0.1, 0.2, 0.99]) == ()  # negative: 0.2 < 0.5
    assert model.findings_from([0.1, 0.6, 0.99]) == ("ground_glass",)
    cfg.negative_label_thresholds = {}
    assert model.findings_from([0.1, 0.2, 0.99]) == ("ground_glass",)
    # training: the report's findings (teacher forcing 1.0) and a loss on the finding heads
    model.train()
    x = torch.rand(2, 1, 1, 64, 64)
    y = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    heads = model._heads(model.encoder(x), y)
    assert heads == [(0, ()), (1, ("ground_glass", "RLL"))]
    cfg.finding_teacher_forcing = 0.0  # the head's findings, the true decision
    enc = model.encoder(x)
    heads = model._heads(enc, y)
    assert [h[0] for h in heads] == [0, 1]
    assert [h[1] for h in heads] == [model.findings_from(p)
                                     for p in torch.sigmoid(enc.logits).tolist()]
    cfg.finding_teacher_forcing = 1.0
    enc = model.encoder(x)
    unknown = torch.tensor([[0.0, float("nan"), float("nan")], [1.0, float("nan"), float("nan")]])
    only_target = model.classification_loss(enc.logits, unknown)
    assert model.classification_loss(enc.logits, y) > only_target  # findings add their share
    # the finding heads learn from the findings alone; the features do not move for them
    model.zero_grad()
    model.classification_loss(model.encoder(x).logits, torch.tensor(
        [[float("nan"), 0.0, 1.0], [float("nan"), 1.0, 0.0]])).backward()
    assert model.encoder.token_classifier[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.encoder.backbone.parameters())
    model.zero_grad()
    out = model.compute_loss(x, texts, y)
    out["loss"].backward()
    assert model.encoder.token_classifier[1].weight.grad.abs().sum() > 0
    # inference states the predicted findings; they come back with the prediction
    model.eval()
    model.save_pretrained(tmp_path / "m")
    back = ReportModel.from_pretrained(tmp_path / "m")
    assert back.config.finding_phrases == cfg.finding_phrases
    assert back.config.label_thresholds == cfg.label_thresholds
    study = study_from_arrays([np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)])
    pred = back.predict(study)
    assert pred.findings == ("ground_glass",)
    assert isinstance(back.generate_report(study), str)


def test_report_encoder_feeds_the_lm_and_leaves_the_classifier_alone(tmp_path):
    """config.report_encoder: a trainable copy of the encoder makes the LM's visual tokens; the
    probability still comes from the classifier's encoder; both survive save/load."""
    import numpy as np

    from mrg_core.models import ReportModel
    from mrg_core.models.factory import SAMPLE_REPORTS, tiny_config
    from mrg_core.study import study_from_arrays
    from mrg_core.text import train_tokenizer

    cfg = tiny_config("medvlm", "gpt2")
    cfg.report_encoder = True
    tok = train_tokenizer(list(SAMPLE_REPORTS) + [cfg.instruction], min_frequency=1)
    torch.manual_seed(0)
    model = ReportModel.build(cfg, tok)
    model.fork_report_encoder()
    for a, b in zip(model.encoder.state_dict().values(),
                    model.report_encoder.state_dict().values()):
        assert torch.equal(a, b)
    model.encoder.requires_grad_(False)
    model.train()
    out = model.compute_loss(torch.rand(2, 1, 1, 64, 64), SAMPLE_REPORTS[:2],
                             torch.tensor([0.0, 1.0]))
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.report_encoder.backbone.parameters())
    model.eval()
    study = study_from_arrays([np.random.default_rng(0).integers(0, 256, (70, 70), np.uint8)])
    p0, prefix0 = model.predict(study).probability, model.encode(study).prefix.clone()
    with torch.no_grad():
        for p in model.report_encoder.parameters():
            p.add_(0.5)
    model._cache.clear()
    assert model.predict(study).probability == p0  # the classifier did not move
    assert not torch.allclose(model.encode(study).prefix, prefix0)  # the LM's view did
    model.save_pretrained(tmp_path / "m")
    back = ReportModel.from_pretrained(tmp_path / "m")
    assert torch.allclose(back.encode(study).prefix, model.encode(study).prefix, atol=1e-5)
    prob, _ = back.analyze(study)  # Grad-CAM path fills the same cache entry
    assert abs(prob.probability - p0) < 1e-6


def test_medvlm_query_transformer_width_is_its_own(tmp_path):
    """qformer_dim: the fused visual tokens are projected to a narrower query transformer (a
    shipped bridge stays small); the model still drafts, and reloads to the same output."""
    from mrg_core.models import ReportModel
    from mrg_core.models.factory import tiny_config
    from mrg_core.text import train_tokenizer

    cfg = tiny_config("medvlm", "gpt2")
    wide = sum(p.numel() for p in ReportModel.build(
        cfg, train_tokenizer([cfg.instruction, "lungs are clear ."], min_frequency=1))
        .bridge.parameters())
    cfg.medvlm.qformer_dim = 8
    tok = train_tokenizer([cfg.instruction, "lungs are clear ."], min_frequency=1)
    torch.manual_seed(0)
    model = ReportModel.build(cfg, tok).eval()
    assert model.bridge.queries.shape[1] == 8 and model.bridge.fuse.out_features == 8
    assert sum(p.numel() for p in model.bridge.parameters()) < wide
    x = torch.rand(1, 1, 1, 64, 64)
    with torch.no_grad():
        prefix = model.bridge(model.encoder(x))
    assert prefix.shape == (1, cfg.medvlm.num_queries, 64)  # LM width
    model.save_pretrained(tmp_path / "m")
    back = ReportModel.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back.bridge(back.encoder(x)), prefix)
