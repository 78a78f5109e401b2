"""Reference points a report generator must beat, all fitted on the training split only.

- MostFrequentBaseline: the most frequent (cleaned) training report. COV-CTR reports are nearly
  all distinct, so ties are broken by the medoid: the report with the largest mean word-overlap
  (Jaccard) with the others, i.e. the most "typical" report.
- RetrievalBaseline: the report of the nearest training image (cosine on image features; by
  default downsampled, per-image standardised pixels from the same preprocessing as the model).
- TemplateBaseline: one report per class (most frequent / medoid of that class); the class comes
  from the model's probability at its threshold.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.example import Example
from ..text import clean_report


def typical_report(reports: Sequence[str]) -> str:
    """Most frequent cleaned report; ties → the medoid by word-set Jaccard similarity."""
    reports = [r for r in reports if r.strip()]
    if not reports:
        return ""
    counts = Counter(clean_report(r) for r in reports)
    top = max(counts.values())
    tied = [r for r in dict.fromkeys(reports) if counts[clean_report(r)] == top]
    if len(tied) == 1:
        return tied[0]
    sets = [set(clean_report(r).split()) for r in reports]

    def mean_jaccard(r: str) -> float:
        s = set(clean_report(r).split())
        return float(np.mean([len(s & t) / max(len(s | t), 1) for t in sets]))

    return max(tied, key=mean_jaccard)


class MostFrequentBaseline:
    name = "most_frequent"

    def __init__(self, train: Sequence[Example]):
        self.report = typical_report([ex.report for ex in train])

    def generate(self, example: Example) -> str:
        return self.report


def pixel_features(image_cache, size: int = 32) -> Callable[[Example], np.ndarray]:
    """Feature function: mean over views of the [S,S] tensor average-pooled to size², then
    standardised per image (so brightness/contrast of the source do not dominate)."""

    def features(example: Example) -> np.ndarray:
        x = image_cache.get(example)  # [V,1,S,S]
        f = F.adaptive_avg_pool2d(x, size).mean(0).flatten()
        f = (f - f.mean()) / f.std().clamp_min(1e-6)
        return f.numpy().astype(np.float32)

    return features


class RetrievalBaseline:
    name = "nearest_neighbour"

    def __init__(self, train: Sequence[Example], features: Callable[[Example], np.ndarray]):
        self.train = [ex for ex in train if ex.report.strip()]
        self.features = features
        bank = np.stack([features(ex) for ex in self.train])
        self.bank = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-8)

    def nearest(self, example: Example) -> Example:
        f = self.features(example)
        f = f / max(np.linalg.norm(f), 1e-8)
        return self.train[int(np.argmax(self.bank @ f))]

    def generate(self, example: Example) -> str:
        return self.nearest(example).report


class TemplateBaseline:
    name = "class_template"

    def __init__(self, train: Sequence[Example], probability: Callable[[Example], float],
                 threshold: float = 0.5):
        self.probability, self.threshold = probability, threshold
        self.templates = {c: typical_report([ex.report for ex in train if ex.label == c])
                          for c in (0, 1)}

    def generate(self, example: Example) -> str:
        return self.templates[int(self.probability(example) >= self.threshold)]


def as_tensor_features(fn: Callable[[Example], torch.Tensor]) -> Callable[[Example], np.ndarray]:
    """Wrap a feature function that returns a tensor (e.g. the model's encoder)."""
    return lambda ex: fn(ex).detach().float().flatten().cpu().numpy()
