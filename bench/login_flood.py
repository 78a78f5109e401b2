"""A flood of wrong logins against the real app on 127.0.0.1 (issue 19): how long an unrelated
request (the page) takes meanwhile, with the real PBKDF2 cost (600k iterations).

    python bench/login_flood.py [--logins 64] [--json bench/results/login_flood.json]

`guarded` is the app's login (mrg_core.auth.guard_logins: hashing on one worker thread, at
most 8 waiting, lockout); `plain` is the bare checker Gradio would call on its event loop.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _timed_get(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
    return time.perf_counter() - t


def _login(url: str, user: str) -> None:
    data = urllib.parse.urlencode({"username": user, "password": "wrong"}).encode()
    try:
        urllib.request.urlopen(urllib.request.Request(url + "login", data=data), timeout=300)
    except urllib.error.HTTPError:
        pass


def flood(kind: str, logins: int) -> dict:
    from mrg_core import auth
    from mrg_core.models import tiny_model
    from tests.e2e.serving import serve_app

    tmp = Path(tempfile.mkdtemp())
    tiny_model(method="prompt", family="gpt2", seed=0).save_pretrained(tmp / "model")
    check = auth.make_checker({"ada": auth.hash_password("right")})
    login = auth.guard_logins(check) if kind == "guarded" else check
    demo, engine = serve_app(tmp / "model", tmp / "r.db", auth=login)
    try:
        url = demo.local_url
        quiet = [_timed_get(url) for _ in range(5)]
        threads = [threading.Thread(target=_login, args=(url, f"user{i % 8}"))
                   for i in range(logins)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        during = []
        while any(t.is_alive() for t in threads) and len(during) < 20:
            during.append(_timed_get(url))
        for t in threads:
            t.join()
        return {"logins": logins, "flood_s": round(time.perf_counter() - t0, 2),
                "page_quiet_median_s": round(statistics.median(quiet), 4),
                "page_during_flood_max_s": round(max(during), 4) if during else None,
                "page_during_flood_median_s": round(statistics.median(during), 4)
                if during else None, "page_requests_during_flood": len(during)}
    finally:
        demo.close()
        engine.store.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--logins", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {"date": time.strftime("%Y-%m-%d"), "guarded": flood("guarded", args.logins),
           "plain": flood("plain", args.logins)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
