"""A lean decoder for a Llama-style frozen LLM (SmolLM2): the arithmetic of transformers'
LlamaForCausalLM without its per-call machinery, with two savings a report allows.

SmolLM2-135M reads 30 layers of weights per token plus a 49,152 x 576 output layer (28 M
weights, 21 % of the model). On 2 CPU cores a token costs the weight reads plus the Python
around ~600 small calls, so this decoder
- keeps keys and values in tensors preallocated for the prefix plus the report,
- calls each layer's projections as modules, so the same code runs on float32 (LoRA merged),
  bfloat16 and dynamically quantised int8 layers (models/quantize.py); int8-weights layers
  that read the same input (q, k, v; gate, up) step as one joined kernel call (joined_int8),
- decodes rows of different lengths together (LlamaKV: a guided pair, several users' drafts),
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
    """Keys and values of every layer, [L, B, H_kv, capacity, D]; row b is filled up to
    lengths[b]. Rows of different lengths (a guided pair with prompts of unequal length,
    several users' drafts in one step: models/step_batcher.py) decode together: each row
    attends to its own positions only. Unfilled positions hold zeros (finite under a mask)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int] | int = 0):
        self.k, self.v = k, v
        self.lengths = list(lengths) if isinstance(lengths, (list, tuple)) else [lengths] * k.shape[1]

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @classmethod
    def empty(cls, n_layer: int, rows: int, n_kv: int, capacity: int, head_dim: int, like):
        shape = (n_layer, rows, n_kv, capacity, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape), 0)

    @classmethod
    def cat(cls, caches: list["LlamaKV"]) -> "LlamaKV":
        """The rows of `caches`, in order, as one cache (room: the largest capacity)."""
        cap = max(c.capacity for c in caches)
        pad = lambda z: F.pad(z, (0, 0, 0, cap - z.shape[3]))  # noqa: E731
        return cls(torch.cat([pad(c.k) for c in caches], 1),
                   torch.cat([pad(c.v) for c in caches], 1),
                   [n for c in caches for n in c.lengths])

    def grow(self, capacity: int) -> None:
        """Room for `capacity` positions (a draft longer than planned)."""
        if capacity > self.capacity:
            pad = lambda z: F.pad(z, (0, 0, 0, capacity - z.shape[3]))  # noqa: E731
            self.k, self.v = pad(self.k), pad(self.v)

    def batch_repeat_interleave(self, n: int) -> None:  # the two calls beam search makes
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.lengths = [x for x in self.lengths for _ in range(n)]

    def reorder_cache(self, idx: torch.Tensor) -> None:
        self.k = self.k.index_select(1, idx)
        self.v = self.v.index_select(1, idx)
        self.lengths = [self.lengths[i] for i in idx.tolist()]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm (in float32, then back), with torch's own kernel: the same numbers."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def joined_int8(parent, names: tuple[str, ...]):
    """The int8-weights projections `names` of `parent` that read the same input (q, k, v;
    gate, up) as one kernel call: (fn(x2d) -> joined outputs, their sizes), or None where they
    are not all bias-free Int8WeightLinear layers (inference-only, so changing their storage
    cannot touch training). Their weights are joined once, in place: each layer keeps a view
    of its rows, so no memory is added and transformers' own forward reads the same numbers."""
    from mrg_core.models.quantize import Int8WeightLinear

    key = "_joined_" + "_".join(names)
    hit = parent.__dict__.get(key)
    if hit is not None:
        return hit
    mods = [getattr(parent, n) for n in names]
    if not all(type(m) is Int8WeightLinear and m.bias is None for m in mods):
        return None
    w = torch.cat([m.weight_int8 for m in mods]).contiguous()
    scales = torch.cat([m.scales for m in mods]).contiguous()
    sizes, start = [m.out_features for m in mods], 0
    for m, n in zip(mods, sizes):
        m.weight_int8, m.scales = w[start:start + n], scales[start:start + n]
        start += n

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w, scales)

    parent.__dict__[key] = hit = (fn, sizes)  # not a submodule: plain attribute
    return hit


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it (x * cos + rotate_half(x) * sin, with
    rotate_half(x) = [-x2, x1]), with the sign folded into the table: [x2, x1] * [-sin1, sin2].
    The same numbers in two kernels fewer (q and k are rotated together in a step; measured
    no faster than the chunk/neg/cat form, and no slower)."""
    half = x.shape[-1] // 2
    return x * cos + x.unflatten(-1, (2, half)).flip(-2).flatten(-2) * sin_signed


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
        # one-token steps of int8-weights layers: q, k, v in one kernel call, gate and up in
        # another (7 calls a layer become 4)
        self._joined = [(joined_int8(layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                         joined_int8(layer.mlp, ("gate_proj", "up_proj")))
                        for layer in self.model.layers]

    def _rope_tables(self, n: int):
        if self._cos is None or self._cos.shape[0] < n:
            n = max(n, 512)
            pos = torch.arange(n, device=self.head_w.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.head_w.device)
            cos, sin = self.model.rotary_emb(probe, pos)
            half = sin.shape[-1] // 2
            self._cos = cos[0]  # [n, D]
            self._sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # signed
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
        """x [B, T, C] after each row's filled positions; fills the cache; last hidden state.
        T > 1 (a prefix) only into an empty cache; T == 1 (one token per row) at each row's
        own position when the rows differ in length."""
        b, t, _ = x.shape
        start = cache.length
        ragged = t == 1 and min(cache.lengths) != start
        if t > 1 and start:
            raise ValueError("a prefix goes into an empty cache")
        h_q, h_kv, d = self.n_head, self.n_kv, self.head_dim
        group = h_q // h_kv
        cos_t, sin_t = self._rope_tables(start + t)
        if ragged:  # each row at its own position; keys beyond a row's own are masked out
            pos = torch.tensor(cache.lengths, device=x.device)
            cos, sin = cos_t[pos][:, None, None], sin_t[pos][:, None, None]  # [B, 1, 1, D]
            rows = torch.arange(b, device=x.device)
            hidden = torch.arange(start + 1, device=x.device)[None] > pos[:, None]
            mask = torch.zeros(hidden.shape, device=x.device).masked_fill_(
                hidden, float("-inf"))[:, None, None]  # [B, 1, 1, T]
        else:
            cos, sin = cos_t[start:start + t], sin_t[start:start + t]  # [T, D]
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            qkv, gate_up = self._joined[i] if t == 1 else (None, None)
            h = _rms(x, layer.input_layernorm.weight, self.eps)
            if qkv is not None:  # one token: q and k side by side, rotated in one go
                out = qkv[0](h.view(b, -1))
                qk = _rope(out[:, :(h_q + h_kv) * d].view(b, h_q + h_kv, 1, d), cos, sin)
                q, k = qk[:, :h_q], qk[:, h_q:]  # [B, H, 1, D]
                v = out[:, (h_q + h_kv) * d:].view(b, h_kv, 1, d)
            else:
                q, k, v = att.q_proj(h), att.k_proj(h), att.v_proj(h)
                q = _rope(q.reshape(b, t, h_q, d).transpose(1, 2), cos, sin)  # [B, H, T, D]
                k = _rope(k.reshape(b, t, h_kv, d).transpose(1, 2), cos, sin)
                v = v.reshape(b, t, h_kv, d).transpose(1, 2)
            if ragged:
                cache.k[i, rows, :, pos] = k[:, :, 0]
                cache.v[i, rows, :, pos] = v[:, :, 0]
            else:
                cache.k[i, :, :, start:start + t] = k
                cache.v[i, :, :, start:start + t] = v
            keys, vals = cache.k[i, :, :, :start + t], cache.v[i, :, :, :start + t]
            if t == 1:  # one new token: grouped heads against the cached keys
                # (F.scaled_dot_product_attention measured in a whole int8-weights step: the
                # same 10.9 ms at 2 rows, 40 ms against 25 at 16; it keeps the scores in float32
                # where this rounds them to bf16, so 30 of 72 val drafts changed words)
                qg = q.reshape(b, h_kv, group, d)
                s = (qg @ keys.transpose(-1, -2)).float() * d ** -0.5
                w = torch.softmax(s + mask if ragged else s, dim=-1)
                y = (w.to(vals.dtype) @ vals).reshape(b, 1, h_q * d)
            else:  # the prefix, from position 0: plain causal attention
                y = F.scaled_dot_product_attention(
                    q, keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1),
                    is_causal=True).transpose(1, 2).reshape(b, t, h_q * d)
            x = x + att.o_proj(y)
            h = _rms(x, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            if gate_up is not None:
                gate, up = gate_up[0](h.view(b, -1)).split(gate_up[1], dim=-1)
                x = x + mlp.down_proj((F.silu(gate) * up).view(b, t, -1))
            else:
                x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        cache.lengths = [n + t for n in cache.lengths]
        return _rms(x[:, -1], self.model.norm.weight, self.eps)

    def prefill(self, embeds: torch.Tensor):
        b, t, _ = embeds.shape
        cache = LlamaKV.empty(len(self.model.layers), b, self.n_kv, t + self.room, self.head_dim,
                              embeds.new_zeros((), dtype=self.dtype))
        return self._logits(self._forward(embeds.to(self.dtype), cache)), cache

    @staticmethod
    def join(*caches: LlamaKV) -> LlamaKV:
        """Caches of separate prefills (prompts of unequal length) as one batch: one weight
        read per step for all their rows."""
        return LlamaKV.cat(list(caches))

    def step(self, tokens: torch.Tensor, cache: LlamaKV):
        if cache.length >= cache.capacity:  # a draft longer than planned: double the room
            cache.grow(2 * cache.capacity)
        x = self.model.embed_tokens.weight[tokens][:, None]
        return self._logits(self._forward(x, cache)), cache
