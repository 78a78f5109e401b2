"""The decision threshold: where on the classifier's ROC curve the app says "COVID-19".

Two rules, chosen by `TrainConfig.operating_point`:
- "youden": the point with the best sensitivity + specificity - 1 (Youden's J);
- "equal_error": the point where sensitivity and specificity are closest (the equal-error
  rate), ties broken by J.

Why two: on a weak encoder's out-of-fold ROC, J is often flat over a wide range (2.1.0's lung-
focus encoder: J 0.49-0.52 for every threshold from 0.57 to 0.90), so its argmax is a spike
that moves with a few slices; the crossing of sensitivity and specificity is a steadier
statistic. `threshold_spread` measures that: each rule's threshold over bootstrap resamples of
whole sources (a paper or a case, as grouped_cv folds them).
"""
from __future__ import annotations

import numpy as np

RULES = ("youden", "equal_error")


def choose_threshold(probs, y, rule: str = "youden") -> float:
    """The threshold of `rule` on these probabilities and 0/1 labels (a slice is positive when
    its probability is >= the threshold), kept inside (1e-4, 1 - 1e-4)."""
    from sklearn.metrics import roc_curve

    if rule not in RULES:
        raise ValueError(f"operating point {rule!r}: expected one of {', '.join(RULES)}")
    fpr, tpr, thr = roc_curve(np.asarray(y).astype(int), np.asarray(probs, float),
                              drop_intermediate=False)
    j = tpr - fpr
    if rule == "youden":
        best = int(np.argmax(j))
    else:  # smallest |sensitivity - specificity|, then the best J among those
        gap = np.round(np.abs(tpr + fpr - 1.0), 12)
        best = int(np.lexsort((-j, gap))[0])
    return float(min(max(thr[best], 1e-4), 1 - 1e-4))


def threshold_spread(probs, y, groups, rule: str, n: int = 500, seed: int = 0) -> dict:
    """Percentiles (10, 25, 50, 75, 90) of `rule`'s threshold over `n` bootstrap resamples of
    whole groups: how far one more or one fewer source would move the operating point."""
    probs, y, groups = np.asarray(probs, float), np.asarray(y).astype(int), np.asarray(groups)
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    names = list(members)
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(n):
        idx = np.concatenate([members[names[i]] for i in rng.integers(0, len(names), len(names))])
        if len(set(y[idx].tolist())) == 2:
            found.append(choose_threshold(probs[idx], y[idx], rule))
    pct = np.percentile(found, [10, 25, 50, 75, 90])
    return {"rule": rule, "resamples": len(found),
            **{f"p{q}": round(float(v), 4) for q, v in zip((10, 25, 50, 75, 90), pct)},
            "iqr": round(float(pct[3] - pct[1]), 4)}
