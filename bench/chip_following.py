"""Does the draft follow the finding chips (issue 21)? Flip one chip at a time on val studies.

    python bench/chip_following.py --studies 24 --offset 6 --finding-guidance 1.5 \
        --json bench/results/chip_following_val_model2.json

For each study and each finding the model states in words: flip that chip (tick it when the
model did not predict it, untick it when it did), draft again, make the edit the page and the
CLI make (the unflipped draft with the flipped chips' clauses changed:
mrg_core.finding_chips.follow_chips), and read both with the rule-based finding extractor
(mrg_core.evaluation.clinical.extract_findings). Reported per finding and overall, for the
edit and (`redraft`) for the model's redraft alone:
- followed: the flipped finding is asserted after ticking / no longer asserted after unticking;
- others kept: the other findings the extractor reads are those of the unflipped draft (a chip
  changes its finding, not the rest of the report).
Lobe chips are read the same way (the extractor reads lobes only where an abnormality is).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mrg_core.models import GenerationSettings, ReportModel  # noqa: E402
from mrg_core.models.quantize import PRECISIONS, apply_precision  # noqa: E402
from mrg_core.paths import DEFAULT_MODEL_DIR  # noqa: E402


def flip_one(model, study, settings, names=None) -> list[dict]:
    """One row per finding: the unflipped draft, the redraft and the edit, and whether they
    follow the flip."""
    from mrg_core.evaluation.clinical import LOBE_NAMES, extract_findings
    from mrg_core.finding_chips import follow_chips

    pred = model.predict(study)
    base_stated = set(pred.findings)
    base = model.generate_report(study, settings)
    base_read = extract_findings(base)
    rows = []
    for name in names or model.finding_names:
        on = name not in base_stated
        stated = base_stated | {name} if on else base_stated - {name}
        redraft = "".join(model.stream_report(study, settings, findings=stated))
        text = follow_chips(base, base_stated, redraft, stated, model.finding_names,
                            model.config.finding_phrases,
                            [n for n in model.finding_names if n not in LOBE_NAMES])
        row = {"finding": name, "ticked": on}
        for key, t in (("", text), ("redraft_", redraft)):
            read = extract_findings(t)
            others = lambda r: {x for x in r if x not in (name, "normal")}  # noqa: E731
            row.update({f"{key}followed": (name in read) if on else (name not in read),
                        f"{key}others_kept": others(read) == others(base_read)})
        rows.append({**row, "draft": text, "redraft": redraft, "unflipped": base})
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for key, sel in (("tick", True), ("untick", False)):
        part = [r for r in rows if r["ticked"] == sel]
        out[key] = {"n": len(part), **{
            k: round(sum(r[k] for r in part) / max(len(part), 1), 4)
            for k in ("followed", "others_kept", "redraft_followed", "redraft_others_kept")}}
    per = {}
    for r in rows:
        d = per.setdefault(r["finding"], {"tick_n": 0, "tick_followed": 0,
                                          "untick_n": 0, "untick_followed": 0})
        k = "tick" if r["ticked"] else "untick"
        d[f"{k}_n"] += 1
        d[f"{k}_followed"] += int(r["followed"])
    out["per_finding"] = per
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data", type=Path, default=None, help="COV-CTR folder (default: shared)")
    ap.add_argument("--studies", type=int, default=24, help="N val studies")
    ap.add_argument("--offset", type=int, default=0,
                    help="skip the first val studies (those a setting was chosen on)")
    ap.add_argument("--precision", choices=PRECISIONS, default="int8-weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finding-guidance", type=float, default=None,
                    help="guidance strength of a flipped draft (default: the model's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from mrg_core.data import load_splits
    from mrg_core.data.images import ImageCache

    torch.set_num_threads(args.threads)
    model = apply_precision(ReportModel.from_pretrained(args.model), args.precision)
    if not model.finding_names:
        print("this model states no findings in words: nothing to flip", file=sys.stderr)
        return 2
    examples = load_splits(args.data)["val"][args.offset: args.offset + args.studies]
    cache = ImageCache()
    settings = GenerationSettings(finding_guidance=args.finding_guidance)
    rows, t0 = [], time.perf_counter()
    for ex in examples:
        for r in flip_one(model, cache.load_study(ex), settings):
            rows.append({"id": ex.id, **r})
    res = {"split": "val", "n_studies": len(examples), "offset": args.offset,
           "precision": args.precision,
           "finding_guidance": args.finding_guidance,
           "model": {k: model.info.get(k) for k in ("name", "version")},
           "seconds": round(time.perf_counter() - t0, 1), **summary(rows)}
    print(json.dumps({k: v for k, v in res.items() if k != "per_finding"}, indent=2))
    for name, d in res["per_finding"].items():
        print(f"{name:16s} tick {d['tick_followed']}/{d['tick_n']}  "
              f"untick {d['untick_followed']}/{d['untick_n']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**res, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
