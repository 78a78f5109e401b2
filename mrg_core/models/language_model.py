"""The causal LM: a local pretrained folder or a random-init model of a given size.

Nothing here assumes one architecture: callers use `lm_hidden_size`, `get_input_embeddings()`
and `decoder_layers` instead of attribute names such as `transformer.h`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM)

from mrg_core.models.config import LMConfig


def lm_folder(cfg: LMConfig) -> str | None:
    """The local folder of a pretrained LM: the packaged one (converted on first use) or path."""
    if cfg.package:
        from mrg_core.models.packaged_lm import packaged_lm_folder
        from mrg_core.weights import MissingWeights, spec

        w = spec(cfg.package)
        if cfg.package_sha256 and cfg.package_sha256 != w.sha256:
            source = f" ({cfg.package_requirement})" if cfg.package_requirement else ""
            raise MissingWeights(f"this model was trained with {cfg.package} weights of sha256 "
                                 f"{cfg.package_sha256[:12]}…{source}, but this MRG Studio "
                                 f"knows {w.requirement} ({w.sha256[:12]}…) only")
        cfg.package_sha256 = w.sha256
        cfg.package_requirement = cfg.package_requirement or w.requirement
        return str(packaged_lm_folder(cfg.package))
    return cfg.path


def build_lm(cfg: LMConfig, tokenizer) -> PreTrainedModel:
    folder = lm_folder(cfg)
    if folder:
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                    dtype=torch.float32)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                          n_head=cfg.n_head, n_positions=cfg.n_positions, **ids))
    common = dict(hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.n_positions,
                  tie_word_embeddings=True, **ids)
    if cfg.family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if cfg.family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise ValueError(f"unknown LM family {cfg.family!r}")


def lm_hidden_size(lm) -> int:
    conf = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return int(getattr(conf, "hidden_size", None) or conf.n_embd)


def lm_max_positions(lm) -> int | None:
    conf = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return getattr(conf, "n_positions", None) or getattr(conf, "max_position_embeddings", None)


def decoder_layers(lm) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList as long as the layer count."""
    conf = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    n = conf.num_hidden_layers
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError("could not find the decoder layers of this LM")
