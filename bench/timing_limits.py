"""Wall-clock limits that the test suite used to assert, measured here instead.

Tests check behaviour, not speed (a busy CI machine must not fail them); these figures are
checked against their targets by this script, which exits 1 when one is missed.

    python bench/timing_limits.py --json bench/results/timing_limits.json
    python bench/timing_limits.py --fuzz-inputs 2000          # more damaged files

- loader_max_s: the slowest of N damaged files (byte flips and truncations of the fuzz corpus
  of tests/test_io_fuzz.py, seeded) through load_study with the fuzz test's limits; target
  5 s an input (a hostile upload must not tie up the server). Was in test_io_fuzz._check.
- tiny_model_s: building the tiny test model; target 2 s (the suite builds many). Was in
  test_models_io.test_info_and_tiny_model_is_fast.
- locked_store_s: a save into a SQLite file held by another writer (EXCLUSIVE lock), with a
  busy timeout of 0.2 s, refused; target 2 s (the page must answer, not hang). Was in
  test_storage.test_locked_database_then_retry.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fuzz corpus is built with tests/factories.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {"loader_max_s": 5.0, "tiny_model_s": 2.0, "locked_store_s": 2.0}


def loader_times(n_inputs: int, seed: int = 0) -> list[float]:
    """Seconds per damaged input (byte flips, half aimed at the header, and truncations)."""
    import numpy as np

    from mrg_core.io import StudyLoadError, load_study
    from test_io_fuzz import CORPUS, LIMITS

    rng = np.random.default_rng(seed)
    names = sorted(CORPUS)
    times = []
    for i in range(n_inputs):
        data = bytearray(CORPUS[names[rng.integers(len(names))]])
        if i % 3 == 2:  # truncation
            data = data[: int(rng.random() * len(data))]
        else:
            span = min(len(data), 1024) if i % 2 else len(data)
            for _ in range(int(rng.integers(1, 25))):
                data[int(rng.random() * span)] = int(rng.integers(256))
        t0 = time.perf_counter()
        try:
            load_study([("fuzz.bin", bytes(data))], LIMITS)
        except StudyLoadError:
            pass
        times.append(time.perf_counter() - t0)
    return times


def tiny_model_seconds(repeats: int = 3) -> list[float]:
    from mrg_core.models import tiny_model

    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tiny_model()
        out.append(time.perf_counter() - t0)
    return out


def locked_store_seconds() -> float:
    """Seconds until a save into a locked SQLite file is refused (StoreUnavailable)."""
    from mrg_core.storage import Store, StoreUnavailable
    from storage_writer import make_draft, make_study

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "locked.db"
        store = Store(f"sqlite:///{db}", busy_timeout_s=0.2)
        study = make_study(5)
        store.save_review(study, make_draft(), "earlier report", "r")
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            t0 = time.perf_counter()
            try:
                store.save_review(study, make_draft(), "new report", "r")
            except StoreUnavailable:
                pass
            else:
                raise AssertionError("a save into a locked database was not refused")
            return time.perf_counter() - t0
        finally:
            locker.execute("ROLLBACK")
            locker.close()
            store.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fuzz-inputs", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    loader = loader_times(args.fuzz_inputs)
    tiny = tiny_model_seconds()
    res = {
        "loader_inputs": len(loader),
        "loader_max_s": round(max(loader), 4),
        "loader_median_s": round(statistics.median(loader), 4),
        "tiny_model_s": round(min(tiny), 4),
        "locked_store_s": round(locked_store_seconds(), 4),
        "targets_s": TARGETS,
    }
    res["missed"] = sorted(k for k, limit in TARGETS.items() if res[k] >= limit)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 1 if res["missed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
