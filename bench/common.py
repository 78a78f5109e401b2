"""What the benchmark scripts share: a free local port and how a result is printed and kept."""
from __future__ import annotations

import json
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit(result: dict, json_path: Path | None) -> None:
    """Print the result as JSON and, when a path is given, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
