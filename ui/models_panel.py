"""Model versions (admin area): list, switch the live model, fine-tune on saved corrections.

Plain functions over the engine like ui/handlers.py; ui/layout.py wires them to the "Model"
accordion. Fine-tuning takes minutes, so it runs in a worker thread and the handler only polls
it: the handler's own worker is free between polls and other sessions go on drafting.
"""
from __future__ import annotations

import hashlib

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mrg_core.engine import Engine
from mrg_core.model_thread import start_worker

from .handlers import _md, log_failure

log = logging.getLogger(__name__)

_finetune_busy = threading.Lock()  # one fine-tune per process: it takes every CPU core

READ_ONLY_NOTE = ("Read-only: switching the model and fine-tuning need an administrator "
                  "(sign-in with the admin role, or the app started with --admin-open).")


def admin_check(auth, username: str | None, admin_open: bool = False,
                action: str = "switch the model or start fine-tuning") -> str | None:
    """None when this request may switch the live model or fine-tune, else why not (Markdown).

    With sign-in (`auth`), only users with the admin role in the auth file (mrg_core.auth) may,
    whatever `admin_open` says. Without sign-in nobody may, unless the app was started with
    --admin-open (MRG_ADMIN_OPEN=1): every visitor is then an administrator. Checked on the
    server for every click, so a doctored page or an API call gains nothing."""
    from mrg_core.auth import is_admin

    if auth:
        if is_admin(auth, username):
            return None
        return (f"**Refused.** Only an administrator can {action}; "
                f"{_md(username or 'this user')} does not have the admin role "
                "(an admin adds it with `python -m mrg_core.auth add-user FILE USER --admin`).")
    if admin_open:
        return None
    return (f"**Refused** ({action}). The Model panel is read-only: this app runs without "
            "sign-in and was not started with `--admin-open`. Start it with an auth file and an "
            "admin user, or with `--admin-open` on a machine only administrators can reach.")


def model_label(mv, live: tuple[str, str] | None = None) -> str:
    """'name version (parent …)' as the dropdown shows it."""
    parent = f" (parent {mv.parent_version})" if mv.parent_version else ""
    here = " · in use" if live == (mv.name, mv.version) else ""
    return f"{mv.name} {mv.version}{parent}{here}"


def version_key(path) -> str:
    """What the page and its API see for a model version: a short hash of the folder, never
    the server path (nor a way to name any other folder)."""
    return hashlib.sha256(str(Path(path).resolve()).encode("utf-8", "surrogateescape")
                          ).hexdigest()[:16]


def _versions(engine: Engine, roots=None) -> list:
    try:
        return engine.list_models(roots)
    except OSError:
        log.exception("could not list model versions")
        return []


def model_choices(engine: Engine, roots=None) -> list[tuple[str, str]]:
    """(label, version key) of every version on disk, newest first."""
    info = engine.model_info
    live = None if info is None else (str(info.get("name")), str(info.get("version")))
    return [(model_label(m, live), version_key(m.path))
            for m in reversed(_versions(engine, roots))]


def switch_model(engine: Engine, key: str | None, roots=None) -> tuple[bool, str]:
    """(ok, message) for a version key from model_choices (a listed version only). Drafts
    started after this record the new name + version."""
    if not key:
        return False, "Choose a model version first."
    path = next((m.path for m in _versions(engine, roots) if version_key(m.path) == key), None)
    if path is None:
        return False, ("**Model not changed.** That version is not in the list any more; "
                       "choose one again.")
    try:
        info = engine.switch_model(Path(path))
    except Exception as exc:  # a broken folder must not take the page down
        log_failure("loading a model version", exc)
        return False, ("**Model not changed.** That folder could not be loaded as a model; "
                       "the previous model is still in use.")
    log.info("live model switched to %s %s", info.get("name"), info.get("version"))
    return True, (f"Now using **{_md(info.get('name'))}** version {_md(info.get('version'))}. "
                  "New drafts record this version.")


def finetune(engine: Engine, out_dir=None, cfg=None, poll_s: float = 2.0) -> Iterator[str]:
    """Run Engine.finetune in a thread; yield progress lines, then the outcome (Markdown).
    The new version is listed, not switched to: an admin checks it first."""
    from mrg_core.finetune import TooFewCorrections

    if engine.model is None:
        yield "**No model loaded**: there is nothing to fine-tune."
        return
    if not _finetune_busy.acquire(blocking=False):
        yield "A fine-tune is already running; wait for it to finish."
        return
    outcome: dict = {}

    def work():
        try:
            outcome["result"] = engine.finetune(out_dir=out_dir, cfg=cfg)
        except BaseException as exc:  # handed to the handler, which words it
            outcome["error"] = exc
        finally:
            _finetune_busy.release()

    t0 = time.monotonic()
    try:  # a worker the interpreter waits for at exit (it stops at its next batch)
        worker = start_worker(work, "mrg-finetune")
    except BaseException:
        _finetune_busy.release()
        raise
    yield "Fine-tuning on the saved corrections… (this takes minutes; drafting goes on)"
    while worker.is_alive():
        worker.join(poll_s)
        if worker.is_alive():
            yield f"Fine-tuning on the saved corrections… {time.monotonic() - t0:.0f} s"
    err = outcome.get("error")
    if isinstance(err, TooFewCorrections):
        yield f"**Not enough corrections to fine-tune.** {_md(err)}"
    elif err is not None:
        log_failure("fine-tuning", err)
        yield f"**Fine-tuning failed** ({type(err).__name__}). The live model is unchanged."
    else:
        yield finetune_done_message(outcome["result"])


def finetune_done_message(res) -> str:
    log.info("fine-tuned %s %s from parent %s in %.0f s", res.name, res.version,
             res.parent_version, res.seconds)
    return (f"Fine-tuned **{_md(res.name)}** version {_md(res.version)} (parent "
            f"{_md(res.parent_version)}) on {len(res.train_ids)} corrections in "
            f"{res.seconds:.0f} s. It is listed above but **not in use**: choose it and press "
            "*Use this model* to switch.")
