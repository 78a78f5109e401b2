"""MRG Studio web app: settings → engine → page → launch (offline, nothing shared).

    python app.py [--host 127.0.0.1] [--port 7860] [--model-dir assets/model]
                  [--db-url sqlite:///mrg_studio.db] [--auth-file users.txt]
                  [--max-upload-mb 256]
                  [--precision fp32|fp32-merged|bf16|int8|int8-weights|int4-weights]
                  [--decode-threads auto|N] [--admin-open]

Every flag has an environment variable (MRG_HOST, MRG_PORT or GRADIO_SERVER_PORT, MRG_MODEL_DIR,
MRG_DB_URL, MRG_AUTH_FILE, MRG_MAX_UPLOAD_MB, MRG_PRECISION, MRG_DECODE_THREADS,
MRG_ADMIN_OPEN). The auth file holds `user:<pbkdf2 hash>[:admin]` lines made with
`python -m mrg_core.auth add-user FILE USER [--admin]`; plain-text passwords are refused.
Switching the live model and fine-tuning (the Model panel) need the admin role; without sign-in
the panel is read-only unless the app is started with --admin-open.
"""
from __future__ import annotations

import os
import time

STARTED = time.perf_counter()  # start-up is logged from here (bench/startup.py: from the spawn)
# Before gradio / transformers are imported: no analytics, no hub look-ups.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import atexit  # noqa: E402
import signal  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402


def default_host() -> str:
    if os.environ.get("MRG_HOST"):
        return os.environ["MRG_HOST"]
    return "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"  # HF Spaces needs 0.0.0.0


def parse_args(argv=None) -> argparse.Namespace:
    from mrg_core.engine import EngineSettings
    from mrg_core.paths import SERVING_PRECISION

    env = os.environ.get
    p = argparse.ArgumentParser(description="MRG Studio: chest study → probability, Grad-CAM "
                                            "and a draft report to correct. Research demo, not "
                                            "for clinical use.")
    p.add_argument("--host", default=default_host(),
                   help="interface to listen on (env MRG_HOST; default 127.0.0.1, "
                        "0.0.0.0 on Hugging Face Spaces)")
    p.add_argument("--port", type=int,
                   default=int(env("MRG_PORT") or env("GRADIO_SERVER_PORT") or 7860),
                   help="port (env MRG_PORT or GRADIO_SERVER_PORT; default 7860)")
    p.add_argument("--model-dir", type=Path,
                   default=Path(env("MRG_MODEL_DIR") or "assets/model"),
                   help="trained model folder (env MRG_MODEL_DIR; default assets/model). "
                        "Without one the app still loads studies and saves reports.")
    p.add_argument("--db-url", default=env("MRG_DB_URL") or EngineSettings().database_url,
                   help="SQLAlchemy database URL (env MRG_DB_URL; default a SQLite file in "
                        "the repository)")
    p.add_argument("--auth-file", type=Path, default=env("MRG_AUTH_FILE") or None,
                   help="optional file of user:<pbkdf2 hash> lines (python -m mrg_core.auth "
                        "add-user); sign-in required when given (env MRG_AUTH_FILE)")
    p.add_argument("--max-upload-mb", type=float,
                   default=float(env("MRG_MAX_UPLOAD_MB") or 256),
                   help="largest file accepted, in MiB; the upload and the loader use the same "
                        "limit (env MRG_MAX_UPLOAD_MB; default 256)")
    p.add_argument("--precision", choices=["fp32", "fp32-merged", "bf16", "int8", "int8-weights",
                                          "int4-weights"],
                   default=(env("MRG_PRECISION") or SERVING_PRECISION).lower(),
                   help="inference form of the report language model (env MRG_PRECISION; "
                        "default int8-weights: LoRA folded in, int8 weights with bf16 "
                        "activations, 2.6x faster drafts than fp32-merged and no worse on "
                        "COV-CTR val; bf16 on a GPU; int4-weights: the layers LoRA did not "
                        "adapt in int4, a step 1.1-1.3x faster); speed and val scores of each: "
                        "README, Speed")
    p.add_argument("--decode-threads", type=decode_threads,
                   default=decode_threads(env("MRG_DECODE_THREADS") or "auto"),
                   help="torch threads of the one thread that runs the model (analysis, "
                        "drafts; env MRG_DECODE_THREADS; default auto: every core)")
    p.add_argument("--admin-open", action="store_true",
                   default=truthy(env("MRG_ADMIN_OPEN")),
                   help="without sign-in, let every visitor switch the live model and start "
                        "fine-tuning (env MRG_ADMIN_OPEN=1; default: the Model panel is "
                        "read-only without sign-in; with --auth-file the admin role decides)")
    return p.parse_args(argv)


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def decode_threads(value: str) -> int | str:
    """'auto' (resolved by the engine: every core) or a positive number (the
    report CLI's --threads takes the same values: mrg_core.engine.parse_threads)."""
    from mrg_core.engine import parse_threads

    try:
        return parse_threads(value)
    except ValueError:
        raise argparse.ArgumentTypeError("--decode-threads must be 1 or more, or auto") from None


def read_auth_file(path: Path | None):
    """The Gradio auth callable for the file, or None. Exits with a readable error on a
    plain-text password or a malformed line (the message never repeats a password)."""
    from mrg_core.auth import AuthFileError, load_auth

    try:
        return load_auth(path)
    except AuthFileError as exc:
        raise SystemExit(f"error: {exc}") from None


def load_limits(max_upload_mb: float):
    """One limit for both Gradio's upload (launch max_file_size) and the loader."""
    from mrg_core.io import LoadLimits

    if max_upload_mb <= 0:
        raise SystemExit("error: --max-upload-mb must be positive")
    return LoadLimits(max_file_bytes=int(max_upload_mb * 2**20))


def warm_up(engine) -> None:
    log = logging.getLogger("mrg_core.engine")
    try:
        log.info("warm-up took %.2f s", engine.warm_up())
        from mrg_core.paths import SAMPLES_DIR

        t0 = time.perf_counter()
        n = engine.seed_drafts(sorted(SAMPLES_DIR.glob("*.dcm")))  # the bundled phantoms
        log.info("%d sample drafts seeded the draft proposals in %.2f s", n,
                 time.perf_counter() - t0)
    except Exception:  # a failed warm-up only means a slower first request
        log.exception("warm-up failed")


def main(argv=None) -> None:
    args = parse_args(argv)
    from mrg_core.logging_setup import configure, quiet_known_warnings

    quiet_known_warnings()
    configure(logging.INFO)  # stderr; see logging_setup for what may be logged
    auth = read_auth_file(args.auth_file)  # before the model load: fail fast
    if auth:  # hashing off the event loop, bounded, with a lockout (mrg_core.auth)
        from mrg_core.auth import guard_logins

        auth = guard_logins(auth)
    from mrg_core.engine import Engine, EngineSettings
    from mrg_core.registry import models_dir
    from ui import build_app, launch_kwargs

    from ui.file_access import FilePolicy
    from ui.upload_cache import empty_upload_folder, use_own_upload_folder

    uploads = use_own_upload_folder()  # before the page is built: Gradio reads it then
    try:  # caps and TTL of what the upload folder keeps (MRG_USER_QUOTA_MB, ...)
        files = FilePolicy.from_env(load_limits(args.max_upload_mb),
                                    own_folder=uploads is not None)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if uploads is not None:  # our own folder: nothing from a previous run remains
        empty_upload_folder(uploads)
        atexit.register(empty_upload_folder, uploads)
        # SIGTERM (service stop, container stop) ends through SystemExit, so atexit runs
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    model_dir = args.model_dir if args.model_dir.is_absolute() else Path.cwd() / args.model_dir
    settings = EngineSettings(model_dir=model_dir, database_url=args.db_url,
                              limits=load_limits(args.max_upload_mb), precision=args.precision,
                              decode_threads=args.decode_threads)
    t_imports = time.perf_counter()
    engine = Engine.from_settings(settings)
    t_engine = time.perf_counter()
    if auth and args.admin_open:
        logging.getLogger("mrg_core.auth").warning(
            "--admin-open is ignored with --auth-file: the admin role in the auth file decides")
    demo = build_app(engine, auth=auth, model_roots=[model_dir, models_dir()],
                     admin_open=args.admin_open and not auth)
    # quiet: Gradio's banner ends with a "set share=True" hint, wrong for this app (never
    # shared); the address is printed here instead.
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, auth=auth, quiet=True,
        prevent_thread_lock=True, **launch_kwargs(engine, files))
    print(f"* MRG Studio running on {demo.local_url}", flush=True)
    log = logging.getLogger("mrg_core.engine")
    log.info("start-up: page answering %.2f s after start (imports %.2f s, model and store "
             "%.2f s, page %.2f s); bench/startup.py measures it", time.perf_counter() - STARTED,
             t_imports - STARTED, t_engine - t_imports, time.perf_counter() - t_engine)
    # The warm-up (first analysis and draft: ~0.5 s) runs once the page answers; a request that
    # comes meanwhile waits on the model thread for the job in progress, never for the whole
    # start-up.
    threading.Thread(target=warm_up, args=(engine,), name="warm-up", daemon=True).start()
    demo.block_thread()


if __name__ == "__main__":
    sys.exit(main())
