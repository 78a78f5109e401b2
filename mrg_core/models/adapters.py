"""How the causal LM is adapted (MedVLM): one small function per `MedVLMConfig.adapter`.

Each function returns the module to call for training and for the first decoding pass; the LM's
own weights stay frozen except where the method unfreezes them on purpose.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

from mrg_core.models.config import MedVLMConfig
from mrg_core.models.language_model import decoder_layers

# Attention query/value projections per model_type (others default to q_proj/v_proj).
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                "gemma3_text": ["q_proj", "v_proj"]}


def freeze(lm: nn.Module) -> nn.Module:
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm


def add_lora(lm, cfg: MedVLMConfig, family: str):
    targets = cfg.lora_targets or LORA_TARGETS.get(family, ["q_proj", "v_proj"])
    conf = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=list(targets),
                      fan_in_fan_out=(family == "gpt2"))  # GPT-2 Conv1D stores W transposed
    return get_peft_model(freeze(lm), conf)


def add_prefix(lm, cfg: MedVLMConfig, family: str):
    # P-Tuning v2: learned key/value prefixes in every layer (peft prefix tuning)
    conf = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.prefix_length)
    return get_peft_model(freeze(lm), conf)


def learned_prefix(peft_lm) -> tuple[torch.Tensor, torch.Tensor]:
    """P-Tuning v2's keys and values of every layer ([L, H_kv, P, D] each), as peft puts them
    before the prompt (its get_prompt): what the lean decoder copies into its caches."""
    with torch.no_grad():
        past = peft_lm.get_prompt(batch_size=1)
    return (torch.stack([layer.keys[0] for layer in past.layers]),
            torch.stack([layer.values[0] for layer in past.layers]))


def unfreeze_layers(lm, cfg: MedVLMConfig, family: str):
    layers = decoder_layers(freeze(lm))
    for i in cfg.unfreeze_layers:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    return lm


ADAPTERS = {"lora": add_lora, "prefix": add_prefix, "unfreeze": unfreeze_layers,
            "none": lambda lm, cfg, family: freeze(lm)}


def apply_adapter(lm, cfg: MedVLMConfig, family: str):
    if cfg.adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {cfg.adapter!r}")
    return ADAPTERS[cfg.adapter](lm, cfg, family)
