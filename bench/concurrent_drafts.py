"""Several users' drafts at once through the engine, in-process: what the model side costs
without a web server (bench/app_load.py measures the whole app).

Each user loads a study (the shipped CT samples, in turn: a slice and the 8-slice series),
analyses it and drafts it. All users start together; the same users are also run one after
another. Reported per user count: the time until the last draft, each user's time, how
many drafts shared a decode step (the model's StepBatcher), and for the run together the
seconds the model thread computed (`model_busy_s`, and its share of the wall time) split into
decode steps and the other model jobs (analyses, prefills).

    python bench/concurrent_drafts.py --users 1 4 8 --json bench/results/cpu_concurrent_drafts.json
    python bench/concurrent_drafts.py --users 8 --gather-shares 0 0.25 --repeat 4   # A/B
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import emit, machine  # noqa: E402


def _user(engine, source: str) -> float:
    t0 = time.perf_counter()
    study = engine.load_series([source])[0] if source.endswith(".zip") else engine.load([source])
    engine.analyze(study)
    "".join(engine.stream_report(study))
    return time.perf_counter() - t0


def _together(engine, sources: list[str]) -> dict:
    """The users of `sources` all at once: their times, and where the run's time went."""
    batcher = engine._batcher(engine.model)
    counters = ("steps", "drafts_stepped", "rows_stepped", "step_s")
    before = {k: getattr(batcher, k) if batcher else 0 for k in counters}
    busy_before = engine.model_thread.busy_s
    times: list = [None] * len(sources)
    runs = [threading.Thread(target=lambda i=i: times.__setitem__(i, _user(engine, s)))
            for i, s in enumerate(sources)]
    t0 = time.perf_counter()
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    together = time.perf_counter() - t0
    busy = engine.model_thread.busy_s - busy_before
    done = {k: (getattr(batcher, k) if batcher else 0) - before[k] for k in counters}
    steps = done["steps"]
    return {
        "gather_share": batcher.gather_share if batcher else None,  # the setting it ran with
        "together_s": together, "user_p50_s": statistics.median(times),
        "user_max_s": max(times),
        "drafts_per_step": done["drafts_stepped"] / steps if steps else None,
        # Where the time went. The model thread computes every job in turn, so when it was
        # busy nearly all the wall time, the users' last draft can come no sooner than its
        # busy seconds: only less work per draft helps.
        "model_busy_s": busy, "model_busy_share": busy / together,
        "steps": steps, "step_s": done["step_s"],
        "rows_per_step": done["rows_stepped"] / steps if steps else None,
        "other_model_jobs_s": busy - done["step_s"]}  # analyses, prefills


def bench(model_dir: Path, users=(1, 4, 8), precision: str = "int8-weights",
          threads: str = "auto", gather_shares=(), repeat: int = 1) -> dict:
    """`gather_shares`: instead of one run together, the step batcher's `gather_share`
    values in turn, `repeat` times each, with their medians (a busy host drifts)."""
    from mrg_core.engine import Engine, EngineSettings
    from ui.handlers import list_samples

    samples = [v for _, v in list_samples(REPO / "assets" / "samples")]
    ct = [s for s in samples if "ct_" in Path(s).name] or samples
    out: dict = {"machine": machine(), "precision": precision, "threads": threads,
                 "samples": [Path(s).name for s in ct]}
    with tempfile.TemporaryDirectory() as tmp:
        settings = EngineSettings(model_dir=model_dir, database_url=f"sqlite:///{tmp}/b.db",
                                  precision=precision, decode_threads=threads)
        engine = Engine.from_settings(settings)
        engine.warm_up()
        for n in users:
            sources = [ct[i % len(ct)] for i in range(n)]
            t0 = time.perf_counter()
            alone = [_user(engine, s) for s in sources]
            res = {"one_after_another_s": time.perf_counter() - t0,
                   "alone_p50_s": statistics.median(alone)}
            batcher = engine._batcher(engine.model)
            if not gather_shares or batcher is None:
                res.update(_together(engine, sources))
            else:
                runs: dict = {str(g): [] for g in gather_shares}
                for _ in range(repeat):
                    for g in gather_shares:
                        batcher.gather_share = g
                        runs[str(g)].append(_together(engine, sources))
                res["by_gather_share"] = {g: {
                    "median": {k: statistics.median(r[k] for r in rs) for k in rs[0]
                               if rs[0][k] is not None}, "runs": rs} for g, rs in runs.items()}
            out[f"users_{n}"] = res
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "assets" / "model")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--precision", default="int8-weights")
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--gather-shares", type=float, nargs="+", default=(),
                    help="compare these step-batcher gather shares (alternated)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each gather share")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    emit(bench(a.model, tuple(a.users), a.precision, a.threads, tuple(a.gather_shares),
               a.repeat), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
