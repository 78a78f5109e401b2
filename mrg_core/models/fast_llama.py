"""A lean decoder for a Llama-style frozen LLM (SmolLM2): the arithmetic of transformers'
LlamaForCausalLM without its per-call machinery, with two savings a report allows.

SmolLM2-135M reads 30 layers of weights per token plus a 49,152 x 576 output layer (28 M
weights, 21 % of the model). On 2 CPU cores a token costs the weight reads plus the Python
around ~600 small calls, so this decoder
- keeps keys and values in tensors preallocated for the prefix plus the report,
- calls each layer's projections as modules, so the same code runs on float32 (LoRA merged),
  bfloat16 and dynamically quantised int8 layers (models/quantize.py),
- computes the prefix (visual tokens, prompt, stated decision) once, with the same code,
- optionally scores only `head_ids` (the token ids that occur in the training reports, saved in
  the model config as `head_vocab`): every other logit is set to -1e9. Greedy and beam drafts
  are unchanged whenever the best token is a report token, which the decoder's training makes
  the rule; tests/test_fast_llama.py compares drafts with and without it.

Used only where it is exact arithmetic: a plain LlamaForCausalLM (LoRA merged; a peft wrapper
or prefix tuning keeps the transformers path). tests/test_fast_llama.py checks the logits
against transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED = -1e9  # finite, so label guidance's difference of two log-softmaxes stays finite


def supports_fast_llama(lm) -> bool:
    from transformers import LlamaForCausalLM

    if type(lm) is not LlamaForCausalLM:
        return False
    c = lm.config
    return (c.hidden_act == "silu" and not getattr(c, "attention_bias", False)
            and not getattr(c, "mlp_bias", False)
            and (getattr(c, "rope_scaling", None) or {}).get("rope_type", "default") == "default")


class LlamaKV:
    """Keys and values of every layer, [L, B, H_kv, capacity, D], filled up to `length`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int = 0):
        self.k, self.v, self.length = k, v, length

    def batch_repeat_interleave(self, n: int) -> None:  # the two calls beam search makes
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)

    def reorder_cache(self, idx: torch.Tensor) -> None:
        self.k = self.k.index_select(1, idx)
        self.v = self.v.index_select(1, idx)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class FastLlamaDecoder:
    """KVDecoder interface: prefill(embeds) -> (logits, cache); step(tokens, cache)."""

    def __init__(self, lm, head_ids: list[int] | torch.Tensor | None = None, room: int = 160):
        self.lm, self.model = lm, lm.model
        c = lm.config
        self.n_head, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps, self.room = c.rms_norm_eps, room
        self.dtype = self.model.embed_tokens.weight.dtype
        w = lm.lm_head.weight
        self.vocab = w.shape[0]
        self.head_ids = None
        if head_ids is not None:
            self.head_ids = torch.as_tensor(head_ids, dtype=torch.long, device=w.device)
            w = w[self.head_ids]
        self.head_w = w.detach().contiguous()
        self._cos = self._sin = None

    def _rope_tables(self, n: int):
        if self._cos is None or self._cos.shape[0] < n:
            n = max(n, 512)
            pos = torch.arange(n, device=self.head_w.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.head_w.device)
            cos, sin = self.model.rotary_emb(probe, pos)
            self._cos, self._sin = cos[0], sin[0]  # [n, D]
        return self._cos, self._sin

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        part = (x @ self.head_w.t()).float()
        if self.head_ids is None:
            return part
        full = part.new_full((part.shape[0], self.vocab), MASKED)
        full[:, self.head_ids] = part
        return full

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, cache: LlamaKV) -> torch.Tensor:
        """x [B, T, C] at positions cache.length ... + T; fills the cache; last hidden state."""
        b, t, _ = x.shape
        start = cache.length
        h_q, h_kv, d = self.n_head, self.n_kv, self.head_dim
        group = h_q // h_kv
        cos_t, sin_t = self._rope_tables(start + t)
        cos, sin = cos_t[start:start + t], sin_t[start:start + t]  # [T, D]
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            h = _rms(x, layer.input_layernorm.weight, self.eps)
            q = att.q_proj(h).view(b, t, h_q, d).transpose(1, 2)  # [B, H, T, D]
            k = att.k_proj(h).view(b, t, h_kv, d).transpose(1, 2)
            v = att.v_proj(h).view(b, t, h_kv, d).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.k[i, :, :, start:start + t] = k
            cache.v[i, :, :, start:start + t] = v
            keys, vals = cache.k[i, :, :, :start + t], cache.v[i, :, :, :start + t]
            if t == 1:  # one new token: grouped heads against the cached keys, no mask
                qg = q.reshape(b, h_kv, group, d)
                w = torch.softmax((qg @ keys.transpose(-1, -2)).float() * d ** -0.5, dim=-1)
                y = (w.to(vals.dtype) @ vals).reshape(b, 1, h_q * d)
            else:  # the prefix, from position 0: plain causal attention
                y = F.scaled_dot_product_attention(
                    q, keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1),
                    is_causal=True).transpose(1, 2).reshape(b, t, h_q * d)
            x = x + att.o_proj(y)
            h = _rms(x, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        cache.length = start + t
        return _rms(x[:, -1], self.model.norm.weight, self.eps)

    def prefill(self, embeds: torch.Tensor):
        b, t, _ = embeds.shape
        shape = (len(self.model.layers), b, self.n_kv, t + self.room, self.head_dim)
        cache = LlamaKV(embeds.new_empty(shape, dtype=self.dtype),
                        embeds.new_empty(shape, dtype=self.dtype))
        return self._logits(self._forward(embeds.to(self.dtype), cache)), cache

    def step(self, tokens: torch.Tensor, cache: LlamaKV):
        if cache.length >= cache.k.shape[3]:  # a draft longer than planned: double the room
            grow = lambda z: torch.cat([z, torch.empty_like(z)], dim=3)  # noqa: E731
            cache.k, cache.v = grow(cache.k), grow(cache.v)
        x = self.model.embed_tokens.weight[tokens][:, None]
        return self._logits(self._forward(x, cache)), cache
