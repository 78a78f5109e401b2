"""python -m mrg_core report FILE... [--model DIR] [--jsonl] [--threads auto|N]
                               [--precision fp32|fp32-merged|bf16|int8]

One model load, then for each study (a file; a folder or zip whose files are the views or
slices of one study; one object per DICOM series when it holds several) one JSON object: which argument it is (`input`, 1-based; `kind`; a hash of the path, never
the path or a name, which may identify a patient), probability, label, threshold, for a series or multi-view study
the series (slices, thickness, spacing, order), the aggregation rule, the key slices (most
probable first) and each slice's probability, out-of-domain decision, draft report, model, run
settings and timings.

Threads and precision follow the app (app.py --decode-threads / --precision): by default one
core fewer than the machine has (1 on a 2-core machine: on a loaded machine torch's default of
every core made one draft take 14-44 s against 0.7 s on one thread) and the LoRA folded into
the weights (fp32-merged: the same drafts, faster). Environment: MRG_DECODE_THREADS,
MRG_PRECISION.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mrg_core.paths import DEFAULT_MODEL_DIR

# models.quantize.PRECISIONS, spelled here so that --help needs no torch import (a test checks
# that the two agree)
PRECISIONS = ("fp32", "fp32-merged", "bf16", "int8")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrg_core report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="DICOM/PNG/JPEG files or study folders")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model folder")
    ap.add_argument("--jsonl", action="store_true", help="one compact JSON object per line")
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    ap.add_argument("--threads", type=_threads,
                    default=os.environ.get("MRG_DECODE_THREADS") or "auto",
                    help="torch CPU threads (env MRG_DECODE_THREADS; default auto: one core "
                         "fewer than the machine has, at least 1, as in the app)")
    ap.add_argument("--precision", choices=PRECISIONS, type=str.lower,
                    default=(os.environ.get("MRG_PRECISION") or "fp32-merged").lower(),
                    help="inference form of the report language model (env MRG_PRECISION; "
                         "default fp32-merged, as in the app; README, Speed)")
    args = ap.parse_args(argv)

    import torch

    from mrg_core.engine import Engine, resolve_threads
    from mrg_core.io import StudyLoadError, load_studies
    from mrg_core.models import GenerationSettings, ReportModel
    from mrg_core.models.quantize import apply_precision, model_precision

    if not (args.model / "config.json").is_file():
        print(f"error: no model folder at {args.model} (expected config.json)", file=sys.stderr)
        return 2
    threads = resolve_threads(args.threads)
    torch.set_num_threads(threads)  # the whole run: image model and decoding
    t0 = time.perf_counter()
    model = ReportModel.from_pretrained(args.model, device=args.device)
    try:
        apply_precision(model, args.precision)
    except ValueError as err:  # e.g. int8 on a GPU
        print(f"error: --precision {args.precision}: {err}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    info = model.info
    status = 0
    engine = Engine(model, None, decode_threads=threads)  # the app's study-level logic
    for index, path in enumerate(args.files, 1):
        try:
            t1 = time.perf_counter()
            studies = load_studies([path])
            load_s_study = (time.perf_counter() - t1) / len(studies)
        except StudyLoadError as err:
            record = input_record(index, path)
            record.update(error=err.code, message=err.message)
            status = 2
            print(json.dumps(record) if args.jsonl else json.dumps(record, indent=2), flush=True)
            continue
        for study in studies:  # one object per series (a file or plain images: one study)
            record = input_record(index, path)
            t2 = time.perf_counter()
            a = engine.analyze(study)
            t3 = time.perf_counter()
            text = "".join(engine.stream_report(study, settings))
            t4 = time.perf_counter()
            record.update(
                n_views=len(study.views), modality=study.modality,
                body_part=study.body_part,
                series=None if study.series is None else study.series.to_dict(),
                probability=round(float(a.probability), 4), label=int(a.label),
                label_meaning=a.label_meaning or None,  # what the probability is of
                threshold=float(a.threshold),
                # several slices/views: how the study probability was made and from which
                aggregation=a.aggregation, key_views=list(a.key_views),
                view_probabilities=None if a.view_probabilities is None else
                [round(p, 4) for p in a.view_probabilities],
                # as the app's alert: the study is not what the model was trained on, so the
                # probability and the report are unreliable
                out_of_domain=a.domain_warning is not None, domain_warning=a.domain_warning,
                domain=a.domain,  # what the study looks like: from DICOM tags or the pixels
                findings=list(a.findings), report=text,
                model={"name": info.get("name"), "version": info.get("version")},
                run={"threads": torch.get_num_threads(), "precision": model_precision(model)},
                timings_s={"model_load": round(load_s, 3), "load_study": round(load_s_study, 3),
                           "probability": round(t3 - t2, 3), "report": round(t4 - t3, 3)})
            print(json.dumps(record) if args.jsonl else json.dumps(record, indent=2),
                  flush=True)
    return status


def input_record(index: int, path: Path) -> dict:
    """How a study is named in the output: its position among the arguments, file or folder,
    and a short hash of the path. Never the path or a file name: PACS-style folders and files
    are often named by patient ID or name (e.g. dicomdirtests/77654033/...)."""
    import hashlib

    digest = hashlib.sha256(str(Path(path).resolve()).encode("utf-8", "surrogateescape"))
    return {"input": index, "kind": "folder" if Path(path).is_dir() else "file",
            "path_sha256": digest.hexdigest()[:12]}


def _threads(value: str) -> int | str:
    from mrg_core.engine import parse_threads

    try:
        return parse_threads(value)
    except ValueError:
        raise argparse.ArgumentTypeError("--threads must be 1 or more, or auto") from None
