"""Learning from expert corrections: fine-tune a model version on the store's corrections.

    store corrections ─► newest correction per study ─► held-out split (time or k-fold)
        ─► base model + LM adapter (LoRA / prefix) + trainable prompts / projection / encoder
        ─► train on the reviewers' final texts ─► NEW version folder:
           config.json (version "<parent>+ft<n>.<UTC stamp>"), weights, tokenizer/, README.md,
           lineage.json, finetune_metrics.json/.md (held-out before/after), adapter/ (LoRA only)

How the adapter ends up loadable by `ReportModel.from_pretrained` with no extra code:
- LoRA on an LM without a peft adapter (MRG-LLM prompt/promptbook, MedVLM "none"/"unfreeze"):
  peft LoRA is added here, trained, then MERGED into the LM weights, so the new folder is a
  plain model folder (its lm/ carries the merged weights). The unmerged adapter is kept in
  adapter/ for audit; loading does not need it.
- A MedVLM base that already has a peft adapter (config.medvlm.adapter "lora"/"prefix"): that
  adapter keeps training and is saved by models.io as usual.
- Prefix tuning on a MedVLM base without adapter: the model is rebuilt with
  config.medvlm.adapter = "prefix" (models.io rebuilds it on load).
- Prefix tuning on a prompt/promptbook model cannot be merged and models.io would not re-attach
  it: refused with a clear message (use LoRA there).

Version string: "<parent base>+ft<n>.<YYYYMMDDHHMMSS>" (PEP 440 local segment): n counts fine-tune
generations (the parent's n + 1), the UTC stamp keeps sibling versions of one parent apart.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mrg_core.storage import ACCEPTED, CorrectionExample
from mrg_core.sections import findings_text
from mrg_core.study import study_from_arrays
from mrg_core.text import clean_report

ADAPTERS = ("lora", "prefix", "none")
HOLDOUTS = ("time", "kfold")


@dataclass
class FinetuneConfig:
    adapter: str = "lora"  # "lora" | "prefix" | "none" (prompts/projection/encoder only)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    train_prompts: bool = True  # customized prompts / promptbook (MedVLM: queries, Q-Former)
    train_projection: bool = True  # visual tokens -> LM width (MedVLM: the output projection)
    train_encoder: bool = False  # image backbone + classifier (off: keeps the probability as is)
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    holdout: str = "time"  # "time": newest fraction held out | "kfold": cross-validated metrics
    holdout_fraction: float = 0.2
    k: int = 5
    min_corrections: int = 10  # after keeping the newest correction per study
    # Drafts saved unchanged ("accepted as drafted"): left out by default (select_corrections)
    include_accepted: bool = False
    augment: bool = True  # same photometric/affine jitter as training (few studies: overfitting)
    grad_clip: float = 1.0
    max_new_tokens: int = 120
    covctr_split: str | None = None  # e.g. "test": before/after on COV-CTR too (shared data)
    covctr_limit: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, not {self.adapter!r}")
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"holdout must be one of {HOLDOUTS}, not {self.holdout!r}")


@dataclass
class FinetuneResult:
    path: Path  # the new model version folder
    name: str
    version: str
    parent_version: str
    train_ids: list[int]
    heldout_ids: list[int]  # k-fold: every id was held out once; the saved model saw all
    metrics: dict  # {"heldout": {"before": {...}, "after": {...}}, "covctr": {...}?}
    seconds: float
    lineage: dict = field(default_factory=dict)


class TooFewCorrections(ValueError):
    def __init__(self, n: int, needed: int):
        self.n, self.needed = n, needed
        super().__init__(f"Only {n} corrected stud{'y' if n == 1 else 'ies'} in the database; "
                         f"fine-tuning needs at least {needed}. Review more drafts first.")


# ----------------------------------------------------------------------------- data

def select_corrections(examples: list[CorrectionExample], include_accepted: bool = False
                       ) -> tuple[list[CorrectionExample], list[int]]:
    """Newest correction per study (a later edit supersedes an earlier one; one study must not
    sit in both train and held-out), oldest first. Returns (kept, superseded ids).

    Drafts saved unchanged (kind "accepted", "accepted as drafted") are left out unless
    `include_accepted`: their target is the parent model's own output, so training on them
    teaches nothing new (it only reinforces what the model already writes, and with many of
    them pulls it towards its own drafts), and on the held-out side they flatter the parent,
    which reproduces them exactly. They are not counted as superseded either; the lineage
    lists them as "accepted" (finetune_from_store). With `include_accepted` they are ordinary
    positive examples, still tagged by their `kind`."""
    if not include_accepted:
        examples = [e for e in examples if e.kind != ACCEPTED]
    newest: dict[str, CorrectionExample] = {}
    for ex in sorted(examples, key=lambda e: (e.created_at, e.correction_id)):
        if ex.images and ex.final_text.strip():
            newest[ex.content_hash] = ex
    kept = sorted(newest.values(), key=lambda e: (e.created_at, e.correction_id))
    kept_ids = {e.correction_id for e in kept}
    return kept, [e.correction_id for e in examples if e.correction_id not in kept_ids]


def time_split(examples: list[CorrectionExample], fraction: float
               ) -> tuple[list[CorrectionExample], list[CorrectionExample]]:
    """(train, held out): the newest `fraction` is held out, as the model will meet the future."""
    n_out = min(len(examples) - 1, max(1, round(len(examples) * fraction))) if fraction > 0 else 0
    return examples[: len(examples) - n_out], examples[len(examples) - n_out:]


def kfold_split(examples: list[CorrectionExample], k: int, seed: int
                ) -> list[tuple[list[CorrectionExample], list[CorrectionExample]]]:
    order = np.random.default_rng(seed).permutation(len(examples))
    folds = [sorted(order[i::k].tolist()) for i in range(k)]
    return [([examples[j] for j in range(len(examples)) if j not in set(f)],
             [examples[j] for j in f]) for f in folds if f]


def study_of(ex: CorrectionExample):
    return study_from_arrays(ex.images)


def as_drafted(model, ex: CorrectionExample) -> CorrectionExample:
    """A series or multi-view correction as the engine drafted it: its key view alone (the most
    probable by `model`), so fine-tuning sees what the draft was written from, not hundreds of
    slices fused into one input."""
    if len(ex.images) < 2:
        return ex
    from dataclasses import replace

    from mrg_core.study_level import key_views

    key = key_views(model.view_probabilities(study_of(ex)))[0]
    return replace(ex, images=[ex.images[key]])


def training_items(examples: list[CorrectionExample], model) -> list[tuple]:
    """(FloatTensor[V,1,S,S], final text, label or NaN): the tuples training.collate batches.
    When a reader's finding chips are among the examples, every label is a row over the
    model's labels (target_label_row), so the finding heads and the findings the text states
    learn the reader's chips too."""
    from mrg_core.preprocess import study_to_tensor

    labels = model.config.labels
    rows = len(labels) > 1 and any(ex.findings for ex in examples)
    return [(study_to_tensor(study_of(ex), model.config.preprocess),
             findings_text(model, ex.final_text),  # not an Impression the LM never writes
             target_label_row(ex, labels, model._target_index) if rows else
             float("nan") if ex.label is None else float(ex.label)) for ex in examples]


def target_label_row(ex: CorrectionExample, labels: list[str], target: int) -> list[float]:
    """One correction's targets over the model's labels: its decision label at `target`, the
    reader's finding chips where given, NaN (unknown) elsewhere."""
    row = [float("nan")] * len(labels)
    if ex.label is not None:
        row[target] = float(ex.label)
    for name, value in (ex.findings or {}).items():
        if name in labels and labels.index(name) != target:
            row[labels.index(name)] = float(value)
    return row


# ----------------------------------------------------------------------------- model surgery

def _group(model, name: str) -> str:
    """Which FinetuneConfig switch a parameter belongs to."""
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith("lm."):
        return "adapter" if ("lora_" in name or "prompt_encoder" in name) else "lm"
    proj = "bridge.out." if model.config.method == "medvlm" else "bridge.visual_proj."
    return "projection" if name.startswith(proj) else "prompts"


def check_adapter(model, cfg: FinetuneConfig) -> None:
    from peft import PeftModel

    if cfg.adapter == "prefix" and model.config.method != "medvlm" \
            and not isinstance(model.lm, PeftModel):
        raise ValueError("Prefix tuning of a prompt/promptbook model cannot be saved in a form "
                         "ReportModel.from_pretrained reloads (it cannot be merged into the "
                         "weights); use adapter 'lora' for this model.")


def add_adapter(model, cfg: FinetuneConfig):
    """Attach cfg.adapter to the model's LM. Returns (model, how, built_flags): how is
    "merge-lora" | "existing" | "rebuilt-prefix" | "none"; built_flags are the requires_grad
    flags a fresh build of the saved config gives (restored before saving: models.io saves and
    expects exactly the tensors that are trainable as built)."""
    from peft import PeftModel

    from mrg_core.models.adapters import add_lora
    from mrg_core.models.config import MedVLMConfig
    from mrg_core.models.report_model import ReportModel

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if cfg.adapter == "none":
        return model, "none", flags
    if isinstance(model.lm, PeftModel):  # MedVLM with its own adapter: keep training that one
        return model, "existing", flags
    if cfg.adapter == "lora":
        lcfg = MedVLMConfig(adapter="lora", lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                            lora_dropout=cfg.lora_dropout)
        model.lm = add_lora(model.lm, lcfg, model.family)
        model.config.lm.path = None  # merged weights must travel in lm/, not by reference
        return model, "merge-lora", flags
    check_adapter(model, cfg)
    new_cfg = copy.deepcopy(model.config)
    new_cfg.medvlm.adapter = "prefix"
    new_cfg.lm.path = None
    new = ReportModel.build(new_cfg, model.tokenizer, lm=model.base_lm).to(model.device)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("lm.") for k in missing):
        raise RuntimeError(f"rebuilding for prefix tuning lost weights: {missing[:5]}")
    return new.eval(), "rebuilt-prefix", {n: p.requires_grad for n, p in new.named_parameters()}


def set_trainable(model, cfg: FinetuneConfig, how: str) -> dict[str, int]:
    switch = {"prompts": cfg.train_prompts, "projection": cfg.train_projection,
              "encoder": cfg.train_encoder, "adapter": how != "none", "lm": False}
    counts: Counter = Counter()
    for n, p in model.named_parameters():
        g = _group(model, n)
        p.requires_grad_(bool(switch[g]))
        if switch[g]:
            counts[g] += p.numel()
    if not counts:
        raise ValueError("nothing to train: enable an adapter, prompts, projection or encoder")
    return dict(counts)


def finalize(model, how: str, flags: dict[str, bool], adapter_dir: Path | None):
    """Merge a LoRA added here (after saving it unmerged to adapter_dir) and restore the
    as-built requires_grad flags so save_pretrained writes what from_pretrained expects."""
    if how == "merge-lora":
        if adapter_dir is not None:
            model.lm.save_pretrained(str(adapter_dir))
        model.lm = model.lm.merge_and_unload()
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))
    return model.eval()


def weights_sha256(model) -> str:
    """Identity of a model's weights (names, dtypes, shapes, bytes), independent of files."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def derive_version(parent: str, when: datetime) -> str:
    base, _, local = (parent or "0.0.0").partition("+")
    m = re.match(r"ft(\d+)", local)
    n = int(m.group(1)) + 1 if m else 1
    return f"{base}+ft{n}.{when.strftime('%Y%m%d%H%M%S')}"


# ----------------------------------------------------------------------------- train

def train_model(model, items: list[tuple], cfg: FinetuneConfig, desc: str = "fine-tune"
                ) -> list[dict]:
    """Plain loop (one process, a few dozen studies): AdamW, linear decay, clipping.
    Reuses training.LossModule / collate so the loss is the one the model was trained with."""
    from mrg_core.model_thread import ProcessExiting, exiting
    from mrg_core.preprocess import augment_batch
    from mrg_core.training import LossModule, collate

    model.learn_vocabulary([it[1] for it in items])  # a restricted output layer grows
    torch.manual_seed(cfg.seed)  # dropout
    gen = torch.Generator().manual_seed(cfg.seed)  # order + augmentation
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = max(1, cfg.epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / total)
    loss_module = LossModule(model)
    dev = model.device
    model.train()
    if not cfg.train_encoder:
        model.encoder.eval()  # frozen BatchNorm statistics must not drift either
    rows = []
    bar = tqdm(range(cfg.epochs), desc=desc, leave=False)
    for epoch in bar:
        order = torch.randperm(len(items), generator=gen).tolist()
        losses = []
        for b in range(per_epoch):
            if exiting():  # the app is closing: stop at a batch boundary (model_thread.py)
                raise ProcessExiting("the process is exiting: fine-tuning stopped")
            pix, reports, labels = collate([items[i] for i in order[b::per_epoch]])
            if cfg.augment:
                pix = augment_batch(pix, generator=gen)
            out = loss_module(pix.to(dev), reports, labels)
            opt.zero_grad()
            out["loss"].backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(out["lm_loss"].detach()))
        rows.append({"epoch": epoch + 1, "lm_loss": float(np.mean(losses))})
        bar.set_postfix(lm_loss=f"{rows[-1]['lm_loss']:.3f}")
    model.eval()
    return rows


# ----------------------------------------------------------------------------- metrics

def _words(text: str) -> list[str]:
    return clean_report(text).split()


def token_f1(ref: str, hyp: str) -> float:
    r, h = Counter(_words(ref)), Counter(_words(hyp))
    overlap = sum((r & h).values())
    if not r or not h or not overlap:
        return 0.0
    p, rec = overlap / sum(h.values()), overlap / sum(r.values())
    return 2 * p * rec / (p + rec)


def text_metrics(refs: dict, hyps: dict, drafts: dict | None = None) -> dict:
    """Word-level metrics of hypotheses against references (same ids):
    token_f1, exact_match, BLEU_4 / ROUGE_L (pycocoevalcap, no Java), and, when the drafts the
    reviewers edited are given, the reviewers' edits: added_word_recall (words they added that
    the model now writes) and removed_word_rate (words they deleted that it still writes)."""
    ids = [i for i in refs if i in hyps]
    out: dict = {"n": len(ids)}
    if not ids:
        return out
    out["token_f1"] = float(np.mean([token_f1(refs[i], hyps[i]) for i in ids]))
    out["exact_match"] = float(np.mean([clean_report(refs[i]) == clean_report(hyps[i])
                                        for i in ids]))
    try:
        from mrg_core.evaluation.caption import CaptionScorer

        s = CaptionScorer(meteor=False).score({i: refs[i] for i in ids}, {i: hyps[i] for i in ids})
        out["BLEU_4"], out["ROUGE_L"] = s["BLEU_4"], s["ROUGE_L"]
    except ImportError:  # pycocoevalcap missing: token-level metrics still stand
        pass
    if drafts:
        added, removed = [], []
        for i in ids:
            ref, hyp = set(_words(refs[i])), set(_words(hyps[i]))
            draft = set(_words(drafts.get(i, "")))
            if ref - draft:
                added.append(len((ref - draft) & hyp) / len(ref - draft))
            if draft - ref:
                removed.append(len((draft - ref) & hyp) / len(draft - ref))
        if added:
            out["added_word_recall"] = float(np.mean(added))
        if removed:
            out["removed_word_rate"] = float(np.mean(removed))
    return out


def generate_for(model, examples: list[CorrectionExample], settings, desc: str) -> dict:
    return {ex.correction_id: model.generate_report(study_of(ex), settings)
            for ex in tqdm(examples, desc=desc, leave=False)}


def label_accuracy(model, examples: list[CorrectionExample]) -> float | None:
    known = [ex for ex in examples if ex.label is not None]
    if not known:
        return None
    return float(np.mean([model.predict(study_of(ex)).label == ex.label for ex in known]))


def heldout_metrics(model, examples: list[CorrectionExample], settings, desc: str,
                    hyps: dict | None = None, text_model=None) -> dict:
    """Text metrics of `model`'s drafts (or `hyps`) against the saved reports, on what the
    language model writes (sections.findings_text of `text_model`, default `model`)."""
    hyps = hyps if hyps is not None else generate_for(model, examples, settings, desc)
    reader = text_model or model
    lm = (lambda t: findings_text(reader, t)) if reader is not None else (lambda t: t)
    m = text_metrics({e.correction_id: lm(e.final_text) for e in examples}, hyps,
                     {e.correction_id: lm(e.draft_text) for e in examples})
    if model is not None:
        m["label_accuracy"] = label_accuracy(model, examples)
    return m


def covctr_metrics(model, split: str, limit: int | None, settings) -> dict | None:
    """Caption metrics on a COV-CTR split (no METEOR: no JVM per call); None without the data."""
    from mrg_core.data import load_covctr
    from mrg_core.data.covctr import default_root
    from mrg_core.data.images import ImageCache

    if not (default_root() / "reports.tsv").is_file():
        return None
    examples = [ex for ex in load_covctr()[split] if ex.has_report][:limit]
    cache = ImageCache(model.config.preprocess)
    hyps = {ex.id: model.generate_report(cache.load_study(ex), settings)
            for ex in tqdm(examples, desc=f"COV-CTR {split}", leave=False)}
    return text_metrics({ex.id: ex.report for ex in examples}, hyps) | {"split": split}


# ----------------------------------------------------------------------------- main entry

def _load_base(base, device):
    from mrg_core.models import ReportModel

    if isinstance(base, (str, os.PathLike)):
        return ReportModel.from_pretrained(base, device=device), Path(base).resolve()
    return copy.deepcopy(base).eval(), None  # an in-memory model (Engine without a folder)


def _fresh(base_model):
    return copy.deepcopy(base_model)


def _prepare(base_model, cfg: FinetuneConfig):
    model, how, flags = add_adapter(_fresh(base_model), cfg)
    counts = set_trainable(model, cfg, how)
    return model, how, flags, counts


def default_out_dir(name: str, version: str) -> Path:
    from mrg_core.registry import models_dir

    return models_dir() / re.sub(r"[^A-Za-z0-9._+-]", "-", f"{name}-{version}")


def finetune_from_store(store, base_dir, out_dir=None, cfg: FinetuneConfig | None = None,
                        exclude_models: Collection[str] = ()) -> FinetuneResult:
    """Fine-tune the model at `base_dir` (a folder, or an in-memory ReportModel) on the store's
    corrections, except those drafted by a model named in `exclude_models` (the engine's other
    routed models); write a new version folder at `out_dir` (default: models dir /
    name-version). Raises TooFewCorrections before loading any model."""
    from mrg_core.models import GenerationSettings
    from mrg_core.models.io import default_card

    cfg = cfg or FinetuneConfig()
    t0 = time.time()
    # Not what another routed model drafted: the app sends chest radiographs to the CXR model,
    # and its corrections would teach the CT model radiograph reports.
    all_ex = [e for e in store.iter_corrections() if e.model_name not in exclude_models]
    kept, superseded = select_corrections(all_ex, cfg.include_accepted)
    accepted = [] if cfg.include_accepted else [e.correction_id for e in all_ex
                                                if e.kind == ACCEPTED]
    needed = max(cfg.min_corrections, cfg.k if cfg.holdout == "kfold" else 2)
    if len(kept) < needed:
        raise TooFewCorrections(len(kept), needed)
    if out_dir is not None and Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new folder")

    base_model, base_folder = _load_base(base_dir, cfg.device)
    check_adapter(base_model, cfg)  # before minutes of evaluation
    kept = [as_drafted(base_model, ex) for ex in kept]
    parent = {"name": base_model.config.name, "version": base_model.config.version,
              "folder": str(base_folder) if base_folder else None,
              "weights_sha256": weights_sha256(base_model)}
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
    items_of = {ex.correction_id: it for ex, it in
                zip(kept, training_items(kept, base_model))}

    # ---- held-out evaluation -------------------------------------------------------------
    if cfg.holdout == "time":
        train_ex, held = time_split(kept, cfg.holdout_fraction)
        before = heldout_metrics(base_model, held, settings, "base on held-out")
        model, how, flags, counts = _prepare(base_model, cfg)
        history = train_model(model, [items_of[e.correction_id] for e in train_ex], cfg)
        after = heldout_metrics(model, held, settings, "new on held-out")
        evaluation = {"holdout": "time", "fraction": cfg.holdout_fraction}
    else:
        folds = kfold_split(kept, cfg.k, cfg.seed)
        held = kept
        before = heldout_metrics(base_model, kept, settings, "base on all (k-fold)")
        hyps, correct = {}, []
        for i, (tr, te) in enumerate(folds):
            m, how, _, _ = _prepare(base_model, cfg)
            train_model(m, [items_of[e.correction_id] for e in tr], cfg, desc=f"fold {i + 1}")
            hyps |= generate_for(m, te, settings, f"fold {i + 1} held-out")
            acc = label_accuracy(m, te)
            correct += [] if acc is None else [(acc, len(te))]
        after = heldout_metrics(None, kept, settings, "", hyps=hyps, text_model=base_model)
        after["label_accuracy"] = (sum(a * n for a, n in correct) / sum(n for _, n in correct)
                                   if correct else None)
        train_ex = kept  # the saved version learns from every correction
        model, how, flags, counts = _prepare(base_model, cfg)
        history = train_model(model, [items_of[e.correction_id] for e in train_ex], cfg)
        evaluation = {"holdout": "kfold", "k": len(folds),
                      "folds": [[e.correction_id for e in te] for _, te in folds]}

    metrics = {"heldout": {"before": before, "after": after, **evaluation}}

    # ---- new version ---------------------------------------------------------------------
    created = datetime.now(timezone.utc)
    version = derive_version(parent["version"], created)
    out = Path(out_dir) if out_dir is not None else default_out_dir(parent["name"], version)
    tmp = out.with_name(f".{out.name}.partial")  # the registry never sees a half-written folder
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = finalize(model, how, flags, tmp / "adapter" if how == "merge-lora" else None)
    model.config.version = version

    if cfg.covctr_split:
        cov_before = covctr_metrics(base_model, cfg.covctr_split, cfg.covctr_limit, settings)
        if cov_before is not None:
            metrics["covctr"] = {"before": cov_before,
                                 "after": covctr_metrics(model, cfg.covctr_split,
                                                         cfg.covctr_limit, settings)}
    lineage = {
        "name": parent["name"], "version": version,
        "created_at": created.isoformat(timespec="seconds"),
        "parent": parent,
        "corrections": {"train": [e.correction_id for e in train_ex],
                        "heldout": [] if cfg.holdout == "kfold" else
                        [e.correction_id for e in held],
                        "superseded": superseded, "accepted": accepted,
                        "include_accepted": cfg.include_accepted,
                        "store": _store_url(store)},
        "evaluation": evaluation,
        "adapter": {"requested": cfg.adapter, "applied": how,
                    "trainable_params": counts},
        "settings": asdict(cfg),
        "history": history,
        "metrics": metrics,
    }
    (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2, default=str))
    (tmp / "finetune_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    table = metrics_markdown(metrics)
    (tmp / "finetune_metrics.md").write_text(table)
    model.save_pretrained(tmp, card=default_card(model) + lineage_card(lineage, table))
    if out.exists():
        out.rmdir()  # checked empty above
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return FinetuneResult(path=out, name=parent["name"], version=version,
                          parent_version=parent["version"],
                          train_ids=lineage["corrections"]["train"],
                          heldout_ids=[e.correction_id for e in held], metrics=metrics,
                          seconds=round(time.time() - t0, 1), lineage=lineage)


def _store_url(store) -> str | None:
    try:
        return store.engine.url.render_as_string(hide_password=True)
    except AttributeError:
        return None


# ----------------------------------------------------------------------------- reports

METRIC_ROWS = ("token_f1", "BLEU_4", "ROUGE_L", "exact_match", "added_word_recall",
               "removed_word_rate", "label_accuracy")


def metrics_markdown(metrics: dict) -> str:
    lines = []
    for key, title in (("heldout", "Held-out corrected cases"), ("covctr", "COV-CTR")):
        m = metrics.get(key)
        if not m:
            continue
        b, a = m["before"] or {}, m["after"] or {}
        extra = (f"k-fold (k={m['k']})" if m.get("holdout") == "kfold"
                 else f"newest {m['fraction']:.0%}" if m.get("holdout") == "time"
                 else f"split {b.get('split', '')}")
        lines += [f"### {title} ({extra}, n={b.get('n', 0)})", "",
                  "| metric | before (parent) | after (this version) | change |",
                  "| --- | --- | --- | --- |"]
        for r in METRIC_ROWS:
            if b.get(r) is None and a.get(r) is None:
                continue
            fb, fa = b.get(r), a.get(r)
            d = f"{fa - fb:+.3f}" if fb is not None and fa is not None else ""
            lines.append(f"| {r} | {_f(fb)} | {_f(fa)} | {d} |")
        lines.append("")
    return "\n".join(lines)


def _f(v) -> str:
    return "" if v is None else f"{v:.3f}"


def lineage_card(lineage: dict, table: str) -> str:
    p, c = lineage["parent"], lineage["corrections"]
    return (f"\n## Fine-tuned on expert corrections\n\n"
            f"- Parent: {p['name']} {p['version']} (folder `{p['folder']}`, weights sha256 "
            f"`{p['weights_sha256'][:16]}…`)\n"
            f"- Created: {lineage['created_at']}\n"
            f"- Adapter: {lineage['adapter']['applied']} (requested "
            f"{lineage['adapter']['requested']})\n"
            f"- Corrections: {len(c['train'])} for training, {len(c['heldout'])} held out "
            f"({lineage['evaluation']['holdout']}); ids in lineage.json\n\n{table}\n")
