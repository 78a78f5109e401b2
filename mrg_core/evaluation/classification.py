"""Binary classifier metrics at the model's threshold, with calibration (Brier, ECE)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, brier_score_loss, confusion_matrix, f1_score,
                             roc_auc_score, roc_curve)


def reliability_curve(y_true, prob, n_bins: int = 10) -> dict:
    """Equal-width bins over [0, 1]: per bin mean predicted probability, observed positive rate
    and count (empty bins give None). ECE = sum_b n_b/N * |observed_b - predicted_b|."""
    y, p = np.asarray(y_true, float), np.clip(np.asarray(prob, float), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed last bin so p == 1.0 lands in it
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    mean_pred, frac_pos, counts = [], [], []
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        counts.append(n)
        if n == 0:
            mean_pred.append(None)
            frac_pos.append(None)
            continue
        mp, fp = float(p[m].mean()), float(y[m].mean())
        mean_pred.append(mp)
        frac_pos.append(fp)
        ece += n / max(len(p), 1) * abs(fp - mp)
    return {"edges": edges.tolist(), "mean_predicted": mean_pred, "fraction_positive": frac_pos,
            "counts": counts, "ece": float(ece)}


def classification_metrics(y_true, prob, threshold: float = 0.5, n_bins: int = 10) -> dict:
    """AUC, accuracy, F1, sensitivity, specificity (label = prob >= threshold), Brier, ECE.
    Examples with label < 0 (unknown) are ignored. AUC is NaN when one class is absent."""
    y, p = np.asarray(y_true, int), np.asarray(prob, float)
    keep = y >= 0
    y, p = y[keep], p[keep]
    out = {"n": int(len(y)), "n_positive": int(y.sum()), "threshold": float(threshold)}
    if len(y) == 0:
        return out
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    two_classes = len(np.unique(y)) == 2
    out.update({
        "auc": float(roc_auc_score(y, p)) if two_classes else float("nan"),
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "brier": float(brier_score_loss(y, p, pos_label=1)) if two_classes
        else float(np.mean((p - y) ** 2)),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    })
    curve = reliability_curve(y, p, n_bins)
    out["ece"] = curve["ece"]
    out["reliability"] = curve
    return out


def roc_points(y_true, prob) -> dict:
    y, p = np.asarray(y_true, int), np.asarray(prob, float)
    keep = y >= 0
    fpr, tpr, thr = roc_curve(y[keep], p[keep])
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
