"""Several users' drafts at once through the engine, in-process: what the model side costs
without a web server (bench/app_load.py measures the whole app).

Each user loads a study (the shipped CT samples, in turn: a slice and the 8-slice series),
analyses it and drafts it. All users start together; the same users are also run one after
another. Reported per user count: the time until the last draft, each user's time, and how
many drafts shared a decode step (the model's StepBatcher).

    python bench/concurrent_drafts.py --users 1 4 8 --json bench/results/cpu_concurrent_drafts.json
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


def bench(model_dir: Path, users=(1, 4, 8), precision: str = "int8-weights",
          threads: str = "auto") -> dict:
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
            one_after_another = time.perf_counter() - t0
            batcher = engine._batcher(engine.model)
            before = (batcher.steps, batcher.drafts_stepped) if batcher else (0, 0)
            times: list = [None] * n
            runs = [threading.Thread(target=lambda i=i: times.__setitem__(
                i, _user(engine, sources[i]))) for i in range(n)]
            t0 = time.perf_counter()
            for t in runs:
                t.start()
            for t in runs:
                t.join()
            together = time.perf_counter() - t0
            steps = (batcher.steps - before[0]) if batcher else 0
            shared = (batcher.drafts_stepped - before[1]) if batcher else 0
            out[f"users_{n}"] = {
                "together_s": together, "one_after_another_s": one_after_another,
                "user_p50_s": statistics.median(times), "user_max_s": max(times),
                "alone_p50_s": statistics.median(alone),
                "drafts_per_step": shared / steps if steps else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "assets" / "model")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--precision", default="int8-weights")
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    emit(bench(a.model, tuple(a.users), a.precision, a.threads), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
