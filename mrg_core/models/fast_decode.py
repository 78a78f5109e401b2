"""A lean one-token step for plain GPT-2 (nanoGPT style): the same arithmetic as transformers'
GPT2LMHeadModel, without its per-call machinery (cache classes, mask building, output objects).

At 4 layers x width 256 a decode step reads 13 MB of weights; transformers spends most of a
step's ~2 ms in Python around the matmuls, not in the weight reads. This step keeps keys and
values in preallocated tensors and calls the layers' weights directly.

Used only where it is exact: a plain float32 GPT2LMHeadModel with Conv1D layers, i.e. after
LoRA is merged (precision "fp32-merged"); a peft wrapper, prefix tuning, int8 or bf16 keep the
transformers path. The prefix (visual tokens + prompt) still runs through transformers once;
its cache is copied in. tests/test_models_fast_decode.py checks it against transformers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu": F.gelu}


def supports_fast_step(lm) -> bool:
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    if type(lm) is not GPT2LMHeadModel:
        return False
    c = lm.config
    standard = (c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx
                and not c.reorder_and_upcast_attn and c.activation_function in ACTIVATIONS
                and not c.add_cross_attention)
    blocks = lm.transformer.h
    plain = all(type(m) is Conv1D for b in blocks
                for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    return bool(standard and plain and lm.lm_head.weight.dtype == torch.float32)


class KVBuffer:
    """Keys and values of every layer, [L, B, H, capacity, D], filled up to `length`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        self.k, self.v, self.length = keys, values, length

    @classmethod
    def from_hf(cls, cache, extra: int = 128) -> "KVBuffer":
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        k0 = layers[0][0]
        n_layer, (b, h, t, d) = len(layers), k0.shape
        k = k0.new_empty(n_layer, b, h, t + extra, d)
        v = k0.new_empty(n_layer, b, h, t + extra, d)
        for i, (lk, lv) in enumerate(layers):
            k[i, :, :, :t], v[i, :, :, :t] = lk, lv
        return cls(k, v, t)

    def ensure_room(self) -> None:
        if self.length < self.k.shape[3]:
            return
        grow = lambda x: torch.cat([x, torch.empty_like(x)], dim=3)  # noqa: E731
        self.k, self.v = grow(self.k), grow(self.v)

    # the two calls beam search makes on a cache
    def batch_repeat_interleave(self, n: int) -> None:
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)

    def reorder_cache(self, idx: torch.Tensor) -> None:
        self.k = self.k.index_select(1, idx)
        self.v = self.v.index_select(1, idx)


class FastGPT2Decoder:
    """KVDecoder interface: prefill(embeds) -> (logits, cache); step(tokens, cache)."""

    def __init__(self, lm):
        self.lm = lm
        c = lm.config
        self.n_head, self.eps = c.n_head, c.layer_norm_epsilon
        self.act = ACTIVATIONS[c.activation_function]

    def prefill(self, embeds: torch.Tensor):
        out = self.lm(inputs_embeds=embeds, use_cache=True)
        return out.logits[:, -1].float(), KVBuffer.from_hf(out.past_key_values)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: KVBuffer):
        tr = self.lm.transformer
        cache.ensure_room()
        t = cache.length
        x = tr.wte.weight[tokens] + tr.wpe.weight[t]  # [B, C]
        b, c = x.shape
        h, d = self.n_head, c // self.n_head
        for i, blk in enumerate(tr.h):
            a = F.layer_norm(x, (c,), blk.ln_1.weight, blk.ln_1.bias, self.eps)
            qkv = torch.addmm(blk.attn.c_attn.bias, a, blk.attn.c_attn.weight)
            q, k, v = qkv.view(b, 3, h, d).unbind(1)  # each [B, H, D]
            cache.k[i, :, :, t], cache.v[i, :, :, t] = k, v
            keys, vals = cache.k[i, :, :, : t + 1], cache.v[i, :, :, : t + 1]  # [B, H, T, D]
            att = torch.softmax((keys @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(d), dim=-1)
            y = (att.unsqueeze(-2) @ vals).reshape(b, c)
            x = x + torch.addmm(blk.attn.c_proj.bias, y, blk.attn.c_proj.weight)
            m = F.layer_norm(x, (c,), blk.ln_2.weight, blk.ln_2.bias, self.eps)
            m = self.act(torch.addmm(blk.mlp.c_fc.bias, m, blk.mlp.c_fc.weight))
            x = x + torch.addmm(blk.mlp.c_proj.bias, m, blk.mlp.c_proj.weight)
        cache.length = t + 1
        x = F.layer_norm(x, (c,), tr.ln_f.weight, tr.ln_f.bias, self.eps)
        return x @ self.lm.lm_head.weight.t(), cache
