"""End to end on a synthetic COV-CTR: tokenizer → LM pretraining → report model → best
checkpoint → from_pretrained → text; --resume continues; the evaluate CLI writes its files."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import require
from mrg_core.data.synthetic import write_synthetic_covctr

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_test.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mrg_core.cli.train import main

    base = tmp_path_factory.mktemp("train")
    data = write_synthetic_covctr(base / "covctr", n={"train": 12, "val": 4, "test": 4}, size=32)
    out = base / "run"
    assert main(["--config", str(CONFIG), "--data", str(data), "--out", str(out),
                 "--epochs", "2", "--device", "cpu"]) == 0
    first = json.loads((out / "history.json").read_text())
    # resume from the saved epoch and train one more
    assert main(["--config", str(CONFIG), "--data", str(data), "--out", str(out),
                 "--epochs", "3", "--resume", "--device", "cpu"]) == 0
    return {"data": data, "out": out, "first": first,
            "history": json.loads((out / "history.json").read_text())}


def test_training_writes_lm_checkpoints_and_history(run):
    out, h = run["out"], run["history"]
    assert (out / "lm" / "config.json").is_file() and (out / "lm" / "tokenizer.json").is_file()
    assert (out / "best" / "config.json").is_file()
    assert (out / "last" / "trainer_state.json").is_file()
    lm_losses = [r["loss"] for r in h["lm_pretrain"]]
    assert lm_losses[-1] < lm_losses[0]
    assert [r["epoch"] for r in h["epochs"]] == [1, 2, 3]
    assert h["epochs"][-1]["train_loss"] < h["epochs"][0]["train_loss"]
    assert {"val_loss", "val_auc", "val_bleu4"} <= set(h["epochs"][0])
    assert h["label_balance"]["n"] == 12  # the id without a report still counts (its label)


def test_resume_continued_from_saved_epoch(run):
    assert [r["epoch"] for r in run["first"]["epochs"]] == [1, 2]
    # epochs 1-2 are carried over unchanged, not retrained
    assert run["history"]["epochs"][:2] == run["first"]["epochs"]


def test_best_checkpoint_loads_and_generates(run):
    from mrg_core.data import ImageCache, load_covctr
    from mrg_core.models import GenerationSettings, ReportModel

    model = ReportModel.from_pretrained(run["out"] / "best")
    ex = load_covctr(run["data"])["test"][0]
    study = ImageCache(model.config.preprocess).load_study(ex)
    p = model.predict(study)
    assert 0.0 <= p.probability <= 1.0
    text = model.generate_report(study, GenerationSettings(max_new_tokens=20))
    assert isinstance(text, str) and text.strip()


def test_evaluate_cli_writes_metrics_and_plots(run, tmp_path, monkeypatch):
    require(shutil.which("java"), "METEOR needs Java (apt-get install openjdk-17-jre-headless)")
    from mrg_core.cli.evaluate import main

    monkeypatch.setenv("MRG_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    assert main(["--model", str(run["out"] / "best"), "--split", "test", "--out", str(out),
                 "--data", str(run["data"]), "--max-new-tokens", "24"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["systems"]) == {"model", "most_frequent", "nearest_neighbour", "class_template"}
    assert m["systems"]["model"]["METEOR"] is not None
    assert "png_only" in m["classifier"] and m["classifier"]["n"] == 4
    md = (out / "metrics.md").read_text()
    assert "| nearest_neighbour |" in md and "PNG-only" in md
    # draft quality: diversity per system, decision-text agreement and lung saliency of the model
    q = m["draft_quality"]
    assert set(q["diversity"]) == set(m["systems"])
    assert all(0 < d["distinct_ratio"] <= 1 and d["n"] == 4 for d in q["diversity"].values())
    most = q["diversity"]["most_frequent"]  # one text for every study
    assert most["distinct_drafts"] == 1 and most["different_findings_different_drafts"] == 0.0
    t = q["decision_text"]
    assert t["n_negative"] + t["n_positive"] == 4
    assert all(v is None or 0 <= v <= 1
               for v in (t["negative_states_no_finding"], t["positive_states_finding"]))
    s = q["saliency"]
    assert s["n_studies"] == 4 and s["n_scored"] + s["n_excluded"] == 4
    assert s["lung_share_mean"] is None or 0 <= s["lung_share_mean"] <= 1
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert all("lung_share" in r and isinstance(r["lung_mask"], bool) for r in rows)
    assert "## Draft quality" in md and "| class_template |" in md.split("## Draft quality")[1]
    for name in ("roc.png", "reliability.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000
    # the LM's inference form that wrote the drafts is recorded
    assert m["precision"] == "fp32"
    assert main(["--model", str(run["out"] / "best"), "--split", "test", "--out",
                 str(tmp_path / "merged"), "--data", str(run["data"]), "--max-new-tokens", "8",
                 "--no-meteor", "--no-clinical", "--precision", "fp32-merged"]) == 0
    assert json.loads((tmp_path / "merged" / "metrics.json").read_text())["precision"] == \
        "fp32-merged"


def test_default_recipe_warmup_frozen_encoder_and_val_threshold(run, tmp_path):
    """The shipped recipe's phases: encoder warm-up keeps its best val-AUC epoch, the encoder
    (batch-norm statistics too) stays fixed during the report phase, and the threshold chosen
    on val is written into the saved model."""
    import torch

    from mrg_core.models import ReportModel
    from mrg_core.training import TrainConfig, train

    cfg = TrainConfig.load(CONFIG)
    cfg.data.root, cfg.out_dir = str(run["data"]), str(tmp_path / "recipe")
    cfg.lm_pretrain.path = str(run["out"] / "lm")  # reuse the fixture's LM: seconds, not minutes
    cfg.epochs, cfg.encoder_warmup_epochs = 2, 2
    cfg.freeze_encoder = cfg.calibrate_threshold = True
    cfg.finding_thresholds_by_decision = True
    cfg.model["label_prompt"] = True
    # findings stated in words, predicted by extra encoder heads trained on the report's findings
    cfg.model["labels"] = ["pneumonia", "ground_glass", "RUL", "RLL", "LUL", "LLL"]
    cfg.model["finding_prompt"] = True
    cfg.model["finding_phrases"] = {
        "ground_glass": "ground glass shadow", "RUL": "upper lobe of the right lung",
        "RLL": "lower lobe of the right lung", "LUL": "upper lobe of the left lung",
        "LLL": "lower lobe of the left lung"}
    cfg.jpeg_augment = 0.5
    cfg.model["encoder"]["members"] = 2  # a deep-ensemble classifier through every phase
    cfg.restrict_head = True  # the saved model scores only the train reports' tokens
    hist = train(cfg, device="cpu")
    assert len(hist["encoder_warmup"]) == 2 and any(r.get("best") for r in hist["encoder_warmup"])
    assert 0.0 < hist["threshold"]["threshold"] < 1.0
    best = ReportModel.from_pretrained(tmp_path / "recipe" / "best")
    assert best.config.threshold == hist["threshold"]["threshold"]
    assert best.config.calibration == hist["threshold"]["calibration"]  # Platt fit, saved
    assert best.encoder.n_members == 2
    from mrg_core.data import load_splits

    train_reports = [ex.report for ex in load_splits(cfg.data.spec())["train"] if ex.has_report]
    assert best.config.head_vocab == best.report_vocabulary(train_reports)
    assert best.tokenizer.eos_token_id in best.config.head_vocab
    # frozen encoder: the report phase left its classifier output unchanged between epochs
    # (the finding head alone keeps learning, so compare the pneumonia output's AUC)
    assert hist["epochs"][0]["val_auc"] == pytest.approx(hist["epochs"][1]["val_auc"])
    assert best.config.label_prompt and torch.is_tensor(best.encoder(
        torch.zeros(1, 1, 1, best.config.preprocess.image_size,
                    best.config.preprocess.image_size)).logits)
    # the pneumonia head on pooled features, a token-grid head for the findings; each finding
    # got a threshold chosen on val, saved with the model
    assert best.encoder.classifier[1].out_features == 1
    assert best.encoder.token_classifier[1].out_features == 5
    assert set(best.config.label_thresholds) == set(best.finding_names) == {
        "ground_glass", "RUL", "RLL", "LUL", "LLL"}
    assert best.config.label_thresholds == hist["threshold"]["finding_thresholds"]
    # and a second set for negative decisions, chosen on val's negative-decision studies
    assert set(best.config.negative_label_thresholds) == set(best.finding_names)
    assert best.config.negative_label_thresholds == \
        hist["threshold"]["negative_finding_thresholds"]
    # the evaluation reports each finding head next to the drafts that state its findings
    from mrg_core.data import load_covctr
    from mrg_core.evaluation.runner import evaluate_model

    splits = load_covctr(run["data"])
    # the negative set counts only studies decided negative: none when every study is called
    # positive (too few cases: 0.5 each), all of them (= the shared set) when none is
    from mrg_core.data import ImageCache
    from mrg_core.training import finding_thresholds

    cache = ImageCache(best.config.preprocess)
    best.config.threshold = 0.0
    shared, negative = finding_thresholds(best, splits["val"], cache, 1, by_decision=True)
    assert set(negative.values()) == {0.5}
    best.config.threshold = 1.01
    assert finding_thresholds(best, splits["val"], cache, 1, by_decision=True) == (shared, shared)
    assert finding_thresholds(best, splits["val"], cache, 1)[1] == {}
    assert shared != {n: 0.5 for n in shared}  # the tiny val has enough cases to choose
    best.config.threshold = hist["threshold"]["threshold"]
    m = evaluate_model(best, splits["test"], splits["train"], tmp_path / "eval", meteor=False,
                       clinical=False)
    assert set(m["finding_heads"]) == set(best.finding_names)
    assert "## Finding heads" in (tmp_path / "eval" / "metrics.md").read_text()


def test_training_targets_name_the_reports_findings(run):
    """Finding targets come from the reference text (NaN without one); the JPEG copy is a
    re-encoded image of the same study, not a different one."""
    import math

    import torch

    from mrg_core.data import ImageCache, load_covctr
    from mrg_core.training import ExampleDataset, study_targets

    train = load_covctr(run["data"])["train"]
    names = ["pneumonia", "ground_glass", "RLL", "LUL"]
    covid = next(ex for ex in train if ex.label == 1 and ex.has_report)
    said = study_targets(covid, names)
    assert said[0] == 1.0 and said[1] == 1.0 and said[2] + said[3] <= 1.0  # one lobe named
    normal = next(ex for ex in train if ex.label == 0 and ex.has_report)
    assert study_targets(normal, names) == [0.0, 0.0, 0.0, 0.0]
    silent = next(ex for ex in train if not ex.has_report)
    t = study_targets(silent, names)
    assert t[0] == float(silent.label) and all(math.isnan(v) for v in t[1:])
    plain, jpeg = ImageCache(), ImageCache(jpeg_quality=(70, 70))
    a, b = plain.get(covid), jpeg.get(covid)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert (a - b).abs().mean() < 0.1  # artefacts, not another image
    ds = ExampleDataset([covid], plain, names, jpeg, jpeg_p=1.0)
    assert torch.equal(ds[0][0], b) and ds[0][2] == said


def test_encoder_warmup_draws_a_new_batch_order_every_epoch(run):
    """The warm-up advances the sampler's epoch: a fixed order would repeat the very same
    batches every epoch (the 1.1.0 warm-up did)."""
    import torch

    from mrg_core.data import ImageCache, load_covctr
    from mrg_core.models import tiny_model
    from mrg_core.training import (EpochSampler, ExampleDataset, TrainConfig, collate,
                                   make_accelerator, warmup_encoder)

    cfg = TrainConfig.load(CONFIG)
    cfg.encoder_warmup_epochs, cfg.augment = 3, False
    model = tiny_model("medvlm")
    splits = load_covctr(run["data"])
    cache = ImageCache(model.config.preprocess)
    sampler = EpochSampler([max(ex.label, 0) for ex in splits["train"]], seed=0, balanced=False)
    train = torch.utils.data.DataLoader(ExampleDataset(splits["train"], cache), batch_size=4,
                                        sampler=sampler, collate_fn=collate)
    val = torch.utils.data.DataLoader(ExampleDataset(splits["val"], cache), batch_size=4,
                                      collate_fn=collate)
    first_batches = []
    model.encoder.register_forward_hook(
        lambda mod, args, out: first_batches.append(args[0].sum().item()) if mod.training else None)
    rows = warmup_encoder(model, train, val, cfg, make_accelerator(cfg, "cpu"), sampler)
    assert len(rows) == 3
    per_epoch = len(first_batches) // 3  # 12 studies / batch 4 = 3 batches per epoch
    orders = [tuple(round(x, 3) for x in first_batches[i * per_epoch:(i + 1) * per_epoch])
              for i in range(3)]
    assert len(set(orders)) == 3, orders


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_switches_mixed_precision_on_the_cpu_only_when_asked_and_native(
        native, monkeypatch, capsys):
    """bf16 autocast on the CPU needs both cpu_bf16 and a CPU with native bf16: emulated bf16
    made a SmolLM2 training batch >13x slower than float32 on an AVX2-only host."""
    import torch

    from mrg_core.training import TrainConfig, make_accelerator, mixed_precision

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert mixed_precision(TrainConfig(), cpu=True) == "no"
    assert mixed_precision(TrainConfig(cpu_bf16=True), cpu=True) == ("bf16" if native else "no")
    assert mixed_precision(TrainConfig(amp=False, cpu_bf16=True), cpu=False) == "no"
    # the fallback is said, not silent (accelerate keeps one state per process: reset around)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        make_accelerator(TrainConfig(cpu_bf16=True), "cpu")
    finally:
        AcceleratorState._reset_state(True)
    assert ("no native bfloat16" in capsys.readouterr().err) == (not native)


def test_param_groups_give_each_parameter_its_deepest_modules_rate():
    """P-Tuning v2's prefixes live inside the LM (lm.prompt_encoder...): with a rate of their
    own they take it, whichever key the config lists first; the frozen LM gets no group."""
    from mrg_core.models import tiny_model
    from mrg_core.training import TrainConfig, param_groups

    model = tiny_model("medvlm", family="llama", adapter="prefix")
    names = {id(p): n for n, p in model.named_parameters()}
    for lr in ({"lm": 5e-4, "prompt_encoder": 5e-3, "encoder": 1e-4, "default": 2e-3},
               {"prompt_encoder": 5e-3, "encoder": 1e-4, "lm": 5e-4, "default": 2e-3}):
        groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=lr))}
        prefix = [names[id(p)] for p in groups["prompt_encoder"]["params"]]
        assert prefix and all(".prompt_encoder." in n for n in prefix), prefix
        assert groups["prompt_encoder"]["lr"] == 5e-3
        assert "lm" not in groups  # the LLM's own weights are frozen: nothing else under lm
        encoder = [names[id(p)] for p in groups["encoder"]["params"]]
        assert encoder and all(n.split(".")[0] in ("encoder", "report_encoder")
                               or ".encoder." in n for n in encoder)
        assert groups["encoder"]["lr"] == 1e-4
        assert sum(len(g["params"]) for g in groups.values()) == sum(
            p.requires_grad for p in model.parameters())


def test_init_encoder_reuses_a_finding_models_encoder_without_its_finding_head(tmp_path):
    """A plain model can start from a finding model's encoder (the token head is left out);
    a finding model started from a plain one gets a fresh token head."""
    import torch

    from mrg_core.models import ReportModel, tiny_config
    from mrg_core.models.factory import SAMPLE_REPORTS
    from mrg_core.text import train_tokenizer
    from mrg_core.training import init_encoder

    tok = train_tokenizer(SAMPLE_REPORTS + ["ground glass , nodule ."], min_frequency=1)
    found = tiny_config()
    found.labels = ["pneumonia", "ground_glass", "nodule"]
    found.finding_prompt = True
    found.finding_phrases = {"ground_glass": "ground glass", "nodule": "nodule"}
    torch.manual_seed(1)
    ReportModel.build(found, tok).save_pretrained(tmp_path / "findings")
    torch.manual_seed(2)
    plain = ReportModel.build(tiny_config(), tok)
    info = init_encoder(plain, tmp_path / "findings")
    src = ReportModel.from_pretrained(tmp_path / "findings").encoder.state_dict()
    for k, v in plain.encoder.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert info["fresh"] == []


def test_fbeta_thresholds_weigh_precision_by_beta():
    """beta < 1 picks a stricter threshold than F1 when recall costs precision; too few
    positives fall back to 0.5."""
    import numpy as np

    from mrg_core.training import fbeta_thresholds

    # 4 positives at 0.9, 0.8, 0.3, 0.2 among negatives at 0.35, 0.25, 0.1 (column 0)
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.35, 0.25, 0.1])
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    probs, targets = np.stack([p, p], 1), np.stack([y, np.array([1, 0, 0, 0, 0, 0, 0])], 1)
    cols = {"finding": 0, "rare": 1}
    f1 = fbeta_thresholds(probs, targets, cols, beta=1.0, min_positives=2)
    strict = fbeta_thresholds(probs, targets, cols, beta=0.5, min_positives=2)
    assert f1["finding"] == pytest.approx(0.2) and strict["finding"] == pytest.approx(0.8)
    assert f1["rare"] == strict["rare"] == 0.5  # one positive only


def test_fbeta_thresholds_state_no_finding_more_often_than_it_occurs():
    """A weak head whose F1 optimum states the finding in 9 studies of 10: max_rate 1 keeps it to
    as many studies as have it (the most probable ones); a head within the cap is unchanged."""
    import numpy as np

    from mrg_core.training import fbeta_thresholds

    # 3 positives of 10, scored no better than the negatives: F1 is best stating it in 9
    p = np.array([0.30, 0.20, 0.10, 0.35, 0.33, 0.25, 0.22, 0.15, 0.12, 0.05])
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    cols = {"weak": 0}
    free = fbeta_thresholds(p[:, None], y[:, None], cols, min_positives=2)["weak"]
    assert (p >= free).sum() == 9
    capped = fbeta_thresholds(p[:, None], y[:, None], cols, min_positives=2, max_rate=1.0)
    assert (p >= capped["weak"]).sum() == 3  # 0.35, 0.33, 0.30
    assert 0.25 < capped["weak"] <= 0.30
    # a good head already states it at most that often: the cap changes nothing
    good = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.3, 0.1, 0.2, 0.1, 0.05])
    assert fbeta_thresholds(good[:, None], y[:, None], cols, min_positives=2, max_rate=1.0) == \
        fbeta_thresholds(good[:, None], y[:, None], cols, min_positives=2)


def test_warmup_scores_epochs_by_the_decision_head(tmp_path):
    """With finding heads beside the decision, warm-up's val AUC (which picks the epoch kept)
    is the decision head's, and on_epoch sees every head's probabilities."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from mrg_core.data.covctr import load_covctr
    from mrg_core.data.synthetic import write_synthetic_covctr
    from mrg_core.models import ReportModel, tiny_config
    from mrg_core.models.factory import SAMPLE_REPORTS
    from mrg_core.text import train_tokenizer
    from mrg_core.training import (ExampleDataset, ImageCache, TrainConfig, collate,
                                   make_accelerator, warmup_encoder)

    splits = load_covctr(write_synthetic_covctr(tmp_path / "covctr",
                                                n={"train": 12, "val": 8, "test": 2}, size=32))
    mcfg = tiny_config()
    mcfg.labels = ["pneumonia", "ground_glass", "RLL"]  # the decision is not the last column
    mcfg.finding_prompt = True
    mcfg.finding_phrases = {"ground_glass": "ground glass shadow", "RLL": "lower lobe"}
    torch.manual_seed(0)
    model = ReportModel.build(mcfg, train_tokenizer(SAMPLE_REPORTS, min_frequency=1))
    # lr 0: the heads stay random, so their AUCs differ and the test can tell them apart
    cfg = TrainConfig(encoder_warmup_epochs=2, batch_size=4, augment=False,
                      encoder_warmup_lr=0.0)
    cache = ImageCache(mcfg.preprocess)
    load = lambda exs: torch.utils.data.DataLoader(  # noqa: E731
        ExampleDataset(exs, cache, mcfg.labels), batch_size=4, collate_fn=collate)
    seen = []
    rows = warmup_encoder(model, load(splits["train"]), load(splits["val"]), cfg,
                          make_accelerator(cfg, "cpu"), on_epoch=lambda e, p, s: seen.append(p))
    y = np.array([ex.label for ex in splits["val"]])
    assert [p.shape for p in seen] == [(len(y), 3)] * 2
    for row, p in zip(rows, seen):
        assert row["val_auc"] == pytest.approx(roc_auc_score(y, p[:, 0]))
        assert roc_auc_score(y, p[:, 0]) != pytest.approx(roc_auc_score(y, p[:, 2]))
