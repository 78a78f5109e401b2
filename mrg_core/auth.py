"""Optional sign-in: an auth file of `username:<hash>` lines, checked by Gradio's login page.

    python -m mrg_core.auth add-user users.txt ada      # asks for the password (or reads stdin)
    python -m mrg_core.auth add-user users.txt root --admin   # an administrator

Line format: `username:<hash>` or `username:<hash>:admin`. Hash format:
`pbkdf2_sha256$<iterations>$<salt-hex>$<hash-hex>` (hashlib.pbkdf2_hmac). A line whose password
part is not such a hash is refused: plain-text passwords are never accepted.

Roles: "admin" may switch the live model and start fine-tuning (the Model panel); every other
signed-in user may read studies and save reports only. Files without roles still load (nobody
is an admin then).
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000  # OWASP 2023 figure for PBKDF2-HMAC-SHA256
_HASH = re.compile(r"^pbkdf2_sha256\$(\d{1,9})\$([0-9a-f]{16,256})\$([0-9a-f]{64})$")
_USER = re.compile(r"^[^\s:#][^\s:]{0,127}$")
ADMIN = "admin"
ROLES = (ADMIN,)


class AuthFileError(ValueError):
    """The auth file cannot be used; the message never repeats a password."""


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS,
                  salt: bytes | None = None) -> str:
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, int(iterations))
    return f"{SCHEME}${int(iterations)}${salt.hex()}${digest.hex()}"


def is_hash(text: str) -> bool:
    m = _HASH.match(text)
    return bool(m) and int(m.group(1)) > 0


def verify_password(password: str, encoded: str) -> bool:
    m = _HASH.match(encoded or "")
    if not m or int(m.group(1)) <= 0:
        return False
    iterations, salt, want = int(m.group(1)), bytes.fromhex(m.group(2)), m.group(3)
    got = hashlib.pbkdf2_hmac("sha256", (password or "").encode("utf-8"), salt, iterations)
    return hmac.compare_digest(got.hex(), want)


def read_auth_file(path: str | os.PathLike) -> dict[str, str]:
    """{username: hash}. Raises AuthFileError on a plain-text password or a malformed line."""
    return read_users(path)[0]


def read_admins(path: str | os.PathLike) -> frozenset[str]:
    """The usernames with the admin role."""
    return read_users(path)[1]


def read_users(path: str | os.PathLike) -> tuple[dict[str, str], frozenset[str]]:
    """({username: hash}, admins). Raises AuthFileError on a plain-text password, a malformed
    line or an unknown role."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AuthFileError(f"{path}: cannot read the auth file ({exc.strerror})") from None
    users: dict[str, str] = {}
    admins: set[str] = set()
    for no, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        secret, _, role = secret.partition(":")  # the hash has no ':'
        if not sep or not _USER.match(user):
            raise AuthFileError(f"{path}, line {no}: expected username:{SCHEME}$… ")
        if not is_hash(secret):  # do not echo the line: it may hold a real password
            raise AuthFileError(
                f"{path}, line {no} (user {user!r}): the password is not a {SCHEME} hash. "
                "Plain-text passwords are refused; create the entry with "
                f"`python -m mrg_core.auth add-user {path} {user}`.")
        role = role.strip()
        if role and role not in ROLES:
            raise AuthFileError(f"{path}, line {no} (user {user!r}): unknown role {role!r} "
                                f"(known: {', '.join(ROLES)})")
        users[user] = secret
        if role == ADMIN:
            admins.add(user)
    if not users:
        raise AuthFileError(f"{path}: no user found; add one with "
                            f"`python -m mrg_core.auth add-user {path} USERNAME`")
    return users, frozenset(admins)


def make_checker(users: dict[str, str]) -> Callable[[str, str], bool]:
    """The callable Gradio's `auth=` takes. An unknown user costs the same hashing time as a
    known one, so a login's timing does not say which usernames exist."""
    dummy = next(iter(users.values()))

    def check(username: str, password: str) -> bool:
        encoded = users.get(username)
        ok = verify_password(password, encoded or dummy)
        return ok and encoded is not None

    return check


def load_auth(path: str | os.PathLike | None) -> Callable[[str, str], bool] | None:
    """None when sign-in is off; else the checker for the file (read once, at start). The
    checker's `admins` attribute holds the admin usernames (is_admin)."""
    if path is None:
        return None
    users, admins = read_users(path)
    check = make_checker(users)
    check.admins = admins
    return check


@dataclass(frozen=True)
class LoginPolicy:
    """Limits on password guessing (guard_logins)."""

    max_failures: int = 5  # wrong passwords for one username within window_s ...
    window_s: float = 300.0
    lockout_s: float = 300.0  # ... lock that username this long (right password refused too)
    max_waiting: int = 8  # logins hashing or queued; beyond it a login is refused unhashed


def guard_logins(check: Callable[[str, str], bool], policy: LoginPolicy = LoginPolicy(),
                 clock: Callable[[], float] = time.monotonic):
    """Gradio's `auth=` as a coroutine function around a (slow, PBKDF2) checker:
    - the hash runs on one worker thread, never on the event loop, so a flood of logins does not
      stall pages and signed-in users (each hash takes ~0.15 s of CPU);
    - at most policy.max_waiting logins wait for it; more are refused without hashing;
    - a username with policy.max_failures wrong passwords within window_s is locked for
      lockout_s: every login for it is refused, the right password included.
    The result keeps the checker's `admins` (is_admin). Gradio awaits it only because it is a
    real `async def` function (an object with an async __call__ would be called without await
    and its coroutine taken as True)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="login-hash")
    failures: dict[str, deque] = defaultdict(deque)
    locked_until: dict[str, float] = {}
    waiting = 0

    async def guarded(username: str, password: str) -> bool:
        nonlocal waiting
        now = clock()
        if locked_until.get(username, 0.0) > now:
            log.warning("login refused: the username is locked after repeated failures")
            return False
        if waiting >= policy.max_waiting:
            log.warning("login refused: %d logins already waiting", waiting)
            return False
        waiting += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(pool, check, username,
                                                                  password)
        finally:
            waiting -= 1
        recent = failures[username]
        if ok:
            recent.clear()
            return True
        now = clock()
        recent.append(now)
        while recent and recent[0] <= now - policy.window_s:
            recent.popleft()
        if len(recent) >= policy.max_failures:
            locked_until[username] = now + policy.lockout_s
            recent.clear()
            log.warning("a username is locked for %.0f s after %d wrong passwords",
                        policy.lockout_s, policy.max_failures)
        if len(failures) > 10_000:  # unknown usernames must not grow memory without end
            failures.clear()
        return False

    guarded.admins = getattr(check, "admins", frozenset())
    guarded.policy = policy
    return guarded


def is_admin(auth, username: str | None) -> bool:
    """True when sign-in is on and `username` has the admin role. A checker made without
    roles (a bare callable) has no admins."""
    return bool(auth) and bool(username) and username in getattr(auth, "admins", frozenset())


def add_user(path: str | os.PathLike, username: str, password: str,
             iterations: int = DEFAULT_ITERATIONS, admin: bool = False) -> None:
    """Add or replace one user (with the admin role when `admin`); other lines are kept as
    they are. The file is created 0600."""
    if not _USER.match(username or ""):
        raise AuthFileError("a username is 1-128 characters without spaces or ':'")
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.strip().partition(":")[0] != username]
    role = f":{ADMIN}" if admin else ""
    kept.append(f"{username}:{hash_password(password, iterations)}{role}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(kept) + "\n")


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise AuthFileError("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")  # piped: the first line is the password


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mrg_core.auth",
                                description="Manage the MRG Studio sign-in file.")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add-user", help="add or replace a user (password from the terminal, "
                                          "or the first line of stdin)")
    add.add_argument("file", type=Path)
    add.add_argument("username")
    add.add_argument("--admin", action="store_true",
                     help="give the user the admin role: switch the live model, fine-tune")
    add.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                     help=f"PBKDF2 iterations (default {DEFAULT_ITERATIONS})")
    args = p.parse_args(argv)
    try:
        if args.iterations < 1:
            raise AuthFileError("--iterations must be positive")
        password = _read_password()
        if not password:
            raise AuthFileError("the password is empty")
        add_user(args.file, args.username, password, args.iterations, admin=args.admin)
    except AuthFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    role = " (admin)" if args.admin else ""
    print(f"user {args.username!r}{role} written to {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
