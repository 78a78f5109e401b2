"""The first drafts after the app starts, with and without the warm-up's seeded proposals.

    python bench/first_drafts.py --repeat 3 --json bench/results/cpu_first_drafts_seeded.json

Speculative decoding proposes tokens from earlier drafts (models/generation.py: DraftNgrams);
a fresh process has none, so its first drafts decode about one token per pass. app.py's
warm-up drafts the bundled phantoms first (Engine.seed_drafts). Each run is a fresh process
(the table lives in memory) holding the app's engine in its default form (int8-weights); the
two arms alternate, then the same COV-CTR val studies are drafted one after another.
Needs the shared data folder (MRG_DATA_DIR).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit  # noqa: E402

# two negatives (a PNG and a JPEG source) and two COVID-19 slices of COV-CTR val
STUDIES = ("1335.png", "14%1.jpg", "2020.02.25.20021568-p23-108%3.png",
           "PIIS0140673620301549_1.png")


def one_run(seed: bool, ids: list[str]) -> dict:
    """In this process: start the engine as app.py does, seed (or not), draft the studies."""
    from mrg_core.data.covctr import load_covctr
    from mrg_core.engine import Engine, EngineSettings
    from mrg_core.paths import SAMPLES_DIR

    engine = Engine.from_settings(EngineSettings(database_url="sqlite://",
                                                 precision="int8-weights"))
    engine.warm_up()
    t0 = time.perf_counter()
    seeded = engine.seed_drafts(sorted(SAMPLES_DIR.glob("*.dcm"))) if seed else 0
    seed_s = time.perf_counter() - t0
    val = {ex.id: ex for ex in load_covctr()["val"]}
    drafts = []
    for i in ids:
        study = engine.load([str(p) for p in val[i].image_paths])
        engine.analyze(study)
        t0 = time.perf_counter()
        text = "".join(engine.stream_report(study))
        drafts.append({"id": i, "s": round(time.perf_counter() - t0, 3), "text": text})
    return {"seeded": seed, "seed_drafts": seeded, "seed_s": round(seed_s, 2), "drafts": drafts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="runs of each arm, alternated")
    p.add_argument("--studies", nargs="+", default=list(STUDIES))
    p.add_argument("--json", type=Path)
    p.add_argument("--one", choices=("seeded", "empty"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one_run(a.one == "seeded", a.studies)))
        return 0
    runs = []
    for _ in range(a.repeat):
        for arm in ("empty", "seeded"):
            out = subprocess.run([sys.executable, __file__, "--one", arm, "--studies",
                                  *a.studies], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    texts = {}
    for r in runs:
        for d in r["drafts"]:
            texts.setdefault(d["id"], set()).add(d["text"])
    res = {"studies": a.studies, "runs": [{**r, "drafts": [{k: d[k] for k in ("id", "s")}
                                                           for d in r["drafts"]]} for r in runs],
           "drafts_identical_across_runs": all(len(v) == 1 for v in texts.values())}
    for arm in (False, True):
        mine = [r for r in runs if r["seeded"] is arm]
        res["seeded" if arm else "empty"] = {
            "first_draft_s_median": statistics.median(r["drafts"][0]["s"] for r in mine),
            "all_drafts_s_median": statistics.median(sum(d["s"] for d in r["drafts"])
                                                     for r in mine),
            "seed_s_median": statistics.median(r["seed_s"] for r in mine)}
    emit(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
