"""python -m mrg_core evaluate --model DIR --split {val,test} --out DIR [--data DIR] [--limit N]

Scores the model's reports and probabilities on one split next to three baselines fitted on the
training split (most frequent report, nearest-neighbour retrieval, per-class template), and
writes metrics.json, metrics.md, generations.jsonl and PNG plots to --out. Select models on
val; report test.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrg_core evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (save_pretrained)")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", help="COV-CTR folder, annotation.json or corrections export "
                                   "(default: $MRG_DATA_DIR/covctr)")
    ap.add_argument("--limit", type=int, help="first N studies of the split (quick checks)")
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (no Java needed)")
    ap.add_argument("--no-clinical", action="store_true", help="skip the MiniLM text classifier")
    ap.add_argument("--max-new-tokens", type=int, help="generation length cap")
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="fp32",
                    help="the LM's inference form (models/quantize.py: fp32 as trained, "
                         "fp32-merged, bf16, int8, int8-weights, int4-weights); the "
                         "probability is fp32's")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mrg_core.data import load_splits
    from mrg_core.evaluation.runner import json_safe, evaluate_model
    from mrg_core.models import GenerationSettings, ReportModel

    splits = load_splits(args.data)
    examples = splits[args.split][: args.limit] if args.limit else splits[args.split]
    if not examples:
        print(f"split {args.split!r} is empty")
        return 2
    from mrg_core.models.quantize import apply_precision

    model = apply_precision(ReportModel.from_pretrained(args.model, device=args.device),
                            args.precision)
    model.eval()
    settings = GenerationSettings()
    if args.max_new_tokens:
        settings.max_new_tokens = args.max_new_tokens
    history = None
    for cand in (Path(args.model) / "history.json", Path(args.model).parent / "history.json"):
        if cand.is_file():
            history = json.loads(cand.read_text())
            break
    m = evaluate_model(model, examples, splits["train"], args.out, settings=settings,
                       split=args.split, history=history, meteor=not args.no_meteor,
                       clinical=not args.no_clinical)
    row = m["systems"]["model"]
    print(json.dumps(json_safe({"out": args.out, "BLEU_4": row.get("BLEU_4"),
                                "METEOR": row.get("METEOR"), "auc": m["classifier"].get("auc"),
                                "seconds": m["seconds"]})))
    return 0
