"""Grouped cross-validation (mrg_core.grouped_cv): sources never straddle a fold, on the real
COV-CTR names; a real tiny run gives every example one out-of-fold probability per epoch."""
import json
from pathlib import Path

import numpy as np
import torch
import pytest

from mrg_core.grouped_cv import grouped_folds, source_group, summarise

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_test.json"


@pytest.mark.parametrize("image_id, group", [
    ("2020.02.26.20027938-p6-80_3%0.png", "2020.02.26.20027938"),
    ("2020.03.12.20034686-p17-91-3.png", "2020.03.12.20034686"),
    ("bmj.m606.full-p4-22%7.png", "bmj.m606.full"),
    ("18%3.jpg", "18"),
    ("PIIS0140673620302117_1.png", "PIIS0140673620302117"),
    ("2144.png", "2144"),
])
def test_source_group_reads_paper_and_case_from_the_file_name(image_id, group):
    assert source_group(image_id) == group


def test_folds_keep_each_real_source_on_one_side(shared_data):
    """On COV-CTR train + val: the slices of one paper or case are held out together, every
    slice is held out exactly once, and no fold trains on what it holds out."""
    from mrg_core.data.covctr import load_covctr

    splits = load_covctr(shared_data / "covctr")
    pooled = splits["train"] + splits["val"]
    folds = grouped_folds(pooled, 5)
    held_count = np.zeros(len(pooled), int)
    for train_idx, held in folds:
        assert not set(train_idx.tolist()) & set(held.tolist())
        assert len(train_idx) + len(held) == len(pooled)
        held_count[held] += 1
        train_groups = {source_group(pooled[j].id) for j in train_idx}
        assert not train_groups & {source_group(pooled[j].id) for j in held}
    assert (held_count == 1).all()
    # e.g. the four slices of case 18 (JPEG, non-COVID) share one fold
    case = [i for i, ex in enumerate(pooled) if ex.id.startswith("18%")]
    assert len(case) > 1
    assert len({next(f for f, (_t, h) in enumerate(folds) if i in set(h.tolist()))
                for i in case}) == 1
    # the label shares stay close to the pool's
    rate = np.mean([ex.label for ex in pooled])
    for _t, held in folds:
        assert abs(np.mean([pooled[j].label for j in held]) - rate) < 0.1


def test_summarise_threshold_and_accuracy_by_format():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.6, 0.8, 0.9])
    fmt = ["jpeg", "png", "jpeg", "png", "png", "png"]
    s = summarise(p, y, fmt)
    assert s["threshold"] == pytest.approx(0.6)  # Youden: sens 1, spec 2/3
    assert s["all"]["accuracy"] == pytest.approx(5 / 6)
    assert s["jpeg"] == {"n": 2, "accuracy": 0.5, "specificity": 0.5}
    assert s["png"]["accuracy"] == 1.0 and s["png"]["auc"] == 1.0
    fixed = summarise(p, y, fmt, threshold=0.75)
    assert fixed["all"]["sensitivity"] == pytest.approx(2 / 3)


def test_cli_cross_validates_a_tiny_recipe(tmp_path):
    """A real run (tiny encoder, synthetic COV-CTR): every train + val example gets one
    out-of-fold probability per warm-up epoch, and the chosen threshold is Youden's J on the
    chosen epoch's out-of-fold probabilities."""
    from mrg_core.data.synthetic import write_synthetic_covctr
    from mrg_core.grouped_cv import main

    data = write_synthetic_covctr(tmp_path / "covctr", n={"train": 12, "val": 6, "test": 2},
                                  size=32)
    cfg = json.loads(CONFIG.read_text())
    cfg["data"]["root"] = str(data)
    cfg["encoder_warmup_epochs"], cfg["jpeg_augment"] = 2, 0.5
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["--config", str(tmp_path / "cfg.json"), "--folds", "3",
                 "--out", str(tmp_path / "cv")]) == 0
    out = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert len(out["out_of_fold"]) == 18 and out["operating_point"] == "youden"
    assert all(len(v) == 2 and all(0 <= p <= 1 for p in v) for v in out["out_of_fold"].values())
    # every label head's out-of-fold probabilities too: [epoch][label] per example
    assert set(out["out_of_fold_labels"]) == set(out["out_of_fold"])
    assert all(np.array(v).shape == (2, len(cfg["model"].get("labels") or [None]))
               for v in out["out_of_fold_labels"].values())
    assert all(v[e][0] == pytest.approx(out["out_of_fold"][i][e], abs=1e-3)
               for i, v in out["out_of_fold_labels"].items() for e in range(2))
    assert sum(f["n_held"] for f in out["folds"]) == 18
    # the held-out share of each epoch's Grad-CAM mass in the lungs (lung_focus.lung_shares)
    assert all(0 <= r["lung_share"] <= 1 for r in out["epochs"])
    from mrg_core.data.covctr import load_covctr

    splits = load_covctr(data)
    label = {ex.id: ex.label for ex in splits["train"] + splits["val"]}
    assert set(out["out_of_fold"]) == set(label)
    e = out["chosen_epoch"]
    ids = list(out["out_of_fold"])
    probs = np.array([out["out_of_fold"][i][e - 1] for i in ids])
    y = np.array([label[i] for i in ids])
    fmts = ["jpeg" if i.endswith(".jpg") else "png" for i in ids]
    assert out["threshold"] == pytest.approx(summarise(probs, y, fmts)["threshold"], abs=1e-4)
    assert max(r["all"]["auc"] for r in out["epochs"]) == \
        next(r for r in out["epochs"] if r["epoch"] == e)["all"]["auc"]
    # --apply-to reuses cv.json and gives a saved model the out-of-fold operating point
    from mrg_core.models import ReportModel
    from mrg_core.models.factory import tiny_model
    from mrg_core.training import platt_scaling

    tiny_model().save_pretrained(tmp_path / "model")
    before = (tmp_path / "cv" / "cv.json").stat().st_mtime_ns
    assert main(["--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "cv"),
                 "--apply-to", str(tmp_path / "model"), "--epoch", "2"]) == 0
    assert (tmp_path / "cv" / "cv.json").stat().st_mtime_ns == before  # not run again
    saved = ReportModel.from_pretrained(tmp_path / "model").config
    epoch2 = np.array([out["out_of_fold"][i][1] for i in ids])
    assert saved.threshold == pytest.approx(summarise(epoch2, y, fmts)["threshold"], abs=1e-4)
    assert saved.calibration == platt_scaling(epoch2, y.astype(float))

    # --refit-to: the encoder trained on all of train + val for the chosen epoch count, ready
    # for init_encoder_from, with the out-of-fold operating point beside it
    from mrg_core.training import init_encoder

    assert main(["--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "cv"),
                 "--refit-to", str(tmp_path / "enc"), "--epoch", "2"]) == 0
    point = json.loads((tmp_path / "enc" / "operating_point.json").read_text())
    assert point["epochs"] == 2 and point["operating_point"] == "youden"
    assert point["threshold"] == pytest.approx(out["epochs"][1]["threshold"], abs=1e-4)
    assert point["calibration"] == platt_scaling(epoch2, y.astype(float))
    fresh = tiny_model()
    before = {k: v.clone() for k, v in fresh.encoder.state_dict().items()}
    assert init_encoder(fresh, tmp_path / "enc")["tensors"] == len(before)
    assert any(not torch.equal(before[k], v) for k, v in fresh.encoder.state_dict().items())
    # the refit trains for the epoch count asked (seeded: the same count gives the same weights)
    from safetensors.torch import load_file

    assert main(["--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "cv"),
                 "--refit-to", str(tmp_path / "enc1"), "--epoch", "1"]) == 0
    two, one = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("enc", "enc1"))
    assert any(not torch.equal(two[k], one[k]) for k in two)


def _glass_model(tmp_path, n: dict):
    """Synthetic COV-CTR splits and a tiny model whose one finding (ground glass) is stated
    in words, saved to tmp_path/model: (splits, train + val)."""
    from mrg_core.data.covctr import load_covctr
    from mrg_core.data.synthetic import write_synthetic_covctr
    from mrg_core.models import ReportModel, tiny_config
    from mrg_core.models.factory import SAMPLE_REPORTS
    from mrg_core.text import train_tokenizer

    splits = load_covctr(write_synthetic_covctr(tmp_path / "covctr", n=n, size=32))
    cfg = tiny_config()
    cfg.labels = ["pneumonia", "ground_glass"]
    cfg.finding_prompt = True
    cfg.finding_phrases = {"ground_glass": "ground glass shadow"}
    tok = train_tokenizer(SAMPLE_REPORTS + ["ground glass shadow ."], min_frequency=1)
    ReportModel.build(cfg, tok).save_pretrained(tmp_path / "model")
    return splits, splits["train"] + splits["val"]


def _cv_with_glass(pooled, glass: dict) -> dict:
    """cv.json of one epoch: decision probabilities by label, ground glass as given."""
    return {"epochs": [{"epoch": 1, "threshold": 0.5, "all": {}}],
            "out_of_fold": {ex.id: [0.8 if ex.label else 0.2] for ex in pooled},
            "out_of_fold_labels": {ex.id: [[0.8 if ex.label else 0.2, glass.get(ex.id, 0.1)]]
                                   for ex in pooled}}


def test_apply_operating_point_fits_finding_thresholds_out_of_fold(tmp_path):
    """With the finding heads' out-of-fold probabilities in cv.json, a model's finding
    thresholds are fitted on them (F1 over train + val's out-of-fold probabilities), not on
    val, which a refitted encoder has trained on."""
    from mrg_core.grouped_cv import apply_operating_point
    from mrg_core.models import ReportModel

    splits, pooled = _glass_model(tmp_path, {"train": 12, "val": 6, "test": 2})
    # out-of-fold: COVID-19 slices (their reports say ground glass) at 0.7, one of them missed
    # at 0.05; other slices at 0.1, one false alarm at 0.6 → F1 is best at 0.7
    positives = [ex.id for ex in pooled if ex.label == 1 and ex.has_report]
    negatives = [ex.id for ex in pooled if ex.label == 0]
    assert len(positives) >= 6 and len(negatives) >= 2
    glass = {i: 0.7 for i in positives} | {i: 0.1 for i in negatives}
    glass[positives[0]], glass[negatives[0]] = 0.05, 0.6
    cv = _cv_with_glass(pooled, glass)
    done = apply_operating_point(tmp_path / "model", cv, 1, pooled, splits["val"])
    saved = ReportModel.from_pretrained(tmp_path / "model").config
    assert done["finding_thresholds_from"] == "out of fold"
    assert saved.label_thresholds["ground_glass"] == pytest.approx(0.7)
    # the negative decisions hold no ground glass case: too few positives → 0.5
    assert saved.negative_label_thresholds["ground_glass"] == 0.5
    # without the heads' out-of-fold probabilities: refitted on val, as before
    del cv["out_of_fold_labels"]
    assert apply_operating_point(tmp_path / "model", cv, 1, pooled,
                                 splits["val"])["finding_thresholds_from"] == "val"


def test_apply_operating_point_takes_the_recipes_rule(tmp_path):
    """rule="equal_error" (TrainConfig.operating_point): the threshold where out-of-fold
    sensitivity and specificity cross, not Youden's; None keeps cv.json's own threshold."""
    from mrg_core.grouped_cv import apply_operating_point
    from mrg_core.models import ReportModel
    from mrg_core.operating_point import choose_threshold

    splits, pooled = _glass_model(tmp_path, {"train": 12, "val": 6, "test": 2})
    cv = _cv_with_glass(pooled, {})
    cv["epochs"][0]["threshold"] = 0.33
    kinds = {1: [0.4, 0.5, 0.7, 0.9], 0: [0.1, 0.2, 0.3, 0.6]}  # overlapping classes
    seen = {0: 0, 1: 0}
    for ex in pooled:
        cv["out_of_fold"][ex.id] = [kinds[ex.label][seen[ex.label] % 4]]
        seen[ex.label] += 1
    probs = np.array([cv["out_of_fold"][ex.id][0] for ex in pooled])
    y = np.array([ex.label for ex in pooled])
    want = {r: choose_threshold(probs, y, r) for r in ("youden", "equal_error")}
    assert want["youden"] != want["equal_error"]
    for rule in ("youden", "equal_error"):
        done = apply_operating_point(tmp_path / "model", cv, 1, pooled, splits["val"],
                                     rule=rule)
        assert done["rule"] == rule
        assert ReportModel.from_pretrained(tmp_path / "model").config.threshold == \
            pytest.approx(want[rule])
    apply_operating_point(tmp_path / "model", cv, 1, pooled, splits["val"])
    assert ReportModel.from_pretrained(tmp_path / "model").config.threshold == 0.33


def test_out_of_fold_finding_thresholds_weigh_precision(tmp_path):
    """F0.5, not F1: with half the ground-glass slices at 0.7, the other half at 0.4 among five
    false alarms at 0.5, F1 would state it down to 0.4 (capped just above 0.5); F0.5 keeps 0.7."""
    from mrg_core.grouped_cv import apply_operating_point
    from mrg_core.models import ReportModel

    splits, pooled = _glass_model(tmp_path, {"train": 24, "val": 8, "test": 2})
    positives = [ex.id for ex in pooled if ex.label == 1 and ex.has_report]
    negatives = [ex.id for ex in pooled if ex.label == 0 and ex.has_report]
    assert len(positives) >= 8 and len(negatives) >= 5
    glass = {i: (0.7 if k % 2 == 0 else 0.4) for k, i in enumerate(positives)}
    glass |= {i: (0.5 if k < 5 else 0.1) for k, i in enumerate(negatives)}
    apply_operating_point(tmp_path / "model", _cv_with_glass(pooled, glass), 1, pooled,
                          splits["val"])
    saved = ReportModel.from_pretrained(tmp_path / "model").config
    assert saved.label_thresholds["ground_glass"] == pytest.approx(0.7)


def test_fold_probabilities_are_the_held_out_slices_own(tmp_path):
    """One warm-up epoch on a fold: the probabilities returned for the held-out slices (the
    decision's and every head's) are what the trained encoder, saved and loaded again, gives
    those slices."""
    from mrg_core.data.covctr import load_covctr
    from mrg_core.data.synthetic import write_synthetic_covctr
    from mrg_core.grouped_cv import _caches, fold_probabilities
    from mrg_core.models.factory import tiny_model
    from mrg_core.training import TrainConfig, init_encoder

    data = write_synthetic_covctr(tmp_path / "covctr", n={"train": 12, "val": 6, "test": 2},
                                  size=32)
    raw = json.loads(CONFIG.read_text())
    raw["data"]["root"] = str(data)
    raw["encoder_warmup_epochs"] = 1
    cfg = TrainConfig.from_dict(raw)
    splits = load_covctr(data)
    train, held = splits["train"], splits["val"]
    cache, jpeg = _caches(cfg, train + held)
    probs, every, shares, _ = fold_probabilities(cfg, train, held, cache, jpeg, keep=tmp_path / "enc")
    assert probs.shape == (1, len(held)) and every.shape[:2] == (1, len(held))
    model = tiny_model()
    init_encoder(model, tmp_path / "enc")
    model.eval()
    with torch.no_grad():
        x = torch.stack([cache.get(ex) for ex in held])
        again = torch.sigmoid(model.encoder(x).logits.float()).numpy()
    np.testing.assert_allclose(every[0], again, atol=1e-5)
    np.testing.assert_allclose(probs[0], again[:, 0], atol=1e-5)
    # and the held-out lung shares are those slices' own Grad-CAM shares
    from mrg_core.lung_focus import lung_shares

    pre = model.config.preprocess
    np.testing.assert_allclose(shares[0], lung_shares(model.encoder, [x], 0, pre.mean, pre.std),
                               atol=1e-5)
