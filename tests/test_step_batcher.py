"""Drafts that overlap share decode steps (mrg_core/models/step_batcher.py), and every model
computation of the engine runs on its one model thread (mrg_core/model_thread.py).

A shared step must change nothing a draft sees: each draft's logits are those of its own
single-row decode, whoever else is in the step, and a draft that leaves gives its rows back.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from mrg_core.model_thread import ModelThread
from mrg_core.models.fast_llama import FastLlamaDecoder
from mrg_core.models.step_batcher import StepBatcher


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _alone(dec, embeds, tokens):
    """Logits of a single decode: after the prefix, then after each of `tokens`."""
    with torch.inference_mode():
        logits, cache = dec.prefill(embeds)
        out = [logits]
        for t in tokens:
            logits, cache = dec.step(t, cache)
            out.append(logits)
    return out


def _admit(bdec, embeds, contrast=None):
    """Prefill one draft on a BatchedDecoder (a guided pair when `contrast`: prefilled apart,
    then joined): (its first logits, its rows)."""
    with torch.inference_mode():
        logits, member = bdec.prefill(embeds)
        if contrast is not None:
            other, second = bdec.prefill(contrast)
            logits, member = torch.cat([logits, other]), bdec.join(member, second)
    return logits, member


def _steps(bdec, admitted, tokens, out):
    """The draft's steps; records its logits in `out`, then gives its rows back."""
    logits, member = admitted
    out.append(logits)
    with torch.inference_mode():
        for t in tokens:
            logits, member = bdec.step(t, member)
            out.append(logits)
    bdec.close()


def _decode_on(bdec, embeds, tokens, out, contrast=None):
    _steps(bdec, _admit(bdec, embeds, contrast), tokens, out)


def test_drafts_in_one_step_see_the_logits_of_their_own_decode():
    """Three drafts (prefixes of 4 and 9 embeddings, and a guided pair of 6 and 3 joined)
    take every step together (the step waits for all of them); each gets the logits of its
    own decode alone, and the pool holds only their rows."""
    dec = FastLlamaDecoder(_llama(), room=2)  # the pool grows past the planned room
    batcher = StepBatcher(dec, gather_s=30.0)
    e1, e2, e3, c3 = (torch.randn(1, n, 64) for n in (4, 9, 6, 3))
    n_steps = 6
    toks = [[torch.tensor([(7 * i + r) % 300]) for i in range(n_steps)] for r in range(3)]
    pair = [torch.cat([t, t]) for t in toks[2]]
    outs = [[], [], []]
    bdecs = [batcher.decoder() for _ in range(3)]
    # all admitted before any step, so every step has all three
    admitted = [_admit(bdecs[0], e1), _admit(bdecs[1], e2), _admit(bdecs[2], e3, c3)]
    runs = [threading.Thread(target=_steps, args=(bdecs[i], admitted[i], t, outs[i]))
            for i, t in enumerate((toks[0], toks[1], pair))]
    for t in runs:
        t.start()
    for t in runs:
        t.join(60)
    assert batcher.steps == n_steps and batcher.most_drafts_in_a_step == 3
    # what benchmarks read: rows 0-3 computed every step (1 + 1 + the pair's 2), and time
    assert batcher.rows_stepped == 4 * n_steps and batcher.step_s > 0
    refs = [_alone(dec, e1, toks[0]), _alone(dec, e2, toks[1])]
    ref_a, ref_b = _alone(dec, e3, toks[2]), _alone(dec, c3, toks[2])
    refs.append([torch.cat([a, b]) for a, b in zip(ref_a, ref_b)])
    for got, ref in zip(outs, refs):
        assert len(got) == n_steps + 1
        for g, r in zip(got, ref):
            assert torch.allclose(g, r, atol=1e-5)
    assert batcher._used == set()  # every draft gave its rows back


def test_a_guided_pair_that_begins_alike_is_one_prefill_job_and_steps_as_alone():
    """A guided draft whose two prompts share their beginning: one model job prefills both
    (the beginning once), its two rows join the pool, and its guided scores step for step are
    those of the same pair decoded alone on the lean decoder."""
    from mrg_core.models.generation import GuidedDecoder

    dec = FastLlamaDecoder(_llama(seed=3), room=2)
    jobs = []
    batcher = StepBatcher(dec, run=lambda fn: (jobs.append(fn), fn())[1])
    common = torch.randn(1, 5, 64)
    cond = torch.cat([common, torch.randn(1, 4, 64)], 1)
    contrast = torch.cat([common, torch.randn(1, 2, 64)], 1)
    pooled = GuidedDecoder(batcher.decoder(), contrast, 1.5)
    alone = GuidedDecoder(dec, contrast, 1.5)
    with torch.inference_mode():
        (sp, cp), (sa, ca) = pooled.prefill(cond), alone.prefill(cond)
        assert len(jobs) == 1 and len(cp.both.rows) == 2
        for _ in range(4):
            assert torch.allclose(sp, sa, atol=1e-5)
            tok = sa.argmax(-1)
            (sp, cp), (sa, ca) = pooled.step(tok, cp), alone.step(tok, ca)
        assert torch.allclose(sp, sa, atol=1e-5)
    pooled.close()
    assert batcher._used == set()


def test_a_draft_joining_midway_takes_free_rows_and_decodes_as_alone():
    """Draft A decodes 5 steps alone and leaves; B starts, then C joins B mid-draft: the pool
    keeps its rows (B and C reuse A's), and B and C get their own logits."""
    dec = FastLlamaDecoder(_llama(seed=1))
    batcher = StepBatcher(dec)
    e_a, e_b, e_c = (torch.randn(1, n, 64) for n in (5, 7, 3))
    t_a = [torch.tensor([i + 1]) for i in range(5)]
    out_a: list = []
    _decode_on(batcher.decoder(), e_a, t_a, out_a)
    rows = batcher._pool.k.shape[1]
    t_b, t_c = [torch.tensor([i + 10]) for i in range(8)], [torch.tensor([i + 50]) for i in range(4)]
    out_b, out_c = [], []
    b_dec, c_dec = batcher.decoder(), batcher.decoder()
    with torch.inference_mode():
        logits, member = b_dec.prefill(e_b)
        out_b.append(logits)
        for i, t in enumerate(t_b):
            if i == 3:  # C arrives while B is decoding, and steps with it from then on
                runner = threading.Thread(target=_decode_on, args=(c_dec, e_c, t_c, out_c))
                runner.start()
                while len(out_c) < 1:
                    time.sleep(0.001)
            logits, member = b_dec.step(t, member)
            out_b.append(logits)
    b_dec.close()
    runner.join(30)
    assert batcher._pool.k.shape[1] == rows and batcher.most_drafts_in_a_step == 2
    for got, ref in ((out_a, _alone(dec, e_a, t_a)), (out_b, _alone(dec, e_b, t_b)),
                     (out_c, _alone(dec, e_c, t_c))):
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert torch.allclose(g, r, atol=1e-5)


def test_a_draft_not_waiting_keeps_its_place_while_others_step():
    """Steps that do not include a draft (it was busy) must not move it on: A steps three
    times alone while B waits admitted, then B steps; both see their own decode's logits."""
    dec = FastLlamaDecoder(_llama(seed=2))
    batcher = StepBatcher(dec, gather_s=0.0)  # a step takes whoever is waiting at once
    e_a, e_b = torch.randn(1, 5, 64), torch.randn(1, 8, 64)
    a_dec, b_dec = batcher.decoder(), batcher.decoder()
    t_a, t_b = [torch.tensor([i + 3]) for i in range(3)], [torch.tensor([i + 90]) for i in range(3)]
    out_a, out_b = [], []
    first_b = _admit(b_dec, e_b)
    _decode_on(a_dec, e_a, t_a, out_a)
    _steps(b_dec, first_b, t_b, out_b)
    assert batcher.steps == 6 and batcher.most_drafts_in_a_step == 1
    for got, ref in ((out_a, _alone(dec, e_a, t_a)), (out_b, _alone(dec, e_b, t_b))):
        for g, r in zip(got, ref):
            assert torch.allclose(g, r, atol=1e-5)


class _SlowSteps(FastLlamaDecoder):
    """Steps as slow as a 16-row step on a slow 2-core host, relative to a draft's Python."""
    step_s = 0.6

    def step(self, tokens, cache):
        time.sleep(self.step_s)
        return super().step(tokens, cache)


def test_a_step_waits_a_share_of_the_last_steps_time_for_a_draft_still_in_python():
    """A draft that hands in its tokens 30 ms after the others (its thread busy in Python)
    would miss every step that starts at once, its rows computed and thrown away. After the
    first step (0.6 s) a step waits up to a quarter of that (0.15 s) for it: A's first step
    alone, then the two drafts together, 7 steps for 6 tokens each (when a step starts at
    once they never share one: the late draft steps alone between the other's); each still
    sees its own decode's logits."""
    lm = _llama(seed=3)
    dec, fast = _SlowSteps(lm), FastLlamaDecoder(lm)  # the references computed at full speed
    batcher = StepBatcher(dec, gather_s=0.0, gather_share=0.25, gather_max_s=1.0)
    e_a, e_b = torch.randn(1, 5, 64), torch.randn(1, 7, 64)
    t_a, t_b = [torch.tensor([i + 5]) for i in range(6)], [torch.tensor([i + 60]) for i in range(6)]
    a_dec, b_dec = batcher.decoder(), batcher.decoder()
    admitted = [_admit(a_dec, e_a), _admit(b_dec, e_b)]
    out_a, out_b = [], []

    def late(tokens):  # B's tokens, each handed in 30 ms after its logits came
        for t in tokens:
            time.sleep(0.03)
            yield t

    runs = [threading.Thread(target=_steps, args=(a_dec, admitted[0], t_a, out_a)),
            threading.Thread(target=_steps, args=(b_dec, admitted[1], late(t_b), out_b))]
    for t in runs:
        t.start()
    for t in runs:
        t.join(60)
    assert batcher.most_drafts_in_a_step == 2 and batcher.steps <= 7
    for got, ref in ((out_a, _alone(fast, e_a, t_a)), (out_b, _alone(fast, e_b, t_b))):
        assert len(got) == 7
        for g, r in zip(got, ref):
            assert torch.allclose(g, r, atol=1e-5)
    batcher._last_step_s = 60.0  # a pathological step: the wait stays bounded
    assert batcher._gather_wait() == 1.0


def test_a_failing_step_raises_in_every_waiting_draft():
    dec = FastLlamaDecoder(_llama())
    batcher = StepBatcher(dec)

    def broken(tokens, cache):
        raise RuntimeError("step failed")

    bdec = batcher.decoder()
    logits, member = bdec.prefill(torch.randn(1, 4, 64))
    dec.step = broken
    with pytest.raises(RuntimeError, match="step failed"):
        bdec.step(torch.tensor([1]), member)
    bdec.close()
    assert batcher._used == set()


# ---------------------------------------------------------------------------- model thread
def test_model_thread_runs_jobs_in_arrival_order_on_one_thread():
    runner = ModelThread(threads=1)
    seen, order = [], []
    first_started = threading.Event()

    def job(name, hold=0.0):
        seen.append(threading.current_thread())
        first_started.set()
        time.sleep(hold)
        order.append(name)
        return name

    callers = [threading.Thread(target=runner.run, args=(job, "a", 0.2))]
    callers[0].start()
    first_started.wait(5)
    for name in "bcd":  # arrive while "a" runs, in this order
        callers.append(threading.Thread(target=runner.run, args=(job, name)))
        callers[-1].start()
        time.sleep(0.03)
    for t in callers:
        t.join(5)
    assert order == ["a", "b", "c", "d"]
    assert len(set(seen)) == 1 and seen[0] is not threading.current_thread()
    assert runner.run(lambda: runner.run(job, "inner")) == "inner"  # a job's own call: inline


def test_model_thread_counts_the_seconds_its_jobs_computed():
    """busy_s (benchmarks: how much of a run's wall time the model thread computed) adds
    every job's duration, a failing one's too, and a job's own inline call only once."""
    runner = ModelThread(threads=1)

    def fail():
        time.sleep(0.1)
        raise ValueError("bad study")

    t0 = time.perf_counter()
    runner.run(time.sleep, 0.15)
    runner.run(lambda: runner.run(time.sleep, 0.1))  # 0.1 s, counted in the outer job
    with pytest.raises(ValueError):
        runner.run(fail)
    wall = time.perf_counter() - t0
    assert 0.35 <= runner.busy_s <= wall


def test_model_thread_raises_a_jobs_error_in_its_caller_and_restarts_after_idle():
    runner = ModelThread(threads=1, idle_s=0.05)
    with pytest.raises(ValueError, match="bad study"):
        runner.run(lambda: (_ for _ in ()).throw(ValueError("bad study")))
    first = runner.run(threading.current_thread)
    deadline = time.monotonic() + 5
    while runner._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner._thread is None and not first.is_alive()  # idle: the thread (and team) ended
    assert runner.run(lambda: 42) == 42


_EXIT_MID_WORK = r"""
import sys, threading, time, torch
from mrg_core.model_thread import ModelThread, ProcessExiting, exiting, start_worker

runner, a = ModelThread(threads=2), torch.randn(192, 192)

def job():  # a long model job, still running when the main thread ends
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        a @ a
    print("job finished", flush=True)

def search():  # a draft's own thread, busy in torch at exit (ending its token for another
    # second); its next model call is refused
    while not exiting():
        a @ a
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        a @ a
    try:
        runner.run(lambda: None)
    except ProcessExiting:
        print("worker refused", flush=True)

def tune():  # the page's fine-tune, training when the app closes: it stops at a batch
    from mrg_core.finetune import FinetuneConfig, train_model
    from mrg_core.models.factory import tiny_model

    items = [(torch.rand(1, 1, 64, 64), "the lungs are clear .", 1.0)] * 4
    try:
        train_model(tiny_model("medvlm", family="gpt2"), items,
                    FinetuneConfig(epochs=10 ** 6, batch_size=1, augment=False))
    except ProcessExiting:
        print("fine-tune stopped", flush=True)

if sys.argv[1] == "job":  # asked for by a plain daemon thread (a web server's)
    threading.Thread(target=runner.run, args=(job,), daemon=True).start()
elif sys.argv[1] == "worker":
    start_worker(search, "search")
else:
    start_worker(tune, "mrg-finetune")
    time.sleep(5)  # the tiny model is built and training
time.sleep(0.3)
"""


@pytest.mark.parametrize("busy, says", [("job", "job finished"), ("worker", "worker refused"),
                                        ("finetune", "fine-tune stopped")])
def test_the_process_exits_cleanly_while_model_work_runs(busy, says):
    """Exit mid-work: on the model thread, in a draft's own thread, or while fine-tuning (CI's
    pytest once ended in exit 134, 'terminate called without an active exception': a daemon
    thread inside torch while Python finalized)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for _ in range(2):  # the abort depends on timing: both tries end well
        done = subprocess.run([sys.executable, "-c", _EXIT_MID_WORK, busy], cwd=root,
                              timeout=120, capture_output=True, text=True)
        assert "terminate called" not in done.stderr and done.returncode == 0, done.stderr
        assert says in done.stdout


# ---------------------------------------------------------------------------- the engine
def _int8_llama(seed: int):
    from mrg_core.models.quantize import quantize_linear_int8_weights

    lm = _llama(seed).to(torch.bfloat16)
    quantize_linear_int8_weights(lm.model)
    return lm


def test_a_speculative_pass_shares_a_step_and_each_draft_sees_its_own_logits():
    """Draft A hands in 4 tokens (a speculative pass) while B hands in one, in the same step:
    A gets the logits of its own pass alone, B those of its own step alone (int8 weights: bit
    for bit), each row's length grows by what it handed in, and A's rewind keeps two of its
    four positions: its next step is that of a decode that took only those two."""
    dec = FastLlamaDecoder(_int8_llama(seed=6), room=2)  # the pass outgrows the pool's room
    batcher = StepBatcher(dec, gather_s=30.0)  # the step waits for both
    e_a, e_b = torch.randn(1, 5, 64), torch.randn(1, 8, 64)
    a_dec, b_dec = batcher.decoder(), batcher.decoder()
    (_, a), (_, b) = _admit(a_dec, e_a), _admit(b_dec, e_b)
    assert not a_dec.can_extend  # B decodes too: no pass would be alone
    seq, tok_b = torch.tensor([[11, 12, 13, 14]]), torch.tensor([40])
    got = {}
    with torch.inference_mode():
        runs = [threading.Thread(target=lambda: got.setdefault("a", a_dec.extend(seq, a)[0])),
                threading.Thread(target=lambda: got.setdefault("b", b_dec.step(tok_b, b)[0]))]
        for t in runs:
            t.start()
        for t in runs:
            t.join(60)
        assert batcher.steps == 1 and batcher.most_drafts_in_a_step == 2
        own_a, cache_a = dec.extend(seq, dec.prefill(e_a)[1])
        own_b, _ = dec.step(tok_b, dec.prefill(e_b)[1])
        assert torch.equal(got["a"], own_a) and torch.equal(got["b"], own_b)
        assert [batcher._pool.lengths[r] for r in a.rows + b.rows] == [9, 9]
        a_dec.rewind(a, 2)
        dec.rewind(cache_a, 2)
        b_dec.close()
        assert a_dec.can_extend  # alone now
        nxt = torch.tensor([7])
        assert torch.equal(a_dec.step(nxt, a)[0], dec.step(nxt, cache_a)[0])
    a_dec.close()
    assert batcher._used == set()


@pytest.fixture
def llama_engine(tmp_path):
    from mrg_core.engine import Engine
    from mrg_core.models import tiny_model
    from mrg_core.models.quantize import apply_precision
    from mrg_core.storage import Store

    model = apply_precision(tiny_model("medvlm", family="llama", seed=1), "fp32-merged")
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    yield Engine(model, store)
    store.close()


def _studies(n: int, offset: int = 0):
    from mrg_core.samples import make_ct_phantom
    from mrg_core.study import study_from_arrays

    return [study_from_arrays([make_ct_phantom(seed=offset + i, covid=bool(i % 2))])
            for i in range(n)]


def test_engine_model_work_runs_on_the_model_thread(llama_engine, monkeypatch):
    """Analysis, domain check, prefill and decode steps: all on the engine's model thread;
    the draft's own thread keeps torch at one thread."""
    from mrg_core.models.fast_llama import FastLlamaDecoder as Fast

    where: dict[str, set] = {}

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapped(*a, **kw):
            where.setdefault(name, set()).add(threading.current_thread().name)
            if name == "sample_tokens":
                where.setdefault("search threads", set()).add(torch.get_num_threads())
            return real(*a, **kw)
        monkeypatch.setattr(owner, name, wrapped)

    import mrg_core.models.report_model as rm

    for owner, name in ((type(llama_engine.model), "analyze"), (Fast, "prefill"),
                        (Fast, "step"), (rm, "sample_tokens"),
                        (type(llama_engine.model), "_remember")):  # image features computed
        spy(owner, name)
    study, unseen = _studies(2)
    llama_engine.analyze(study)
    text = "".join(llama_engine.stream_report(study))
    assert text and "".join(llama_engine.stream_report(unseen))  # a draft before its analysis
    assert where["analyze"] == where["prefill"] == where["step"] == {"mrg-model"}
    assert where["_remember"] == {"mrg-model"}
    assert where["sample_tokens"] == {"mrg-decode"} and where["search threads"] == {1}


def test_engine_grounds_each_statement_on_the_model_thread(llama_engine, monkeypatch):
    """Sentence maps: the prediction and each statement's attribution are model-thread jobs
    (other users' drafts run between two statements)."""
    from captum.attr import LayerGradientXActivation

    where: list[str] = []
    real = LayerGradientXActivation.attribute

    def attribute(*a, **kw):
        where.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(LayerGradientXActivation, "attribute", attribute)
    study = _studies(1, offset=80)[0]
    _view, found = llama_engine.ground(study, "Patchy shadow in the left lung. No effusion.")
    assert len(found) == 2 and where == ["mrg-model", "mrg-model"]


def test_engine_drafts_that_overlap_share_steps_and_write_what_they_write_alone(llama_engine):
    studies = _studies(3, offset=20)
    alone = ["".join(llama_engine.stream_report(s)) for s in studies]
    batcher = llama_engine._batcher(llama_engine.model)
    assert batcher.most_drafts_in_a_step == 1
    out = [None] * 3
    go = threading.Barrier(3)

    def user(i):
        go.wait()
        out[i] = "".join(llama_engine.stream_report(studies[i]))

    users = [threading.Thread(target=user, args=(i,)) for i in range(3)]
    for t in users:
        t.start()
    for t in users:
        t.join(60)
    assert out == alone and all(alone)
    assert batcher.most_drafts_in_a_step >= 2
    assert batcher._used == set() and llama_engine.drafts_running() == 0


def test_engine_analysis_waits_for_one_shared_step_not_the_whole_draft(llama_engine,
                                                                      monkeypatch):
    """Steps slowed to 0.3 s: a 12-token draft takes 3.6 s; another user's analysis, asked
    after the draft started, ends while the draft still runs, within about one step."""
    from mrg_core.models import GenerationSettings

    batcher = llama_engine._batcher(llama_engine.model)
    real = batcher._step

    def slow(batch):
        time.sleep(0.3)
        return real(batch)

    monkeypatch.setattr(batcher, "_step", slow)
    studies = _studies(2, offset=40)
    it = llama_engine.stream_report(studies[0], GenerationSettings(max_new_tokens=12))
    assert next(it)
    t0 = time.perf_counter()
    llama_engine.analyze(studies[1])
    waited = time.perf_counter() - t0
    assert llama_engine.drafts_running() == 1  # the draft was still decoding
    it.close()
    assert waited < 1.5, f"the analysis waited {waited:.1f} s behind the draft"


def test_engine_stop_ends_a_shared_draft_and_frees_its_rows(llama_engine):
    from mrg_core.models import GenerationSettings

    it = llama_engine.stream_report(_studies(1, offset=60)[0],
                                    GenerationSettings(max_new_tokens=100))
    assert next(it)
    it.close()
    deadline = time.monotonic() + 10
    while llama_engine.drafts_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher = llama_engine._batcher(llama_engine.model)
    assert llama_engine.drafts_running() == 0 and batcher._used == set()
    assert batcher.steps < 100  # it stopped, not ran to the end


def test_engine_drafts_speculate_alone_and_write_what_they_write_step_by_step(tmp_path,
                                                                              monkeypatch):
    """An int8-weights engine: a draft alone checks proposals from earlier drafts in shared
    passes and writes the text of one-token steps; drafts that overlap write it too."""
    from mrg_core.engine import Engine
    from mrg_core.models import GenerationSettings, tiny_model
    from mrg_core.models.quantize import apply_precision

    passes = []
    extend = FastLlamaDecoder.extend
    monkeypatch.setattr(FastLlamaDecoder, "extend",
                        lambda self, *a: passes.append(a[0].shape) or extend(self, *a))
    model = apply_precision(tiny_model("medvlm", family="llama", seed=1), "int8-weights")
    engine = Engine(model, None)
    studies = _studies(3, offset=40)
    kw = dict(max_new_tokens=30, repetition_penalty=1.0, no_repeat_ngram_size=3)
    off, on = GenerationSettings(speculative_tokens=0, **kw), GenerationSettings(**kw)
    ref = ["".join(engine.stream_report(s, off)) for s in studies]
    assert all(ref) and not passes
    assert ["".join(engine.stream_report(s, on)) for s in studies] == ref
    assert passes  # the earlier drafts' words were proposed and checked
    out = [None] * 3
    go = threading.Barrier(3)

    def user(i):
        go.wait()
        out[i] = "".join(engine.stream_report(studies[i], on))

    users = [threading.Thread(target=user, args=(i,)) for i in range(3)]
    for t in users:
        t.start()
    for t in users:
        t.join(60)
    assert out == ref
    assert engine._batcher(model).most_drafts_in_a_step >= 2
