"""Training: tokenizer → compact causal LM pretraining → report model (frozen LM), accelerate.

    python -m mrg_core train --config configs/default.json [--resume] [--out DIR] [--device auto]
    accelerate launch -m mrg_core train --config configs/default.json      # several GPUs

Output folder (TrainConfig.out_dir):
    lm/            tokenizer + pretrained causal LM (reused when present; skipped when the
                   config names an existing LM folder, e.g. a real pretrained GPT-2)
    last/          accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    best/          the best model on val, ReportModel.save_pretrained (the app loads this)
    history.json   per-epoch losses and val metrics (training-curve plots)
    train_config.json

Data rules: the tokenizer and LM see COV-CTR *train* reports (+ IU X-ray report text, another
dataset); model selection uses val only; test is never read here.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .data import Example, ImageCache, load_splits
from .models.language_model import lm_folder
from .models.quantize import native_bf16
from .paths import data_dir
from .text import clean_report, train_tokenizer


# ----------------------------------------------------------------------------- configuration

@dataclass
class DataConfig:
    kind: str = "covctr"  # "covctr" | "r2gen" | "corrections"
    root: str | None = None  # COV-CTR folder (None → $MRG_DATA_DIR/covctr)
    annotation: str | None = None  # r2gen annotation.json
    images: str | None = None  # r2gen images root
    folder: str | None = None  # corrections export
    val_fraction: float = 0.15  # corrections only (no split of their own)
    # Extra LM text: IU X-ray reports CSV ("default" → $MRG_DATA_DIR/iu_reports/iu_reports.csv,
    # null → none). A missing default file is skipped, a missing explicit path is an error.
    iu_reports: str | None = "default"
    max_train: int | None = None  # caps for smoke runs
    max_val: int | None = None

    def spec(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class LMPretrainConfig:
    path: str | None = None  # existing LM folder (with its tokenizer): no tokenizer/LM training
    tokenizer_kind: str = "wordlevel"
    vocab_size: int = 2000
    min_frequency: int = 2
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int = 128
    warmup_ratio: float = 0.05
    covctr_repeat: int = 3  # target-domain (CT) text counts this many times vs IU X-ray text
    iu_max_texts: int | None = None  # random subset of the IU X-ray reports (CPU time)
    max_texts: int | None = None  # cap (smoke runs)


@dataclass
class TrainConfig:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)  # ReportModelConfig.to_dict() fields
    lm_pretrain: LMPretrainConfig = field(default_factory=LMPretrainConfig)
    epochs: int = 20
    batch_size: int = 16
    # learning rate per parameter group; a key matches parameters whose name contains it
    # (first match in this order), "default" takes the rest
    lr: dict = field(default_factory=lambda: {"encoder": 1e-3, "bridge": 1e-3, "lm": 2e-4,
                                              "default": 1e-3})
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 42
    eval_every: int = 1  # epochs between validations
    patience: int = 5  # validations without improvement before stopping (0 = never stop)
    select_metric: str = "val_loss"  # "val_loss" (min) | "val_auc" | "val_bleu4" (max)
    augment: bool = True
    # Share of training draws that see the study re-encoded as JPEG (quality 70-95, fixed per
    # study): compression artefacts on every source, so the file format is no shortcut.
    jpeg_augment: float = 0.0
    # Save the training reports' token ids as the model's head_vocab: the fast decoder then
    # scores only those rows of a large LLM's output layer (models/fast_llama.py).
    restrict_head: bool = False
    amp: bool = True  # mixed precision on CUDA (bf16 when supported, else fp16); CPU: fp32
    # bf16 autocast on the CPU too: ~2x faster steps through a frozen 135M LLM on CPUs with
    # AVX512-BF16/AMX (measured 4.5 s -> 2.2 s, batch 8 x 150 tokens, 2 cores)
    cpu_bf16: bool = False
    balance: str = "auto"  # "auto" | "sampler" | "none": class-balanced sampling
    eval_generate: int = 8  # val studies generated each validation for a quick BLEU/ROUGE
    # Discrimination first: train encoder + classifier alone (no LM forward, so ~5x cheaper an
    # epoch) and keep the epoch with the best val AUC, before the report phase starts.
    encoder_warmup_epochs: int = 0
    encoder_warmup_lr: float = 2e-3
    # Keep the (warmed-up) encoder fixed in the report phase, batch-norm statistics included, so
    # the probability and Grad-CAM stay those selected on val AUC while the prompts learn.
    freeze_encoder: bool = False
    # A saved model folder whose encoder (and classifier head) initialises this run's encoder,
    # instead of the warm-up: reuse one warmed-up encoder across report-phase experiments.
    init_encoder_from: str | None = None
    # Pick the decision threshold on val and store it in the saved model's config.
    calibrate_threshold: bool = False
    # How the threshold is picked, on val or out of fold (mrg_core/operating_point.py):
    # "youden" (best sensitivity + specificity) or "equal_error" (where they cross: steadier
    # when Youden's J is flat).
    operating_point: str = "youden"
    # Finding thresholds maximise F-beta on val: beta < 1 weighs precision more, so a draft
    # states fewer findings the image model is unsure of (a wrongly stated finding is written as
    # fact; a missed one the radiologist adds).
    finding_threshold_beta: float = 1.0
    # Separate finding thresholds for studies the classifier calls negative
    # (ReportModelConfig.negative_label_thresholds), chosen on val's negative-decision studies.
    finding_thresholds_by_decision: bool = False
    # Shrink one image axis by up to this share (preprocess.augment_batch): sources squashed to
    # a square (cxr_pneumonia) are then also seen with the aspect ratios real radiographs keep.
    aspect_augment: float = 0.0
    # Weight of the warm-up's lung-focus penalty (mrg_core/lung_focus.py): the share of the
    # decision's Grad-CAM mass outside the lung fields, so the encoder cannot settle on the
    # chest wall, the table or the image edge. 0: off (older recipes replay exactly).
    lung_focus: float = 0.0
    # The report phase learns from report text alone, conditioned on its text class, when the
    # images have no reports (cxr_pneumonia): "iu_reports" (mrg_core.data.iu_reports). The
    # model needs visual_context false; `epochs` then counts passes over the text.
    report_text: str | None = None
    num_threads: int | None = None  # torch CPU threads (None = torch default)
    out_dir: str = "runs/default"

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"description", "_comment"}
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        d = dict(d)
        from .operating_point import RULES

        if d.get("operating_point", "youden") not in RULES:  # before hours of training
            raise ValueError(f"operating_point {d['operating_point']!r}: expected one of "
                             f"{', '.join(RULES)}")
        d["data"] = DataConfig(**d.get("data", {}))
        d["lm_pretrain"] = LMPretrainConfig(**d.get("lm_pretrain", {}))
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- text + LM

def iu_report_texts(path: str | Path) -> list[str]:
    """IU X-ray findings + impression per report; de-identification marks (XXXX) dropped."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = " ".join(t for t in (row.get("findings"), row.get("impression")) if t)
            text = re.sub(r"\bX{2,}\b", " ", text)
            if text.strip():
                out.append(text)
    return out


def lm_texts(cfg: TrainConfig, train: list[Example]) -> list[str]:
    """Cleaned LM training text: training-split reports (repeated) + optional IU reports."""
    own = [clean_report(ex.report) for ex in train if ex.has_report]
    texts = own * max(1, cfg.lm_pretrain.covctr_repeat)
    iu = cfg.data.iu_reports
    if iu:
        path = data_dir() / "iu_reports" / "iu_reports.csv" if iu == "default" else Path(iu)
        if path.is_file():
            iu_texts = iu_report_texts(path)
            if cfg.lm_pretrain.iu_max_texts is not None:
                random.Random(cfg.seed).shuffle(iu_texts)
                iu_texts = iu_texts[: cfg.lm_pretrain.iu_max_texts]
            texts += [clean_report(t) for t in iu_texts]
        elif iu != "default":
            raise FileNotFoundError(f"IU reports file {path} not found")
    texts = [t for t in texts if t]
    if cfg.lm_pretrain.max_texts:
        random.Random(cfg.seed).shuffle(texts)
        texts = texts[: cfg.lm_pretrain.max_texts]
    return texts


def pretrain_lm(cfg: TrainConfig, lm_cfg, texts: list[str], out: Path, accelerator,
                instruction: str = "") -> list[dict]:
    """Train a word-level tokenizer and a small causal LM (build_lm) on report text; save both
    to `out`. `instruction` (the report model's prompt text) joins the tokenizer's vocabulary
    only. Returns per-epoch loss rows."""
    from transformers import get_cosine_schedule_with_warmup

    from .models.language_model import build_lm

    p = cfg.lm_pretrain
    # the model's instruction must tokenize without [UNK]: show it min_frequency times
    extra = [clean_report(instruction)] * p.min_frequency if instruction else []
    tokenizer = train_tokenizer(texts + extra, vocab_size=p.vocab_size,
                                min_frequency=p.min_frequency, kind=p.tokenizer_kind)
    lm = build_lm(lm_cfg, tokenizer)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [[bos] + ids[: p.max_length - 2] + [eos]
               for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def collate(batch: list[list[int]]):
        n = max(len(s) for s in batch)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return ids, mask, ids.masked_fill(mask == 0, -100)

    batches = LengthGroupedBatches([len(x) for x in encoded], p.batch_size, cfg.seed)
    loader = torch.utils.data.DataLoader(encoded, collate_fn=collate, batch_sampler=batches)
    opt = torch.optim.AdamW(lm.parameters(), lr=p.lr, weight_decay=0.01)
    total = max(1, p.epochs * len(loader))
    sched = get_cosine_schedule_with_warmup(opt, int(p.warmup_ratio * total), total)
    # Runs on the main process only (others wait), so no DDP here: plain device placement, and
    # bf16 autocast on CUDA when available (no loss scaler needed, unlike fp16).
    dev = accelerator.device
    lm.to(dev)
    use_bf16 = cfg.amp and dev.type == "cuda" and torch.cuda.is_bf16_supported()
    rows = []
    lm.train()
    for epoch in range(p.epochs):
        losses = []
        bar = tqdm(loader, desc=f"LM pretrain {epoch + 1}/{p.epochs}",
                   disable=not accelerator.is_local_main_process)
        for ids, mask, labels in bar:
            ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        rows.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
    out.mkdir(parents=True, exist_ok=True)
    lm.to("cpu").save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain_history.json").write_text(json.dumps(rows, indent=2))
    return rows


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length (far less padding: report lengths vary 10-250 tokens), in a new
    shuffled order each epoch; lengths are sorted within windows of 50 batches so epochs mix."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        rng = random.Random(self.seed * 1000 + self.epoch)
        self.epoch += 1
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        window = self.batch_size * 50
        batches = []
        for i in range(0, len(idx), window):
            chunk = sorted(idx[i:i + window], key=lambda j: self.lengths[j])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


def load_lm(folder: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                              dtype=torch.float32)
    # real pretrained LMs (GPT-2...) often lack BOS/PAD: the report model needs both
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, lm


# ----------------------------------------------------------------------------- report model

class LossModule(nn.Module):
    """forward() = the ReportModel's training loss, so DDP/accelerate wrap a plain forward.

    Studies without a report (COV-CTR has some) must not teach the LM to emit EOS at once: they
    go through the encoder only and add to the classification loss.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, reports: list[str], labels):
        has = torch.tensor([bool(r.strip()) for r in reports])
        if bool(has.all()):
            return self.model.compute_loss(pixel_values, reports, labels)
        n = len(reports)
        dev = pixel_values.device
        zero = pixel_values.new_zeros(())
        out = {"loss": zero, "lm_loss": zero, "cls_loss": zero}
        cls_sum = zero
        if bool(has.any()):
            idx = has.nonzero().flatten().to(dev)
            out = self.model.compute_loss(pixel_values[idx], [r for r, h in zip(reports, has) if h],
                                          labels[idx])
            cls_sum = out["cls_loss"] * int(has.sum())
        idx = (~has).nonzero().flatten().to(dev)
        enc = self.model.encoder(pixel_values[idx])
        cls_sum = cls_sum + self.model.encoder_loss(enc, labels[idx.cpu()]) * len(idx)
        cls = cls_sum / n
        w = float(getattr(self.model.config, "cls_weight", 1.0))
        return {"loss": out["lm_loss"] + w * cls, "lm_loss": out["lm_loss"], "cls_loss": cls}


def study_targets(ex: Example, names: list[str]) -> list[float]:
    """One target per model label, NaN = unknown: the study's label for the target
    (pneumonia, or a single label), and for every other label whether the reference report
    names that finding or lobe (mrg_core.evaluation.clinical.extract_findings)."""
    from .evaluation.clinical import extract_findings

    target = names.index("pneumonia") if "pneumonia" in names else 0
    said = extract_findings(ex.report) if ex.has_report else None
    return [(float("nan") if ex.label < 0 else float(ex.label)) if i == target
            else (float("nan") if said is None else float(n in said))
            for i, n in enumerate(names)]


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], cache: ImageCache,
                 label_names: list[str] | None = None, jpeg_cache: ImageCache | None = None,
                 jpeg_p: float = 0.0):
        """jpeg_cache/jpeg_p: the share of draws that see the study re-encoded as JPEG."""
        self.examples, self.cache = examples, cache
        self.jpeg_cache, self.jpeg_p = jpeg_cache, jpeg_p
        names = label_names or ["pneumonia"]
        # a single label stays a scalar per study (a [B] batch), as every caller expects
        self.targets = [study_targets(ex, names) if len(names) > 1
                        else study_targets(ex, names)[0] for ex in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        ex = self.examples[i]
        jpeg = self.jpeg_cache is not None and float(torch.rand(())) < self.jpeg_p
        return (self.jpeg_cache if jpeg else self.cache).get(ex), ex.report, self.targets[i]


def collate(batch):
    views = max(x.shape[0] for x, _, _ in batch)
    pix = torch.stack([torch.cat([x, x[-1:].expand(views - x.shape[0], *x.shape[1:])])
                       for x, _, _ in batch])
    return pix, [r for _, r, _ in batch], torch.tensor([y for _, _, y in batch])


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled (or class-balanced, with replacement) order drawn from seed + epoch, so a resumed
    run sees the same order as an uninterrupted one."""

    def __init__(self, labels: list[int], seed: int, balanced: bool):
        self.labels, self.seed, self.balanced, self.epoch = labels, seed, balanced, 0
        y = np.array(labels)
        counts = {c: max(int((y == c).sum()), 1) for c in set(labels)}
        self.weights = torch.tensor([1.0 / counts[c] for c in labels], dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        if self.balanced:
            draw = torch.multinomial(self.weights, len(self.labels), True, generator=g)
            return iter(draw.tolist())
        return iter(torch.randperm(len(self.labels), generator=g).tolist())


def label_balance(examples: list[Example]) -> dict:
    y = np.array([ex.label for ex in examples if ex.label >= 0])
    pos = float(y.mean()) if len(y) else float("nan")
    return {"n": int(len(y)), "n_positive": int(y.sum()) if len(y) else 0, "positive_rate": pos}


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One optimizer group per `cfg.lr` key, named after a module path segment. A parameter
    goes to the deepest segment that has a rate, whatever the keys' order: P-Tuning v2's
    prefixes (lm.prompt_encoder...) take "prompt_encoder"'s rate over "lm"'s."""
    keys = set(cfg.lr) - {"default"}
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # whole segments ("lm", not the end of "...elm"), the deepest first
        key = next((s for s in reversed(name.split(".")) if s in keys), "default")
        groups.setdefault(key, []).append(p)
    default = cfg.lr.get("default", 1e-3)
    return [{"params": ps, "lr": cfg.lr.get(k, default), "name": k} for k, ps in groups.items()]


def _target_index(model) -> int:
    labels = [lab.lower() for lab in model.config.labels]
    return labels.index("pneumonia") if "pneumonia" in labels else 0


@torch.no_grad()
def validate(model, loss_module, loader, examples: list[Example], cache: ImageCache,
             n_generate: int, accelerator) -> dict:
    """Val loss (teacher forcing), AUC/accuracy of the image classifier, and BLEU-4/ROUGE-L on
    the first n_generate val studies with a report (quick, no METEOR)."""
    from sklearn.metrics import roc_auc_score

    from .evaluation.caption import CaptionScorer

    model.eval()
    sums = {"loss": 0.0, "lm_loss": 0.0, "cls_loss": 0.0}
    n = 0
    probs, ys = [], []
    t = _target_index(model)
    for pix, reports, labels in loader:
        pix = pix.to(accelerator.device)
        with accelerator.autocast():
            out = loss_module(pix, reports, labels)
            logits = model.encoder(pix).logits
        for k in sums:
            sums[k] += float(out[k]) * len(reports)
        n += len(reports)
        probs += torch.sigmoid(logits[:, t].float()).tolist()
        y = labels.view(len(reports), -1)
        ys += y[:, t if y.shape[1] > 1 else 0].tolist()
    row = {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
    y, p = np.array(ys), np.array(probs)
    keep = ~np.isnan(y)
    y, p = y[keep].astype(int), p[keep]
    row["val_auc"] = float(roc_auc_score(y, p)) if len(set(y)) == 2 else None
    row["val_accuracy"] = float(((p >= model.config.threshold) == y).mean()) if len(y) else None
    if n_generate > 0:
        chosen = [ex for ex in examples if ex.has_report][:n_generate]
        hyps = {ex.id: model.generate_report(cache.load_study(ex)) for ex in chosen}
        scores = CaptionScorer(meteor=False).score({ex.id: list(ex.references) for ex in chosen},
                                                   hyps)
        row["val_bleu4"], row["val_rouge_l"] = scores["BLEU_4"], scores["ROUGE_L"]
        row["val_sample"] = next(iter(hyps.values()), "")
    model.train()
    return row


def _better(metric: str, new: float | None, best: float | None) -> bool:
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False
    if best is None:
        return True
    return new < best if metric.endswith("loss") else new > best


def mixed_precision(cfg: TrainConfig, cpu: bool) -> str:
    """accelerate's mixed_precision: bf16/fp16 autocast on CUDA (amp), bf16 on the CPU only with
    cpu_bf16 and a CPU that computes bf16 natively, else none. Emulated bf16 is no shortcut: on
    an AVX2-only host a SmolLM2 batch of 8 had not finished in 200 s under bf16 autocast and
    took ~15 s in float32 (2.8 s in bf16 on a host with AVX512-BF16)."""
    if cpu:
        return "bf16" if cfg.cpu_bf16 and native_bf16() else "no"
    if not cfg.amp:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(cfg: TrainConfig, device: str = "auto"):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = device == "cpu" or not torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    mp = mixed_precision(cfg, cpu)
    if cpu and cfg.cpu_bf16 and mp == "no":
        print("cpu_bf16 is set, but this CPU has no native bfloat16: training in float32, "
              "which is the faster here", file=sys.stderr)
    # a batch made only of report-less studies leaves the prompt/LM path unused
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=cpu, mixed_precision=mp, kwargs_handlers=[ddp])


def train(cfg: TrainConfig, resume: bool = False, device: str = "auto") -> dict:
    """Run the whole pipeline; returns the history dict (also written to history.json)."""
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from .models import ReportModel, ReportModelConfig

    t0 = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    accelerator = make_accelerator(cfg, device)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    splits = load_splits(cfg.data.spec())
    train_ex = splits["train"][: cfg.data.max_train] if cfg.data.max_train else splits["train"]
    val_ex = splits["val"][: cfg.data.max_val] if cfg.data.max_val else splits["val"]
    if not val_ex:
        raise ValueError("the validation split is empty: model selection needs val")

    # (a)+(b) tokenizer and LM -------------------------------------------------------------
    model_cfg = ReportModelConfig.from_dict(cfg.model)
    lm_rows: list[dict] = []
    if model_cfg.lm.package:  # a frozen pretrained LLM from an installed package: no LM training
        lm_dir = Path(lm_folder(model_cfg.lm))
    else:
        lm_dir = Path(cfg.lm_pretrain.path) if cfg.lm_pretrain.path else out / "lm"
    if cfg.lm_pretrain.path and not lm_dir.is_dir():
        raise FileNotFoundError(f"LM folder {lm_dir} not found")
    if not (lm_dir / "config.json").is_file():
        if main:
            texts = lm_texts(cfg, train_ex)
            accelerator.print(f"LM pretraining on {len(texts)} report texts")
            lm_cfg = model_cfg.lm
            lm_cfg.path = None
            lm_rows = pretrain_lm(cfg, lm_cfg, texts, lm_dir, accelerator,
                                  instruction=model_cfg.instruction)
        accelerator.wait_for_everyone()
    elif (lm_dir / "pretrain_history.json").is_file():
        lm_rows = json.loads((lm_dir / "pretrain_history.json").read_text())
    tokenizer, lm = load_lm(lm_dir)
    model_cfg.lm.path = None  # weights travel inside the saved model folder, not by this path
    model = ReportModel.build(model_cfg, tokenizer, lm=lm)
    if cfg.restrict_head:
        model.config.head_vocab = model.report_vocabulary(
            [ex.report for ex in train_ex if ex.has_report])

    # (c) report model ----------------------------------------------------------------------
    cache = ImageCache(model_cfg.preprocess)
    cache.preload(train_ex + val_ex)
    balance = label_balance(train_ex)
    rate = balance["positive_rate"]
    balanced = cfg.balance == "sampler" or (
        cfg.balance == "auto" and not math.isnan(rate) and not 0.35 <= rate <= 0.65)
    balance["sampler"] = "balanced" if balanced else "shuffle"
    accelerator.print(f"train label balance: {balance}")
    sampler = EpochSampler([max(ex.label, 0) for ex in train_ex], cfg.seed, balanced)
    jpeg_cache = None
    if cfg.augment and cfg.jpeg_augment > 0:
        jpeg_cache = ImageCache(model_cfg.preprocess, jpeg_quality=(70, 95))
        jpeg_cache.preload(train_ex, desc="JPEG copies of the training images")
    train_set = ExampleDataset(train_ex, cache, model_cfg.labels, jpeg_cache, cfg.jpeg_augment)
    train_loader = torch.utils.data.DataLoader(train_set,
                                               batch_size=cfg.batch_size, sampler=sampler,
                                               collate_fn=collate, drop_last=False)
    val_loader = torch.utils.data.DataLoader(ExampleDataset(val_ex, cache, model_cfg.labels),
                                             batch_size=cfg.batch_size, collate_fn=collate)
    loss_module = LossModule(model)
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    total = max(1, cfg.epochs * math.ceil(len(train_ex) / cfg.batch_size
                                          / accelerator.num_processes))
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    loss_module, opt, train_loader, sched = accelerator.prepare(loss_module, opt, train_loader,
                                                                sched)
    model = accelerator.unwrap_model(loss_module).model

    state = {"epoch": 0, "best": None, "best_epoch": None, "bad": 0, "epochs": []}
    last = out / "last"
    if resume and (last / "trainer_state.json").is_file():
        accelerator.load_state(str(last))
        state = json.loads((last / "trainer_state.json").read_text())
        accelerator.print(f"resumed after epoch {state['epoch']}")
    n_params = {"total": sum(p.numel() for p in model.parameters()),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    history = {"name": cfg.name, "label_balance": balance, "params": n_params,
               "lm_pretrain": lm_rows, "select_metric": cfg.select_metric}

    if cfg.init_encoder_from and state["epoch"] == 0:
        history["init_encoder_from"] = init_encoder(model, cfg.init_encoder_from)
        accelerator.print(f"encoder initialised from {cfg.init_encoder_from}")
    elif cfg.encoder_warmup_epochs and state["epoch"] == 0 and not state.get("warmup"):
        if accelerator.num_processes > 1:
            accelerator.print("encoder warm-up skipped: it runs on a single process only")
        else:
            state["warmup"] = warmup_encoder(model, train_loader, val_loader, cfg, accelerator,
                                             sampler)
            history["encoder_warmup"] = state["warmup"]

    if cfg.report_text:
        if state["epoch"] == 0:
            history["text_phase"] = train_text_phase(model, cfg, accelerator, out)
        state["epoch"] = cfg.epochs  # the image-report loop below has no text to learn from
    if state["epoch"] == 0:
        model.fork_report_encoder()  # from the warmed-up / initialised encoder
    if cfg.freeze_encoder:
        model.encoder.requires_grad_(False)
        if model.encoder.token_classifier is not None:  # findings keep learning on fixed features
            model.encoder.token_classifier.requires_grad_(True)
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        if cfg.freeze_encoder:
            model.encoder.eval()
            if model.encoder.token_classifier is not None:
                model.encoder.token_classifier.train()
        sampler.set_epoch(epoch)
        sums = {"loss": 0.0, "lm_loss": 0.0, "cls_loss": 0.0}
        n, te = 0, time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not accelerator.is_local_main_process)
        for pix, reports, labels in bar:
            if cfg.augment:
                pix = _augment(pix, cfg.aspect_augment)
            out_d = loss_module(pix, reports, labels)
            if not out_d["loss"].requires_grad:  # frozen encoder and no report in this batch
                continue
            accelerator.backward(out_d["loss"])
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(loss_module.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad()
            for k in sums:
                sums[k] += out_d[k].detach().item() * len(reports)
            n += len(reports)
            bar.set_postfix(loss=f"{sums['loss'] / n:.3f}")
        row = {"epoch": epoch + 1, "seconds": round(time.time() - te, 1),
               **{f"train_{k}": v / max(n, 1) for k, v in sums.items()}}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            row |= validate(model, loss_module, val_loader, val_ex, cache, cfg.eval_generate,
                            accelerator)
            metric = row.get(cfg.select_metric)
            if _better(cfg.select_metric, metric, state["best"]):
                state["best"], state["best_epoch"], state["bad"] = metric, epoch + 1, 0
                row["best"] = True
                if main:
                    model.save_pretrained(out / "best", card=_card(cfg, row))
            else:
                state["bad"] += 1
        state["epochs"].append(row)
        state["epoch"] = epoch + 1
        accelerator.print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                      for k, v in row.items() if k != "val_sample"}))
        accelerator.save_state(str(last))
        if main:
            (last / "trainer_state.json").write_text(json.dumps(state, indent=2))
            _write_history(out, history, state)
        accelerator.wait_for_everyone()
        if cfg.patience and state["bad"] >= cfg.patience:
            accelerator.print(f"early stop: no {cfg.select_metric} gain in {cfg.patience} checks")
            break
    if main and cfg.calibrate_threshold and (out / "best" / "config.json").is_file():
        history["threshold"] = calibrate_threshold(out / "best", val_ex, cache,
                                                   accelerator.device,
                                                   cfg.finding_threshold_beta,
                                                   cfg.finding_thresholds_by_decision,
                                                   rule=cfg.operating_point)
        accelerator.print(f"val-selected threshold: {history['threshold']}")
    history["seconds_this_run"] = round(time.time() - t0, 1)
    if main:
        _write_history(out, history, state)
    return _history(history, state)


def train_text_phase(model, cfg: TrainConfig, accelerator, out: Path) -> dict:
    """The report phase of a model whose images have no reports: the LM's adapter learns report
    text conditioned on the text's class stated in words (the label phrase), as it will later
    be conditioned on the image classifier's decision. The encoder stays as the warm-up left it
    (only the LM's trainable parameters are optimised; the text loss never reaches it).
    Classes are balanced per epoch (each drawn as often); the epoch with the lowest val
    text loss is saved as best/."""
    from transformers import get_cosine_schedule_with_warmup

    from .data.iu_reports import load_iu_labelled

    if cfg.report_text != "iu_reports":
        raise ValueError(f"unknown report_text {cfg.report_text!r}")
    if model.bridge is not None or not model.label_phrase_ids:
        raise ValueError("report_text needs a model with visual_context false and label_prompt")
    texts = load_iu_labelled()
    if cfg.restrict_head:
        model.config.head_vocab = model.report_vocabulary([t.text for t in texts["train"]])
    params = [p for p in model.lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr.get("lm", 2e-4), weight_decay=cfg.weight_decay)
    by_class = {c: [t for t in texts["train"] if t.label == c] for c in (0, 1)}
    per_epoch = len(texts["train"])  # half from each class: the rarer one repeats
    steps = cfg.epochs * math.ceil(per_epoch / cfg.batch_size)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * steps), steps)
    rng = random.Random(cfg.seed)

    def loss_of(batch) -> torch.Tensor:
        with accelerator.autocast():
            return model.text_loss(None, [t.text for t in batch],
                                   [(t.label, ()) for t in batch])

    rows, best = [], None
    for epoch in range(cfg.epochs):
        model.lm.train()
        draw = [t for c in (0, 1) for t in rng.choices(by_class[c], k=per_epoch // 2)]
        rng.shuffle(draw)
        te, total, n = time.time(), 0.0, 0
        for i in tqdm(range(0, len(draw), cfg.batch_size), desc=f"text epoch {epoch + 1}",
                      disable=not accelerator.is_local_main_process):
            batch = draw[i:i + cfg.batch_size]
            loss = loss_of(batch)
            accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or 1e9)
            opt.step()
            sched.step()
            opt.zero_grad()
            total, n = total + float(loss.detach()) * len(batch), n + len(batch)
        model.lm.eval()
        with torch.no_grad():
            val = [(float(loss_of(texts["val"][i:i + 16])), len(texts["val"][i:i + 16]))
                   for i in range(0, len(texts["val"]), 16)]
        row = {"epoch": epoch + 1, "seconds": round(time.time() - te, 1),
               "train_text_loss": total / max(n, 1),
               "val_text_loss": sum(v * k for v, k in val) / max(sum(k for _, k in val), 1)}
        if best is None or row["val_text_loss"] < best:
            best, row["best"] = row["val_text_loss"], True
            model.save_pretrained(out / "best", card=_card(cfg, row))
        rows.append(row)
        accelerator.print("text phase " + json.dumps({k: (round(v, 4) if isinstance(v, float)
                                                           else v) for k, v in row.items()}))
    return {"texts": {k: len(v) for k, v in texts.items()},
            "positives": {k: sum(t.label for t in v) for k, v in texts.items()}, "epochs": rows}


def init_encoder(model, folder: str | Path) -> dict:
    """Copy encoder.* tensors from a saved model folder; the architectures must match, except
    that a finding head (token_classifier) the source lacks starts fresh, and one the target
    lacks is left out."""
    from safetensors.torch import load_file

    src = {k[len("encoder."):]: v for k, v in
           load_file(str(Path(folder) / "model.safetensors")).items()
           if k.startswith("encoder.")}
    if not src:
        raise ValueError(f"{folder} holds no encoder weights")
    if model.encoder.token_classifier is None:  # a finding model's encoder, reused without it
        src = {k: v for k, v in src.items() if not k.startswith("token_classifier.")}
    missing, unexpected = model.encoder.load_state_dict(src, strict=False)
    if unexpected or any(not k.startswith("token_classifier.") for k in missing):
        raise ValueError(f"{folder}: encoder mismatch (missing {missing}, unexpected "
                         f"{unexpected})")
    return {"folder": str(folder), "tensors": len(src), "fresh": missing}


def warmup_encoder(model, train_loader, val_loader, cfg: TrainConfig, accelerator,
                   sampler: EpochSampler | None = None, on_epoch=None) -> list[dict]:
    """Train the visual encoder and its classifier head on labels alone; restore the epoch with
    the best val AUC. A CNN trained from scratch learns to discriminate slowly when the LM loss
    dominates the gradient, and every later part (prompts, Grad-CAM) builds on these features.
    on_epoch(epoch, val_probabilities, val_lung_shares) sees every epoch's val probabilities of
    every head, [n, labels], and the share of each slice's Grad-CAM mass in its lungs, [n]
    (grouped_cv keeps them as out-of-fold predictions). val_loader None: no evaluation, the last
    epoch is kept (a refit for an epoch count chosen elsewhere)."""
    import copy

    from sklearn.metrics import roc_auc_score
    from transformers import get_cosine_schedule_with_warmup

    from .lung_focus import lung_focus_loss, lung_shares, tensor_lung_masks

    enc, t = model.encoder, _target_index(model)
    pre = model.config.preprocess
    if cfg.lung_focus and enc.n_members > 1:
        raise ValueError("lung_focus needs a single encoder (members 1)")
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.encoder_warmup_lr,
                            weight_decay=cfg.weight_decay)
    total = cfg.encoder_warmup_epochs * len(train_loader)
    sched = get_cosine_schedule_with_warmup(opt, int(0.05 * total), total)
    best, best_state, rows = -1.0, None, []
    for epoch in range(cfg.encoder_warmup_epochs):
        enc.train()
        if sampler is not None:  # a new order every epoch (a fixed one repeats the same batches)
            sampler.set_epoch(epoch)
        te, loss_sum, n = time.time(), 0.0, 0
        for pix, _reports, labels in train_loader:
            pix = pix.to(accelerator.device)
            if cfg.augment:
                pix = _augment(pix, cfg.aspect_augment)
            with accelerator.autocast() if pix.is_cuda else contextlib.nullcontext():
                out = enc(pix)  # fp32 on the CPU: cpu_bf16 is for the LLM's steps
            loss = model.encoder_loss(out, labels)
            if cfg.lung_focus:
                masks, valid = tensor_lung_masks(pix, pre.mean, pre.std)
                loss = loss + cfg.lung_focus * lung_focus_loss(
                    out.feature_map, enc.classifier[-1].weight[t], masks, valid)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc.parameters(), cfg.grad_clip or 1e9)
            opt.step()
            sched.step()
            opt.zero_grad()
            loss_sum, n = loss_sum + float(loss.detach()) * len(labels), n + len(labels)
        row = {"epoch": epoch + 1, "seconds": round(time.time() - te, 1),
               "train_cls_loss": loss_sum / max(n, 1)}
        if val_loader is not None:
            enc.eval()
            every, y = encoder_probabilities(enc, ((pix, lab) for pix, _r, lab in val_loader), t,
                                             accelerator.device, every_label=True)
            p = every[:, t]
            shares = lung_shares(enc, (pix for pix, _r, _l in val_loader), t, pre.mean, pre.std)
            row["val_lung_share_positive"] = float(np.nanmean(shares[y == 1])) \
                if np.isfinite(shares[y == 1]).any() else None
            if on_epoch is not None:
                on_epoch(epoch + 1, every, shares)
            keep = ~np.isnan(y)
            row["val_auc"] = auc = float(roc_auc_score(y[keep].astype(int), p[keep]))
            if auc > best:
                best, best_state, row["best"] = auc, copy.deepcopy(enc.state_dict()), True
        rows.append(row)
        accelerator.print("encoder warm-up " + json.dumps({k: (round(v, 4) if isinstance(v, float)
                                                                else v) for k, v in row.items()}))
    if best_state is not None:
        enc.load_state_dict(best_state)
    enc.train()
    return rows


@torch.no_grad()
def encoder_probabilities(encoder, batches, target: int, device, every_label: bool = False
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Classifier probabilities and labels for (pixels, labels) batches; the encoder only, no
    LM. NaN labels (unknown) come back as NaN for the caller to drop. every_label: the
    probabilities of every head (decision, findings, lobes), [n, labels], not the target's."""
    probs, ys = [], []
    for pix, labels in batches:
        logits = encoder(pix.to(device)).logits.float()
        probs += torch.sigmoid(logits if every_label else logits[:, target]).tolist()
        y = labels.view(len(labels), -1)
        ys += y[:, target if y.shape[1] > 1 else 0].tolist()
    return np.array(probs), np.array(ys)


def platt_scaling(probs: np.ndarray, y: np.ndarray) -> list[float] | None:
    """[a, b] with sigmoid(a * logit(p) + b) fitted to the labels (Platt 1999); None when the
    fit is not increasing (it would reverse the ranking) or one class is missing."""
    from sklearn.linear_model import LogisticRegression

    if len(set(y.astype(int).tolist())) < 2:
        return None
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    x = np.log(p / (1 - p))[:, None]
    fit = LogisticRegression(C=1e4).fit(x, y.astype(int))
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    return [round(a, 4), round(b, 4)] if a > 0 else None


@torch.no_grad()
def calibrate_threshold(folder: Path, val_ex: list[Example], cache: ImageCache, device,
                        finding_beta: float = 1.0, by_decision: bool = False,
                        rule: str = "youden") -> dict:
    """Set the saved model's threshold to val's operating point (`rule`, see
    operating_point.py): a from-scratch classifier's probabilities are seldom centred on 0.5.
    Also fit the Platt scaling of the probability shown to users. Val only: test never chooses
    anything."""
    from .models import ReportModel
    from .operating_point import choose_threshold

    model = ReportModel.from_pretrained(folder, device=device)
    keep = [ex for ex in val_ex if ex.label in (0, 1)]
    batches = ((torch.stack([cache.get(ex) for ex in keep[i:i + 32]]),
                torch.tensor([float(ex.label) for ex in keep[i:i + 32]]))
               for i in range(0, len(keep), 32))
    probs, y = encoder_probabilities(model.encoder, batches, _target_index(model), model.device)
    threshold = choose_threshold(probs, y, rule)
    # not rounded: near-duplicate slices can sit 1e-5 apart on either side of the threshold
    model.config.threshold = threshold
    model.config.calibration = platt_scaling(probs, y)
    if model.finding_names:
        model.config.label_thresholds, model.config.negative_label_thresholds = \
            finding_thresholds(model, val_ex, cache, beta=finding_beta, by_decision=by_decision)
    card = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() \
        else None
    model.save_pretrained(folder, card=card)
    return {"threshold": model.config.threshold, "calibration": model.config.calibration,
            "rule": rule,
            "val_sensitivity": float((probs[y == 1] >= threshold).mean()),
            "val_specificity": float((probs[y == 0] < threshold).mean()),
            "finding_thresholds": model.config.label_thresholds,
            "negative_finding_thresholds": model.config.negative_label_thresholds}


@torch.no_grad()
def finding_thresholds(model, val_ex: list[Example], cache: ImageCache, min_positives: int = 5,
                       beta: float = 1.0, by_decision: bool = False
                       ) -> tuple[dict[str, float], dict[str, float]]:
    """(thresholds, negative-decision thresholds) of the finding labels, from one encoder pass
    over val (see fbeta_thresholds). The second set, only with by_decision (else empty), counts
    only the val studies the classifier calls negative (at config.threshold): a finding far
    more common under one label (ground glass: 68 % of COVID-19 reports, 30 % of the others)
    needs more evidence when the decision is the other one."""
    keep = [ex for ex in val_ex if ex.has_report]
    model.eval()
    probs = torch.cat([torch.sigmoid(model.encoder(
        torch.stack([cache.get(ex) for ex in keep[i:i + 32]]).to(model.device)).logits.float())
        for i in range(0, len(keep), 32)]).cpu().numpy()
    return finding_thresholds_from(model, probs, keep, min_positives, beta, by_decision)


def finding_thresholds_from(model, label_probs: np.ndarray, examples: list[Example],
                            min_positives: int = 5, beta: float = 1.0, by_decision: bool = True,
                            max_rate: float | None = None
                            ) -> tuple[dict[str, float], dict[str, float]]:
    """finding_thresholds from given probabilities of every label head ([studies, labels], in
    config.labels order): an encoder pass over val, or grouped_cv's out-of-fold ones."""
    y = np.array([study_targets(ex, model.config.labels) for ex in examples])
    columns = {n: j for j, n in enumerate(model.config.labels) if n in model.finding_names}
    shared = fbeta_thresholds(label_probs, y, columns, beta, min_positives, max_rate)
    if not by_decision:
        return shared, {}
    negative = label_probs[:, model._target_index] < model.config.threshold
    return shared, fbeta_thresholds(label_probs[negative], y[negative], columns, beta,
                                    min_positives, max_rate)


def fbeta_thresholds(probs: np.ndarray, y: np.ndarray, columns: dict[str, int],
                     beta: float = 1.0, min_positives: int = 5, max_rate: float | None = None
                     ) -> dict[str, float]:
    """Per named column, the threshold with the best F-beta of probs against the 0/1 targets y
    (beta < 1 weighs precision more); 0.5 where there are fewer than min_positives cases (an
    optimum over two or three cases picks a threshold that states the finding everywhere).
    max_rate: never state a finding in more than max_rate x its share of the studies (a weak
    head's F-optimum can be "say it almost always": cavity, 5 % of reports, stated in half)."""
    from sklearn.metrics import precision_recall_curve

    out, b2 = {}, beta * beta
    for name, j in columns.items():
        if y[:, j].sum() < min_positives:
            out[name] = 0.5
            continue
        prec, rec, thr = precision_recall_curve(y[:, j].astype(int), probs[:, j])
        fb = (1 + b2) * prec[:-1] * rec[:-1] / np.clip(b2 * prec[:-1] + rec[:-1], 1e-9, None)
        t = float(thr[int(np.argmax(fb))])
        if max_rate is not None:
            allowed = int(np.floor(max_rate * y[:, j].sum()))  # studies it may be stated in
            ranked = np.sort(probs[:, j])[::-1]
            if allowed < len(ranked) and (probs[:, j] >= t).sum() > allowed:
                t = float(np.nextafter(ranked[allowed], 1.0))  # above the first one cut
        out[name] = float(min(max(t, 1e-4), 1 - 1e-4))
    return out


def _augment(pix: torch.Tensor, aspect: float = 0.0) -> torch.Tensor:
    from .preprocess import augment_batch

    return augment_batch(pix, aspect=aspect)


def _history(history: dict, state: dict) -> dict:
    return history | {"epochs": state["epochs"], "best_epoch": state["best_epoch"],
                      "best_metric": state["best"]}


def _write_history(out: Path, history: dict, state: dict) -> None:
    h = _history(history, state)
    (out / "history.json").write_text(json.dumps(h, indent=2))
    if (out / "best").is_dir():  # the model folder carries its own curves (evaluate plots them)
        (out / "best" / "history.json").write_text(json.dumps(h, indent=2))


def _card(cfg: TrainConfig, row: dict) -> str:
    keep = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
    return (f"Trained with `python -m mrg_core train` (config `{cfg.name}`), data "
            f"{cfg.data.kind}; selected on val by {cfg.select_metric} at epoch {row['epoch']}.\n\n"
            f"Validation at selection: {json.dumps(keep)}\n")
