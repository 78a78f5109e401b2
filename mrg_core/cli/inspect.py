"""python -m mrg_core inspect FILE... [--preview OUT.png]

Prints one JSON object per file per line: display name, non-identifying metadata per view,
n_views, display size, value range of `values`, content_hash. A file that cannot be read
prints {"file", "error", "message"} on stdout and the message on stderr; the exit status is 2
if any file failed (the other files are still inspected).

--preview OUT.png writes the first view's display image. With several files, file i is written
to OUT_i.png (OUT.png -> OUT_0.png, OUT_1.png, ...), numbered by position on the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..io import StudyLoadError, load_study


def _preview_path(out: Path, index: int, n_files: int) -> Path:
    if n_files == 1:
        return out
    return out.with_name(f"{out.stem}_{index}{out.suffix or '.png'}")


def describe(name: str, study) -> dict:
    views = study.views
    return {
        "file": name,
        "n_views": len(views),
        "display_size": [int(views[0].display.shape[0]), int(views[0].display.shape[1])],
        "value_range": [float(min(v.values.min() for v in views)),
                        float(max(v.values.max() for v in views))],
        "window": list(views[0].window) if views[0].window is not None else None,
        "content_hash": study.content_hash,
        "views": [v.meta.to_dict() for v in views],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrg_core inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--preview", type=Path, metavar="OUT.png",
                        help="write the display image (first view) as PNG; several files -> "
                             "OUT_0.png, OUT_1.png, ...")
    args = parser.parse_args(argv)
    failed = 0
    for i, path in enumerate(args.files):
        name = path.name
        try:
            study = load_study([path])
        except StudyLoadError as err:
            failed += 1
            print(json.dumps({"file": name, "error": err.code, "message": err.message}),
                  flush=True)
            print(f"{name}: {err.message}", file=sys.stderr, flush=True)
            continue
        print(json.dumps(describe(name, study)), flush=True)
        if args.preview is not None:
            from PIL import Image

            out = _preview_path(args.preview, i, len(args.files))
            Image.fromarray(study.views[0].display).save(out, format="PNG")
    return 2 if failed else 0
