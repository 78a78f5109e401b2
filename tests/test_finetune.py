"""Learning from expert corrections, end to end on real parts: a tiny model pretrained here on an
"original" report style, a reviewer who always rewrites one sentence, the real Store on a real
SQLite file, finetune_from_store, and the new version reloaded from its folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mrg_core.data.synthetic import synthetic_image
from mrg_core.finetune import FinetuneConfig, finetune_from_store, token_f1
from mrg_core.models import ReportModel, tiny_model
from mrg_core.registry import list_model_versions
from mrg_core.storage import DraftRecord, Store
from mrg_core.study import study_from_arrays
from mrg_core.text import clean_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Image kind -> the finding sentence of the original style; every report ends with TEMPLATE.
FINDINGS = {"normal": "both lungs are well aerated .",
            "opacity": "ground glass opacity in the right lower lobe ."}
TEMPLATE = "no pleural effusion ."
REVIEWER = "the pleural spaces are clear ."  # what the reviewer always writes instead
KINDS = list(FINDINGS)


def original(kind: str) -> str:
    return f"{FINDINGS[kind]} {TEMPLATE}"


def reviewed(kind: str) -> str:
    return f"{FINDINGS[kind]} {REVIEWER}"


def make_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    return synthetic_image(int(kind != "normal"), "right", "lower", rng, size=64)


def studies(n: int, seed: int) -> list[tuple[str, object]]:
    """n (kind, Study) pairs, kinds in rotation, pixels from `seed` (distinct sets never share
    a study: the noise differs)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        out.append((kind, study_from_arrays([make_image(kind, rng)], "CT", "CHEST")))
    return out


def has_reviewer_wording(text: str) -> bool:
    return "pleural spaces are clear" in clean_report(text)


def finding_correct(text: str, kind: str) -> bool:
    return clean_report(text).startswith(FINDINGS[kind])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two torch threads on a shared 2-core machine spin against each other (10x slower here);
    one thread keeps this module well under its time budget. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, one_thread):
    """The parent version: tiny_model (prompt method, frozen LM) pretrained on the original style.
    The tokenizer knows both wordings; the LM never saw the reviewer's."""
    torch.manual_seed(0)
    texts = [original(k) for k in KINDS] + [reviewed(k) for k in KINDS]
    model = tiny_model(texts=texts, seed=0)
    built = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)  # a random frozen LM learns nothing: pretrain it once here
    data = studies(36, seed=100)
    from mrg_core.preprocess import study_to_tensor
    from mrg_core.training import LossModule, collate

    items = [(study_to_tensor(s, model.config.preprocess), original(k), float(k != "normal"))
             for k, s in data]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_module = LossModule(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(PRETRAIN_STEPS):
        idx = torch.randint(len(items), (8,), generator=g).tolist()
        pix, reports, labels = collate([items[i] for i in idx])
        loss = loss_module(pix, reports, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(built[n])
    model.config.version = "0.1.0"
    folder = tmp_path_factory.mktemp("models") / "base"
    model.save_pretrained(folder)
    return folder


PRETRAIN_STEPS = 60  # enough for the tiny model to write the original style perfectly


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, base_dir):
    """24 reviewed studies: drafts from the parent model, final text = the reviewer's wording."""
    db = tmp_path_factory.mktemp("db") / "corrections.db"
    url = f"sqlite:///{db}"
    base = ReportModel.from_pretrained(base_dir)
    with Store(url) as store:
        for kind, study in studies(24, seed=200):
            draft = base.generate_report(study)
            p = base.predict(study)
            rec = DraftRecord(model_name=base.config.name, model_version=base.config.version,
                              text=draft, probability=p.probability, threshold=p.threshold)
            store.save_review(study, rec, reviewed(kind), "dr-test", label=int(kind != "normal"))
    return url


# Fine-tuning settings for the tiny model: a word the LM never produced ("clear") has to become
# likely through LoRA on c_attn only (tied, frozen output embeddings), hence the high lr.
FT = dict(epochs=30, lr=0.03, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, base_dir, store_url):
    out = tmp_path_factory.mktemp("models") / "ft"
    with Store(store_url) as store:
        return finetune_from_store(store, base_dir, out, FinetuneConfig(**FT))


def _generate(model, data):
    return [(kind, model.generate_report(study)) for kind, study in data]


def test_new_version_writes_the_reviewers_wording(base_dir, finetuned):
    base = ReportModel.from_pretrained(base_dir)
    new = ReportModel.from_pretrained(finetuned.path)  # plain from_pretrained, offline
    unseen = studies(12, seed=300)  # same kind of studies, never stored, never trained on
    rate_base = np.mean([has_reviewer_wording(t) for _, t in _generate(base, unseen)])
    rate_new = np.mean([has_reviewer_wording(t) for _, t in _generate(new, unseen)])
    print(f"reviewer wording on unseen studies: base {rate_base:.2f} -> new {rate_new:.2f}")
    assert rate_base == 0.0
    assert rate_new >= 0.75

    # Original-style reference set (the "test split" of the issue). Two measures:
    reference = studies(12, seed=400)
    gen_base, gen_new = _generate(base, reference), _generate(new, reference)
    # (1) The image-dependent finding must survive. Tolerance 1/6 (2 of 12 studies): a tiny
    #     model may flip a borderline study, while forgetting the image (one finding for all)
    #     would cost 0.5 on these balanced classes.
    acc_base = np.mean([finding_correct(t, k) for k, t in gen_base])
    acc_new = np.mean([finding_correct(t, k) for k, t in gen_new])
    assert acc_new >= acc_base - 1 / 6, (acc_base, acc_new)
    # (2) Word overlap with the original-style references drops by the cost of the intended
    #     rewrite itself (a perfect model that adopted the reviewer's sentence scores
    #     token_f1(original, reviewed) < 1) plus 0.05 slack for at most one word in ~20 going
    #     astray. Anything larger means the fine-tune damaged what the reviewer did not touch.
    f1_base = np.mean([token_f1(original(k), t) for k, t in gen_base])
    f1_new = np.mean([token_f1(original(k), t) for k, t in gen_new])
    rewrite_cost = 1 - np.mean([token_f1(original(k), reviewed(k)) for k, _ in reference])
    tolerance = rewrite_cost + 0.05
    print(f"reference token-F1 {f1_base:.3f} -> {f1_new:.3f} (tolerance {tolerance:.3f}); "
          f"finding accuracy {acc_base:.2f} -> {acc_new:.2f}")
    assert f1_base - f1_new <= tolerance

    # the held-out corrections (newest 20 %) show the same in finetune_metrics
    held = finetuned.metrics["heldout"]
    assert held["after"]["added_word_recall"] > held["before"]["added_word_recall"]
    assert held["after"]["token_f1"] > held["before"]["token_f1"]


def test_lineage_version_and_registry(base_dir, finetuned, store_url):
    lineage = json.loads((finetuned.path / "lineage.json").read_text())
    base_cfg = json.loads((base_dir / "config.json").read_text())
    new_cfg = json.loads((finetuned.path / "config.json").read_text())
    assert lineage["parent"]["version"] == base_cfg["version"] == "0.1.0"
    assert lineage["parent"]["folder"] == str(base_dir.resolve())
    assert len(lineage["parent"]["weights_sha256"]) == 64
    assert new_cfg["version"] == lineage["version"] == finetuned.version
    assert finetuned.version.startswith("0.1.0+ft1.") and finetuned.version != "0.1.0"
    with Store(store_url) as store:
        ids = [c.correction_id for c in store.iter_corrections()]
    train, held = lineage["corrections"]["train"], lineage["corrections"]["heldout"]
    assert sorted(train + held) == sorted(ids) and not set(train) & set(held)
    assert len(held) == round(0.2 * len(ids))
    assert max(train) < min(held)  # time split: the newest corrections are held out
    assert lineage["settings"]["epochs"] == FT["epochs"] and lineage["created_at"]
    assert lineage["adapter"]["applied"] == "merge-lora"
    assert (finetuned.path / "adapter" / "adapter_config.json").is_file()
    for name in ("finetune_metrics.json", "finetune_metrics.md"):
        assert (finetuned.path / name).is_file()
    assert "| token_f1 |" in (finetuned.path / "finetune_metrics.md").read_text()
    assert "Fine-tuned on expert corrections" in (finetuned.path / "README.md").read_text()

    versions = list_model_versions([base_dir, finetuned.path.parent])
    by_version = {v.version: v for v in versions}
    assert by_version[finetuned.version].parent_version == "0.1.0"
    assert by_version["0.1.0"].parent_version is None
    assert all(v.path.name != "lm" for v in versions)


def test_engine_lists_switches_and_records_the_version(base_dir, finetuned, store_url):
    from mrg_core.engine import Engine

    with Store(store_url) as store:
        engine = Engine(ReportModel.from_pretrained(base_dir), store)
        listed = engine.list_models([base_dir, finetuned.path.parent])
        assert {m.version for m in listed} >= {"0.1.0", finetuned.version}
        info = engine.switch_model(finetuned.path)
        assert info["version"] == finetuned.version and engine.model_dir == finetuned.path.resolve()
        _, study = studies(1, seed=500)[0]
        rec = engine.draft_record(engine.model.generate_report(study), None)
        assert rec.model_version == finetuned.version


def test_kfold_and_engine_finetune(base_dir, store_url, tmp_path):
    from mrg_core.engine import Engine

    with Store(store_url) as store:
        engine = Engine(ReportModel.from_pretrained(base_dir), store)
        engine.model_dir = base_dir
        cfg = FinetuneConfig(epochs=1, lr=0.03, holdout="kfold", k=3, seed=0)
        res = engine.finetune(tmp_path / "kfold", cfg)
    lineage = json.loads((res.path / "lineage.json").read_text())
    folds = lineage["evaluation"]["folds"]
    assert len(folds) == 3 and sorted(sum(folds, [])) == sorted(lineage["corrections"]["train"])
    assert lineage["corrections"]["heldout"] == []  # k-fold: the saved version saw everything
    assert res.metrics["heldout"]["after"]["n"] == len(lineage["corrections"]["train"])
    assert ReportModel.from_pretrained(res.path).config.version == res.version


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "mrg_core", "finetune", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                            **env})


def test_cli_finetune_from_db(base_dir, store_url, tmp_path):
    out = tmp_path / "cli-version"
    r = _cli("--from-db", store_url, "--base", str(base_dir), "--out", str(out),
             "--adapter", "lora", "--epochs", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["path"] == str(out) and summary["parent_version"] == "0.1.0"
    assert (out / "lineage.json").is_file() and (out / "config.json").is_file()


def test_cli_too_few_corrections_exits_2(base_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'few.db'}"
    with Store(url) as store:
        for kind, study in studies(2, seed=600):
            store.save_review(study, DraftRecord("m", "0.1.0", original(kind)), reviewed(kind),
                              "dr-test")
    r = _cli("--from-db", url, "--base", str(base_dir), "--out", str(tmp_path / "x"),
             "--min-corrections", "5")
    assert r.returncode == 2
    assert "Too few corrections" in r.stderr and "2" in r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_leaves_out_the_other_routed_models_corrections(base_dir, tmp_path):
    """The radiograph model's corrections never teach the CT model: by default the app's other
    routed models ($MRG_EXTRA_MODELS) are left out, --exclude-model names them explicitly."""
    cxr = tmp_path / "cxr"
    tiny_model(seed=3).save_pretrained(cxr)
    cfg = json.loads((cxr / "config.json").read_text())
    (cxr / "config.json").write_text(json.dumps(cfg | {"name": "tiny-cxr"}))
    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    with Store(url) as store:
        for i, (kind, study) in enumerate(studies(5, seed=700)):
            name = "tiny-cxr" if i < 3 else "m"  # 3 drafted by the radiograph model
            store.save_review(study, DraftRecord(name, "0.1.0", original(kind)), reviewed(kind),
                              "dr-test")
    common = ("--from-db", url, "--base", str(base_dir), "--out", str(tmp_path / "x"),
              "--min-corrections", "3")
    for r in (_cli(*common, MRG_EXTRA_MODELS=str(cxr)),
              _cli(*common, "--exclude-model", "tiny-cxr", MRG_EXTRA_MODELS="")):
        assert r.returncode == 2 and "Only 2 corrected studies" in r.stderr, r.stderr[-500:]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("base_adapter, adapter, applied", [
    ("none", "prefix", "rebuilt-prefix"), ("none", "lora", "merge-lora"),
    ("lora", "lora", "existing")])
def test_medvlm_base_gets_a_reloadable_adapter(store_url, tmp_path, base_adapter, adapter,
                                               applied):
    """MedVLM without an LM adapter: prefix tuning rebuilds it with medvlm.adapter "prefix",
    LoRA is merged; a MedVLM with its own LoRA keeps training it. All reload with plain
    from_pretrained."""
    texts = [original(k) for k in KINDS] + [reviewed(k) for k in KINDS]
    base = tiny_model(method="medvlm", adapter=base_adapter, texts=texts, seed=1)
    base.save_pretrained(tmp_path / "base")
    cfg = FinetuneConfig(adapter=adapter, epochs=1, lr=0.01, holdout_fraction=0.1)
    with Store(store_url) as store:
        res = finetune_from_store(store, tmp_path / "base", tmp_path / "new", cfg)
    new = ReportModel.from_pretrained(res.path)
    assert res.lineage["adapter"]["applied"] == applied
    assert new.config.medvlm.adapter == ("prefix" if adapter == "prefix" else base_adapter)
    _, study = studies(1, seed=700)[0]
    assert isinstance(new.generate_report(study), str)


def test_prefix_on_a_prompt_model_is_refused_early(base_dir, store_url, tmp_path):
    with Store(store_url) as store, pytest.raises(ValueError, match="use adapter 'lora'"):
        finetune_from_store(store, base_dir, tmp_path / "p", FinetuneConfig(adapter="prefix"))


def test_engine_finetune_without_a_known_folder(base_dir, store_url, tmp_path, monkeypatch):
    """A live model whose folder is unknown is fine-tuned from memory; the new version lands in
    $MRG_MODELS_DIR under <name>-<version> and is listed there."""
    from mrg_core.engine import Engine

    monkeypatch.setenv("MRG_MODEL_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("MRG_MODELS_DIR", str(tmp_path / "models"))
    with Store(store_url) as store:
        engine = Engine(ReportModel.from_pretrained(base_dir), store)
        res = engine.finetune(cfg=FinetuneConfig(epochs=1))
        assert res.path.parent == tmp_path / "models" and res.lineage["parent"]["folder"] is None
        assert [m.version for m in engine.list_models()] == [res.version]
        assert engine.model.config.version == "0.1.0"  # the live model is left as it was


def test_drafts_accepted_unchanged_are_left_out_of_the_fine_tuning_set(tmp_path):
    """A draft saved unchanged is the parent's own text: not trained on (and not counted
    towards min_corrections) unless include_accepted; a later acceptance does not hide an
    earlier correction of the same study."""
    from mrg_core.finetune import TooFewCorrections, select_corrections

    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    with Store(url) as store:
        pairs = studies(5, seed=700)
        for kind, study in pairs[:3]:  # accepted as drafted
            store.save_review(study, DraftRecord("m", "0.1.0", original(kind)), original(kind),
                              "dr-test")
        for kind, study in pairs[3:]:  # corrected, then the next draft accepted
            store.save_review(study, DraftRecord("m", "0.1.0", original(kind)), reviewed(kind),
                              "dr-test")
            store.save_review(study, DraftRecord("m", "0.1.0", original(kind)), original(kind),
                              "dr-test")
        every = store.iter_corrections()
        assert [e.kind for e in every] == ["accepted"] * 3 + ["corrected", "accepted"] * 2
        kept, superseded = select_corrections(every)
        assert [e.final_text for e in kept] == [reviewed(k) for k, _ in pairs[3:]]
        assert superseded == [] and all(e.kind == "corrected" for e in kept)
        kept_all, _ = select_corrections(every, include_accepted=True)
        assert len(kept_all) == 5 and sum(e.kind == "accepted" for e in kept_all) == 5
        with pytest.raises(TooFewCorrections) as err:  # before any model is loaded
            finetune_from_store(store, tmp_path / "no-model", tmp_path / "out",
                                FinetuneConfig(min_corrections=3))
        assert err.value.n == 2
