"""Which rule turns slice probabilities into one study probability (issue 16), chosen on val.

    python bench/series_rule.py runs/eval_val_default111/generations.jsonl --model assets/model
    python bench/series_rule.py runs/oof_epoch6.jsonl --raw --model assets/model  # refit encoders

COV-CTR holds single slices, not series, so series are simulated from val's slice-level
predictions (the `probability` of `python -m mrg_core evaluate --split val`): a negative series
is `n` negative slices, a positive one has `m` positive slices among them (lesions on a few
slices of a scan, or on many). Each rule is scored by AUC and by balanced accuracy at a study
threshold chosen here, over every mix. Rules work on the classifier's raw scale (the calibration is undone).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrg_core.study_level import RULES, aggregate  # noqa: E402


def raw_scale(p: np.ndarray, calibration) -> np.ndarray:
    if not calibration:
        return p
    a, b = calibration
    z = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1))
    return 1 / (1 + np.exp(-((z - b) / a)))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def simulate(pos: np.ndarray, neg: np.ndarray, n: int, m: int, reps: int, rng) -> tuple:
    negs = np.stack([rng.choice(neg, n, replace=True) for _ in range(reps)])
    poss = np.stack([np.concatenate([rng.choice(pos, m), rng.choice(neg, n - m)])
                     for _ in range(reps)])
    return poss, negs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generations", type=Path)
    ap.add_argument("--model", type=Path, default=Path("assets/model"))
    ap.add_argument("--slices", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--raw", action="store_true",
                    help="the probabilities are on the raw scale already (e.g. grouped_cv's "
                         "out-of-fold ones, for a model whose encoder trained on val)")
    a = ap.parse_args(argv)
    cfg = json.loads((a.model / "config.json").read_text())
    rows = [json.loads(line) for line in a.generations.read_text().splitlines() if line.strip()]
    p = np.array([r["probability"] for r in rows])
    if not a.raw:
        p = raw_scale(p, cfg.get("calibration"))
    y = np.array([r["label"] for r in rows])
    pos, neg = p[y == 1], p[y == 0]
    rng = np.random.default_rng(0)
    out = {"slices_per_series": a.slices, "reps": a.reps, "val_slices": len(rows),
           "threshold_raw": cfg["threshold"], "by_positive_slices": {}}
    mixes = (1, 3, 10, a.slices)
    sims = {m: simulate(pos, neg, a.slices, m, a.reps, rng) for m in mixes}
    scores = {rule: {m: (np.array([aggregate(s, rule) for s in sims[m][0]]),
                         np.array([aggregate(s, rule) for s in sims[m][1]])) for m in mixes}
              for rule in RULES}
    # one study threshold per rule: the best balanced accuracy over every mix at once (the
    # slice threshold does not carry over: the highest of 30 negative slices often passes it)
    out["study_threshold"] = {}
    for rule in RULES:
        sp = np.concatenate([scores[rule][m][0] for m in mixes])
        sn = np.concatenate([scores[rule][m][1] for m in mixes])
        grid = np.unique(np.concatenate([sp, sn]))
        accs = [0.5 * ((sp >= t).mean() + (sn < t).mean()) for t in grid]
        out["study_threshold"][rule] = float(grid[int(np.argmax(accs))])
    print(f"{'positive slices':>16} " + " ".join(f"{r:>20}" for r in RULES))
    for m in mixes:
        res = {}
        for rule in RULES:
            sp, sn = scores[rule][m]
            t = out["study_threshold"][rule]
            acc = 0.5 * ((sp >= t).mean() + (sn < t).mean())
            res[rule] = {"auc": round(auc(sp, sn), 3), "balanced_accuracy": round(float(acc), 3)}
        out["by_positive_slices"][m] = res
        print(f"{m:>16} " + " ".join(f"AUC {v['auc']:.3f} acc {v['balanced_accuracy']:.3f}"
                                     for v in res.values()))
    print("study thresholds (raw scale):", {k: round(v, 3) for k, v in
                                            out["study_threshold"].items()})
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if math.isfinite(len(rows)) else 1


if __name__ == "__main__":
    sys.exit(main())
