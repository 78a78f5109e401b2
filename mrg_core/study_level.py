"""One study probability from the probabilities of its slices or views (issue 16).

A chest CT series shows pneumonia on some slices, not on all: averaging every slice dilutes
a lesion seen on a few, the single highest slice lets one noisy slice decide. The rules work on
the classifier's raw scale. A model's config names its rule and study threshold
(`study_aggregation`, `study_threshold`), chosen on val with `bench/series_rule.py`; the shipped
model's card has the table.
"""
from __future__ import annotations

import numpy as np

TOP_K = 3


def _mean(p: np.ndarray) -> float:
    return float(p.mean())


def _max(p: np.ndarray) -> float:
    return float(p.max())


def _top_k_mean(p: np.ndarray) -> float:
    return float(np.sort(p)[-TOP_K:].mean())


def _noisy_or(p: np.ndarray) -> float:
    return float(1.0 - np.prod(1.0 - np.clip(p, 0.0, 1.0)))


RULES = {"mean": _mean, "max": _max, f"top{TOP_K}_mean": _top_k_mean, "noisy_or": _noisy_or}


def aggregate(probabilities, rule: str) -> float:
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("no slice probabilities to aggregate")
    return RULES[rule](p)


def key_views(probabilities, k: int = TOP_K) -> tuple[int, ...]:
    """Indices of the k most probable slices, most probable first (ties: lower index)."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    order = sorted(range(p.size), key=lambda i: (-p[i], i))
    return tuple(order[:k])
