"""A whole CT series through the app's engine (issue 16): load + analysis time, peak memory, and
the time to show another slice (window + Grad-CAM overlay on demand + PNG, as the viewer does).

    python bench/series.py [--slices 300] [--size 512] [--model-dir assets/model]
                           [--json bench/results/series.json]

The series is generated (phantom slices, 16-bit CT DICOM, files in shuffled order) in a temp
folder; the measurement runs in a fresh process so its peak RSS is the series' own.
Targets (2-core CPU): 300 × 512² loaded and analysed < 10 s, peak < 2 GB, a slice < 100 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import emit  # noqa: E402


def write_series(folder: Path, n: int, size: int) -> None:
    from mrg_core.samples import make_ct_phantom, write_ct_dicom

    folder.mkdir(parents=True, exist_ok=True)
    base = [make_ct_phantom(seed=s, covid=s % 2 == 1, size=size) for s in range(8)]
    order = list(range(n))
    random.Random(0).shuffle(order)
    for i in order:
        ds = write_ct_dicom(folder / f"{i * 7919 % 100003:06d}.dcm", base[i % 8], seed="bench")
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.9.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [-size * 0.35, -size * 0.35, -1.25 * i]
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"{i * 7919 % 100003:06d}.dcm", enforce_file_format=True)


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
t0 = time.perf_counter()
from mrg_core.engine import Engine, EngineSettings
from ui.handlers import png_file, render_view
from ui.state import Session
engine = Engine.from_settings(EngineSettings(model_dir=Path(sys.argv[2]),
                                             database_url="sqlite:///" + sys.argv[3]))
engine.warm_up()
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t1 = time.perf_counter()
(study,) = engine.load_series([sys.argv[1]])
t2 = time.perf_counter()
analysis = engine.analyze(study)
t3 = time.perf_counter()
session = Session()
session.reset_study(study, "bench")
session.analysis = analysis
slices = []
for i in range(0, len(study.views), max(1, len(study.views) // 20)):
    s = time.perf_counter()
    if analysis.heatmaps[i] is None:  # what the viewer does for a slice not seen yet
        analysis.heatmaps[i] = engine.view_heatmap(study, i)
    png_file(render_view(engine, session, i, "lung"), sys.argv[4])
    slices.append(time.perf_counter() - s)
print(json.dumps({"slices": len(study.views), "load_s": round(t2 - t1, 2),
                  "analyse_s": round(t3 - t2, 2), "load_and_analyse_s": round(t3 - t1, 2),
                  "slice_view_s_median": round(float(np.median(slices)), 4),
                  "slice_view_s_max": round(max(slices), 4),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "rss_before_load_mb": round(rss_before),
                  "key_views": list(analysis.key_views), "probability": analysis.probability}))
"""


def bench_series(n: int = 300, size: int = 512, model_dir: Path = REPO / "assets" / "model"):
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_series(Path(tmp) / "series", n, size)
        written = time.perf_counter() - t
        (Path(tmp) / "png").mkdir()
        r = subprocess.run([sys.executable, "-c", CHILD, f"{tmp}/series", str(model_dir),
                            f"{tmp}/b.db", f"{tmp}/png"], cwd=REPO, capture_output=True,
                           text=True, timeout=900,
                           env=os.environ | {"GRADIO_ANALYTICS_ENABLED": "False",
                                             "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(size=size, generate_s=round(written, 1), cpu_count=os.cpu_count(),
               load_average_at_start=round(os.getloadavg()[0], 2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--model-dir", type=Path, default=REPO / "assets" / "model")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    res = bench_series(a.slices, a.size, a.model_dir.resolve())
    emit(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
