"""Evaluation: caption metrics, clinical correctness, classifier metrics, baselines, plots.

Heavy pieces (Java METEOR, MiniLM) load only when used.
"""
from .caption import CaptionScorer, caption_metrics
from .classification import classification_metrics, reliability_curve
from .clinical import (ReportTextClassifier, diagnostic_accuracy, extract_findings,
                       finding_scores, label_agreement)

__all__ = ["CaptionScorer", "ReportTextClassifier", "caption_metrics", "classification_metrics",
           "diagnostic_accuracy", "extract_findings", "finding_scores", "label_agreement",
           "reliability_curve"]
