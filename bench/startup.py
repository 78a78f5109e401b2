"""Start-up of the app (issue 17): from `python app.py` to the page answering, and where the time
goes.

    python bench/startup.py [--model-dir assets/model] [--runs 3] [--json bench/results/startup.json]

`warm`: the usual start (bytecode already compiled). `cold`: a first start after installing,
with an empty bytecode cache (PYTHONPYCACHEPREFIX in a new temp folder), so every module of
torch, transformers and gradio is compiled again. The phases come from a separate in-process
run: imports (gradio, torch, transformers + peft), model load, warm-up, page build, launch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import emit, free_port  # noqa: E402


def time_to_page(model_dir: Path, env_extra: dict | None = None, timeout_s: float = 300) -> dict:
    """Seconds from spawning `python app.py` to the page's first HTTP 200, to the log line
    that says the warm-up finished, and to the one after it that says how many sample drafts
    seeded the draft proposals (with that count)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                            "MRG_UPLOAD_DIR": f"{tmp}/uploads", **(env_extra or {})}
        env.pop("GRADIO_TEMP_DIR", None)
        # appended by the app, read by name: a read/write handle would share its offset with
        # the child, and a seek(0) here would send the app's next lines over the file's start
        log_path = Path(tmp) / "app.log"
        log = open(log_path, "ab")  # noqa: SIM115 (closed in finally)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port),
                                 "--model-dir", str(model_dir), "--db-url",
                                 f"sqlite:///{tmp}/startup.db"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        page = warm = seeded = None
        try:
            while time.perf_counter() - t0 < timeout_s and proc.poll() is None:
                if page is None:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                            page = time.perf_counter() - t0
                    except OSError:
                        pass
                text = log_path.read_text(encoding="utf-8", errors="replace")
                if warm is None and "warm-up took" in text:
                    warm = time.perf_counter() - t0
                found = re.search(r"(\d+) sample drafts seeded", text)
                if seeded is None and (found or "warm-up failed" in text):
                    seeded = (time.perf_counter() - t0, int(found.group(1)) if found else 0)
                if page is not None and warm is not None and seeded is not None:
                    break
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    if page is None:
        raise RuntimeError("the app did not answer")
    return {"page_s": round(page, 2), "warm_up_done_s": None if warm is None else round(warm, 2),
            "seeded_s": None if seeded is None else round(seeded[0], 2),
            "seeded_drafts": None if seeded is None else seeded[1]}


PHASES = r"""
import json, sys, time
t = time.perf_counter(); out = {}
import gradio; out["import gradio"] = time.perf_counter() - t; t = time.perf_counter()
import torch; out["import torch"] = time.perf_counter() - t; t = time.perf_counter()
import transformers.modeling_utils, peft; out["import transformers + peft"] = time.perf_counter() - t
t = time.perf_counter()
from pathlib import Path
from mrg_core.engine import Engine, EngineSettings
from ui import build_app, launch_kwargs
out["import the app's own modules"] = time.perf_counter() - t; t = time.perf_counter()
engine = Engine.from_settings(EngineSettings(model_dir=Path(sys.argv[1]),
                                             database_url="sqlite:///" + sys.argv[2]))
out["model load + store"] = time.perf_counter() - t; t = time.perf_counter()
engine.warm_up(); out["warm-up (first analysis + draft)"] = time.perf_counter() - t
t = time.perf_counter()
demo = build_app(engine); out["page build"] = time.perf_counter() - t; t = time.perf_counter()
demo.queue().launch(prevent_thread_lock=True, quiet=True, server_port=int(sys.argv[3]),
                    **launch_kwargs(engine))
out["launch"] = time.perf_counter() - t
demo.close()
print(json.dumps({k: round(v, 2) for k, v in out.items()}))
"""


def phases(model_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", PHASES, str(model_dir), f"{tmp}/p.db",
                            str(free_port())], cwd=REPO, capture_output=True, text=True,
                           env=os.environ | {"GRADIO_ANALYTICS_ENABLED": "False",
                                             "HF_HUB_OFFLINE": "1"}, timeout=300)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_startup(model_dir: Path, runs: int = 3) -> dict:
    time_to_page(model_dir)  # the first start after a change compiles our own modules
    warm = [time_to_page(model_dir) for _ in range(runs)]
    with tempfile.TemporaryDirectory() as pyc:
        cold = time_to_page(model_dir, {"PYTHONPYCACHEPREFIX": pyc})
    return {"model_dir": str(model_dir), "cpu_count": os.cpu_count(),
            "load_average_at_start": round(os.getloadavg()[0], 2),
            "warm_page_s_median": statistics.median(w["page_s"] for w in warm),
            "warm_runs": warm, "cold_bytecode": cold, "phases_s": phases(model_dir)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=REPO / "assets" / "model")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    res = bench_startup(a.model_dir.resolve(), a.runs)
    emit(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
