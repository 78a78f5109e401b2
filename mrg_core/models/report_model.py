"""ReportModel: image(s) -> pneumonia probability, Grad-CAM, and a streamed draft report.

Sequence fed to the causal LM (inputs_embeds):

    [visual tokens][customized prompts]   (or prompts first)     method "prompt" / "promptbook"
    [query-transformer tokens]                                    method "medvlm"
    [instruction tokens][BOS] report [EOS]

Only report tokens and EOS are scored; everything before is context (labels -100).
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import PeftModel

from mrg_core.models.adapters import apply_adapter, freeze, learned_prefix
from mrg_core.models.config import ReportModelConfig
from mrg_core.models.encoder import EncoderOutput, VisualEncoder
from mrg_core.models.fast_decode import FastGPT2Decoder, supports_fast_step
from mrg_core.models.fast_llama import FastLlamaDecoder, supports_fast_llama
from mrg_core.models.generation import (DraftNgrams, GenerationSettings, GuidedDecoder,
                                        KVDecoder, beam_search, resolve_settings,
                                        sample_tokens)
from mrg_core.models.language_model import build_lm, lm_hidden_size, lm_max_positions
from mrg_core.models.medvlm import MedVLMBridge
from mrg_core.models.prompts import PromptBridge
from mrg_core.preprocess import heatmap_to_view, study_to_tensor
from mrg_core.text import clean_report, detokenize

CACHE_SIZE = 32
# A draft of flipped finding chips keeps tokens with p >= this share of the best token's under
# the chips' prompt (GuidedDecoder's plausibility constraint; contrastive decoding's alpha).
FLIP_PLAUSIBILITY = 0.1


@dataclass
class Prediction:
    probability: float  # of the first label (pneumonia)
    threshold: float
    label: int  # 1 when probability >= threshold
    labels: dict[str, float]  # every label's probability
    findings: tuple[str, ...] = ()  # finding labels past their threshold (finding_prompt models)


# What the text states before the report: the decision (None = no label phrase) and findings.
Head = tuple[int | None, tuple[str, ...]]


@dataclass
class EncodedStudy:
    logits: torch.Tensor  # [1, n_labels]
    prefix: torch.Tensor  # [1, P, D] LM-space tokens before the instruction
    view_weights: torch.Tensor  # [1, V]


class ReportModel(nn.Module):
    def __init__(self, config: ReportModelConfig, tokenizer, lm: nn.Module):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        self.draft_ngrams = DraftNgrams()  # earlier drafts' continuations: speculative decoding
        n_labels, n_found = len(config.labels), len(self._finding_names(config))
        if config.labels[n_labels - n_found:] != self._finding_names(config):
            raise ValueError("finding labels (finding_phrases) must come after the others in "
                             "labels")
        pre = config.preprocess
        norm = (pre.mean, pre.std)
        self.encoder = VisualEncoder(config.encoder, pre.image_size, n_labels, n_found, norm)
        self.report_encoder = (VisualEncoder(config.encoder, pre.image_size, n_labels, n_found,
                                             norm)
                               if config.report_encoder else None)
        feat, width = self.encoder.feat_dim, lm_hidden_size(lm)
        config.lm.family = lm.config.model_type  # an LM passed in or loaded decides the family
        self.family = config.lm.family
        if config.lm.package and not config.lm.package_sha256:  # the weights it was built on
            from mrg_core.weights import spec
            w = spec(config.lm.package)
            config.lm.package_sha256 = w.sha256
            config.lm.package_requirement = w.requirement
        if not config.visual_context and config.method != "medvlm":
            raise ValueError("visual_context false needs method medvlm (prompts are the "
                             "image's own)")
        if config.method in ("prompt", "promptbook"):
            self.bridge = PromptBridge(config.prompt, feat, width, config.method == "promptbook")
            lm = freeze(lm) if config.lm.freeze else lm
        elif config.method == "medvlm":
            self.bridge = (MedVLMBridge(config.medvlm, feat, width, n_labels)
                           if config.visual_context else None)
            lm = apply_adapter(lm, config.medvlm, self.family)
            if not config.lm.freeze:
                for p in lm.parameters():
                    p.requires_grad_(True)
        else:
            raise ValueError(f"unknown method {config.method!r}")
        self.lm = lm
        self.instruction_ids: list[int] = tokenizer(
            clean_report(config.instruction), add_special_tokens=False)["input_ids"]
        self.label_phrase_ids = [tokenizer(clean_report(t), add_special_tokens=False)["input_ids"]
                                 for t in config.label_phrases] if config.label_prompt else None
        said = [i for n in self.finding_names for i in tokenizer(
            clean_report(config.finding_phrases[n] + " ,"), add_special_tokens=False)["input_ids"]]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in said:
            warnings.warn("a finding phrase has words the tokenizer does not know ([UNK])",
                          stacklevel=2)
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in self.instruction_ids:
            warnings.warn("the instruction has words the tokenizer does not know ([UNK]): "
                          "train the tokenizer on the instruction too", stacklevel=2)
        self.suppress_ids = sorted({ids[0] for w in config.suppress_words
                                    for form in (w, " " + w)
                                    if len(ids := tokenizer(form, add_special_tokens=False)
                                           ["input_ids"]) == 1})
        self._cache: OrderedDict[str, EncodedStudy] = OrderedDict()
        self._cache_lock = threading.Lock()  # the app may analyze and generate from two threads

    def __getstate__(self):
        # deepcopy/pickle (fine-tuning copies a model): a lock can't be copied, and the copy's
        # weights may change, so it starts with a fresh lock and an empty feature cache.
        state = self.__dict__.copy()
        state.pop("_cache_lock", None)
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache_lock = threading.Lock()

    @classmethod
    def build(cls, config: ReportModelConfig, tokenizer, lm: nn.Module | None = None) -> "ReportModel":
        return cls(config, tokenizer, lm if lm is not None else build_lm(config.lm, tokenizer))

    # ------------------------------------------------------------------ plumbing
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def base_lm(self) -> nn.Module:
        """The transformers causal LM inside any peft wrapper (LoRA layers stay injected)."""
        return self.lm.get_base_model() if isinstance(self.lm, PeftModel) else self.lm

    # Decode with the lean GPT-2 step where it is exact (plain float32 GPT-2, e.g. LoRA merged);
    # False forces the transformers path (tests compare the two).
    fast_decode: bool = True

    @property
    def n_virtual_tokens(self) -> int:
        m = self.config.medvlm
        return m.prefix_length if self.config.method == "medvlm" and m.adapter == "prefix" else 0

    def train(self, mode: bool = True):
        if mode:
            self._cache.clear()  # weights are about to change: cached features go stale
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .half(): cached tensors would not follow
        if hasattr(self, "_cache"):
            self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    @contextlib.contextmanager
    def _eval(self):
        was = self.training
        self.eval()
        try:
            yield
        finally:
            if was:
                self.train(True)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _visual_prefix(self, enc: EncoderOutput) -> torch.Tensor:
        if self.bridge is None:  # visual_context false: the words before the report only
            return self._no_prefix(enc.logits.shape[0])
        return self.bridge(enc)

    def _no_prefix(self, b: int) -> torch.Tensor:
        """[b, 0, D]: no tokens before the words (text alone)."""
        emb = self.lm.get_input_embeddings().weight
        return emb.new_zeros(b, 0, emb.shape[1])

    def fork_report_encoder(self) -> None:
        """Start the report encoder (config.report_encoder) from the classifier's encoder."""
        if self.report_encoder is not None:
            self.report_encoder.load_state_dict(self.encoder.state_dict())

    def _lm_features(self, enc: EncoderOutput, pixel_values: torch.Tensor) -> EncoderOutput:
        """What the bridge reads: the classifier's logits, with the report encoder's features
        when there is one."""
        if self.report_encoder is None:
            return enc
        r = self.report_encoder(pixel_values)
        return EncoderOutput(r.global_feat, r.tokens, enc.logits, r.view_weights)

    # ------------------------------------------------------------------ training
    @staticmethod
    def _finding_names(config: ReportModelConfig) -> list[str]:
        if not config.finding_prompt:
            return []
        unknown = set(config.finding_phrases) - set(config.labels)
        if unknown:
            raise ValueError(f"finding_phrases name labels the model does not have: {unknown}")
        return [n for n in config.labels if n in config.finding_phrases]

    @property
    def finding_names(self) -> list[str]:
        """Labels stated as findings in the text (finding_prompt), in labels' order; the
        encoder's token head predicts them."""
        return self._finding_names(self.config)

    def findings_from(self, probs: list[float]) -> tuple[str, ...]:
        """Finding labels whose probability passes their threshold (default 0.5); the
        negative-decision thresholds when the classifier's decision is negative."""
        cfg, names = self.config, set(self.finding_names)
        negative = probs[self._target_index] < cfg.threshold
        th = {**cfg.label_thresholds, **cfg.negative_label_thresholds} if negative \
            else cfg.label_thresholds
        return tuple(n for n, p in zip(self.config.labels, probs)
                     if n in names and p >= th.get(n, 0.5))

    def label_matrix(self, labels: torch.Tensor, b: int) -> torch.Tensor:
        """Targets as [B, n_labels], NaN = unknown; a single column is the target label's."""
        y = labels.to(torch.float32).view(b, -1)
        n = len(self.config.labels)
        if y.shape[1] == n:
            return y
        if y.shape[1] != 1:
            raise ValueError(f"{y.shape[1]} label columns for a model with {n} labels")
        out = torch.full((b, n), float("nan"), device=y.device)
        out[:, self._target_index] = y[:, 0]
        return out

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE over the known labels (NaN = unknown), summed per study with the target label
        weighing 1 and each finding finding_weight, averaged over studies."""
        y = self.label_matrix(labels, logits.shape[0]).to(logits.device)
        known = ~torch.isnan(y)
        if not known.any():
            return logits.sum() * 0.0
        w = torch.full((y.shape[1],), float(self.config.finding_weight), device=y.device)
        w[self._target_index] = 1.0
        bce = F.binary_cross_entropy_with_logits(logits.float(), y.nan_to_num(0),
                                                 reduction="none")
        return (bce * w * known).sum() / known.any(dim=1).sum()

    def encoder_loss(self, enc: EncoderOutput, labels: torch.Tensor) -> torch.Tensor:
        """classification_loss of an encoder output. An ensemble's members each learn the labels
        on their own (the mean of their losses): a loss on the averaged logit would let them
        co-adapt and lose the diversity the average needs."""
        if enc.member_logits is None:
            return self.classification_loss(enc.logits, labels)
        k = enc.member_logits.shape[2]
        return torch.stack([self.classification_loss(torch.cat([m, enc.logits[:, k:]], 1), labels)
                            for m in enc.member_logits.unbind(1)]).mean()

    def _heads(self, enc: EncoderOutput, labels: torch.Tensor) -> list[Head]:
        """What each study's text states before the report: the classifier's decision and
        findings, or (training, teacher forcing) the true label and the report's findings."""
        probs = torch.sigmoid(enc.logits.float())
        t = self._target_index
        pred = (probs[:, t] >= self.config.threshold).long().tolist()
        pred_f = [self.findings_from(row) for row in probs.tolist()]
        phrase = bool(self.label_phrase_ids)
        if not self.training:
            return [(lab if phrase else None, f) for lab, f in zip(pred, pred_f)]
        y = self.label_matrix(labels, probs.shape[0]).to(probs.device)
        use = torch.rand(y.shape[0], device=y.device) < self.config.label_prompt_teacher_forcing
        use_f = (torch.rand(y.shape[0], device=y.device) < self.config.finding_teacher_forcing
                 if self.finding_names else use)  # no draw: older recipes replay exactly
        finding_cols = [self.config.labels.index(n) for n in self.finding_names]
        heads = []
        for i in range(y.shape[0]):
            lab, f = pred[i], pred_f[i]
            if use[i] and not torch.isnan(y[i, t]):
                lab = int(y[i, t])
            # every finding known (a reader's chips may leave the other labels unknown)
            if use_f[i] and self.finding_names and not torch.isnan(y[i, finding_cols]).any():
                f = tuple(n for n, v in zip(self.config.labels, y[i].tolist())
                          if n in self.finding_names and v >= 0.5)
            heads.append((lab if phrase else None, f))
        return heads

    def _training_prefix(self, enc: EncoderOutput, labels: torch.Tensor) -> torch.Tensor:
        """MedVLM with label teacher forcing: some studies embed their true label (see
        MedVLMConfig.label_teacher_forcing); everything else uses the inference path."""
        share = self.config.medvlm.label_teacher_forcing if self.config.method == "medvlm" else 0
        if not (self.training and share > 0) or self.bridge is None:
            return self._visual_prefix(enc)
        probs = torch.sigmoid(enc.logits)
        y = self.label_matrix(labels, probs.shape[0]).to(probs.device, probs.dtype)
        use = ~torch.isnan(y) & (torch.rand(y.shape, device=y.device) < share)
        return self.bridge(enc, probs=torch.where(use, y, probs))

    def head_ids(self, label: int | None = None, findings: tuple[str, ...] = ()) -> list[int]:
        """Unscored tokens before the report: [instruction][label phrase][findings][BOS]."""
        phrase = self.label_phrase_ids[int(label)] if self.label_phrase_ids and label is not None \
            else []
        words = [self.config.finding_phrases[n] for n in findings]
        found = self.tokenizer(clean_report(" , ".join(words) + " ."), add_special_tokens=False
                               )["input_ids"] if words else []
        return self.instruction_ids + phrase + found + [self.tokenizer.bos_token_id]

    def report_vocabulary(self, reports: list[str]) -> list[int]:
        """The token ids these reports train the decoder to emit (as tokenize_reports cuts
        them), and the end of text."""
        tok = self.tokenizer
        ids = {tok.eos_token_id}
        for r in tok([clean_report(x) for x in reports], add_special_tokens=False)["input_ids"]:
            ids.update(r[: self.config.max_report_tokens])
        return sorted(ids)

    def learn_vocabulary(self, reports: list[str]) -> None:
        """A model with a restricted output layer (config.head_vocab) may write these reports'
        words from now on (fine-tuning on corrections adds the radiologist's words)."""
        if self.config.head_vocab is not None:
            self.config.head_vocab = sorted(set(self.config.head_vocab)
                                            | set(self.report_vocabulary(reports)))

    def tokenize_reports(self, reports: list[str], heads: list[Head] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[instruction][label phrase][findings][BOS] report [EOS], right-padded:
        (input_ids, attention_mask, labels)."""
        tok = self.tokenizer
        cleaned = [clean_report(r) for r in reports]
        rep = tok(cleaned, add_special_tokens=False)["input_ids"]
        heads = [self.head_ids(*(heads[i] if heads is not None else (None, ())))
                 for i in range(len(rep))]
        seqs = [h + r[: self.config.max_report_tokens] + [tok.eos_token_id]
                for h, r in zip(heads, rep)]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, len(heads[i]): len(s)] = torch.tensor(s[len(heads[i]):])
        return ids, mask, labels

    def compute_loss(self, pixel_values: torch.Tensor, reports: list[str],
                     labels: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = self.device
        px = pixel_values.to(dev)
        enc = self.encoder(px)
        prefix = self._training_prefix(self._lm_features(enc, px), labels)
        heads = self._heads(enc, labels) if self.label_phrase_ids or self.finding_names else None
        lm_loss = self.text_loss(prefix, reports, heads)
        cls_loss = self.encoder_loss(enc, labels)
        return {"loss": lm_loss + self.config.cls_weight * cls_loss,
                "lm_loss": lm_loss, "cls_loss": cls_loss}

    def text_loss(self, prefix: torch.Tensor | None, reports: list[str],
                  heads: list[Head] | None) -> torch.Tensor:
        """The LM's cross-entropy on the reports after `prefix` (visual tokens; None for text
        alone, as a model without visual context reads it) and each study's head words."""
        if prefix is None:
            prefix = self._no_prefix(len(reports))
        dev = prefix.device
        ids, mask, lm_labels = (t.to(dev) for t in self.tokenize_reports(reports, heads))
        b, p = prefix.shape[:2]
        embeds = torch.cat([prefix, self._embed(ids).to(prefix.dtype)], dim=1)
        attn = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=dev), mask], dim=1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=attn).logits
        # position t predicts token t+1: drop the prefix's logits, keep the text's
        logits = logits[:, p:-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               lm_labels[:, 1:].reshape(-1), ignore_index=-100)

    # ------------------------------------------------------------------ inference
    def _remember(self, key: str, enc: EncoderOutput, x: torch.Tensor) -> EncodedStudy:
        with torch.inference_mode():
            lm_enc = self._lm_features(enc, x)
            e = EncodedStudy(enc.logits.detach(), self._visual_prefix(lm_enc).detach(),
                             enc.view_weights.detach())
        with self._cache_lock:
            self._cache[key] = e
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return e

    def encode(self, study) -> EncodedStudy:
        """Classifier logits + LM-space prefix of a study; LRU-cached by content_hash."""
        with self._cache_lock:
            hit = self._cache.get(study.content_hash)
            if hit is not None:
                self._cache.move_to_end(study.content_hash)
                return hit
        x = study_to_tensor(study, self.config.preprocess)[None].to(self.device)
        with self._eval(), torch.inference_mode():
            return self._remember(study.content_hash, self.encoder(x), x)

    def calibrated(self, p: float) -> float:
        """A raw classifier probability on the scale shown to users (config.calibration)."""
        c = self.config.calibration
        if not c:
            return float(p)
        p = min(max(float(p), 1e-7), 1 - 1e-7)
        return 1.0 / (1.0 + math.exp(-(c[0] * math.log(p / (1 - p)) + c[1])))

    def _prediction(self, logits: torch.Tensor) -> Prediction:
        probs = torch.sigmoid(logits.float())[0].tolist()
        t = self._target_index
        label = int(probs[t] >= self.config.threshold)  # decided on the raw scale, as in _heads
        shown = self.calibrated(probs[t])
        labels = dict(zip(self.config.labels, probs))
        labels[self.config.labels[t]] = shown
        return Prediction(probability=shown, threshold=self.calibrated(self.config.threshold),
                          label=label, labels=labels, findings=self.findings_from(probs))

    @property
    def _target_index(self) -> int:
        labels = [lab.lower() for lab in self.config.labels]
        return labels.index("pneumonia") if "pneumonia" in labels else 0

    def analyze(self, study) -> tuple[Prediction, list[np.ndarray]]:
        """One encoder forward + backward: probability, Grad-CAM per view, and the encode cache."""
        from mrg_core.explain import grad_cam  # explain imports models: import late

        s = self.config.preprocess.image_size
        x = study_to_tensor(study, self.config.preprocess)[None].to(self.device)
        seen: dict[str, EncoderOutput] = {}

        def forward(px: torch.Tensor) -> torch.Tensor:
            seen["enc"] = self.encoder(px)
            return seen["enc"].logits

        with self._eval(), torch.inference_mode(False), torch.enable_grad():
            cams = grad_cam(forward, self.encoder.spatial, x.requires_grad_(True),
                            target=self._target_index, size=(s, s))
        if self.encoder.n_members > 1:  # one map per member and view: the members' mean
            cams = cams.reshape(self.encoder.n_members, -1, s, s).mean(0)
            cams = cams / max(float(cams.max()), 1e-12)
        enc = seen["enc"]
        enc = EncoderOutput(enc.global_feat.detach(), enc.tokens.detach(), enc.logits.detach(),
                            enc.view_weights.detach())
        with self._eval():
            self._remember(study.content_hash, enc, x.detach())
        maps = [np.clip(heatmap_to_view(cams[i], v.display.shape, self.config.preprocess), 0, 1)
                for i, v in enumerate(study.views)]
        return self._prediction(enc.logits), maps

    def predict(self, study) -> Prediction:
        return self._prediction(self.encode(study).logits)

    @torch.inference_mode()
    def view_probabilities(self, study, batch: int = 32) -> np.ndarray:
        """Raw target-label probability of each view classified on its own (the slices of a
        series), in batches so a 600-slice series never becomes one tensor."""
        from mrg_core.preprocess import view_to_tensor

        out = []
        with self._eval():
            for i in range(0, len(study.views), batch):
                x = torch.stack([view_to_tensor(v.display, self.config.preprocess)
                                 for v in study.views[i:i + batch]])[:, None].to(self.device)
                logits = self.encoder(x).logits.float()
                out.append(torch.sigmoid(logits[:, self._target_index]).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def study_decision(self, view_probabilities) -> tuple[float, int]:
        """(raw study probability, label) by the config's aggregation rule and threshold."""
        from mrg_core.study_level import aggregate

        cfg = self.config
        p = aggregate(view_probabilities, cfg.study_aggregation)
        t = cfg.study_threshold if cfg.study_threshold is not None else cfg.threshold
        return p, int(p >= t)

    def explain(self, study) -> list[np.ndarray]:
        return self.analyze(study)[1]

    def stated(self, pred: Prediction, decision: int | None = None,
               findings: Iterable[str] | None = None) -> tuple[int | None, tuple[str, ...]]:
        """(label, findings) a draft states before its words (head_ids): the prediction's, or
        `decision` (a series' own, or the reader's) in place of the label, whose findings then
        go too; `findings` given (the reader's finding chips) replaces the predicted ones."""
        if findings is not None:
            findings = self.chosen_findings(findings)
        else:
            findings = pred.findings
            if decision is not None and decision != pred.label:
                findings = ()  # the study's decision overrides this view's: its findings go too
        label = (pred.label if decision is None else int(decision)) \
            if self.label_phrase_ids else None
        return label, findings

    def chosen_findings(self, names: Iterable[str]) -> tuple[str, ...]:
        """Finding labels chosen by a reader, in the order training states them (labels'
        order); a name the model does not state in words is refused."""
        names = set(names)
        unknown = names - set(self.finding_names)
        if unknown:
            raise ValueError(f"not a finding this model states: {sorted(unknown)} "
                             f"(it states {self.finding_names or 'none'})")
        return tuple(n for n in self.finding_names if n in names)

    def _decoder(self):
        """The lean decoder where it is exact (a merged GPT-2 or Llama LM, or a Llama with
        P-Tuning v2's learned prefix: models/fast_decode, models/fast_llama), else
        transformers' forward with its cache. Made per draft: it holds views of the LM's
        current weights (cheap to take)."""
        if self.fast_decode and supports_fast_step(self.lm):
            return FastGPT2Decoder(self.lm)
        prefixed = self.n_virtual_tokens > 0  # P-Tuning v2: the peft wrapper around a plain LM
        if self.fast_decode and supports_fast_llama(self.base_lm if prefixed else self.lm):
            return FastLlamaDecoder(self.base_lm, self.config.head_vocab,
                                    room=self.config.max_report_tokens + 8,
                                    prefix=learned_prefix(self.lm) if prefixed else None)
        return KVDecoder(self.lm, self.base_lm)

    def step_batcher(self, run=None):
        """A StepBatcher that lets overlapping drafts of this model share decode steps
        (models/step_batcher.py), or None where the lean Llama decoder does not run. `run(fn)`:
        where each step and prefill runs (the engine's model thread)."""
        from mrg_core.models.step_batcher import StepBatcher

        dec = self._decoder()
        return StepBatcher(dec, run) if isinstance(dec, FastLlamaDecoder) else None

    def _report_tokens(self, study, settings: GenerationSettings, decision: int | None = None,
                       findings: Iterable[str] | None = None, batcher=None) -> Iterator[int]:
        """Token ids of the draft. `batcher` (a StepBatcher of this model): greedy and sampled
        drafts decode their steps together with other drafts on it; beam search decodes alone."""
        enc = self.encode(study)
        dev = self.device
        pred = self._prediction(enc.logits)
        label, stated = self.stated(pred, decision, findings)
        own = self.stated(pred, decision)[1]  # what the model would state by itself

        def prompt(lab, said):
            head = torch.tensor([self.head_ids(lab, said)], device=dev)
            return torch.cat([enc.prefix, self._embed(head).to(enc.prefix.dtype)], dim=1)

        embeds = prompt(label, stated)
        room = (lm_max_positions(self.base_lm) or 10**9) - embeds.shape[1] - self.n_virtual_tokens
        max_new = max(0, min(settings.max_new_tokens, room))
        settings = resolve_settings(settings, self.config)
        dec = (batcher.decoder() if batcher is not None and settings.num_beams == 1
               else self._decoder())
        guidance = settings.label_guidance
        flipped = stated != own
        plausible = 0.0
        if flipped and settings.finding_guidance:
            # flipped chips: their own strength, and only tokens the chips' prompt finds likely
            guidance, plausible = settings.finding_guidance, FLIP_PLAUSIBILITY
        if label is not None and guidance and len(self.label_phrase_ids) == 2:
            # Away from the opposite decision and, when the reader flipped finding chips, from
            # the findings the model would have stated: the draft follows the flips instead of
            # the wording the image alone suggests. Unflipped, plain label guidance.
            dec = GuidedDecoder(dec, prompt(1 - label, own), guidance, plausible)
        elif flipped and guidance:
            dec = GuidedDecoder(dec, prompt(label, own), guidance, plausible)
        tok = self.tokenizer
        bos, eos = tok.bos_token_id, tok.eos_token_id
        suppress = [i for i in (tok.pad_token_id, bos, tok.unk_token_id)
                    if i is not None and i != eos] + self.suppress_ids
        made: list[int] = []
        try:
            if settings.num_beams > 1:
                yield from beam_search(dec, embeds, settings, bos, eos, max_new, suppress)
                return
            for t in sample_tokens(dec, embeds, settings, bos, eos, max_new, suppress,
                                   self.draft_ngrams):
                made.append(t)
                yield t
        finally:  # a batched draft gives its rows back (end of draft, or Stop)
            close = getattr(dec, "close", None)
            if close is not None:
                close()
            self.draft_ngrams.learn(made)  # later drafts' proposals (speculative decoding)

    @torch.inference_mode()
    def stream_report(self, study, settings: GenerationSettings | None = None, *,
                      decision: int | None = None,
                      findings: Iterable[str] | None = None, batcher=None) -> Iterator[str]:
        """Yield display text pieces as tokens are decoded (detokenized, sentence case).
        `decision` (0/1) replaces the study's own label in the prompt: a series is drafted from
        its key slice with the whole series' decision. `findings` (finding label names, the
        reader's chips) replaces the predicted findings the prompt states (finding_prompt).
        `batcher` (step_batcher()): decode steps shared with other drafts running at once.

        Greedy/sampling streams token by token. Beam search (num_beams > 1) can only know its
        winner at the end: the pieces of the final beam are then yielded one token at a time.
        "".join(pieces) == generate_report(study, settings) always.
        """
        settings = settings or GenerationSettings()
        was = self.training
        self.eval()
        try:
            ids: list[int] = []
            shown = ""
            for t in self._report_tokens(study, settings, decision, findings, batcher):
                ids.append(t)
                text = detokenize(self.tokenizer.decode(ids, skip_special_tokens=True))
                if len(text) > len(shown) and text.startswith(shown):
                    piece, shown = text[len(shown):], text
                    yield piece
            final = detokenize(self.tokenizer.decode(ids, skip_special_tokens=True))
            if len(final) > len(shown) and final.startswith(shown):
                yield final[len(shown):]
        finally:
            if was:
                self.train(True)

    def generate_report(self, study, settings: GenerationSettings | None = None) -> str:
        return "".join(self.stream_report(study, settings))

    # ------------------------------------------------------------------ save / load / info
    def save_pretrained(self, folder, card: str | None = None, dtype=None,
                        keep_float32: tuple[str, ...] = ()) -> None:
        from mrg_core.models.io import save_model
        save_model(self, folder, card, dtype, keep_float32)

    @classmethod
    def from_pretrained(cls, folder, device=None) -> "ReportModel":
        from mrg_core.models.io import load_model
        return load_model(folder, device)

    @property
    def info(self) -> dict:
        c = self.config
        return {"name": c.name, "version": c.version, "method": c.method,
                "trained_on": dict(c.trained_on), "threshold": self.calibrated(c.threshold),
                "label_meaning": c.label_meaning,
                "text_from_images": c.visual_context,  # False: drafts learned from text alone
                "n_params": sum(p.numel() for p in self.parameters()),
                "n_trainable": sum(p.numel() for p in self.parameters() if p.requires_grad)}
