"""python -m mrg_core report FILE... [--model DIR] [--extra-model DIR]... [--only] [--jsonl]
                               [--threads auto|N]
                               [--precision fp32|fp32-merged|bf16|int8|int8-weights|int4-weights]

Studies are routed as in the app: each goes to the model whose card matches what it looks like
(DICOM tags, else the pixels), and a study no model reads is refused (error
"no_model_for_study", exit status 2).

One load of each model, then for each study (a file; a folder or zip whose files are the views
or slices of one study; one object per DICOM series when it holds several) one JSON object:
which argument it is (`input`, 1-based; `kind`; a hash of the path, never the path or a name,
which may identify a patient), probability, label, threshold, for a series or multi-view study
the series (slices, thickness, spacing, order), the aggregation rule, the key slices (most
probable first) and each slice's probability, out-of-domain decision, draft report, the model
that read it and why (`model`, `routing`, `domain`), run
settings and timings. With --ground, `grounding`: per statement of the draft, where its
saliency peaks and its share inside the lungs (mrg_core/grounding.py, experimental). With
--sr-dir each draft is also written as a DICOM SR (report_<input>_<k>.sr.dcm; `sr` in the
JSON).

Threads and precision follow the app (app.py --decode-threads / --precision): by default every
core, for the one thread that loads and runs the models (mrg_core/model_thread.py: a second
thread with torch work of its own made each small kernel pay a thread wake-up), and the LoRA
folded into the weights as int8 with bf16 activations (int8-weights; README, Speed).
Environment: MRG_DECODE_THREADS, MRG_PRECISION.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mrg_core.paths import DEFAULT_MODEL_DIR, SERVING_PRECISION

# models.quantize.PRECISIONS, spelled here so that --help needs no torch import (a test checks
# that the two agree)
PRECISIONS = ("fp32", "fp32-merged", "bf16", "int8", "int8-weights", "int4-weights")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrg_core report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="DICOM/PNG/JPEG files or study folders")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model folder")
    ap.add_argument("--extra-model", type=Path, action="append", dest="extra_models",
                    help="a further model folder studies are routed to by what they look like "
                         "(repeatable; default: as the app, the shipped chest radiograph model "
                         "or $MRG_EXTRA_MODELS)")
    ap.add_argument("--only", action="store_true",
                    help="read every study with --model, no routing (a study it was not "
                         "trained on gets a warning instead of a refusal)")
    ap.add_argument("--jsonl", action="store_true", help="one compact JSON object per line")
    ap.add_argument("--sr-dir", type=Path,
                    help="also write each draft as a DICOM Comprehensive SR (PRELIMINARY) in "
                         "this folder, report_<input>_<k>.sr.dcm; for DICOM input the SR joins "
                         "the source study and references its instances (UIDs read from the "
                         "files given, written only into the SR; patient module left empty)")
    ap.add_argument("--ground", action="store_true",
                    help="also ground each statement of the draft: `grounding` lists, per "
                         "sentence or clause, where its saliency peaks (view, row/column as "
                         "fractions, image region) and the map's share inside the lungs (with "
                         "requirements-eval.txt installed)")
    ap.add_argument("--finding", action="append", default=[], metavar="NAME=yes|no",
                    help="state (yes) or leave out (no) one finding in the draft in place of "
                         "the model's prediction, as the page's finding chips (repeatable; "
                         "NAME as in the output's finding_chips)")
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    ap.add_argument("--threads", type=_threads,
                    default=os.environ.get("MRG_DECODE_THREADS") or "auto",
                    help="torch CPU threads (env MRG_DECODE_THREADS; default auto: every "
                         "core, as in the app)")
    ap.add_argument("--precision", choices=PRECISIONS, type=str.lower,
                    default=(os.environ.get("MRG_PRECISION") or SERVING_PRECISION).lower(),
                    help="inference form of the report language model (env MRG_PRECISION; "
                         "default int8-weights, as in the app; README, Speed)")
    args = ap.parse_args(argv)
    from mrg_core.finding_chips import parse_finding_args, stated_with

    try:
        overrides = parse_finding_args(args.finding)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    from mrg_core.engine import Engine, EngineSettings, NoModelForStudy, resolve_threads
    from mrg_core.model_thread import ModelThread
    from mrg_core.io import StudyLoadError, load_studies
    from mrg_core.models import GenerationSettings, ReportModel
    from mrg_core.models.quantize import apply_precision, model_precision
    from mrg_core.report_export import sections as report_sections

    if not (args.model / "config.json").is_file():
        print(f"error: no model folder at {args.model} (expected config.json)", file=sys.stderr)
        return 2
    threads = resolve_threads(args.threads)
    runner = ModelThread(threads)  # loads and runs every model: one torch thread team
    extra_dirs = [] if args.only else (args.extra_models if args.extra_models is not None
                                       else EngineSettings.from_env().extra_model_dirs)
    extra_dirs = [d for d in extra_dirs if Path(d).resolve() != args.model.resolve()]
    for d in extra_dirs:
        if not (Path(d) / "config.json").is_file():
            print(f"error: no model folder at {d} (expected config.json)", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    models = [runner.run(ReportModel.from_pretrained, d, device=args.device)
              for d in [args.model, *extra_dirs]]
    try:
        for m in models:
            runner.run(apply_precision, m, args.precision)
    except ValueError as err:  # e.g. int8 on a GPU
        print(f"error: --precision {args.precision}: {err}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    status = 0
    # the app's study-level logic and routing (--only: every study to --model)
    engine = Engine(models[0], None, decode_threads=threads,
                    extra_models=None if args.only else models[1:], runner=runner)
    threads_used = runner.run(torch.get_num_threads)  # as the models run
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
        refs = _references(path) if args.sr_dir else []
        if len(refs) != len(studies):  # cannot tell which instances are whose: stand alone
            refs = [None] * len(studies)
        for k, study in enumerate(studies, 1):  # one object per series (plain images: one)
            record = input_record(index, path)
            t2 = time.perf_counter()
            try:
                a = engine.analyze(study)
            except NoModelForStudy as err:  # refused: what it looks like and what is loaded
                record.update(error="no_model_for_study", message=str(err),
                              n_views=len(study.views), modality=study.modality)
                status = 2
                print(json.dumps(record) if args.jsonl else json.dumps(record, indent=2),
                      flush=True)
                continue
            t3 = time.perf_counter()
            try:  # the reader's chips, as the page's (None: the model's own)
                stated = stated_with(a.chips, overrides) if overrides else None
            except ValueError as err:
                record.update(error="unknown_finding", message=str(err))
                status = 2
                print(json.dumps(record) if args.jsonl else json.dumps(record, indent=2),
                      flush=True)
                continue
            text = "".join(engine.stream_report(study, settings, findings=stated))
            own = None
            if stated is not None:  # as the page: the flips edit the model's own draft
                own = "".join(engine.stream_report(study, settings))
                text = engine.follow_chips(study, text, stated, own,
                                           [c.name for c in a.chips if c.predicted])
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
                # Findings and Impression kept apart, as in the exports
                sections=report_sections(text),
                # every finding the draft can state: probability, predicted, and stated here
                finding_chips=[{**c.to_dict(), "stated": c.predicted if stated is None
                                else c.name in stated} for c in a.chips],
                # with --finding: the model's own draft, before the chips edited it
                **({} if own is None else {"model_report": own}),
                # the model that read it (routed by the domain) and why, in words
                model={"name": a.model.get("name"), "version": a.model.get("version")},
                routing=a.routing or None,
                run={"threads": threads_used,
                     "precision": model_precision(engine.route(study)[0])},
                timings_s={"model_load": round(load_s, 3), "load_study": round(load_s_study, 3),
                           "probability": round(t3 - t2, 3), "report": round(t4 - t3, 3)})
            if args.ground:
                record["grounding"] = _grounding(engine, study, text, stated)
            if args.sr_dir:
                record["sr"] = _write_sr(args.sr_dir, f"report_{index}_{k}.sr.dcm", text, a,
                                         refs[k - 1])
            print(json.dumps(record) if args.jsonl else json.dumps(record, indent=2),
                  flush=True)
    return status


def _grounding(engine, study, text: str, findings=None) -> dict:
    from mrg_core.grounding import NoGrounding

    t = time.perf_counter()
    try:
        view, statements = engine.ground(study, text, findings)
    except NoGrounding as err:
        return {"error": str(err)}
    return {"view": view, "statements": [g.to_dict() for g in statements],
            "seconds": round(time.perf_counter() - t, 3)}


def _references(path: Path) -> list:
    from mrg_core.io.references import source_references

    try:
        return source_references([path])
    except Exception:  # noqa: BLE001 - the study loaded; an unlinked SR is still useful
        return []


def _write_sr(folder: Path, name: str, text: str, analysis, source) -> dict:
    """The draft as a preliminary SR; {"file", "linked_to_source"} or {"error"} (an empty
    draft has nothing to report)."""
    from mrg_core.report_sr import to_dicom_sr

    if not text.strip():
        return {"error": "empty_report"}
    folder.mkdir(parents=True, exist_ok=True)
    sr = to_dicom_sr(text, probability=float(analysis.probability),
                     threshold=float(analysis.threshold), model_info=analysis.model,
                     final=False, source=source)
    sr.save_as(folder / name)
    return {"file": name, "linked_to_source": source is not None}


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
