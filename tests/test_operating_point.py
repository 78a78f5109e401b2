"""The decision threshold's rules (mrg_core/operating_point.py), on val and out of fold."""
import numpy as np
import pytest
import torch

from mrg_core.operating_point import choose_threshold, threshold_spread

# 4 negatives, 4 positives: at 0.4 sensitivity 1 / specificity 0.75 (J 0.75, the best);
# at 0.5 both 0.75 (J 0.5, where they cross)
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.9])


def test_rules_on_a_hand_computed_roc():
    assert choose_threshold(P, Y, "youden") == pytest.approx(0.4)
    assert choose_threshold(P, Y, "equal_error") == pytest.approx(0.5)
    # no exact crossing: at 0.8 sensitivity 0.5 / specificity 0.75, at 0.5 1.0 / 0.75, equally
    # far apart; the better J (0.5) wins
    assert choose_threshold([0.1, 0.2, 0.3, 0.8, 0.5, 0.9], [0, 0, 0, 0, 1, 1],
                            "equal_error") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="youden, equal_error"):
        choose_threshold(P, Y, "f1")


def test_an_unknown_rule_is_refused_before_training():
    from mrg_core.training import TrainConfig

    assert TrainConfig.from_dict({"operating_point": "equal_error"}).operating_point == \
        "equal_error"
    with pytest.raises(ValueError, match="operating_point 'eer'"):
        TrainConfig.from_dict({"operating_point": "eer"})


def test_spread_resamples_whole_sources():
    """Two sources holding the same eight slices: any resample of whole sources has the same
    ROC, so the threshold never moves; resampled slice by slice, it would."""
    p, y = np.tile(P, 2), np.tile(Y, 2)
    groups = np.repeat(np.arange(2), len(P))
    for rule, t in (("youden", 0.4), ("equal_error", 0.5)):
        s = threshold_spread(p, y, groups, rule, n=50)
        assert s["resamples"] == 50 and s["iqr"] == 0
        assert s["p10"] == s["p90"] == pytest.approx(t)
    # one source per slice: resamples differ, and the threshold with them
    s = threshold_spread(P, Y, np.arange(len(P)), "youden", n=50)
    assert s["p90"] > s["p10"]


def test_val_calibration_uses_the_rule(tmp_path):
    """training.calibrate_threshold sets the saved model's threshold to the rule's point on
    val's encoder probabilities."""
    from mrg_core.data import ImageCache, load_covctr
    from mrg_core.data.synthetic import write_synthetic_covctr
    from mrg_core.models import ReportModel
    from mrg_core.models.factory import tiny_model
    from mrg_core.training import calibrate_threshold

    val = load_covctr(write_synthetic_covctr(tmp_path / "covctr", n={"train": 2, "val": 24,
                                                                     "test": 2}, size=32))["val"]
    tiny_model(seed=3).save_pretrained(tmp_path / "model")
    model = ReportModel.from_pretrained(tmp_path / "model").eval()
    cache = ImageCache(model.config.preprocess)
    keep = [ex for ex in val if ex.label in (0, 1)]
    with torch.no_grad():
        probs = torch.sigmoid(model.encoder(torch.stack([cache.get(ex) for ex in keep]))
                              .logits[:, 0]).numpy()
    y = np.array([ex.label for ex in keep])
    found = {}
    for rule in ("youden", "equal_error"):
        done = calibrate_threshold(tmp_path / "model", val, cache, "cpu", rule=rule)
        found[rule] = ReportModel.from_pretrained(tmp_path / "model").config.threshold
        assert done["rule"] == rule and found[rule] == done["threshold"]
        assert found[rule] == pytest.approx(choose_threshold(probs, y, rule), abs=1e-5)
    assert found["youden"] != found["equal_error"]  # the test tells the rules apart
