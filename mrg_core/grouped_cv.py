"""Grouped cross-validation of a config's encoder warm-up over train + val.

Val alone cannot make the choices a file-format or source shortcut could fool: COV-CTR's val
has 9 JPEG slices and no non-PNG COVID-19 slice, and the test split's JPEG slices (other lung
diseases, from other papers) were the ones a val-chosen model got wrong. Cross-validation over
train + val, with all slices of one source (paper or case) in one fold, gives every slice an
out-of-fold probability at every epoch from a model that never saw its source. From those come
the epoch count, the decision threshold and an estimate by file format that val cannot give.

    python -m mrg_core.grouped_cv --config configs/X.json --folds 5 --out runs/cv_X

Only the encoder and its classifier head train here (the recipe's warm-up: lr, epochs, batch
size, augmentation, JPEG re-encoding, class balance); the LM is not loaded.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from .data import Example
from .data.images import file_format
from .operating_point import RULES, choose_threshold, threshold_spread

_PAPER_PAGE = re.compile(r"-p\d+(?:-|$)")


def source_group(example_id: str) -> str:
    """The source a slice came from, from its COV-CTR / COVID-CT file name: slices cut from one
    paper ("2020.02.26.20027938-p6-80_3%0.png" → "2020.02.26.20027938") or one case
    ("18%3.jpg" → "18", "PIIS0140673620302117_1.png" → "PIIS0140673620302117") share a group;
    any other name is its own."""
    stem = example_id.rsplit(".", 1)[0]
    m = _PAPER_PAGE.search(stem)
    if m:
        return stem[:m.start()]
    if "%" in stem:
        return stem.split("%", 1)[0]
    if re.search(r"_\d+$", stem):
        return stem.rsplit("_", 1)[0]
    return stem


def grouped_folds(examples: list[Example], k: int, seed: int = 0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, held-out) index arrays: every example held out once, no source on both sides,
    label shares as even as the groups allow (scikit-learn's StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.array([max(ex.label, 0) for ex in examples])
    groups = [source_group(ex.id) for ex in examples]
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y, groups))


def fold_probabilities(cfg, train: list[Example], held: list[Example], cache, jpeg_cache,
                       device: str = "cpu", keep: str | Path | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Warm up a fresh encoder on `train` with the config's recipe; the held-out probabilities
    after every epoch: the decision's, [epochs, len(held)], and every label's (decision, findings,
    lobes), [epochs, len(held), labels]; the share of each held-out slice's Grad-CAM mass in its
    lungs, [epochs, len(held)] (NaN without a lung mask); the seconds taken (nothing held out:
    the last epoch is kept, no probabilities). keep: write the encoder there (model.safetensors
    with encoder.* tensors, what init_encoder_from reads)."""
    from accelerate.utils import set_seed

    from .models import ReportModel, ReportModelConfig
    from .text import train_tokenizer
    from .training import (EpochSampler, ExampleDataset, _target_index, collate, label_balance,
                           make_accelerator, warmup_encoder)

    set_seed(cfg.seed)
    mcfg = ReportModelConfig.from_dict(cfg.model)
    # the encoder alone is trained: a one-layer stand-in LM spares loading the real one
    mcfg.lm = type(mcfg.lm)(family="gpt2", n_layer=1, n_embd=32, n_head=2)
    mcfg.lm.package = None
    model = ReportModel.build(mcfg, train_tokenizer(["a b c"], min_frequency=1)).to(device)
    accelerator = make_accelerator(cfg, device)
    rate = label_balance(train)["positive_rate"]
    balanced = cfg.balance == "sampler" or (
        cfg.balance == "auto" and not math.isnan(rate) and not 0.35 <= rate <= 0.65)
    sampler = EpochSampler([max(ex.label, 0) for ex in train], cfg.seed, balanced)
    train_set = ExampleDataset(train, cache, mcfg.labels,
                               jpeg_cache if cfg.augment and cfg.jpeg_augment > 0 else None,
                               cfg.jpeg_augment)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size,
                                               sampler=sampler, collate_fn=collate)
    held_loader = torch.utils.data.DataLoader(ExampleDataset(held, cache, mcfg.labels),
                                              batch_size=32, collate_fn=collate) if held else None
    label_rows: list[np.ndarray] = []
    share_rows: list[np.ndarray] = []

    def on_epoch(_epoch, every, shares):
        label_rows.append(np.asarray(every, float))
        share_rows.append(np.asarray(shares, float))

    t = time.time()
    warmup_encoder(model, train_loader, held_loader, cfg, accelerator, sampler, on_epoch=on_epoch)
    if keep is not None:
        from safetensors.torch import save_file

        Path(keep).mkdir(parents=True, exist_ok=True)
        save_file({f"encoder.{k}": v.detach().contiguous().cpu()
                   for k, v in model.encoder.state_dict().items()},
                  str(Path(keep) / "model.safetensors"))
    if not label_rows:
        return np.empty((0, 0)), np.empty((0, 0, 0)), np.empty((0, 0)), time.time() - t
    every = np.stack(label_rows)
    return every[:, :, _target_index(model)], every, np.stack(share_rows), time.time() - t


def summarise(probs: np.ndarray, y: np.ndarray, formats: list[str],
              threshold: float | None = None, rule: str = "youden") -> dict:
    """AUC, and accuracy / sensitivity / specificity at the threshold (`rule`'s operating point
    on these probabilities when None), overall and by file format."""
    from sklearn.metrics import roc_auc_score

    if threshold is None:
        threshold = choose_threshold(probs, y, rule)
    pred = probs >= threshold

    def part(mask) -> dict:
        yy, pp = y[mask], pred[mask]
        out = {"n": int(mask.sum()), "accuracy": float((yy == pp).mean()) if mask.any() else None}
        if (yy == 1).any():
            out["sensitivity"] = float(pp[yy == 1].mean())
        if (yy == 0).any():
            out["specificity"] = float((~pp[yy == 0]).mean())
        if len(set(yy.tolist())) == 2:
            out["auc"] = float(roc_auc_score(yy, probs[mask]))
        return out

    fmt = np.array(formats)
    return {"threshold": threshold, "all": part(np.ones(len(y), bool)),
            **{f: part(fmt == f) for f in sorted(set(formats))}}


def _nanmean(x: np.ndarray) -> float | None:
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _caches(cfg, examples: list[Example]):
    """(decoded images, their JPEG re-encodings or None) as the recipe's training sees them."""
    from .data import ImageCache
    from .models import ReportModelConfig

    pre = ReportModelConfig.from_dict(cfg.model).preprocess
    cache, jpeg_cache = ImageCache(pre), None
    cache.preload(examples)
    if cfg.augment and cfg.jpeg_augment > 0:
        jpeg_cache = ImageCache(pre, jpeg_quality=(70, 95))
        jpeg_cache.preload(examples, desc="JPEG copies")
    return cache, jpeg_cache


def cross_validate(cfg, examples: list[Example], k: int = 5, seed: int = 0,
                   device: str = "cpu", log=print) -> dict:
    """Out-of-fold probabilities per epoch for the pooled examples, and a summary per epoch
    count. The chosen epoch count is the one with the best out-of-fold AUC; its threshold is
    the recipe's operating point (cfg.operating_point) on all out-of-fold probabilities at
    that epoch."""
    cache, jpeg_cache = _caches(cfg, examples)
    y = np.array([ex.label for ex in examples])
    formats = [file_format(ex.image_paths[0]) for ex in examples]
    n_labels = len(cfg.model.get("labels") or [None])
    oof = np.full((cfg.encoder_warmup_epochs, len(examples)), np.nan)
    oof_labels = np.full((cfg.encoder_warmup_epochs, len(examples), n_labels), np.nan)
    oof_lung = np.full((cfg.encoder_warmup_epochs, len(examples)), np.nan)
    folds = []
    for i, (train_idx, held) in enumerate(grouped_folds(examples, k, seed)):
        probs, label_probs, shares, secs = fold_probabilities(
            cfg, [examples[j] for j in train_idx], [examples[j] for j in held], cache,
            jpeg_cache, device)
        oof[:, held] = probs
        oof_labels[:, held] = label_probs
        oof_lung[:, held] = shares
        folds.append({"fold": i, "n_held": int(len(held)),
                      "held_groups": len({source_group(examples[j].id) for j in held}),
                      "seconds": round(secs, 1)})
        log(f"fold {i + 1}/{k}: {len(held)} held out, {secs:.0f} s")
    epochs = [{"epoch": e + 1, **summarise(oof[e], y, formats, rule=cfg.operating_point),
               "lung_share_positive": _nanmean(oof_lung[e][y == 1]),
               "lung_share": _nanmean(oof_lung[e])} for e in range(len(oof))]
    best = max(epochs, key=lambda r: r["all"]["auc"])
    return {"folds": folds, "epochs": epochs, "chosen_epoch": best["epoch"],
            "threshold": best["threshold"], "operating_point": cfg.operating_point,
            "out_of_fold": {ex.id: [round(float(p), 5) for p in oof[:, j]]
                            for j, ex in enumerate(examples)},
            # every label's head (findings, lobes) per epoch: finding thresholds fitted out of
            # fold, not on val (which a refitted encoder has trained on)
            "out_of_fold_labels": {ex.id: np.round(oof_labels[:, j], 4).tolist()
                                   for j, ex in enumerate(examples)}}


# Out-of-fold finding thresholds: precision weighs double (a wrong finding in a draft costs
# more than a missing one), and no finding is stated more often than it occurs in the reports.
FINDING_BETA = 0.5
FINDING_MAX_RATE = 1.0


def apply_operating_point(folder: str | Path, cv: dict, epoch: int, pooled: list[Example],
                          val: list[Example], by_decision: bool = True,
                          rule: str | None = None) -> dict:
    """Give a saved model the decision threshold (`rule`'s operating point; None: the one cv.json
    holds for that epoch) and the Platt scaling fitted on the out-of-fold probabilities of
    `epoch` (its own warm-up epoch, same recipe) instead of val's: 540 slices from every source
    in place of 72 with 9 JPEGs. The finding thresholds (shared, and for a negative decision)
    come from the out-of-fold finding heads too when cv has them: val's are in-sample for an
    encoder refitted on train + val, and thresholds fitted there state findings on most unseen
    slices. Those are F0.5-optimal and state no finding more often than it occurs
    (FINDING_BETA, FINDING_MAX_RATE): F1 on the weak out-of-fold heads stated "patchy shadow" in
    99 % of studies and "cavity" (5 % of reports) in 43 %. Older cv.json files: refitted on
    val, as the training recipe does."""
    from .data import ImageCache
    from .models import ReportModel
    from .training import finding_thresholds, finding_thresholds_from, platt_scaling

    folder = Path(folder)
    oof = cv["out_of_fold"]
    row = next(r for r in cv["epochs"] if r["epoch"] == epoch)
    by_id = {ex.id: ex for ex in pooled}
    ids = [i for i in oof if i in by_id and by_id[i].label in (0, 1)]
    probs = np.array([oof[i][epoch - 1] for i in ids])
    y = np.array([by_id[i].label for i in ids], dtype=float)
    model = ReportModel.from_pretrained(folder)
    model.config.threshold = float(row["threshold"]) if rule is None else \
        choose_threshold(probs, y, rule)
    model.config.calibration = platt_scaling(probs, y)
    source = None
    if model.finding_names and cv.get("out_of_fold_labels"):
        with_report = [i for i in ids if by_id[i].has_report]
        label_probs = np.array([cv["out_of_fold_labels"][i][epoch - 1] for i in with_report])
        model.config.label_thresholds, model.config.negative_label_thresholds = \
            finding_thresholds_from(model, label_probs, [by_id[i] for i in with_report],
                                    beta=FINDING_BETA, by_decision=by_decision,
                                    max_rate=FINDING_MAX_RATE)
        source = "out of fold"
    elif model.finding_names:
        cache = ImageCache(model.config.preprocess)
        model.config.label_thresholds, model.config.negative_label_thresholds = \
            finding_thresholds(model, val, cache, by_decision=by_decision)
        source = "val"
    card = (folder / "README.md").read_text(encoding="utf-8") \
        if (folder / "README.md").is_file() else None
    model.save_pretrained(folder, card=card)
    return {"threshold": model.config.threshold, "rule": rule or cv.get("operating_point"),
            "calibration": model.config.calibration,
            "epoch": epoch, "out_of_fold": row, "finding_thresholds_from": source,
            "label_thresholds": model.config.label_thresholds,
            "negative_label_thresholds": model.config.negative_label_thresholds}


def main(argv: list[str] | None = None) -> int:
    from .data import load_splits
    from .training import TrainConfig

    ap = argparse.ArgumentParser(prog="python -m mrg_core.grouped_cv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a training config with encoder warm-up")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    ap.add_argument("--out", required=True, help="folder for cv.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--apply-to", metavar="FOLDER",
                    help="a saved model trained with this recipe: set its threshold and Platt "
                         "scaling from the out-of-fold probabilities (with --apply-to or "
                         "--refit-to, an existing cv.json in --out is reused)")
    ap.add_argument("--epoch", type=int, help="with --apply-to: the model's own warm-up epoch "
                                              "(default: the cross-validated choice)")
    ap.add_argument("--refit-to", metavar="FOLDER",
                    help="then train the encoder on all of train + val for the chosen epoch "
                         "count (or --epoch) and write it there for init_encoder_from, with "
                         "the out-of-fold threshold and Platt scaling in operating_point.json")
    a = ap.parse_args(argv)
    cfg = TrainConfig.from_dict(json.loads(Path(a.config).read_text(encoding="utf-8")))
    if not cfg.encoder_warmup_epochs:
        ap.error("the config has no encoder warm-up (encoder_warmup_epochs) to cross-validate")
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    splits = load_splits(cfg.data.spec())
    pooled = [ex for ex in splits["train"] + splits["val"] if ex.label in (0, 1)]
    out = Path(a.out)
    if (a.apply_to or a.refit_to) and (out / "cv.json").is_file():
        result = json.loads((out / "cv.json").read_text(encoding="utf-8"))
    else:
        result = cross_validate(cfg, pooled, a.folds, a.seed, a.device)
        result["config"] = a.config
        out.mkdir(parents=True, exist_ok=True)
        (out / "cv.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    for r in result["epochs"]:
        parts = "  ".join(f"{f} acc {r[f]['accuracy']:.3f} (n {r[f]['n']})"
                          for f in r if isinstance(r[f], dict) and f != "all")
        lung = r.get("lung_share_positive")
        lung = f"  Grad-CAM in lungs (positives) {lung:.3f}" if lung is not None else ""
        print(f"epoch {r['epoch']}: AUC {r['all']['auc']:.4f} acc {r['all']['accuracy']:.3f} "
              f"at {r['threshold']:.3f}  {parts}{lung}")
    print(f"chosen: epoch {result['chosen_epoch']}, threshold {result['threshold']:.4f}")
    epoch = a.epoch or result["chosen_epoch"]
    y = np.array([ex.label for ex in pooled], dtype=float)
    oof = np.array([result["out_of_fold"][ex.id][epoch - 1] for ex in pooled])
    groups = [source_group(ex.id) for ex in pooled]
    for rule in RULES:  # how steady each rule's threshold is (the recipe's is used)
        spread = threshold_spread(oof, y, groups, rule)
        print(f"epoch {epoch}, {rule}: threshold {choose_threshold(oof, y, rule):.4f}; over "
              f"{spread['resamples']} resamples of sources: median {spread['p50']:.3f}, "
              f"quartiles {spread['p25']:.3f}-{spread['p75']:.3f}, "
              f"10-90 % {spread['p10']:.3f}-{spread['p90']:.3f}")
    if a.refit_to:
        from .training import platt_scaling

        cfg.encoder_warmup_epochs = epoch
        cache, jpeg_cache = _caches(cfg, pooled)
        fold_probabilities(cfg, pooled, [], cache, jpeg_cache, a.device, keep=a.refit_to)
        row = next(r for r in result["epochs"] if r["epoch"] == epoch)
        point = {"epochs": epoch, "threshold": choose_threshold(oof, y, cfg.operating_point),
                 "operating_point": cfg.operating_point,
                 "calibration": platt_scaling(oof, y), "out_of_fold": row,
                 "trained_on": "train + val", "config": a.config}
        Path(a.refit_to, "operating_point.json").write_text(json.dumps(point, indent=1))
        print(f"refit encoder ({epoch} epochs, train + val) in {a.refit_to}")
    if a.apply_to:
        done = apply_operating_point(a.apply_to, result, epoch, pooled, splits["val"],
                                     rule=cfg.operating_point)
        print(f"{a.apply_to}: threshold {done['threshold']:.4f} ({cfg.operating_point}), "
              f"calibration "
              f"{done['calibration']} (out-of-fold, epoch {epoch}); finding thresholds from "
              f"{done['finding_thresholds_from']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
