"""python -m mrg_core report FILE... [--model DIR] [--jsonl]

One model load, then for each study (a file, or a folder whose files are the views/slices of one
study) one JSON object: probability, label, threshold, draft report, model and timings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mrg_core.paths import DEFAULT_MODEL_DIR


def _sources(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrg_core report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="DICOM/PNG/JPEG files or study folders")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model folder")
    ap.add_argument("--jsonl", action="store_true", help="one compact JSON object per line")
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    args = ap.parse_args(argv)

    from mrg_core.io import StudyLoadError, load_study
    from mrg_core.models import GenerationSettings, ReportModel

    if not (args.model / "config.json").is_file():
        print(f"error: no model folder at {args.model} (expected config.json)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = ReportModel.from_pretrained(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    info = model.info
    status = 0
    for path in args.files:
        record: dict = {"file": str(path)}
        try:
            t1 = time.perf_counter()
            study = load_study(_sources(path))
            t2 = time.perf_counter()
            pred = model.predict(study)
            t3 = time.perf_counter()
            text = model.generate_report(study, settings)
            t4 = time.perf_counter()
        except StudyLoadError as err:
            record.update(error=err.code, message=err.message)
            status = 2
        else:
            record.update(
                n_views=len(study.views), modality=study.modality,
                probability=round(float(pred.probability), 4), label=int(pred.label),
                threshold=float(pred.threshold), findings=list(pred.findings), report=text,
                model={"name": info.get("name"), "version": info.get("version")},
                timings_s={"model_load": round(load_s, 3), "load_study": round(t2 - t1, 3),
                           "probability": round(t3 - t2, 3), "report": round(t4 - t3, 3)})
        print(json.dumps(record) if args.jsonl else json.dumps(record, indent=2), flush=True)
    return status
