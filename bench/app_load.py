"""The running app under 1, 4 and 8 concurrent users, driven through gradio_client.

Each user is one browser-like session: load a sample study → analysis (probability + Grad-CAM)
→ Generate (streamed draft). Latency is measured per user from the load request to the last
streamed piece; throughput is drafts per second of wall time.

    python bench/app_load.py --model assets/model --users 1 4 8
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def start_app(model_dir: Path, db_url: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port),
                             "--model-dir", str(model_dir), "--db-url", db_url],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                time.sleep(1.0)
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the app did not start within 120 s")


def one_user(url: str, sample: str, out: list, errors: list) -> None:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        client.predict(sample, api_name="/load_sample")
        client.predict(api_name="/analyze_sample")
        t_analysis = time.perf_counter()
        job = client.submit("", api_name="/generate")
        t_first = None
        for update in job:
            text = update[0] if isinstance(update, (list, tuple)) else update
            if t_first is None and text:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        out.append({"analysis_s": t_analysis - t0, "first_token_s": (t_first or t_end) - t_analysis,
                    "total_s": t_end - t0})
    except Exception as err:  # a benchmark reports failures rather than dying mid-run
        errors.append(repr(err))


def bench_app(model_dir: Path, users=(1, 4, 8), rounds: int = 2) -> dict:
    from ui.handlers import list_samples

    samples = [value for _, value in list_samples()]
    ct = [s for s in samples if "ct_" in Path(s).name] or samples
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_app(model_dir, f"sqlite:///{tmp}/bench.db")
        try:
            one_user(url, ct[0], [], [])  # warm-up
            for n in users:
                lat, errors = [], []
                t0 = time.perf_counter()
                for _ in range(rounds):
                    threads = [threading.Thread(target=one_user, args=(url, ct[i % len(ct)], lat,
                                                                       errors)) for i in range(n)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                wall = time.perf_counter() - t0
                totals = [r["total_s"] for r in lat]
                results[f"users_{n}"] = {
                    "requests": len(lat), "errors": errors,
                    "p50_s": statistics.median(totals) if totals else None,
                    "p95_s": _pct(totals, 0.95) if totals else None,
                    "analysis_p50_s": statistics.median(r["analysis_s"] for r in lat) if lat else None,
                    "first_token_p50_s": statistics.median(r["first_token_s"] for r in lat)
                    if lat else None,
                    "throughput_drafts_per_s": len(lat) / wall}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=REPO / "assets" / "model")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = bench_app(a.model, tuple(a.users))
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
