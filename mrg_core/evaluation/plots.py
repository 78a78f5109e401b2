"""Figures for metrics.md (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_roc(y_true, prob, path: str | Path, label: str = "model") -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = np.asarray(y_true), np.asarray(prob)
    keep = y >= 0
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(y[keep])) == 2:
        fpr, tpr, _ = roc_curve(y[keep], p[keep])
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y[keep], p[keep]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_reliability(curve: dict, path: str | Path) -> Path:
    """curve: classification.reliability_curve(...) output."""
    pred = [p for p in curve["mean_predicted"] if p is not None]
    obs = [o for o in curve["fraction_positive"] if o is not None]
    counts = [c for c in curve["counts"] if c]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.plot(pred, obs, "o-", label=f"model (ECE {curve['ece']:.3f})")
    for x, y, n in zip(pred, obs, counts):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate",
           title="Reliability (10 bins; n per bin)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_training_curves(history: dict | list, path: str | Path) -> Path:
    """history: training's history.json ({"epochs": [{epoch, train_loss, val_loss, ...}]})."""
    rows = history.get("epochs", []) if isinstance(history, dict) else history
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    ep = [r["epoch"] for r in rows]
    for key in ("train_loss", "train_lm_loss", "train_cls_loss", "val_loss", "val_lm_loss"):
        pts = [(e, r[key]) for e, r in zip(ep, rows) if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts), marker=".", label=key)
    axes[0].set(xlabel="epoch", ylabel="loss", title="Losses")
    axes[0].legend(fontsize=7)
    for key in ("val_auc", "val_accuracy", "val_bleu4", "val_rouge_l"):
        pts = [(e, r[key]) for e, r in zip(ep, rows) if r.get(key) is not None]
        if pts:
            axes[1].plot(*zip(*pts), marker=".", label=key)
    axes[1].set(xlabel="epoch", title="Validation", ylim=(0, 1))
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
