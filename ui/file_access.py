"""Who may fetch which file in Gradio's upload folder, how much of it one user may fill, and how
long files stay there (issue 19, PHI at rest). Gradio 6 itself serves any file in its upload
folder to anyone signed in who has the URL, lets any client fill the folder, and keeps the
page's images and export files until the app stops.

One ASGI middleware (FileGuard, given to the launch as `app_kwargs["middleware"]`) and one
lifespan (FileAccess.lifespan, `app_kwargs["lifespan"]`) add:

- **Holders.** Every file inside the upload folder that the server hands to a client (the
  upload reply; a file value, `"path": ...`, in queue messages and API replies; never a path
  quoted in free text) is recorded as held by that client: the signed-in user, or without
  sign-in the browser (an `mrg-client` cookie set with the page; a client without cookies: its
  address). `GET /gradio_api/file=…` of an upload-folder file the requester does not hold
  answers 403 "File not allowed: …", what Gradio answers for a file that does not exist; an
  event or API call whose body names an upload-folder file the requester does not hold is
  refused (403) before it runs. A session (Gradio's session hash) belongs to the client that
  first used it: another client cannot join it, read its messages or end it.
  (Without sign-in, a browser that refuses cookies, or clients behind one proxy, share one
  address: sign-in is what scopes files per person.)
- **Caps.** An upload whose size (Content-Length; required) would take the requester's held
  files over the per-user cap is refused with 413; one that would take what the app keeps in
  the folder over the total cap, or the disk under 64 MiB free, with 507; both with a
  plain-text reason that the page shows. What the app keeps: in its own folder everything in
  it, in an operator's GRADIO_TEMP_DIR the files it handed out or received and its private
  folders. Uploads in flight count towards both.
- **Purge.** When a page's session ends (its heartbeat connection closes: tab closed, reloaded,
  app stopping) the files only that session held are deleted; every `ttl/4` (at most 5 min)
  files written and last sent more than the TTL ago are deleted: in the app's own upload
  folder everything, in an operator's GRADIO_TEMP_DIR only the files this app handed out or
  received and its private folders (`private_dir`). At stop, all of those go.
- Two Gradio routes that would write session data into the folder and that this page does not
  use (`/gradio_api/deep_link`, `/gradio_api/process_recording`) answer 404.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

log = logging.getLogger(__name__)

MiB = 2**20
API = "/gradio_api/"
CLIENT_COOKIE = "mrg-client"  # SameSite=None; Secure; Partitioned: also in an https iframe
CLIENT_COOKIE_LAX = "mrg-client-lax"  # the same value for plain http (Secure is dropped there)
MIN_FREE_BYTES = 64 * MiB  # an upload never leaves the disk with less than this
MAX_BODY_BYTES = 32 * MiB  # event/API request bodies read whole to check the files they name
BLOCKED = ("deep_link", "process_recording")  # Gradio routes unused here that write to disk
CHECKED_POSTS = ("queue/join", "run/", "api/", "call/", "component_server", "cancel")

# Private folders (ui.layout's viewer PNGs and export files) made inside the upload folder;
# per process (one app in production; the tests' servers share them).
_PRIVATE_DIRS: dict[str, float] = {}  # real path → when made
_LIVE: set[int] = set()  # ids of the FileAccess objects whose server runs
_LIVE_LOCK = threading.Lock()


def private_dir(prefix: str) -> str:
    """A new folder for files the app writes for the page (viewer PNGs, export files), inside
    the upload folder: Gradio then serves them as they are (no second copy in its cache), the
    guard only to the clients they were sent to, and the purges delete them."""
    from .upload_cache import upload_folder

    root = upload_folder()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = tempfile.mkdtemp(prefix=prefix, dir=root)
    _PRIVATE_DIRS[os.path.realpath(path)] = time.time()
    return path


# ----------------------------------------------------------------------------- policy

@dataclass(frozen=True)
class FilePolicy:
    """Caps and TTL. Defaults (from_env): per user the largest study the loader accepts (its
    limit on all files of one upload together; at least 2 x the one-file upload limit), so the
    cap never refuses a study a user sends alone; in total 4 x that; files deleted an hour
    after they were written or last sent."""
    user_quota: int  # bytes one user's held files may take
    total_quota: int  # bytes the whole upload folder may take
    ttl_s: float = 3600.0
    sweep_all: bool = False  # the folder is the app's own: every file in it is swept by age

    @property
    def sweep_every_s(self) -> float:
        return min(300.0, max(0.5, self.ttl_s / 4))

    @classmethod
    def from_env(cls, limits, environ=os.environ, own_folder: bool = False) -> FilePolicy:
        """`limits`: the loader's (mrg_core.io.LoadLimits). MRG_USER_QUOTA_MB,
        MRG_UPLOAD_QUOTA_MB (MiB) and MRG_FILE_TTL_MIN (minutes) override the defaults;
        ValueError on a value that is not a positive number."""
        study = max(2 * limits.max_file_bytes, limits.max_total_bytes) / MiB
        user = _positive(environ, "MRG_USER_QUOTA_MB", study)
        total = _positive(environ, "MRG_UPLOAD_QUOTA_MB", 4 * study)
        ttl = _positive(environ, "MRG_FILE_TTL_MIN", 60.0)
        return cls(user_quota=int(user * MiB), total_quota=int(total * MiB), ttl_s=ttl * 60,
                   sweep_all=own_folder)


def _positive(environ, name: str, default: float) -> float:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, not {raw!r}")
    return value


# ----------------------------------------------------------------------------- holders

@dataclass
class _Held:
    holders: dict[tuple[str, str | None], float] = field(default_factory=dict)


class Holdings:
    """path → {(client, session): when}. Thread-safe (the sweep runs in a worker thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._paths: dict[str, _Held] = {}

    def hold(self, path: str, who: str, session: str | None = None,
             when: float | None = None) -> None:
        with self._lock:
            self._paths.setdefault(path, _Held()).holders[(who, session)] = \
                time.time() if when is None else when

    def holds(self, path: str, who: str) -> bool:
        with self._lock:
            held = self._paths.get(path)
            return held is not None and any(w == who for w, _ in held.holders)

    def paths(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def last_sent(self, path: str) -> float:
        with self._lock:
            held = self._paths.get(path)
            return max(held.holders.values(), default=0.0) if held else 0.0

    def usage(self, who: str) -> int:
        with self._lock:
            mine = [p for p, h in self._paths.items() if any(w == who for w, _ in h.holders)]
        return sum(_size(p) for p in mine)

    def end_session(self, session: str) -> list[str]:
        """Forget the session's holds; returns the paths nobody holds any more."""
        orphans = []
        with self._lock:
            for path, held in list(self._paths.items()):
                gone = [k for k in held.holders if k[1] == session]
                for k in gone:
                    del held.holders[k]
                if gone and not held.holders:
                    del self._paths[path]
                    orphans.append(path)
        return orphans

    def forget(self, paths) -> None:
        with self._lock:
            for p in paths:
                self._paths.pop(p, None)

    def stale(self, grace_s: float = 60.0) -> list[str]:
        """Paths whose file is gone (loaded upload, swept) and that were last held a while ago
        (an upload may be moved into place just after its reply)."""
        now = time.time()
        with self._lock:
            items = [(p, max(h.holders.values(), default=0)) for p, h in self._paths.items()]
        return [p for p, t in items if now - t > grace_s and not os.path.lexists(p)]


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


# ----------------------------------------------------------------------------- the state

class FileAccess:
    """Per launched app: policy, holders, session owners, uploads in flight, the sweep."""

    def __init__(self, policy: FilePolicy, root: str | os.PathLike | None = None):
        self.policy = policy
        raw = str(root) if root is not None else _gradio_upload_dir()
        self.root = os.path.realpath(raw)
        prefixes = sorted({self.root, os.path.abspath(raw).rstrip(os.sep)}, key=len, reverse=True)
        inside = (b"(?:" + b"|".join(re.escape(p.encode()) for p in prefixes)
                  + rb')/(?:[^"\\]|\\.)*')  # the rest of a JSON string (escapes decoded later)
        # Replies: only a file value, "path": "..." (or a diff's ["replace", [.., "path"], ".."]):
        # an unescaped quote is JSON structure, so text echoed back can never look like one.
        self._named = re.compile(rb'"path"(?::|\],)"(' + inside + b')"')
        self.started = math.inf  # when the server started (lifespan)
        self.holdings = Holdings()
        self.sessions: dict[str, tuple[str, float]] = {}  # session hash → (client, last seen)
        self.inflight: dict[int, tuple[str, int]] = {}  # upload id → (client, bytes)
        self.public: set[str] = set()  # files Gradio cached when the page was built

    # -------------------------------------------------------------- who is asking
    def client(self, scope) -> str | None:
        """"user:NAME" when signed in; without sign-in "client:COOKIE" or "ip:ADDRESS"; None
        when sign-in is on and the request has no valid sign-in (Gradio answers 401)."""
        app = scope.get("app")
        cookies = _cookies(scope)
        if getattr(app, "auth", None) is not None or getattr(app, "auth_dependency", None):
            cid = getattr(app, "cookie_id", "")
            token = cookies.get(f"access-token-{cid}") or \
                cookies.get(f"access-token-unsecure-{cid}")
            user = getattr(app, "tokens", {}).get(token) if token else None
            return f"user:{user}" if user else None
        c = cookies.get(CLIENT_COOKIE) or cookies.get(CLIENT_COOKIE_LAX) or ""
        if re.fullmatch(r"[A-Za-z0-9_-]{20,64}", c):
            return f"client:{c}"
        host = (scope.get("client") or ("?",))[0]
        return f"ip:{host}"

    # -------------------------------------------------------------- files
    def inside(self, path: str) -> str | None:
        """The real path when `path` lies inside the upload folder, else None."""
        try:
            real = os.path.realpath(path)
        except (ValueError, OSError):
            return None
        return real if real.startswith(self.root + os.sep) else None

    def may_read(self, real: str, who: str) -> bool:
        return real in self.public or self.holdings.holds(real, who)

    def named_in_request(self, body: bytes) -> set[str]:
        """Upload-folder files a JSON request body names (real paths): any string in it that
        resolves into the folder, relative ones from the working directory as Gradio does."""
        try:
            stack = [json.loads(body)]
        except ValueError:
            return set()
        found = set()
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, list):
                stack.extend(x)
            elif isinstance(x, str) and "/" in x and len(x) < 4096:
                real = self.inside(x)
                if real is not None:
                    found.add(real)
        return found

    def _real(self, raw: bytes) -> str | None:
        try:
            text = json.loads(b'"' + raw + b'"')
        except ValueError:
            return None
        return self.inside(text)

    # -------------------------------------------------------------- sessions
    def claim_session(self, session: str, who: str) -> bool:
        """True when the session is the client's (the first client to use it owns it)."""
        owner = self.sessions.setdefault(session, (who, time.time()))[0]
        if owner == who:
            self.sessions[session] = (who, time.time())
        return owner == who

    def end_session(self, session: str) -> int:
        self.sessions.pop(session, None)
        orphans = self.holdings.end_session(session)
        n = sum(_delete(p, self.root) for p in orphans if p not in self.public)
        if n:
            log.info("session ended: %d file(s) deleted", n)
        return n

    # -------------------------------------------------------------- caps
    def measure(self, who: str) -> tuple[int, int, float]:
        """(bytes of the client's held files, bytes the app keeps in the folder, bytes free on
        its disk): disk reads, run in a worker thread. What the app keeps: in its own folder
        everything there; in an operator's, what it handed out or received and its private
        folders (the same files the sweep looks after)."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = math.inf
        kept = sum(_size(p) for p in self._candidates())
        return self.holdings.usage(who), kept, free

    def refuse_upload(self, who: str, size: int, measured) -> tuple[int, str] | None:
        """(status, reason) when the upload must be refused, else None. Uploads in flight
        count as well (decided and reserved in the event loop, no await in between)."""
        p = self.policy
        held, total, free = measured
        mine = held + sum(b for w, b in self.inflight.values() if w == who)
        if mine + size > p.user_quota:
            return 413, (
                f"Upload refused: your files on the server (uploads not loaded yet, page "
                f"images, export files) would take {_mb(mine + size)}, over your share of "
                f"{_mb(p.user_quota)}. Files are deleted when you close the page or after "
                f"{p.ttl_s / 60:g} minutes; try again then, or upload fewer files at once.")
        total += sum(b for _, b in self.inflight.values())
        if total + size > p.total_quota or free - size < MIN_FREE_BYTES:
            return 507, (
                "Upload refused: the server's space for uploads is full "
                f"({_mb(total)} of {_mb(p.total_quota)} used). Try again in a few minutes.")
        return None

    # -------------------------------------------------------------- sweep
    def sweep(self, now: float | None = None) -> int:
        """Delete files written and last sent to a client more than the TTL ago (see the
        module docstring for which files); returns how many."""
        now = time.time() if now is None else now
        cutoff = now - self.policy.ttl_s
        n = 0
        for path in self._candidates():
            if path in self.public:
                continue
            try:
                written = os.lstat(path).st_mtime
            except OSError:
                continue
            if max(written, self.holdings.last_sent(path)) < cutoff:
                n += _delete(path, self.root)
        if self.policy.sweep_all:
            _remove_empty_dirs(self.root, keep=_PRIVATE_DIRS, older_than=cutoff)
        self.holdings.forget(self.holdings.stale())
        idle = now - self.policy.ttl_s - 3600
        for s, (_, seen) in list(self.sessions.items()):
            if seen < idle:
                self.sessions.pop(s, None)
        if n:
            log.info("file TTL: %d file(s) deleted", n)
        return n

    def _candidates(self) -> list[str]:
        if self.policy.sweep_all:
            return [os.path.join(d, f) for d, _, files in os.walk(self.root) for f in files]
        found = set(self.holdings.paths())
        for d in list(_PRIVATE_DIRS):
            if d.startswith(self.root + os.sep):
                found.update(os.path.join(x, f) for x, _, files in os.walk(d) for f in files)
        return sorted(found)

    def purge(self) -> int:
        """At stop: every file this app handed out or received and, if no other app of this
        process still runs, its private folders."""
        held = self.holdings.paths()
        n = sum(_delete(p, self.root) for p in held if p not in self.public)
        self.holdings.forget(held)
        with _LIVE_LOCK:
            _LIVE.discard(id(self))
            last = not _LIVE
        if last:  # (a page built since this server started keeps its folders)
            for d, made in list(_PRIVATE_DIRS.items()):
                if made <= self.started:
                    shutil.rmtree(d, ignore_errors=True)
                    _PRIVATE_DIRS.pop(d, None)
        return n

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """Gradio's lifespan hook: the sweep runs while the server does; purge at stop."""
        import anyio

        app.state.mrg_file_access = self
        self.started = time.time()
        with _LIVE_LOCK:
            _LIVE.add(id(self))
        try:
            blocks = app.get_blocks()
            for block in blocks.blocks.values():
                self.public.update(os.path.realpath(p) for p in
                                   getattr(block, "keep_in_cache", ()))
        except Exception:  # noqa: BLE001 - only a convenience for files cached at build time
            log.warning("files cached with the page could not be listed")

        async def sweeping():
            while True:
                await asyncio.sleep(self.policy.sweep_every_s)
                try:
                    await anyio.to_thread.run_sync(self.sweep)
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.exception("file TTL sweep failed")

        task = asyncio.create_task(sweeping())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self.purge()


def _gradio_upload_dir() -> str:
    import gradio.utils

    return gradio.utils.get_upload_folder()


def _mb(n: int | float) -> str:
    return f"{n / MiB:.0f} MB" if n >= 10 * MiB else f"{n / MiB:.1f} MB"


def _delete(path: str, root: str) -> int:
    """Delete a file inside root and its parent folders left empty (never root or a private
    folder itself); 1 when a file was deleted."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    except OSError:
        log.warning("a cached file could not be deleted")
        return 0
    parent = os.path.dirname(path)
    while parent.startswith(root + os.sep) and parent not in _PRIVATE_DIRS:
        try:
            os.rmdir(parent)  # only when empty
        except OSError:
            break
        parent = os.path.dirname(parent)
    return 1


def _remove_empty_dirs(root: str, keep, older_than: float) -> None:
    for d, subdirs, files in os.walk(root, topdown=False):
        if d == root or d in keep or files:
            continue
        try:
            if os.lstat(d).st_mtime < older_than:
                os.rmdir(d)
        except OSError:
            pass


def _cookies(scope) -> dict[str, str]:
    """The request's cookies, parsed as Starlette (so Gradio) parses them."""
    from starlette.requests import cookie_parser

    out: dict[str, str] = {}
    for k, v in scope.get("headers") or ():
        if k == b"cookie":
            out.update(cookie_parser(v.decode("latin-1")))
    return out


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k == name:
            return v.decode("latin-1")
    return None


# ----------------------------------------------------------------------------- middleware

class FileGuard:
    """Pure ASGI middleware (no response buffering except small JSON request bodies)."""

    def __init__(self, app, access: FileAccess):
        self.app = app
        self.access = access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        i = path.find(API)
        if i < 0:
            return await self._page(scope, receive, send)
        route = path[i + len(API):]
        method = scope.get("method", "GET")
        access = self.access
        if route.startswith(BLOCKED):
            return await _plain(send, 404, "Not Found")
        who = access.client(scope)
        if who is None:  # sign-in on, not signed in: Gradio answers
            return await self.app(scope, receive, send)

        session = _query(scope, "session_hash")
        if route.startswith("heartbeat/"):
            session = route.split("/")[1] or None
        if session and not access.claim_session(session, who):
            return await _forbidden(send, "This session belongs to another client.",
                                    f"{route.split('/')[0]}: another client's session")

        if route.startswith(("file=", "file/")) and method in ("GET", "HEAD"):
            real = access.inside(route[5:])
            if real is not None and not access.may_read(real, who):  # as Gradio's "no such file"
                return await _forbidden(send, f"File not allowed: {route[5:]}.",
                                        "file: not sent to this client")
            return await self.app(scope, receive, send)

        if route.rstrip("/") == "upload" and method == "POST":
            return await self._upload(scope, receive, send, who)

        if method == "POST" and route.startswith(CHECKED_POSTS):
            body, receive = await _read_body(receive)
            if body is None:
                return await _plain(send, 413, "Request body too large.")
            for real in access.named_in_request(body):
                if not access.may_read(real, who):
                    return await _forbidden(send, "File not allowed.",
                                            f"{route}: names a file not sent to this client")
            if not session:
                session = _json_field(body, "session_hash")
                if session and not access.claim_session(session, who):
                    return await _forbidden(send, "This session belongs to another client.",
                                            f"{route}: another client's session")

        send = _Recorder(access, who, session, send)
        try:
            await self.app(scope, receive, send)
        finally:
            if route.startswith("heartbeat/") and session:
                access.end_session(session)  # tab closed or reloaded, or the app stops

    async def _upload(self, scope, receive, send, who):
        access = self.access
        length = _header(scope, b"content-length")
        if length is None or not length.isdigit():
            return await _plain(send, 411, "Upload refused: the request has no Content-Length.")
        import anyio

        size = int(length)
        measured = await anyio.to_thread.run_sync(access.measure, who)
        refused = access.refuse_upload(who, size, measured)
        if refused:
            log.warning("upload refused (%d): cap reached", refused[0])
            return await _plain(send, *refused)
        key = id(scope)
        access.inflight[key] = (who, size)
        try:
            await self.app(scope, receive, _UploadRecorder(access, who, send))
        finally:
            access.inflight.pop(key, None)

    async def _page(self, scope, receive, send):
        """Without sign-in, the page hands the browser its client cookie."""
        app = scope.get("app")
        cookies = _cookies(scope)
        if (scope.get("method") != "GET" or getattr(app, "auth", None) is not None
                or CLIENT_COOKIE in cookies or CLIENT_COOKIE_LAX in cookies):
            return await self.app(scope, receive, send)
        value = secrets.token_urlsafe(24)
        cookies = [f"{CLIENT_COOKIE}={value}; Path=/; HttpOnly; SameSite=None; Secure; "
                   "Partitioned", f"{CLIENT_COOKIE_LAX}={value}; Path=/; HttpOnly; SameSite=Lax"]

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                ctype = next((v for k, v in headers if k == b"content-type"), b"")
                if ctype.startswith(b"text/html"):
                    headers += [(b"set-cookie", c.encode()) for c in cookies]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


class _Recorder:
    """Wraps `send`: every upload-folder path in the response body is recorded as held by the
    client before the bytes leave (the browser fetches a file as soon as it reads its URL)."""

    def __init__(self, access: FileAccess, who: str, session: str | None, send):
        self.access, self.who, self.session, self.send = access, who, session, send
        self.carry = b""

    async def __call__(self, message):
        if message["type"] == "http.response.body" and message.get("body"):
            self.feed(message["body"])
        await self.send(message)

    def feed(self, chunk: bytes) -> None:
        buf = self.carry + chunk
        end = 0
        for m in self.access._named.finditer(buf):
            real = self.access._real(m.group(1))
            if real is not None:
                self.access.holdings.hold(real, self.who, self.session)
            end = m.end()
        # keep a file value cut off by the chunk boundary (one seen twice is held twice)
        start = buf.rfind(b'"path"')
        self.carry = buf[start:][-65536:] if start >= end else buf[-8:]


class _UploadRecorder:
    """Wraps the upload route's `send`: its reply, a JSON list of the stored paths, is parsed
    whole (it is short) and each path recorded as held by the uploader before it leaves."""

    def __init__(self, access: FileAccess, who: str, send):
        self.access, self.who, self.send = access, who, send
        self.start, self.body = None, b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.start = message  # held back until the body is complete
            return
        if message["type"] == "http.response.body" and self.start is not None:
            self.body += message.get("body", b"")
            if message.get("more_body"):
                return
            try:
                paths = json.loads(self.body) if self.start["status"] == 200 else []
            except ValueError:
                paths = []
            for p in paths if isinstance(paths, list) else []:
                real = self.access.inside(p) if isinstance(p, str) else None
                if real is not None:
                    self.access.holdings.hold(real, self.who)
            await self.send(self.start)
            self.start = None
            await self.send({**message, "body": self.body, "more_body": False})
            return
        await self.send(message)


async def _read_body(receive):
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            return None, receive
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _query(scope, name: str) -> str | None:
    qs = scope.get("query_string") or b""
    values = parse_qs(qs.decode("latin-1")).get(name)
    return values[0] if values else None


def _json_field(body: bytes, name: str) -> str | None:
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


async def _plain(send, status: int, text: str):
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _forbidden(send, detail: str, why: str):
    """403 with the body FastAPI gives an HTTPException (Gradio's own refusals). The log
    names the route, never the path (an upload's file name may carry a patient's name)."""
    log.warning("refused (403) %s", why)
    body = json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-length", str(len(body)).encode()),
                            (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def launch_options(limits, policy: FilePolicy | None = None) -> dict:
    """`launch(**...)` additions: the guard and the sweep for this launch. `limits`: the
    loader's, for the default caps when no `policy` is given."""
    from starlette.middleware import Middleware

    access = FileAccess(policy or FilePolicy.from_env(limits))
    return {"app_kwargs": {"middleware": [Middleware(FileGuard, access=access)],
                           "lifespan": access.lifespan}}
