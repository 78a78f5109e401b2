"""Decoding with a KV cache: the prefix (visual tokens, prompts, instruction) runs once through
the LM as inputs_embeds, then one token per step with the cache.

`first` is the module for the prefix pass (the peft wrapper when there is one: prefix tuning
injects its learned key/values there), `step` the plain causal LM that continues from the cache
(see STACK_NOTES: peft's generate() cannot take inputs_embeds with prefix tuning).
"""
from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import (LogitsProcessor, NoRepeatNGramLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopPLogitsWarper)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 120
    num_beams: int = 1  # > 1: beam search (no sampling); the text streams after the search
    # None = the model's own value (ReportModelConfig, chosen on val): formulaic report text
    # repeats trigrams legitimately ("were seen in the"), so blocking them can hurt.
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # Label guidance (classifier-free-guidance style, Sanchez et al. 2023): with a model that
    # states the classifier's decision in words (label_prompt), decode with
    # (1 + g) * logp(. | decision) - g * logp(. | opposite decision), so the draft follows the
    # decision instead of the most common wording. None = the model's own value
    # (ReportModelConfig.label_guidance, chosen on val); 0 = off.
    label_guidance: float | None = None
    # The same contrast for a model without decision words when the reader flipped finding
    # chips: away from the findings the model would have stated (ReportModel._report_tokens).
    finding_guidance: float | None = None
    # Greedy drafts: propose up to this many next tokens from the continuations of earlier
    # drafts (DraftNgrams) and check them in one pass (decoders with `extend`): the same
    # tokens as one step at a time, fewer passes. 0 = off.
    speculative_tokens: int = 4


MODEL_DEFAULTS = ("repetition_penalty", "no_repeat_ngram_size", "label_guidance",
                  "finding_guidance")


def resolve_settings(s: GenerationSettings, config) -> GenerationSettings:
    """Fill the fields left at None from the model config's decoding defaults."""
    return dataclasses.replace(s, **{k: getattr(config, k) for k in MODEL_DEFAULTS
                                     if getattr(s, k) is None})


class SuppressIds(LogitsProcessor):
    """Never emit these ids ([PAD], [BOS], [UNK]: nothing a report can contain)."""

    def __init__(self, ids: list[int]):
        self.ids = sorted(set(ids))

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.ids] = float("-inf")
        return scores


class Processors(list):
    """Logits processors applied in order: transformers' LogitsProcessorList without its
    per-call signature inspection (0.15 ms a token, on the drafts' threads)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for proc in self:
            scores = proc(input_ids, scores)
        return scores


def make_processors(s: GenerationSettings, sampling: bool,
                    suppress: list[int] | None = None) -> Processors:
    procs = Processors()
    if suppress:
        procs.append(SuppressIds(suppress))
    if s.repetition_penalty and s.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.no_repeat_ngram_size and s.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
    if sampling:
        if s.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(s.temperature))
        if s.top_p < 1.0:
            procs.append(TopPLogitsWarper(s.top_p))
    return procs


class KVDecoder:
    def __init__(self, first, step):
        self.first, self.step_model = first, step

    def prefill(self, embeds: torch.Tensor):
        out = self.first(inputs_embeds=embeds, use_cache=True)
        return out.logits[:, -1].float(), out.past_key_values

    def step(self, tokens: torch.Tensor, cache):
        out = self.step_model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float(), out.past_key_values


class PairCache:
    """The caches of the two prompts of GuidedDecoder: one batch-of-two cache (`both`, rows
    [conditional beams..., contrast beams...]) or two caches (`a`, `b`) decoded in lockstep.
    Beam search reorders and repeats through here so both halves stay aligned."""

    def __init__(self, both=None, a=None, b=None):
        self.both, self.a, self.b = both, a, b

    def batch_repeat_interleave(self, n: int) -> None:
        for c in (self.both, self.a, self.b):
            if c is not None:
                c.batch_repeat_interleave(n)

    def reorder_cache(self, idx: torch.Tensor) -> None:
        if self.both is not None:
            self.both.reorder_cache(torch.cat([idx, idx + len(idx)]))
        else:
            self.a.reorder_cache(idx)
            self.b.reorder_cache(idx)


def shared_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading positions two single-row prompts [1, T, C] have in common, leaving
    each at least one of its own (0 for a batch: beam search's rows)."""
    if a.shape[0] != 1 or b.shape[0] != 1:
        return 0
    n = min(a.shape[1], b.shape[1]) - 1
    differ = (a[0, :n] != b[0, :n]).any(-1).nonzero()
    return int(differ[0]) if len(differ) else max(n, 0)


class GuidedDecoder:
    """Label guidance over two prompts that differ only in the stated decision.

    prefill() takes the conditional prompt; the contrast prompt is given at construction.
    Prompts of equal length run as one batch of two (one weight read per step: about the cost
    of one sequence on a memory-bound CPU). A decoder with `prefill_shared` (the lean Llama
    decoder) computes the prompts' common beginning once and their ends as one batch. Without
    it, prompts of unequal length are prefilled apart and then joined into one batch when the
    decoder can `join` caches of different lengths; otherwise they decode as two caches in
    lockstep."""

    def __init__(self, dec: KVDecoder, contrast: torch.Tensor, scale: float,
                 plausible: float = 0.0):
        self.dec, self.contrast, self.scale = dec, contrast, float(scale)
        self.plausible = float(plausible)

    def _mix(self, lp_cond: torch.Tensor, lp_contrast: torch.Tensor) -> torch.Tensor:
        lp_cond, lp_contrast = torch.log_softmax(lp_cond, -1), torch.log_softmax(lp_contrast, -1)
        mixed = (1 + self.scale) * lp_cond - self.scale * lp_contrast
        if self.plausible > 0:
            # Contrastive decoding's plausibility constraint (Li et al., 2023): only tokens the
            # conditional prompt itself finds likely (p >= plausible * its best) may win; a
            # strong contrast otherwise lifts tokens both prompts find absurd.
            floor = lp_cond.max(-1, keepdim=True).values + math.log(self.plausible)
            mixed = mixed.masked_fill(lp_cond < floor, float("-inf"))
        return mixed

    def prefill(self, embeds: torch.Tensor):
        c = self.contrast.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        shared = getattr(self.dec, "prefill_shared", None)
        n = shared_length(embeds, c)
        if shared is not None and n:  # the common beginning (image, instruction) once
            logits, cache = shared(embeds[:, :n], [embeds[:, n:], c[:, n:]])
            return self._mix(*logits.chunk(2)), PairCache(both=cache)
        if c.shape[1] == embeds.shape[1]:
            logits, cache = self.dec.prefill(torch.cat([embeds, c]))
            return self._mix(*logits.chunk(2)), PairCache(both=cache)
        la, ca = self.dec.prefill(embeds)
        lb, cb = self.dec.prefill(c)
        join = getattr(self.dec, "join", None)
        if join is not None:
            return self._mix(la, lb), PairCache(both=join(ca, cb))
        return self._mix(la, lb), PairCache(a=ca, b=cb)

    def close(self) -> None:  # a batched decoder gives its rows back
        close = getattr(self.dec, "close", None)
        if close is not None:
            close()

    def _on_both(self, call, tokens: torch.Tensor, cache: PairCache):
        """`call` (the decoder's step or extend) on both prompts' rows; their mixed logits."""
        if cache.both is not None:
            logits, cache.both = call(torch.cat([tokens, tokens]), cache.both)
            return self._mix(*logits.chunk(2)), cache
        la, cache.a = call(tokens, cache.a)
        lb, cache.b = call(tokens, cache.b)
        return self._mix(la, lb), cache

    def step(self, tokens: torch.Tensor, cache: PairCache):
        return self._on_both(self.dec.step, tokens, cache)

    def extend(self, tokens: torch.Tensor, cache: PairCache):
        """tokens [1, T]: the mixed logits of every position [1, T, V] (see step)."""
        return self._on_both(self.dec.extend, tokens, cache)

    def rewind(self, cache: PairCache, drop: int) -> None:
        for c in (cache.both, cache.a, cache.b):
            if c is not None:
                self.dec.rewind(c, drop)

    @property
    def can_extend(self) -> bool:
        return can_extend(self.dec)


def can_extend(dec) -> bool:
    """Whether `dec` checks several tokens per row in one pass (extend/rewind) with each
    position's logits exactly those of one-token steps, so speculation changes no draft."""
    return bool(getattr(dec, "can_extend", False))


class DraftNgrams:
    """What followed each run of `n` tokens in earlier drafts (the latest seen wins): the
    proposals of speculative decoding. Report drafts are formulaic: on COV-CTR val, proposing
    4 tokens after 3 from the drafts written before gave 3.5 tokens per pass after the first
    few drafts (README, Speed). In memory only, at most `max_entries` runs (oldest dropped);
    shared by the drafts of one model, so guarded by a lock."""

    def __init__(self, n: int = 3, keep: int = 8, max_entries: int = 50_000):
        self.n, self.keep, self.max_entries = n, keep, max_entries
        self._next: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __deepcopy__(self, memo) -> "DraftNgrams":  # a model copied whole (fine-tuning)
        new = DraftNgrams(self.n, self.keep, self.max_entries)
        with self._lock:
            new._next = OrderedDict(self._next)
        return new

    def propose(self, ids: list[int], k: int) -> list[int]:
        if k <= 0 or len(ids) < self.n:
            return []
        with self._lock:
            return list(self._next.get(tuple(ids[-self.n:]), ())[:k])

    def learn(self, ids: list[int]) -> None:
        with self._lock:
            for i in range(len(ids) - self.n):
                key = tuple(ids[i:i + self.n])
                new = tuple(ids[i + self.n:i + self.n + self.keep])
                old = self._next.get(key, ())
                # a continuation cut short by the draft's end keeps the longer one it begins
                self._next[key] = old if old[:len(new)] == new else new
                self._next.move_to_end(key)
            while len(self._next) > self.max_entries:
                self._next.popitem(last=False)


def sample_tokens(dec: KVDecoder, embeds: torch.Tensor, s: GenerationSettings, bos_id: int,
                  eos_id: int, max_new: int, suppress: list[int] | None = None,
                  proposer: DraftNgrams | None = None) -> Iterator[int]:
    """Greedy (or sampled) tokens until EOS or max_new. Greedy with a `proposer` and a decoder
    that can `extend`: each pass checks the proposed continuation after the chosen token and
    keeps the proposals greedy decoding would have chosen itself (speculative decoding; the
    logits of a position are those of a one-token step: tests/test_fast_llama.py)."""
    procs = make_processors(s, s.do_sample, suppress)
    logits, cache = dec.prefill(embeds)
    ids = torch.tensor([[bos_id]], device=embeds.device)  # penalties see the report only
    gen = None
    if s.do_sample:
        gen = torch.Generator(device=embeds.device).manual_seed(int(s.seed))
    speculate = not s.do_sample and proposer is not None and s.speculative_tokens > 0
    made = 0
    while made < max_new:
        scores = procs(ids, logits) if procs else logits
        if s.do_sample:
            tok = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)[:, 0]
        else:
            tok = scores.argmax(-1)
        t = int(tok)
        if t == eos_id:
            return
        yield t
        made += 1
        ids = torch.cat([ids, tok[:, None]], dim=1)
        k = min(s.speculative_tokens, max_new - made) if speculate and can_extend(dec) else 0
        proposal = proposer.propose(ids[0].tolist(), k) if k else []
        if not proposal:
            logits, cache = dec.step(tok, cache)
            continue
        seq = torch.tensor([[t, *proposal]], device=ids.device)
        every, cache = dec.extend(seq, cache)  # [1, 1 + k, V]: after t, after each proposal
        taken = 0
        for j, p in enumerate(proposal):
            scores = procs(ids, every[:, j]) if procs else every[:, j]
            if int(scores.argmax(-1)) != p or p == eos_id:  # the end: the next pass returns
                break
            yield p
            made += 1
            taken += 1
            ids = torch.cat([ids, seq[:, j + 1:j + 2]], dim=1)
        dec.rewind(cache, len(proposal) - taken)
        logits = every[:, taken]


def beam_search(dec: KVDecoder, embeds: torch.Tensor, s: GenerationSettings, bos_id: int,
                eos_id: int, max_new: int, suppress: list[int] | None = None) -> list[int]:
    """Beam search with cache reordering; scores are length-normalised log-probabilities."""
    nb = s.num_beams
    procs = make_processors(s, sampling=False, suppress=suppress)
    logits, cache = dec.prefill(embeds)
    cache.batch_repeat_interleave(nb)
    logits = logits.expand(nb, -1)
    ids = torch.full((nb, 1), bos_id, device=embeds.device)
    beam_scores = torch.full((nb,), float("-inf"), device=embeds.device)
    beam_scores[0] = 0.0  # all beams start identical: keep one alive so they do not duplicate
    finished: list[tuple[float, list[int]]] = []
    vocab = logits.shape[-1]
    for _ in range(max_new):
        scores = torch.log_softmax(procs(ids, logits), -1) + beam_scores[:, None]
        top_s, top_i = scores.view(-1).topk(2 * nb)
        nxt: list[tuple[float, int, int]] = []
        for rank, (sc, i) in enumerate(zip(top_s.tolist(), top_i.tolist())):
            if sc == float("-inf"):
                break
            b, t = divmod(i, vocab)
            if t == eos_id:
                if rank < nb:
                    finished.append((sc / ids.shape[1], ids[b, 1:].tolist()))
            else:
                nxt.append((sc, b, t))
            if len(nxt) == nb:
                break
        if not nxt:
            break
        if len(finished) >= nb:
            worst = sorted(f[0] for f in finished)[-nb]
            if nxt[0][0] / (ids.shape[1]) <= worst:  # running beams cannot win any more
                break
        while len(nxt) < nb:
            nxt.append((float("-inf"), nxt[0][1], nxt[0][2]))
        beam_idx = torch.tensor([b for _, b, _ in nxt], device=ids.device)
        toks = torch.tensor([t for _, _, t in nxt], device=ids.device)
        beam_scores = torch.tensor([sc for sc, _, _ in nxt], device=ids.device)
        ids = torch.cat([ids[beam_idx], toks[:, None]], dim=1)
        cache.reorder_cache(beam_idx)
        logits, cache = dec.step(toks, cache)
    else:
        for b in range(nb):
            if beam_scores[b] > float("-inf"):
                finished.append((float(beam_scores[b]) / (ids.shape[1] - 1), ids[b, 1:].tolist()))
    if not finished:
        return ids[0, 1:].tolist()
    return max(finished, key=lambda f: f[0])[1]
