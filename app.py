"""MRG Studio web app: settings → engine → page → launch (offline, nothing shared).

    python app.py [--host 127.0.0.1] [--port 7860] [--model-dir assets/model]
                  [--db-url sqlite:///mrg_studio.db] [--auth-file users.txt]

Every flag has an environment variable (MRG_HOST, MRG_PORT or GRADIO_SERVER_PORT, MRG_MODEL_DIR,
MRG_DB_URL, MRG_AUTH_FILE). The auth file holds one `user:password` per line.
"""
from __future__ import annotations

import os

# Before gradio / transformers are imported: no analytics, no hub look-ups.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def default_host() -> str:
    if os.environ.get("MRG_HOST"):
        return os.environ["MRG_HOST"]
    return "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"  # HF Spaces needs 0.0.0.0


def parse_args(argv=None) -> argparse.Namespace:
    from mrg_core.engine import EngineSettings

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
                   help="optional file of user:password lines; sign-in required when given "
                        "(env MRG_AUTH_FILE)")
    return p.parse_args(argv)


def read_auth_file(path: Path | None) -> list[tuple[str, str]] | None:
    if path is None:
        return None
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise SystemExit(f"{path}: each line must be user:password")
            pairs.append((user.strip(), password))
    if not pairs:
        raise SystemExit(f"{path}: no user:password line found")
    return pairs


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mrg_core.engine import Engine, EngineSettings
    from ui import build_app, launch_kwargs

    model_dir = args.model_dir if args.model_dir.is_absolute() else Path.cwd() / args.model_dir
    settings = EngineSettings(model_dir=model_dir, database_url=args.db_url)
    engine = Engine.from_settings(settings)
    auth = read_auth_file(args.auth_file)
    demo = build_app(engine, auth=auth)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, auth=auth, **launch_kwargs(engine))


if __name__ == "__main__":
    sys.exit(main())
