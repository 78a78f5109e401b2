"""Draft-quality metrics of the evaluation: draft diversity, Grad-CAM mass on the lung fields
(classical lung mask: phantom, real COV-CTR slices) and decision-text agreement."""
import itertools
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from mrg_core.evaluation.clinical import extract_findings
from mrg_core.evaluation.decision_text import abnormal_findings, decision_text_agreement
from mrg_core.evaluation.diversity import draft_diversity
from mrg_core.evaluation.saliency import (lung_mask, lung_mass_share, saliency_summary,
                                          study_lung_share)
from mrg_core.paths import data_dir
from mrg_core.text import clean_report
from tests.factories import lung_phantom as phantom

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NORMAL = "No abnormality. The texture of both lungs was clear."
GGO_RUL = "Patchy ground glass shadows were seen in the upper lobe of the right lung."
GGO_LLL = "Patchy ground glass shadows were seen in the lower lobe of the left lung."
EFFUSION = "A small pleural effusion was seen on the left."

# ----------------------------------------------------------------------------- diversity


def test_single_template_tells_no_studies_apart():
    refs = {"a": NORMAL, "b": GGO_RUL, "c": GGO_LLL, "d": EFFUSION}
    same = draft_diversity({k: "No abnormality." for k in refs}, refs)
    assert same["distinct_drafts"] == 1 and same["distinct_ratio"] == 0.25
    assert same["n_pairs_different_findings"] == 6
    assert same["different_findings_different_drafts"] == 0.0
    own = draft_diversity(dict(refs), refs)
    assert own["distinct_ratio"] == 1.0 and own["different_findings_different_drafts"] == 1.0


def test_drafts_are_compared_after_cleaning_and_pairs_with_equal_findings_do_not_count():
    refs = {"a": NORMAL, "b": "Both lungs were clear.", "c": GGO_RUL}
    drafts = {"a": "No abnormality.", "b": "no  ABNORMALITY .", "c": GGO_RUL}
    d = draft_diversity(drafts, refs)
    assert d["distinct_drafts"] == 2  # a and b clean to the same text
    # a-b share their (normal) findings: only a-c and b-c count, and both differ
    assert d["n_pairs_different_findings"] == 2 and d["different_findings_different_drafts"] == 1.0


def test_pair_share_counted_by_groups_equals_enumerating_pairs():
    rng = np.random.default_rng(0)
    texts = [NORMAL, GGO_RUL, GGO_LLL, EFFUSION, GGO_RUL + " " + EFFUSION]
    refs = {f"s{i}": texts[rng.integers(len(texts))] for i in range(60)}
    drafts = {k: texts[rng.integers(3)] for k in refs}
    refs["no_ref"] = ""  # counts for distinct drafts, not for pairs
    drafts["no_ref"] = "something else entirely"
    d = draft_diversity(drafts, refs)
    differ = same = 0
    for a, b in itertools.combinations([k for k in refs if refs[k]], 2):
        if extract_findings(refs[a]) != extract_findings(refs[b]):
            differ += 1
            same += clean_report(drafts[a]) == clean_report(drafts[b])
    assert d["n_pairs_different_findings"] == differ
    assert d["different_findings_different_drafts"] == pytest.approx(1 - same / differ)
    assert d["n"] == 61 and d["distinct_drafts"] == 4


def test_no_pairs_with_different_findings_gives_none():
    d = draft_diversity({"a": "x", "b": "y"}, {"a": NORMAL, "b": NORMAL})
    assert d["different_findings_different_drafts"] is None and d["distinct_ratio"] == 1.0

# ----------------------------------------------------------------------------- decision-text


def test_lobes_alone_are_not_abnormal_and_head_findings_are_allowed():
    assert abnormal_findings(GGO_RUL) == {"ground_glass", "patchy_shadow"}
    assert abnormal_findings(GGO_RUL, ["ground_glass", "patchy_shadow", "RUL"]) == set()
    assert abnormal_findings(NORMAL) == set()


def test_decision_text_agreement_counts_each_call():
    preds = {
        "n_ok": {"label": 0, "report": NORMAL},
        "n_bad": {"label": 0, "report": GGO_RUL},
        "n_head": {"label": 0, "report": GGO_RUL, "findings": ["ground_glass", "patchy_shadow"]},
        "n_head_partial": {"label": 0, "report": GGO_RUL, "findings": ["ground_glass"]},
        "p_ok": {"label": 1, "report": EFFUSION},
        "p_bad": {"label": 1, "report": NORMAL},
        "p_ok2": {"label": 1, "report": GGO_LLL},
        "broken": {"error": "E_DECODE: unreadable"},
    }
    t = decision_text_agreement(preds)
    assert t["n_negative"] == 4 and t["negative_states_no_finding"] == 0.5
    assert t["n_positive"] == 3 and t["positive_states_finding"] == pytest.approx(2 / 3)
    assert decision_text_agreement({})["negative_states_no_finding"] is None

# ----------------------------------------------------------------------------- saliency


def gaussian(shape, cx, cy, sigma):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def test_phantom_lung_mask_matches_the_lungs():
    img, truth = phantom()
    m = lung_mask(img)
    assert m is not None and m.dtype == bool and m.shape == img.shape
    iou = (m & truth).sum() / (m | truth).sum()
    assert iou > 0.85, iou


def test_heatmap_share_rewards_focus_on_a_lung_not_coverage():
    img, _ = phantom()
    m = lung_mask(img)
    assert lung_mass_share(gaussian(img.shape, 178, 120, 12), m) > 0.9  # inside the left lung
    assert lung_mass_share(gaussian(img.shape, 128, 28, 10), m) < 0.1  # body wall / outside
    assert lung_mass_share(gaussian(img.shape, 10, 10, 10), m) < 0.1  # corner, outside the body
    # break-on-purpose: a map that covers everything is no evidence of looking at the lungs
    uniform = lung_mass_share(np.ones(img.shape, np.float32), m)
    assert uniform == pytest.approx(m.mean()) and uniform < 0.5
    assert lung_mass_share(np.zeros(img.shape, np.float32), m) is None


def test_no_plausible_lung_is_none_and_excluded():
    assert lung_mask(np.full((128, 128), 128, np.uint8)) is None  # flat grey
    assert lung_mask(np.zeros((128, 128), np.uint8)) is None  # black
    img, _ = phantom()
    flat = np.full((64, 64), 90, np.uint8)
    heat = gaussian(img.shape, 78, 120, 12)
    share, found = study_lung_share([img, flat], [heat, np.ones((64, 64), np.float32)])
    assert found and share > 0.9  # the view without a mask is left out
    assert study_lung_share([flat], [np.ones((64, 64), np.float32)]) == (None, False)
    s = saliency_summary({"a": {"lung_share": 0.8, "lung_mask": True},
                          "b": {"lung_share": 0.4, "lung_mask": True},
                          "c": {"lung_share": None, "lung_mask": False}},
                         {"a": 1, "b": 0, "c": 1})
    assert s["lung_share_mean"] == pytest.approx(0.6) and s["lung_share_positive_mean"] == 0.8
    assert (s["n_with_mask"], s["n_scored"], s["n_excluded"]) == (2, 2, 1)


# every 16th slice of the COV-CTR test split (splits.json order): 5 non-COVID, 3 COVID
REAL_SLICES = ["103.png", "15%0.jpg", "2020.02.23.20026856-p17-115%5.png",
               "2020.03.21.20040691-p18-67-2.png", "382.png", "67%0.jpg", "83%2.jpg",
               "kjr-21-e24-p5-29.png"]


@pytest.fixture(scope="module")
def covctr_test():
    """COV-CTR test examples by id; skips without the shared data, except under CI=true."""
    from mrg_core.data import load_covctr

    d = data_dir() / "covctr"
    require((d / "images").is_dir(), f"shared data {d} is absent")
    return {ex.id: ex for ex in load_covctr(d)["test"]}


def _display(ex) -> np.ndarray:
    from mrg_core.io import load_study

    return load_study([str(p) for p in ex.image_paths]).views[0].display


@pytest.mark.parametrize("image_id", REAL_SLICES)
def test_real_slice_mask_covers_both_lungs(covctr_test, image_id):
    m = lung_mask(_display(covctr_test[image_id]))
    assert m is not None
    h, w = m.shape
    assert 0.05 <= m.mean() <= 0.60, m.mean()
    ys, xs = np.nonzero(m)
    assert 0.35 <= xs.mean() / w <= 0.65 and 0.25 <= ys.mean() / h <= 0.75  # centred
    left = m[:, :w // 2].sum() / m.sum()
    assert 0.25 <= left <= 0.75, left  # both halves of the chest hold lung


def test_real_slices_nearly_all_have_a_plausible_mask(covctr_test):
    """Every slice of the split: a mask for >= 95 % (the mean leaves the rest out)."""
    fractions = [m.mean() for m in (lung_mask(_display(ex)) for ex in covctr_test.values())
                 if m is not None]
    assert len(fractions) >= 0.95 * len(covctr_test)
    assert 0.3 <= np.median(fractions) <= 0.65


def test_real_slice_overlay_png(covctr_test):
    """Writes tests/artifacts/lung_mask_real.png (slice, mask outline in green) to look at."""
    from PIL import Image
    from scipy import ndimage

    img = _display(covctr_test[REAL_SLICES[3]])
    m = lung_mask(img)
    rgb = np.repeat(img[..., None], 3, axis=2)
    rgb[m & ~ndimage.binary_erosion(m, iterations=2)] = (0, 255, 0)
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(rgb).save(ARTIFACTS / "lung_mask_real.png")
    assert (ARTIFACTS / "lung_mask_real.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- run_model


class _FakeModel:
    """predict + generate_report; with `analyze` it must not call predict (no extra forward)."""

    finding_names = None

    def __init__(self, with_analyze: bool):
        if with_analyze:
            self.analyze = lambda study: (self._pred(), [np.ones(v.display.shape, np.float32)
                                                         for v in study.views])
        self.predict_calls = 0

    @staticmethod
    def _pred():
        from types import SimpleNamespace

        return SimpleNamespace(probability=0.7, label=1, labels={}, findings=())

    def predict(self, study):
        self.predict_calls += 1
        return self._pred()

    def generate_report(self, study):
        return GGO_RUL


def test_run_model_uses_analyze_for_saliency_and_falls_back_to_predict(tmp_path):
    from mrg_core.data import ImageCache, load_covctr
    from mrg_core.data.synthetic import write_synthetic_covctr
    from mrg_core.evaluation.runner import run_model

    test = load_covctr(write_synthetic_covctr(tmp_path, n={"train": 2, "val": 0, "test": 4},
                                              size=64))["test"]
    plain, analysing = _FakeModel(False), _FakeModel(True)
    out = run_model(plain, test, ImageCache())
    assert plain.predict_calls == 4 and all("lung_share" not in r for r in out.values())
    out = run_model(analysing, test, ImageCache())
    assert analysing.predict_calls == 0
    assert all(r["label"] == 1 and r["report"] == GGO_RUL for r in out.values())
    masked = [r for r in out.values() if r["lung_mask"]]  # the synthetic "lungs" are dark ovals
    assert masked and all(r["lung_share"] is None for r in out.values() if not r["lung_mask"])
    # a uniform map scores the mask's area share, well below 1
    assert all(0.03 <= r["lung_share"] <= 0.85 for r in masked)
