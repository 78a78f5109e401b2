"""What bf16 and int8 cost in quality: the same COV-CTR *val* studies drafted by the fp32, bf16
and int8 language model (mrg_core.models.quantize), scored like `python -m mrg_core evaluate`.

    python bench/precision_quality.py --json bench/results/precision_quality_val.json

Per precision: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, one scorer for all), the
classifier's AUC and accuracy, the share of drafts identical to fp32's, and the median draft
time. Only the val split is read: the test split stays for the final evaluation of a model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mrg_core.engine import torch_threads  # noqa: E402
from mrg_core.models import GenerationSettings, ReportModel  # noqa: E402
from mrg_core.models.quantize import PRECISIONS, apply_precision  # noqa: E402
from mrg_core.paths import DEFAULT_MODEL_DIR  # noqa: E402

SPLIT = "val"  # never test


def draft_all(model, studies: dict, settings: GenerationSettings, threads: int | None) -> dict:
    out = {}
    for key, study in studies.items():
        prob = float(model.predict(study).probability)
        with torch_threads(threads):
            t = time.perf_counter()
            text = model.generate_report(study, settings)
            secs = time.perf_counter() - t
        out[key] = {"probability": prob, "report": text, "draft_s": secs}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data", help="COV-CTR folder (default: $MRG_DATA_DIR/covctr)")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--limit", type=int, help="first N val studies (quick checks)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads while decoding")
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (no Java needed)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    from mrg_core.data import load_splits
    from mrg_core.data.images import ImageCache
    from mrg_core.evaluation.caption import CaptionScorer
    from mrg_core.evaluation.classification import classification_metrics
    from mrg_core.evaluation.runner import json_safe

    examples = load_splits(args.data)[SPLIT]
    examples = examples[: args.limit] if args.limit else examples
    cache = ImageCache()
    studies = {ex.id: cache.load_study(ex) for ex in examples}
    refs = {ex.id: list(ex.references) for ex in examples if ex.has_report}
    y = np.array([ex.label for ex in examples])
    settings = GenerationSettings()

    runs, info = {}, {}
    for p in args.precisions:
        model = apply_precision(ReportModel.from_pretrained(args.model), p)
        info = model.info
        runs[p] = draft_all(model, studies, settings, args.threads)
        del model

    base = args.precisions[0]
    res = {"split": SPLIT, "n_studies": len(examples), "n_scored_reports": len(refs),
           "model": {k: info.get(k) for k in ("name", "version", "method")},
           "threads": args.threads or torch.get_num_threads(), "baseline": base,
           "precisions": {}}
    with CaptionScorer(meteor=not args.no_meteor) as scorer:
        for p, out in runs.items():
            row = scorer.score(refs, {k: v["report"] for k, v in out.items()})
            prob = np.array([out[ex.id]["probability"] for ex in examples])
            cls = classification_metrics(y, prob, float(info.get("threshold") or 0.5))
            same = [out[k]["report"] == runs[base][k]["report"] for k in out]
            dprob = [abs(out[k]["probability"] - runs[base][k]["probability"]) for k in out]
            res["precisions"][p] = {
                **{k: row.get(k) for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR",
                                           "ROUGE_L", "CIDEr")},
                "auc": cls.get("auc"), "accuracy": cls.get("accuracy"),
                "identical_to_baseline": sum(same) / len(same),
                "max_probability_change": max(dprob),
                "median_draft_s": statistics.median(v["draft_s"] for v in out.values())}
    print(markdown(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(res), indent=2))
    return 0


def markdown(res: dict) -> str:
    cols = ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "auc", "identical_to_baseline",
            "median_draft_s"]
    lines = [f"COV-CTR {res['split']} ({res['n_studies']} studies), torch threads "
             f"{res['threads']}", "", "| precision | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for p, row in res["precisions"].items():
        cells = ["–" if row.get(c) is None else f"{row[c]:.3f}" for c in cols]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
