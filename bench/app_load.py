"""The running app under 1, 4 and 8 concurrent users, driven through gradio_client.

Each user is one browser-like session: load a sample study → analysis (probability + Grad-CAM)
→ Generate (streamed draft). A round's users all have the page open (client connected) before
any of them picks a study, as radiologists at their workstations do; latency is measured per
user from the load request to the last streamed piece; throughput is drafts per second of wall
time.

    python bench/app_load.py --model assets/model --users 1 4 8 --rounds 3 \
        --json bench/results/cpu_app.json
    python bench/app_load.py --app-args="--decode-threads 2"   # another app setting
    python bench/app_load.py --baseline-app ../old/app.py --repeat 2 --rounds 3 \
        --json bench/results/cpu_app_before_after.json        # before / after, alternated

gradio_client itself polls (50 ms sleeps while it waits for a message), so a figure here is the
server's time plus up to ~50 ms per request of client wait; a browser has no such wait.
`--client raw` makes the page's own calls (the viewer renders and the history too, which
gradio_client does not run) over its queue protocol with httpx, messages read as they arrive:
closer to a browser, and what the server alone costs.
MRG_BENCH_APP_LOG=FILE appends the served app's own log (its errors) to FILE: a draft that
fails ends early, and only its log tells it from a fast one.
"""
from __future__ import annotations

import argparse
import atexit
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

from bench.common import free_port, machine  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# The app's own log lines that end its start-up work (app.py: warm_up). Until then its
# warm-up thread drafts the bundled samples on the same cores as the users' drafts: on a 2-core
# AVX2 host that took ~10 s and made a lone user's draft 7 s instead of 3.7 s.
WARM_UP_DONE = (b"sample drafts seeded", b"warm-up failed")
WARM_UP_WAIT_S = 300.0  # an older app without the line (--baseline-app) is waited for this long


def wait_for_warm_up(log: Path, since: int, timeout_s: float = WARM_UP_WAIT_S,
                     poll_s: float = 0.2) -> float | None:
    """Seconds until the app's log `log` (from byte `since`) says its warm-up ended, or None
    when it has not said so within `timeout_s`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        with open(log, "rb") as f:
            f.seek(since)
            if any(line in f.read() for line in WARM_UP_DONE):
                return time.perf_counter() - t0
        time.sleep(poll_s)
    return None


def start_app(model_dir: Path, db_url: str, app_args=(), app: Path | None = None
              ) -> tuple[subprocess.Popen, str]:
    """app.py of this repository (or `app`, e.g. an older checkout's, to compare) on a free
    port; returns the process and its URL once it answers and its warm-up has ended (the
    time waited for that is `proc.warm_up_wait_s`, None where the app never said so)."""
    port = free_port()
    app = Path(app) if app else REPO / "app.py"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    # the app's own log (errors, the end of its warm-up): appended to MRG_BENCH_APP_LOG
    log = os.environ.get("MRG_BENCH_APP_LOG")
    if not log:
        log = tempfile.NamedTemporaryFile(prefix="mrg-app-", suffix=".log", delete=False).name
        atexit.register(Path(log).unlink, missing_ok=True)
    log = Path(log)
    since = log.stat().st_size if log.exists() else 0
    err = open(log, "ab")  # noqa: SIM115 (the app's lifetime)
    proc = subprocess.Popen([sys.executable, str(app), "--port", str(port),
                             "--model-dir", str(model_dir), "--db-url", db_url, *app_args],
                            cwd=app.parent, env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                proc.warm_up_wait_s = wait_for_warm_up(log, since)
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the app did not start within 120 s")


POLL_S = 0.005  # how often a user's thread looks for streamed text


def _text(update) -> str:
    return update[0] if isinstance(update, (list, tuple)) else update


def _ready(start: threading.Barrier | None) -> None:
    """Wait for the round's other users: every page is open before anyone picks a study."""
    if start is not None:
        start.wait(timeout=300)


def one_user(url: str, sample: str, out: list, errors: list,
             start: threading.Barrier | None = None) -> None:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False)
        _ready(start)
        t0 = time.perf_counter()
        client.predict(sample, api_name="/load_sample")
        client.predict(api_name="/analyze_sample")
        t_analysis = time.perf_counter()
        job = client.submit("", api_name="/generate")
        t_first = None
        # Not `for update in job`: its 1 ms busy wait per user would take the CPU the app
        # needs (8 users = 8000 wake-ups a second on a 2-core machine).
        while True:
            done = job.done()
            if t_first is None and any(_text(u) for u in job.outputs()):
                t_first = time.perf_counter()
            if done:
                break
            time.sleep(POLL_S)
        job.result()  # raises the app's error, if any
        t_end = time.perf_counter()
        out.append({"analysis_s": t_analysis - t0, "first_token_s": (t_first or t_end) - t_analysis,
                    "total_s": t_end - t0})
    except Exception as err:  # a benchmark reports failures rather than dying mid-run
        errors.append(repr(err))
        if start is not None:
            start.abort()  # the others must not wait for a user who is gone


def one_user_raw(url: str, sample: str, out: list, errors: list,
                 start: threading.Barrier | None = None) -> None:
    """What the page itself does, over Gradio's queue protocol (httpx, one keep-alive
    connection, messages read as they arrive): load the sample, then every event chained after
    it (view, analysis, view with overlay, history), then Generate."""
    import uuid

    import httpx

    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=120) as http:
            cfg = http.get(f"{base}/config").json()
            deps = {d["id"]: d for d in cfg["dependencies"]}
            comps = {c["id"]: c for c in cfg["components"]}
            by_name = {d["api_name"]: d for d in deps.values() if d.get("api_name")}
            session = uuid.uuid4().hex[:12]
            _ready(start)

            def page_values(dep: dict) -> list:  # what the page sends: widget values
                return [None if comps[i]["type"] == "state" else
                        comps[i].get("props", {}).get("value") for i in dep["inputs"]]

            def call(dep: dict, data: list, on_update=None) -> None:
                r = http.post(f"{base}/gradio_api/queue/join",
                              json={"data": data, "fn_index": dep["id"], "session_hash": session,
                                    "trigger_id": None, "event_data": None})
                r.raise_for_status()
                event = r.json()["event_id"]
                with http.stream("GET", f"{base}/gradio_api/queue/data",
                                 params={"session_hash": session}) as resp:
                    for line in resp.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        msg = json.loads(line[5:])
                        if msg.get("event_id") != event:
                            continue
                        if msg["msg"] == "process_generating" and on_update:
                            on_update()
                        if msg["msg"] == "process_completed":
                            if not msg.get("success", True):
                                raise RuntimeError(f"{dep.get('api_name')} failed: "
                                                   f"{msg.get('output')}")
                            return

            t0 = time.perf_counter()
            dep = by_name["load_sample"]
            call(dep, [None, sample])  # None: the session's gr.State
            while nxt := [d for d in deps.values() if d.get("trigger_after") == dep["id"]]:
                dep = nxt[0]
                call(dep, page_values(dep))
            t_analysis = time.perf_counter()
            stamps: list[float] = []
            call(by_name["generate"], [None, ""], lambda: stamps.append(time.perf_counter()))
            t_end = time.perf_counter()
        # the first update only locks the editor; the second carries the first text
        t_first = stamps[1] if len(stamps) > 1 else t_end
        out.append({"analysis_s": t_analysis - t0, "first_token_s": t_first - t_analysis,
                    "total_s": t_end - t0})
    except Exception as err:
        errors.append(repr(err))
        if start is not None:
            start.abort()


CLIENTS = {"gradio": one_user, "raw": one_user_raw}


def bench_app(model_dir: Path, users=(1, 4, 8), rounds: int = 2, app_args=(),
              app: Path | None = None, client: str = "gradio") -> dict:
    from ui.handlers import list_samples

    root = Path(app).resolve().parent if app else REPO  # the served app's own samples
    samples = [value for _, value in list_samples(root / "assets" / "samples")]
    ct = [s for s in samples if "ct_" in Path(s).name] or samples
    user = CLIENTS[client]
    results: dict = {"client": client, "app_args": list(app_args), "rounds": rounds,
                     "machine": machine(), "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_app(model_dir, f"sqlite:///{tmp}/bench.db", app_args, app)
        results["app_warm_up_wait_s"] = proc.warm_up_wait_s
        try:
            user(url, ct[0], [], [])  # warm-up
            for n in users:
                lat, errors = [], []
                t0 = time.perf_counter()
                for _ in range(rounds):
                    start = threading.Barrier(n)
                    threads = [threading.Thread(target=user, args=(url, ct[i % len(ct)], lat,
                                                                   errors, start))
                               for i in range(n)]
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
    results["load_average_at_end"] = os.getloadavg()[0]
    return results


def compare_apps(model_dir: Path, variants: dict, users=(1, 4, 8), rounds: int = 3,
                 repeat: int = 2, client: str = "gradio") -> dict:
    """Several apps / settings ({name: (app.py or None, app_args)}) measured alternately,
    `repeat` times each: on a busy machine every variant meets the same conditions. The
    summary gives, per variant and user count, the median over repeats of p50 / p95."""
    runs: dict = {name: [] for name in variants}
    for _ in range(repeat):
        for name, (app, args) in variants.items():
            runs[name].append(bench_app(model_dir, users, rounds, args, app, client))
    summary = {name: {f"users_{n}": {
        k: statistics.median(r[f"users_{n}"][k] for r in rs)
        for k in ("p50_s", "p95_s", "throughput_drafts_per_s")}
        for n in users} for name, rs in runs.items()}
    return {"client": client, "rounds": rounds, "repeat": repeat, "summary": summary,
            "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "assets" / "model")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all users at once")
    ap.add_argument("--app-args", default="", help="extra app.py flags, one string")
    ap.add_argument("--app", type=Path, help="another app.py to serve (e.g. an older checkout)")
    ap.add_argument("--baseline-app", type=Path,
                    help="compare: this app.py (e.g. a checkout of the previous commit) and "
                         "ours, alternately, --repeat times each")
    ap.add_argument("--repeat", type=int, default=2, help="--baseline-app repeats")
    ap.add_argument("--client", choices=sorted(CLIENTS), default="gradio",
                    help="gradio: gradio_client, the three named endpoints (adds its own "
                         "waits); raw: every call the page makes, over httpx")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.baseline_app:
        res = compare_apps(a.model, {"baseline": (a.baseline_app, ()),
                                     "this": (a.app, tuple(a.app_args.split()))},
                           tuple(a.users), a.rounds, a.repeat, a.client)
    else:
        res = bench_app(a.model, tuple(a.users), a.rounds, tuple(a.app_args.split()), a.app,
                        a.client)
    print(json.dumps(res.get("summary", res), indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
