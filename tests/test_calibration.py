"""Platt scaling of the shown probability: fitted on held-out labels, monotone, decisions and
AUC unchanged, threshold shown on the same scale, evaluation on that scale too."""
import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from mrg_core.models import tiny_model
from mrg_core.study import study_from_arrays
from mrg_core.training import platt_scaling


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities whose logits are 4x too large (a small-data classifier)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return 1 / (1 + np.exp(-4 * z)), y


def test_platt_scaling_fixes_overconfidence_on_new_data():
    p_fit, y_fit = overconfident(300, 0)
    a, b = platt_scaling(p_fit, y_fit)
    assert 0.1 < a < 0.5  # shrinks the 4x logits back towards the truth
    p, y = overconfident(2000, 1)
    logit = np.log(p / (1 - p))
    cal = 1 / (1 + np.exp(-(a * logit + b)))
    assert log_loss(y, cal) < 0.8 * log_loss(y, p)
    assert roc_auc_score(y, cal) == roc_auc_score(y, p)  # monotone: ranking unchanged


def test_platt_scaling_refuses_what_it_cannot_fit():
    assert platt_scaling(np.array([0.2, 0.8, 0.6]), np.array([1, 1, 1])) is None  # one class
    assert platt_scaling(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) is None  # reversed


def test_prediction_shows_the_calibrated_scale_and_keeps_the_decision():
    model = tiny_model("medvlm")
    studies = [study_from_arrays([np.random.default_rng(i).integers(0, 256, (64, 64), np.uint8)])
               for i in range(6)]
    raw = [model.predict(s) for s in studies]
    model.config.threshold = float(np.median([r.probability for r in raw]))
    raw = [model.predict(s) for s in studies]
    model.config.calibration = [0.5, -0.3]
    for s, r in zip(studies, raw):
        c = model.predict(s)
        logit = math.log(r.probability / (1 - r.probability))
        assert math.isclose(c.probability, 1 / (1 + math.exp(-(0.5 * logit - 0.3))), rel_tol=1e-6)
        assert c.labels["pneumonia"] == c.probability
        assert c.label == r.label == int(c.probability >= c.threshold)
        assert c.threshold == model.calibrated(model.config.threshold) != r.threshold
    assert model.info["threshold"] == model.calibrated(model.config.threshold)
    assert {r.label for r in raw} == {0, 1}  # both decisions were exercised
