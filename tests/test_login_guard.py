"""Password guessing and login floods (issue 19): the PBKDF2 check runs off the event loop on
one thread, a flood is refused without hashing past a bound, and a username with repeated wrong
passwords is locked (the right password too) for a while."""
from __future__ import annotations

import asyncio
import inspect
import threading
import urllib.error
import urllib.parse
import urllib.request

from mrg_core import auth
from mrg_core.auth import LoginPolicy, guard_logins

FAST = 1_000  # PBKDF2 iterations in tests


def run(coro):
    """asyncio.run on a thread of its own: an earlier test (Playwright) may have left an event
    loop running on this one."""
    out = {}

    def target():
        try:
            out["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    if "error" in out:
        raise out["error"]
    return out["value"]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_repeated_wrong_passwords_lock_the_username():
    users = {"ada": auth.hash_password("right", FAST), "bob": auth.hash_password("b", FAST)}
    clock = Clock()
    policy = LoginPolicy(max_failures=3, window_s=60, lockout_s=120)
    login = guard_logins(auth.make_checker(users), policy, clock)
    assert inspect.iscoroutinefunction(login)  # Gradio awaits only real coroutine functions
    assert run(login("ada", "right"))
    for _ in range(2):
        assert not run(login("ada", "guess"))
    clock.t += 61  # older failures leave the window
    for _ in range(2):
        assert not run(login("ada", "guess"))
    assert run(login("ada", "right"))  # 2 in the window: not locked, and success resets
    for _ in range(3):
        assert not run(login("ada", "guess"))
    assert not run(login("ada", "right"))  # locked: the right password is refused too
    assert run(login("bob", "b"))  # only that username
    clock.t += 121
    assert run(login("ada", "right"))


def test_a_flood_waits_for_one_hashing_thread_and_the_rest_is_refused_unhashed():
    release, calls = threading.Event(), []

    def slow_check(user, password):
        calls.append(threading.current_thread().name)
        release.wait(10)
        return False

    login = guard_logins(slow_check, LoginPolicy(max_waiting=3, max_failures=1000))

    async def flood():
        tasks = [asyncio.create_task(login(f"u{i}", "x")) for i in range(10)]
        await asyncio.sleep(0.2)
        # the event loop is free while a hash runs: this coroutine got here
        assert len(calls) == 1 and calls[0].startswith("login-hash")
        release.set()
        return await asyncio.gather(*tasks)

    assert run(flood()) == [False] * 10
    assert len(calls) == 3  # 7 of the 10 were refused without hashing


def _post_login(url, user, password, out):
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "login", data=data),
                                    timeout=30) as r:
            out.append(r.status)
    except urllib.error.HTTPError as e:
        out.append(e.code)


def _get_status(url, out):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            out.append(r.status)
    except urllib.error.HTTPError as e:
        out.append(e.code)


def test_a_running_hash_does_not_stall_the_server(tmp_path):
    """A real server on 127.0.0.1: while a login's password check is still running, another
    request is answered (before, the check ran on the event loop and every request waited)."""
    from mrg_core.models import tiny_model
    from tests.e2e.serving import serve_app

    tiny_model(method="prompt", family="gpt2", seed=0).save_pretrained(tmp_path / "model")
    started, release = threading.Event(), threading.Event()
    users = {"ada": auth.hash_password("right", FAST)}
    real = auth.make_checker(users)

    def check(user, password):
        started.set()
        release.wait(20)
        return real(user, password)

    login = guard_logins(check, LoginPolicy(max_failures=2, lockout_s=600))
    demo, engine = serve_app(tmp_path / "model", tmp_path / "r.db", auth=login)
    try:
        url = demo.local_url
        statuses: list[int] = []
        t = threading.Thread(target=_post_login, args=(url, "ada", "wrong", statuses))
        t.start()
        assert started.wait(20)
        answered: list[int] = []
        other = threading.Thread(target=_get_status, args=(url, answered))
        other.start()
        other.join(8)
        during = list(answered)  # what came back before the check was let go
        release.set()
        t.join(30)
        other.join(30)
        # the login page is answered while the check still runs
        assert during == [200], during
        assert statuses and statuses[0] >= 400
        # lockout through the real login route: 2 wrong, then the right one is refused
        _post_login(url, "ada", "wrong", statuses)
        _post_login(url, "ada", "right", statuses)
        assert statuses[1] >= 400 and statuses[2] >= 400, statuses
    finally:
        release.set()
        demo.close()
        engine.store.close()
