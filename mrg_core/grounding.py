"""Sentence grounding (experimental): where in the image each statement of a draft comes from.

For each statement (a sentence, or one comma-separated clause of COV-CTR's long sentences) the
log-likelihood of that statement's tokens, given the image, is attributed to the encoder's last
spatial layer with captum's LayerGradientXActivation, summed over channels (HiResCAM): the
gradient reaches the image through the visual tokens (and, in MedVLM, the embedded classifier
probabilities) the LM reads. Grad-CAM's channel-averaged gradient was tried first: two findings
made of the same features at two places then got the same map. The report is scored
teacher-forced with the head words (decision, findings) it was drafted with, so the map answers
"which pixels made the model more sure of this statement".

Checked for localisation on synthetic studies with known answers only
(mrg_core/grounding_check.py): a nodule and a cavity placed independently in one of four
quadrants, one sentence each, a tiny MedVLM trained on them; each sentence's peak falls in its
own finding's quadrant for 78-98 % of the sentences (three training seeds; tests/
test_grounding.py runs one). An earlier design (both findings always present, on different
sides) let a model write one finding's side from the other's place, and localised for one seed
of three. Not checked on real lesions (no region annotations here): the page calls it
experimental.

A model whose text does not see the image (`visual_context: false`, the chest radiograph
model) has no grounding: `ground_sentences` says so instead of inventing maps.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .text import clean_report

# sentence ends, and commas/semicolons between clauses ("..., patchy shadows were seen in the
# lower lobe of the right lung, ...")
_STATEMENT = re.compile(r"[^.;,!?]+[.;,!?]*")


class NoGrounding(RuntimeError):
    """The model's text does not depend on the image (or there is no text to ground)."""


@dataclass
class GroundedStatement:
    text: str
    start: int  # character span in the draft
    end: int
    log_likelihood: float  # of the statement's tokens given the image and what came before
    maps: list[np.ndarray] = field(repr=False)  # per view, view-sized, in [0, 1]
    peak_view: int = 0
    peak: tuple[float, float] = (0.5, 0.5)  # (row, column) as fractions of the view
    lung_share: float | None = None

    def to_dict(self) -> dict:
        """JSON-safe summary (no maps): for the CLI."""
        return {"text": self.text, "span": [self.start, self.end],
                "log_likelihood": round(self.log_likelihood, 4), "peak_view": self.peak_view,
                "peak": [round(self.peak[0], 3), round(self.peak[1], 3)],
                "peak_region": region_name(*self.peak),
                "lung_share": None if self.lung_share is None else round(self.lung_share, 3)}


def region_name(row: float, col: float) -> str:
    """Where a peak sits in image terms ("upper image-left"): the page and the CLI say where
    on the picture, not which lung, since the display convention is the viewer's."""
    vertical = "upper" if row < 1 / 3 else "lower" if row > 2 / 3 else "middle"
    horizontal = "image-left" if col < 0.5 else "image-right"
    return f"{vertical} {horizontal}"


def split_statements(draft: str) -> list[tuple[int, int]]:
    """Character spans of the statements that hold a word (headings and stray punctuation
    join the statement they belong to)."""
    spans = []
    for m in _STATEMENT.finditer(draft or ""):
        a, b = m.start(), m.end()
        while a < b and draft[a].isspace():
            a += 1
        while b > a and draft[b - 1].isspace():
            b -= 1
        if re.search(r"[A-Za-z0-9]", draft[a:b]):
            spans.append((a, b))
    return spans


def _statement_ids(model, draft: str, spans) -> tuple[list[int], list[int]]:
    """Token ids of the draft statement by statement, and each token's statement index. Each
    statement is tokenized on its own (after a space, as inside the text), so the boundaries
    are exact."""
    ids, owner = [], []
    for k, (a, b) in enumerate(spans):
        words = clean_report(draft[a:b])
        piece = model.tokenizer((" " if k else "") + words, add_special_tokens=False)["input_ids"]
        ids += piece
        owner += [k] * len(piece)
    return ids[: model.config.max_report_tokens], owner[: model.config.max_report_tokens]


def _head_in_grad_dtype(lm):
    """The LM's output layer as a float copy in models.quantize.grad_dtype(), when that differs
    from the layer's own dtype (a bf16 LM on a CPU without native bf16), else None. The
    49,152-token output layer's backward in bf16 took 21 s a statement on an AVX2-only CPU, in
    float32 well under a second; elsewhere nothing changes. Made once per grounding."""
    from .models.quantize import grad_dtype

    head = lm.get_output_embeddings()
    dt = grad_dtype()
    if head is None or head.weight.dtype == dt or head.weight.device.type != "cpu":
        return None
    weight = head.weight.detach().to(dt)
    bias = None if head.bias is None else head.bias.detach().to(dt)

    class Head(torch.nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return F.linear(h.to(dt), weight, bias)

    return Head()


@contextlib.contextmanager
def _output_layer(lm, head):
    """`head` (None: the LM's own) as the LM's output layer inside the block. Only one pass sees
    the swap: every pass runs on the model thread, one after another, and the layer is put
    back before the next (another user's draft may run between two statements)."""
    if head is None:
        yield
        return
    own = lm.get_output_embeddings()
    lm.set_output_embeddings(head)
    try:
        yield
    finally:
        lm.set_output_embeddings(own)


def ground_sentences(model, study, draft: str, decision: int | None = None,
                     lungs: bool = True, findings=None,
                     run=None) -> list[GroundedStatement]:
    """One GroundedStatement per statement of `draft` for `study` (all views). `decision`
    and `findings` replace the study's own label and findings in the head words, as in
    stream_report. lungs: also the
    share of each map inside the lung fields (needs scipy: requirements-eval.txt; None
    without it). `run(fn)` makes each pass through the model (the engine's model thread:
    other users' drafts run between two statements; default: here)."""
    from captum.attr import LayerAttribution, LayerGradientXActivation

    from .preprocess import heatmap_to_view, study_to_tensor

    if model.bridge is None:
        raise NoGrounding("this model's text is not conditioned on the image "
                          "(visual_context: false): there is nothing to ground")
    spans = split_statements(draft)
    if not spans:
        raise NoGrounding("the draft has no statement to ground")
    ids, owner = _statement_ids(model, draft, spans)
    run = run or (lambda fn, *a: fn(*a))
    pred = run(model.predict, study)
    head = model.head_ids(*model.stated(pred, decision, findings))  # as drafted
    seq = torch.tensor([head + ids], device=model.device)
    owner_t = torch.tensor(owner, device=model.device)
    n = len(spans)
    grad_head = _head_in_grad_dtype(model.lm)

    def statement_scores(px: torch.Tensor) -> torch.Tensor:
        """[1, n] log-likelihood of each statement's tokens (teacher-forced)."""
        enc = model.encoder(px)
        prefix = model._visual_prefix(model._lm_features(enc, px))
        embeds = torch.cat([prefix, model._embed(seq).to(prefix.dtype)], dim=1)
        with _output_layer(model.lm, grad_head):
            logits = model.lm(inputs_embeds=embeds).logits[:, prefix.shape[1]:-1].float()
        # position t predicts token t + 1; the report's tokens start after the head
        logp = F.log_softmax(logits[:, len(head) - 1:], dim=-1)
        tok = logp.gather(-1, seq[:, len(head):, None])[..., 0]  # [1, T]
        return torch.zeros(1, n, device=tok.device, dtype=tok.dtype).index_add(
            1, owner_t, tok)

    s = model.config.preprocess.image_size
    x = study_to_tensor(study, model.config.preprocess)[None].to(model.device)
    lung_share = _lung_share(study) if lungs else None
    out = []
    gxa = LayerGradientXActivation(statement_scores, model.encoder.spatial)

    def scored():
        with model._eval(), torch.no_grad():
            return statement_scores(x)[0].tolist()

    def statement_map(k: int) -> np.ndarray:
        # gradient x activation summed over channels (HiResCAM): unlike Grad-CAM's
        # channel-averaged gradient it keeps where a feature mattered, so two findings
        # made of the same features at two places get two different maps
        with model._eval(), torch.inference_mode(False), torch.enable_grad():
            attr = gxa.attribute(x.clone().requires_grad_(True), target=k).detach()
        attr = attr.sum(dim=1, keepdim=True)
        attr = LayerAttribution.interpolate(attr, (s, s), interpolate_mode="bilinear")
        return attr[:, 0].clamp_min(0).cpu().numpy()

    scores = run(scored)
    for k, (a, b) in enumerate(spans):
        cams = run(statement_map, k)
        if model.encoder.n_members > 1:
            cams = cams.reshape(model.encoder.n_members, -1, s, s).mean(0)
        peak = float(cams.max())
        cams = cams / peak if peak > 0 else np.zeros_like(cams)
        maps = [np.clip(heatmap_to_view(cams[i], v.display.shape, model.config.preprocess),
                        0, 1) for i, v in enumerate(study.views)]
        share = lung_share(maps) if lung_share is not None and peak > 0 else None
        out.append(_located(draft[a:b], a, b, scores[k], maps, share))
    return out


def _lung_share(study):
    """maps -> their mass share inside the study's lung fields (masks made once per study), or
    None without scipy (an evaluation extra)."""
    try:
        from .evaluation.saliency import lung_mask, study_lung_share
    except ImportError:
        return None
    displays = [v.display for v in study.views]
    masks = [lung_mask(d) for d in displays]
    return lambda maps: study_lung_share(displays, maps, masks)[0]


def _located(text, a, b, score, maps, share) -> GroundedStatement:
    view = int(np.argmax([m.max() for m in maps]))
    r, c = np.unravel_index(int(np.argmax(maps[view])), maps[view].shape)
    h, w = maps[view].shape
    return GroundedStatement(text=text, start=a, end=b, log_likelihood=float(score), maps=maps,
                             peak_view=view, peak=(float((r + 0.5) / h), float((c + 0.5) / w)),
                             lung_share=share)
