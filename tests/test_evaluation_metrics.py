"""Caption metrics (real pycocoevalcap + Java), finding extraction, classifier metrics."""
import shutil

import numpy as np
import pytest

from conftest import require
from mrg_core.evaluation import (CaptionScorer, classification_metrics, extract_findings,
                                 finding_scores, reliability_curve)
from mrg_core.evaluation.clinical import label_agreement

REFS = {
    "a": "The thorax was symmetrical, no enlarged lymph nodes were seen in the mediastinum.",
    "b": "Patchy ground glass shadows were seen in the lower lobe of the right lung.",
    "c": "Nodular shadows were seen under the pleura of the upper lobe of the left lung.",
    "d": "No abnormal density shadow was seen in the bilateral thoracic cavity.",
}


def test_caption_metrics_identical_and_unrelated():
    require(shutil.which("java"), "METEOR needs Java (apt-get install openjdk-17-jre-headless)")
    with CaptionScorer() as scorer:  # one JVM for both calls
        same = scorer.score(REFS, REFS)
        other = scorer.score(REFS, {k: "banana bread recipe with walnuts" for k in REFS})
    assert same["n"] == 4
    assert same["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE_L"] == pytest.approx(1.0) and same["CIDEr"] > 3.0
    assert 0.0 < same["METEOR"] <= 1.0
    assert other["BLEU_1"] < 0.05 and other["CIDEr"] < 0.1 and other["METEOR"] < 0.1


def test_findings_positive_negated_and_lobes():
    f = extract_findings("Patchy ground glass shadows were seen in the lower lobe of the right "
                         "lung, and no enlarged lymph nodes were seen in the mediastinum.")
    assert {"ground_glass", "patchy_shadow", "RLL"} <= f
    assert "enlarged_lymph_nodes" not in f and "normal" not in f
    assert "enlarged_lymph_nodes" in extract_findings("Enlarged lymph nodes in the mediastinum.")
    normal = "No abnormal density shadow was seen. The lungs were clear."
    assert extract_findings(normal) == {"normal"}
    assert "ground_glass" not in extract_findings("Ground glass opacity was not seen.")
    both = extract_findings("Ground glass shadows in the lower lobes of both lungs.")
    assert {"RLL", "LLL", "bilateral"} <= both
    assert {"RUL", "consolidation"} <= extract_findings("Consolidation in the right upper lobe.")
    assert "LUL" in extract_findings("Nodular shadow in the lingual segment of the left lung.")


def test_finding_scores():
    perfect = finding_scores(REFS, REFS)
    assert perfect["micro_f1"] == pytest.approx(1.0) and perfect["macro_f1"] == pytest.approx(1.0)
    swapped = finding_scores(REFS, {"a": REFS["b"], "b": REFS["a"], "c": REFS["d"], "d": REFS["c"]})
    assert swapped["micro_f1"] < 0.5


def test_classification_metrics_known_arrays():
    m = classification_metrics([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9], threshold=0.5)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["f1"] == 1.0
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0
    assert m["brier"] == pytest.approx(np.mean([0.01, 0.16, 0.16, 0.01]))
    # perfectly calibrated bins: within each bin the positive rate equals the probability
    p = np.repeat([0.05, 0.25, 0.45, 0.65, 0.85], 20)
    y = np.concatenate([np.r_[np.ones(int(q * 20)), np.zeros(20 - int(q * 20))] for q in
                        [0.05, 0.25, 0.45, 0.65, 0.85]])
    assert reliability_curve(y, p)["ece"] == pytest.approx(0.0, abs=1e-9)
    assert classification_metrics(y, 1 - p)["auc"] < 0.5
    assert classification_metrics([1, 1, -1], [0.9, 0.8, 0.1])["n"] == 2  # unknown ignored


def test_label_agreement():
    a = label_agreement({"x": 1, "y": 0, "z": 1}, {"x": 1, "y": 0, "z": 0})
    assert a["n"] == 3 and a["agreement"] == pytest.approx(2 / 3)


def test_text_classifier_learns_and_roundtrips(tmp_path):
    from mrg_core.data.synthetic import NORMAL_REPORT, covid_report
    from mrg_core.evaluation import ReportTextClassifier

    pos = [covid_report(s, lobe) for s in ("right", "left") for lobe in ("upper", "lower")]
    neg = [NORMAL_REPORT, "The lungs were clear and no abnormal density shadow was seen.",
           "No enlarged lymph nodes, the texture of both lungs was clear.",
           "The thorax was symmetrical and both lungs were clear."]
    clf = ReportTextClassifier(C=100.0).fit(pos + neg, [1] * 4 + [0] * 4)
    assert list(clf.predict(pos[:1] + neg[:1])) == [1, 0]
    clf.save(tmp_path / "clf.json")
    again = ReportTextClassifier.load(tmp_path / "clf.json")
    assert np.allclose(again.predict_proba(pos + neg), clf.predict_proba(pos + neg))


def test_finding_head_metrics_against_reference_findings():
    """Per finding head: AUC of its probability and F1 of what the draft stated, against the
    findings the reference report names."""
    from types import SimpleNamespace

    from mrg_core.data.example import Example
    from mrg_core.evaluation.runner import finding_head_metrics

    model = SimpleNamespace(finding_names=["ground_glass", "RLL", "cavity"])
    exs = [Example(k, [], v, label=1) for k, v in REFS.items()]
    # a perfect ground-glass head, a backwards RLL head that states nothing; no cavity anywhere
    preds = {k: {"finding_probabilities": {"ground_glass": 0.9 if k == "b" else 0.1,
                                           "RLL": 0.1 if k == "b" else 0.8, "cavity": 0.2},
                 "findings": ["ground_glass"] if k == "b" else []} for k in REFS}
    m = finding_head_metrics(model, exs, preds)
    assert m["ground_glass"] == {"n_positive": 1, "auc": 1.0, "f1": 1.0, "stated": 1}
    assert m["RLL"]["auc"] == 0.0 and m["RLL"]["f1"] == 0.0 and m["RLL"]["stated"] == 0
    assert m["cavity"]["n_positive"] == 0 and m["cavity"]["auc"] is None
