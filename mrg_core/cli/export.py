"""python -m mrg_core export --model SRC --out DST [--dtype float16] [--card FILE] [--set K=V ...]

Package a trained model folder for shipping (e.g. runs/x/best -> assets/model): optionally
store the weights as float16 (half the disk; loading computes in float32; --keep-float32
encoder. keeps the image side exact), write the model
card, and set config fields chosen on val (e.g. --set label_guidance=1.5). Prints the folder
size and how far the re-loaded model's probabilities moved from the source's.

The threshold and calibration were fitted on the float32 weights. Near-duplicate val slices can
sit 1e-5 apart, so float16 storage may move one of them across the threshold: re-fit both on
the exported folder and pass them with --set threshold=... --set calibration=[a,b].
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DTYPES = {"float32": None, "float16": "float16", "bfloat16": "bfloat16"}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrg_core export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="trained model folder")
    ap.add_argument("--out", required=True, help="destination folder (replaced files)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--keep-float32", action="append", default=[], metavar="PREFIX",
                    help="tensor name prefix stored in float32 despite --dtype, e.g. encoder. "
                         "(the image side then gives exactly the measured probabilities; "
                         "repeatable)")
    ap.add_argument("--card", help="Markdown model card: written as README.md and MODEL_CARD.md")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="top-level config field, value as JSON (repeatable)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from mrg_core.models import ReportModel
    from mrg_core.study import study_from_arrays

    model = ReportModel.from_pretrained(args.model, device="cpu")
    for item in args.set:
        key, _, value = item.partition("=")
        if not hasattr(model.config, key):
            ap.error(f"unknown config field {key!r}")
        setattr(model.config, key, json.loads(value))
    card = Path(args.card).read_text(encoding="utf-8") if args.card else None
    out = Path(args.out)
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    model.save_pretrained(out, card=card, dtype=dtype, keep_float32=tuple(args.keep_float32))
    if card is not None:
        (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")

    # how much did storage precision move the outputs? (random grey studies; deterministic)
    back = ReportModel.from_pretrained(out, device="cpu")
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for _ in range(4):
        img = (torch.rand(96, 96, generator=gen) * 255).to(torch.uint8).numpy()
        study = study_from_arrays([img])
        diffs.append(abs(model.predict(study).probability - back.predict(study).probability))
    print(json.dumps({"out": str(out), "bytes": folder_bytes(out), "dtype": args.dtype,
                      "max_probability_change": max(diffs)}))
    return 0
