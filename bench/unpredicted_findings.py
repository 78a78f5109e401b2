"""Should a draft state only the findings its finding heads predicted (issue 14)? Measured on
the drafts of `python -m mrg_core evaluate` (its generations.jsonl), without drafting again.

    python -m mrg_core evaluate --model assets/model --split val --precision int8-weights \
        --out runs/val
    python bench/unpredicted_findings.py runs/val/generations.jsonl --model assets/model \
        --json bench/results/unpredicted_findings_val_model2.json

A finding_prompt model states its predicted findings before the report, and the page shows
them as chips; the LM may still write a finding whose chip is off ("small lamellar shadow"
under a negative call). Each variant removes the clauses that state such findings with the
edit the page makes when a chip is unticked (mrg_core.finding_chips.follow_chips), then scores
the texts as `evaluate` does: BLEU-4, ROUGE-L, CIDEr, finding F1, the MiniLM reader's
diagnostic accuracy (fitted on train), decision-text agreement and distinct drafts. Also
reported: how often a finding the heads did not predict is in the study's reference report
(the extra findings' precision), against the heads' own stated findings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, machine  # noqa: E402
from mrg_core.evaluation.clinical import LOBE_NAMES, extract_findings  # noqa: E402
from mrg_core.finding_chips import follow_chips  # noqa: E402

# variant -> (only drafts of negative calls, lobes count as findings to remove)
VARIANTS = {"as drafted": None,
            "negative calls: unpredicted findings removed": (True, False),
            "all calls: unpredicted findings removed": (False, False),
            "all calls: unpredicted findings and lobes removed": (False, True)}


def chips_of(config: dict) -> tuple[list[str], dict[str, str], list[str]]:
    """(chip names in label order, their phrases, those that are findings, not lobes): the
    model's own finding names (ReportModel.finding_names), read from its config alone."""
    from mrg_core.models.config import ReportModelConfig
    from mrg_core.models.report_model import ReportModel

    cfg = ReportModelConfig.from_dict(config)
    chips = ReportModel._finding_names(cfg)
    return chips, dict(cfg.finding_phrases), [n for n in chips if n not in LOBE_NAMES]


def without_unpredicted(rec: dict, chips, phrases, findings_only, negative_only: bool,
                        lobes: bool) -> str:
    """The draft with the clauses stating chips the heads did not predict removed (lobes only
    if `lobes`), as the page's edit for unticking them (what the removed clauses also stated
    is kept, stated plainly)."""
    said = extract_findings(rec["report"]) & set(chips)
    extra = (said - set(rec.get("findings") or ())) & set(chips if lobes else findings_only)
    if not extra or (negative_only and rec["predicted_label"] == 1):
        return rec["report"]
    keep = [n for n in chips if n in said - extra]
    return follow_chips(rec["report"], sorted(said), rec["report"], keep, chips, phrases,
                        findings_only)


def extra_precision(recs: list[dict], chips, findings_only) -> dict:
    """Of the findings a draft states beyond its heads', the share its reference states; and
    the same for the heads' predicted findings that the draft states."""
    extra = extra_hit = own = own_hit = 0
    for r in recs:
        ref = extract_findings(r.get("reference") or "")
        said = extract_findings(r["report"]) & set(findings_only)
        for n in said:
            if n in set(r.get("findings") or ()):
                own, own_hit = own + 1, own_hit + (n in ref)
            else:
                extra, extra_hit = extra + 1, extra_hit + (n in ref)
    return {"unpredicted_stated": extra,
            "unpredicted_in_reference": extra_hit / extra if extra else None,
            "predicted_stated": own,
            "predicted_in_reference": own_hit / own if own else None}


def score(variants: dict[str, dict[str, str]], recs: list[dict], train) -> dict:
    from mrg_core.evaluation.caption import CaptionScorer
    from mrg_core.evaluation.clinical import (ReportTextClassifier, diagnostic_accuracy,
                                              finding_scores)
    from mrg_core.evaluation.decision_text import decision_text_agreement

    refs = {r["id"]: [r["reference"]] for r in recs if (r.get("reference") or "").strip()}
    labels = {r["id"]: r["label"] for r in recs}
    reader = ReportTextClassifier.for_examples(train)
    out = {}
    with CaptionScorer(meteor=False) as scorer:
        for name, hyps in variants.items():
            row = scorer.score(refs, hyps)
            agree = decision_text_agreement(
                {r["id"]: {"label": r["predicted_label"], "report": hyps[r["id"]],
                           "findings": r.get("findings")} for r in recs})
            out[name] = {
                "BLEU_4": row["BLEU_4"], "ROUGE_L": row["ROUGE_L"], "CIDEr": row["CIDEr"],
                "finding_micro_f1": finding_scores(refs, hyps)["micro_f1"],
                "diagnostic_accuracy": diagnostic_accuracy(reader, hyps, labels)["accuracy"],
                "negative_states_no_finding": agree["negative_states_no_finding"],
                "distinct_drafts": len(set(hyps.values())),
                "drafts_edited": sum(hyps[r["id"]] != r["report"] for r in recs)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generations", help="generations.jsonl written by mrg_core evaluate")
    ap.add_argument("--model", default="assets/model", help="the model folder that drafted them")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    from mrg_core.data import load_covctr
    from mrg_core.paths import data_dir

    recs = [json.loads(x) for x in Path(args.generations).read_text().splitlines() if x]
    recs = [r for r in recs if "error" not in r and r.get("report") is not None]
    written = Path(args.generations).with_name("metrics.json")  # evaluate's, beside them
    run = json.loads(written.read_text()) if written.is_file() else {}
    if run.get("split") == "test":
        raise SystemExit("val drafts only: test is scored once, by evaluate")
    config = json.loads((Path(args.model) / "config.json").read_text())
    chips, phrases, findings_only = chips_of(config)
    if not chips:
        raise SystemExit(f"{args.model} states no findings before its drafts: nothing to measure")
    variants = {}
    for name, how in VARIANTS.items():
        variants[name] = {r["id"]: r["report"] if how is None else
                          without_unpredicted(r, chips, phrases, findings_only, *how)
                          for r in recs}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "split": run.get("split"), "precision": run.get("precision"),
              "model": {k: config.get(k) for k in ("name", "version")},
              "generations": Path(args.generations).name, "studies": len(recs),
              "extra_findings": extra_precision(recs, chips, findings_only),
              "variants": score(variants, recs, load_covctr(data_dir() / "covctr")["train"])}
    emit(result, Path(args.json) if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
