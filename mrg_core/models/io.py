"""Save / load a ReportModel as a Hugging Face style folder, fully offline.

    config.json        ReportModelConfig
    model.safetensors  encoder, bridge (projections, prompts, Q-Former), classifier, and every
                       trainable LM tensor (LoRA / prefix weights, unfrozen layers)
    lm/                the base causal LM (save_pretrained), omitted when config.lm.path names
                       a frozen LM without adapter: then the path is the reference
    tokenizer/         the tokenizer
    README.md          model card
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mrg_core.models.config import ReportModelConfig
from mrg_core.models.language_model import lm_folder


def _lm_is_reference_only(cfg: ReportModelConfig) -> bool:
    """The base LM is not copied into the folder: a packaged LM always (its adapter tensors are
    in model.safetensors), a path only when nothing of the LM was trained."""
    if cfg.lm.package:
        return True
    no_adapter = cfg.method != "medvlm" or cfg.medvlm.adapter == "none"
    return bool(cfg.lm.path) and cfg.lm.freeze and no_adapter


def default_card(model) -> str:
    i = model.info
    t = i["trained_on"]
    return (f"# {i['name']} {i['version']}\n\n"
            f"Radiology report generation model (method: `{i['method']}`), MRG Studio.\n\n"
            f"- Trained on: {t.get('modality')} / {t.get('body_part')}. {t.get('description', '')}\n"
            f"- Decision threshold for pneumonia: {i['threshold']}\n"
            f"- Parameters: {i['n_params']:,} ({i['n_trainable']:,} trainable)\n\n"
            "Drafts are for review by a radiologist; not a diagnosis.\n")


def _save_base_lm(model, folder: Path, dtype: torch.dtype | None = None) -> None:
    """The causal LM without adapter tensors (LoRA's `base_layer` names folded back)."""
    base = model.base_lm
    sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items()
          if "lora_" not in k}
    clean = type(base)(copy.deepcopy(base.config))
    missing, unexpected = clean.load_state_dict(sd, strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected LM tensors while saving: {unexpected[:5]}")
    if dtype is not None:
        clean = clean.to(dtype)
    clean.save_pretrained(folder)


def save_model(model, folder, card: str | None = None, dtype: torch.dtype | None = None,
               keep_float32: tuple[str, ...] = ()) -> None:
    """dtype (e.g. torch.float16): storage type of the floating tensors, half the disk for a
    shipped model; loading always computes in float32. keep_float32: name prefixes stored in
    float32 whatever dtype says (e.g. "encoder.": the probability and the finding calls stay
    exactly those measured, while the text side is halved)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        if k.startswith("lm.") and k not in trainable:
            continue  # frozen LM weights live in lm/ (or at config.lm.path)
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:  # tied weights: store once, load_state_dict re-ties
            continue
        seen.add(key)
        v = v.detach().to("cpu")
        cast = dtype is not None and v.is_floating_point() and not k.startswith(keep_float32)
        tensors[k] = (v.to(dtype) if cast else v).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if not _lm_is_reference_only(cfg):
        _save_base_lm(model, folder / "lm", dtype)
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "README.md").write_text(card if card is not None else default_card(model))


def resolve_device(device=None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(folder, device=None):
    from mrg_core.models.report_model import ReportModel

    folder = Path(folder)
    cfg = ReportModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    lm_dir = folder / "lm" if (folder / "lm").is_dir() else lm_folder(cfg.lm)
    if lm_dir is None:
        raise FileNotFoundError(f"{folder} has no lm/ folder and its config names no LM path")
    # float32 whatever the stored dtype (a float16 folder would otherwise load as float16)
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), local_files_only=True,
                                              dtype=torch.float32)
    # the encoder architecture comes from backbone_config; its weights from model.safetensors
    build_cfg = copy.deepcopy(cfg)
    build_cfg.encoder.pretrained_path = None
    build_cfg.encoder.imagenet = False
    model = ReportModel.build(build_cfg, tokenizer, lm=lm)
    model.config = cfg
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in load_file(str(folder / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    bad = [k for k in missing if not k.startswith("lm.") or k in trainable]
    if unexpected or bad:
        raise RuntimeError(f"weights do not match the config: missing {bad[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.to(resolve_device(device)).eval()
