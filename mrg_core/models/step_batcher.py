"""Several users' drafts in one decode step.

On a CPU a decode step of a 135M-parameter LM costs mostly the read of its weights, whatever
the number of rows: with SmolLM2 in int8-weights on 2 cores, one step takes 7.5 ms for 2 rows
and 20 ms for 16 (README, Speed). Drafts that overlap in time therefore share their steps:
each draft keeps its own search (greedy or sampled tokens, label guidance, logits processors)
in its own thread, and hands its next tokens to the StepBatcher, which runs one lean-decoder
step (models/fast_llama.py) for every draft waiting, then gives each its logits back.

- The rows of all drafts live in one pool cache (LlamaKV, rows of different lengths). A draft
  is admitted after its own prefill (its prefix computed once) into free rows, and leaves when
  its generator closes (end of draft, Stop); a row left free is reused by the next draft.
- A guided pair whose prompts begin alike is prefilled as one job (`prefill_shared`).
- A draft decoding alone may hand in several tokens per row (speculative decoding: proposals
  from earlier drafts, models/generation.py); the step is then one pass of that many
  positions (FastLlamaDecoder.extend), and rewind() drops the proposals not taken.
- A step runs as soon as every admitted draft is waiting, or when the first one has waited
  `gather_s` or a quarter of the last step's time if that is longer (at most `gather_max_s`):
  a slow draft (its thread busy in Python) delays the others by at most that. The rows of a
  draft that is not waiting are computed anyway (and thrown away), so waiting a little for it
  costs less than leaving it a step behind: on a 2-core host whose 16-row steps took 75-90 ms,
  8 users' drafts handed in within 4 ms too rarely (5.8 of 8 drafts per step, 95 steps); a
  quarter of a step (~20 ms) gathered 7.9 in 70 steps, 13.3 -> 10.1 s (README, Speed).
- Each step and each prefill runs through `run` (the engine's model thread, jobs in arrival
  order: mrg_core/model_thread.py): another user's analysis waits for one step, never for a
  whole draft.

Exact where it claims to be: a draft's logits are those of its own single-row decode, to
float rounding (tests/test_step_batcher.py). Beam search keeps the per-draft path.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from mrg_core.models.fast_llama import FastLlamaDecoder, LlamaKV

GATHER_S = 0.004  # how long a step waits for a draft that has not handed in its tokens ...
GATHER_SHARE = 0.25  # ... or this share of the last step's time, if longer ...
GATHER_MAX_S = 0.25  # ... but never longer than this
IDLE_S = 2.0  # the step thread ends after this long without work (started again on demand)


class _Member:
    """One draft's rows in the pool (two for a guided draft: its prompt and the contrast)."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        self.done = threading.Event()
        self.logits: torch.Tensor | None = None
        self.error: BaseException | None = None


class StepBatcher:
    def __init__(self, decoder: FastLlamaDecoder, run: Callable | None = None,
                 gather_s: float = GATHER_S, gather_share: float = GATHER_SHARE,
                 gather_max_s: float = GATHER_MAX_S):
        """`run(fn)`: calls fn where model work runs (default: here, in the step thread)."""
        self.dec, self.gather_s = decoder, gather_s
        self.gather_share, self.gather_max_s = gather_share, gather_max_s
        self._last_step_s = 0.0
        self.run = run or (lambda fn: fn())
        self._cond = threading.Condition()  # members, pending tokens, the step thread
        self._members: set[_Member] = set()
        self._pending: dict[_Member, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._pool_lock = threading.Lock()  # the pool's tensors and rows: steps, admissions
        self._pool: LlamaKV | None = None
        self._used: set[int] = set()
        # what the steps did, for benchmarks and tests
        self.steps = 0
        self.drafts_stepped = 0
        self.most_drafts_in_a_step = 0
        self.rows_stepped = 0  # pool rows computed, summed over steps (free ones included)
        self.step_s = 0.0  # seconds spent computing steps

    def decoder(self) -> BatchedDecoder:
        """A decoder for one draft (the KVDecoder interface), stepping through this batcher."""
        return BatchedDecoder(self)

    # ------------------------------------------------------------------ the pool
    @torch.inference_mode()  # the pool's tensors are made and changed in inference mode only
    def _admit(self, cache: LlamaKV) -> _Member:
        """Copy a prefilled cache's rows into free rows of the pool (grown when needed)."""
        n = cache.k.shape[1]
        with self._pool_lock:
            pool = self._pool
            if pool is None:
                pool = self._pool = LlamaKV.empty(cache.k.shape[0], max(8, n), cache.k.shape[2],
                                                  cache.capacity, cache.k.shape[4], cache.k)
            pool.grow(cache.capacity)
            free = [r for r in range(pool.k.shape[1]) if r not in self._used][:n]
            if len(free) < n:  # double the rows; the new ones are free
                size = pool.k.shape[1]
                extra = LlamaKV.empty(pool.k.shape[0], max(size, n), pool.k.shape[2],
                                      pool.capacity, pool.k.shape[4], pool.k)
                pool = self._pool = LlamaKV.cat([pool, extra])
                free = [r for r in range(pool.k.shape[1]) if r not in self._used][:n]
            idx = torch.tensor(free, device=pool.k.device)
            pool.k[:, idx, :, :cache.capacity] = cache.k
            pool.v[:, idx, :, :cache.capacity] = cache.v
            for r, length in zip(free, cache.lengths):
                pool.lengths[r] = length
            self._used.update(free)
        member = _Member(free)
        with self._cond:
            self._members.add(member)
        return member

    def _merge(self, members) -> _Member:
        """Several admitted members of one draft (a guided pair prefilled apart) as one."""
        merged = _Member([r for m in members for r in m.rows])
        with self._cond:
            self._members.difference_update(members)
            self._members.add(merged)
        return merged

    def _leave(self, member: _Member) -> None:
        with self._cond:
            self._members.discard(member)
            self._pending.pop(member, None)
            self._cond.notify_all()  # a step waiting for this draft need not wait
        with self._pool_lock:
            self._used.difference_update(member.rows)
            for r in member.rows:
                self._pool.lengths[r] = 0

    # ------------------------------------------------------------------ the steps
    def _submit(self, member: _Member, tokens: torch.Tensor) -> torch.Tensor:
        with self._cond:
            self._pending[member] = tokens
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mrg-steps", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        member.done.wait()
        member.done.clear()
        if member.error is not None:
            raise member.error
        return member.logits

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    if not self._cond.wait(IDLE_S) and not self._pending:
                        self._thread = None
                        return
                deadline = time.monotonic() + self._gather_wait()
                while len(self._pending) < len(self._members):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._pending = self._pending, {}
            try:
                out = self.run(lambda: self._locked_step(batch))
                for m in batch:
                    m.logits, m.error = out[m], None
                    m.done.set()
            except BaseException as exc:  # every waiting draft raises it
                for m in batch:
                    m.error = exc
                    m.done.set()

    def _gather_wait(self) -> float:
        """How long a step may wait for the admitted drafts that have not handed in."""
        share = min(self.gather_share * self._last_step_s, self.gather_max_s)
        return max(self.gather_s, share)

    def _locked_step(self, batch):
        with self._pool_lock:
            t0 = time.perf_counter()
            try:
                return self._step(batch)
            finally:
                self._last_step_s = time.perf_counter() - t0
                self.step_s += self._last_step_s

    @torch.inference_mode()
    def _step(self, batch: dict[_Member, torch.Tensor]) -> dict[_Member, torch.Tensor]:
        """One step for the pool's rows up to the highest in use: one token per row, or, when
        a draft hands in several per row (speculative decoding: [rows, T]), a pass of the
        longest T for every row. Rows not in `batch` (free, or a draft not waiting), and a
        draft's positions beyond its own T, are computed and thrown away: the lengths keep
        only what each draft handed in, and its next pass writes those positions again."""
        pool = self._pool
        high = max(self._used) + 1
        handed = {m: t if t.dim() == 2 else t[:, None] for m, t in batch.items()}  # [rows, T]
        width = max(t.shape[1] for t in handed.values())
        need = max(pool.lengths[:high]) + width
        if need > pool.capacity:
            pool.grow(max(2 * pool.capacity, need))
        tokens = torch.zeros(high, width, dtype=torch.long, device=pool.k.device)
        for m, t in handed.items():
            tokens[m.rows, :t.shape[1]] = t.to(tokens.device)
        view = LlamaKV(pool.k[:, :high], pool.v[:, :high], pool.lengths[:high])
        if width == 1:
            logits, _ = self.dec.step(tokens[:, 0], view)
            logits = logits[:, None]
        else:
            logits, _ = self.dec.extend(tokens, view)
        for m, t in handed.items():
            for r in m.rows:
                pool.lengths[r] += t.shape[1]
        self.steps += 1
        self.rows_stepped += high
        self.drafts_stepped += len(batch)
        self.most_drafts_in_a_step = max(self.most_drafts_in_a_step, len(batch))
        # each draft's logits in the shape it handed its tokens in
        return {m: logits[m.rows, :handed[m].shape[1]] if t.dim() == 2 else logits[m.rows, 0]
                for m, t in batch.items()}

    def _rewind(self, member: _Member, drop: int) -> None:
        with self._pool_lock:
            for r in member.rows:
                self._pool.lengths[r] -= drop

    def alone(self, members) -> bool:
        """Whether no other draft is decoding: a speculative pass then slows nobody (it
        computes its T positions for every row of the step)."""
        with self._cond:
            return self._members <= set(members)


class BatchedDecoder:
    """One draft's decoder: prefill on its own (a model job), steps through the batcher.
    close() (the draft's generator ending) gives its rows back."""

    def __init__(self, batcher: StepBatcher):
        self.batcher = batcher
        self._members: list[_Member] = []

    def _admitted(self, prefill: Callable):
        """`prefill()` -> (logits, cache) as one model job, its rows admitted to the pool."""
        def job():
            logits, cache = prefill()
            return logits, self.batcher._admit(cache)

        logits, member = self.batcher.run(job)
        self._members.append(member)
        return logits, member

    def prefill(self, embeds: torch.Tensor):
        return self._admitted(lambda: self.batcher.dec.prefill(embeds))

    def prefill_shared(self, common: torch.Tensor, ends: list[torch.Tensor]):
        return self._admitted(lambda: self.batcher.dec.prefill_shared(common, ends))

    def join(self, *members: _Member) -> _Member:
        merged = self.batcher._merge(members)
        self._members = [m for m in self._members if m not in members] + [merged]
        return merged

    def step(self, tokens: torch.Tensor, member: _Member):
        return self.batcher._submit(member, tokens), member

    def extend(self, tokens: torch.Tensor, member: _Member):
        """tokens [rows, T]: logits [rows, T, V] (FastLlamaDecoder.extend, in a shared step)."""
        return self.batcher._submit(member, tokens), member

    def rewind(self, member: _Member, drop: int) -> None:
        self.batcher._rewind(member, drop)

    @property
    def can_extend(self) -> bool:
        """Exact passes (the lean decoder's own rule), and only while this draft decodes
        alone: with other drafts in the step, a pass of T positions costs every row T."""
        return bool(getattr(self.batcher.dec, "can_extend", False)) and \
            self.batcher.alone(self._members)

    def close(self) -> None:
        for m in self._members:
            self.batcher._leave(m)
        self._members = []
