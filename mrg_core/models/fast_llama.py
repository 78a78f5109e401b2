"""A lean decoder for a Llama-style frozen LLM (SmolLM2): the arithmetic of transformers'
LlamaForCausalLM without its per-call machinery, with two savings a report allows.

SmolLM2-135M reads 30 layers of weights per token plus a 49,152 x 576 output layer (28 M
weights, 21 % of the model). On 2 CPU cores a token costs the weight reads plus ~1,200 small
kernel calls around them, so this decoder
- keeps keys and values in tensors preallocated for the prefix plus the report,
- calls each layer's projections as modules, so the same code runs on float32 (LoRA merged),
  bfloat16 and dynamically quantised int8 layers (models/quantize.py); with int8- or
  int4-weights layers a one-token step is one TorchScript call through every layer
  (quantized_token_step), in which the projections that read the same input (q, k, v;
  gate, up) are one kernel call,
- decodes rows of different lengths together (LlamaKV: a guided pair, several users' drafts),
- computes the prefix (visual tokens, prompt, stated decision) once, with the same code, and
  the common beginning of prompts that begin alike once (prefill_shared: a guided pair),
- checks several proposed tokens per row in one pass (extend, rewind: speculative decoding,
  models/generation.py), each position with the one-token step's logits,
- optionally scores only `head_ids` (the token ids that occur in the training reports, saved in
  the model config as `head_vocab`): every other logit is set to -1e9. Greedy and beam drafts
  are unchanged whenever the best token is a report token, which the decoder's training makes
  the rule; tests/test_fast_llama.py compares drafts with and without it.

Used only where it is exact arithmetic: a plain LlamaForCausalLM (LoRA merged; a LoRA wrapper
keeps the transformers path). P-Tuning v2's learned keys and values (peft prefix tuning) are
`prefix`: they fill the first positions of every cache, unrotated, and the prompt takes the
rotary positions after them, as transformers does with peft's prefix as its past.
tests/test_fast_llama.py checks the logits against transformers. A shared beginning gives each prompt's logits to float rounding; in
bf16 that rounding changed words in 26 of 72 val drafts of the shipped model, with the same
scores (README, Speed).
"""
from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from mrg_core.models.quantize import SHARED_INPUT

QKV, GATE_UP = SHARED_INPUT  # projections called as one kernel (and quantised alike)
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


class Joined(NamedTuple):
    """Weight-only quantised projections that read the same input, as one packed weight and
    one scale table (int8: a scale per output row; int4: (scale, zero) per group and row)."""
    weight: torch.Tensor
    scales: torch.Tensor


INT4_ROW_BLOCK = 64  # torch's CPU int4 packing interleaves rows in blocks of 64


def _packed(m) -> tuple[str, str, int, int] | None:
    """(weight attribute, scale attribute, output-row axis of the scales, int4 group or 0)
    of a bias-free weight-only quantised layer, else None."""
    from mrg_core.models.quantize import Int4WeightLinear, Int8WeightLinear

    if getattr(m, "bias", 0) is not None:
        return None
    if type(m) is Int8WeightLinear:
        return "weight_int8", "scales", 0, 0
    if type(m) is Int4WeightLinear:
        return "weight_int4", "scales_zeros", 1, m.GROUP
    return None


def joined_weights(parent, names: tuple[str, ...]) -> Joined | None:
    """The weight-only quantised projections `names` of `parent` that read the same input
    (q, k, v; gate, up) as one kernel call, or None where they are not all bias-free layers of
    one kind (inference-only, so changing their storage cannot touch training). Their weights
    are joined once, in place: each layer keeps a view of its rows, so no memory is added and
    transformers' own forward reads the same numbers (both kernels compute each output row
    from its own weight row and scales alone). Int4 weights join only in whole blocks of
    INT4_ROW_BLOCK rows, and each layer keeps contiguous scales: the int4 kernel ignores
    strides (a strided view of the scales gave wrong numbers, silently)."""
    key = "_joined_" + "_".join(names)
    hit = parent.__dict__.get(key)
    if hit is not None:
        return hit
    mods = [getattr(parent, n) for n in names]
    kinds = {_packed(m) for m in mods}
    if len(kinds) != 1 or None in kinds:
        return None
    w_name, s_name, s_axis, group = kinds.pop()
    if group and any(m.out_features % INT4_ROW_BLOCK for m in mods):
        return None
    w = torch.cat([getattr(m, w_name) for m in mods]).contiguous()
    scales = torch.cat([getattr(m, s_name) for m in mods], s_axis).contiguous()
    start = 0
    for m in mods:
        n = m.out_features
        setattr(m, w_name, w[start:start + n])
        setattr(m, s_name, scales.narrow(s_axis, start, n).contiguous())
        start += n
    parent.__dict__[key] = hit = Joined(w, scales)  # not a submodule: plain attribute
    return hit


def quantized_layer_weights(model) -> tuple[list[list[torch.Tensor]], list[int]] | None:
    """Every layer's weights for `quantized_token_step`, as lists over the layers: the two
    norms, the joined q/k/v and gate/up projections and o/down, each as (packed weight,
    scales); and the int4 group size of q/k/v, o, gate/up and down (0: int8), each alike in
    every layer. None unless every projection is a bias-free weight-only quantised layer."""
    out: list[list[torch.Tensor]] = [[] for _ in range(10)]
    forms = set()
    for layer in model.layers:
        att, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = joined_weights(att, QKV), joined_weights(mlp, GATE_UP)
        kinds = [_packed(m) for m in (att.q_proj, att.o_proj, mlp.gate_proj, mlp.down_proj)]
        if qkv is None or gate_up is None or None in kinds:
            return None
        (_, _, _, g_qkv), (o_w, o_s, _, g_o), (_, _, _, g_gu), (d_w, d_s, _, g_d) = kinds
        forms.add((g_qkv, g_o, g_gu, g_d))
        for lst, t in zip(out, (
                layer.input_layernorm.weight, qkv.weight, qkv.scales,
                getattr(att.o_proj, o_w), getattr(att.o_proj, o_s),
                layer.post_attention_layernorm.weight, gate_up.weight, gate_up.scales,
                getattr(mlp.down_proj, d_w), getattr(mlp.down_proj, d_s))):
            lst.append(t.detach())
    if len(forms) != 1:
        return None
    return out, list(forms.pop())


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it (x * cos + rotate_half(x) * sin, with
    rotate_half(x) = [-x2, x1]), with the sign folded into the table: [x2, x1] * [-sin1, sin2].
    The same numbers in two kernels fewer (q and k are rotated together in a step; measured
    no faster than the chunk/neg/cat form, and no slower)."""
    half = x.shape[-1] // 2
    return x * cos + x.unflatten(-1, (2, half)).flip(-2).flatten(-2) * sin_signed


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for grouped queries q [B, H_kv, G, D] against the
    cache's float32 keys and values [B, H_kv, S, D], rounded where a `dtype` matmul rounds:
    the scores and the output to `dtype`, the weights to `dtype` before the second product.
    In float32 arithmetic because a bf16 product of these small, ever-longer shapes costs
    more than its conversions: a 30-layer step's attention 7.7 -> 3.4 ms at 1 row and
    24 -> 13 ms at 16 (AVX-512 without native bf16 products); bf16 values are exact in
    float32 and their products too, so only the order of the sums differs from a bf16 matmul
    (15 of 1.8 million scores a bf16 step apart in random trials)."""
    s = torch.matmul(q.float(), keys.transpose(-1, -2)).to(dtype).float() * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + mask
    w = torch.softmax(s, dim=-1)
    return torch.matmul(w.to(dtype).float(), values).to(dtype)


def _qmm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, int4_group: int
         ) -> torch.Tensor:
    """x @ w.T for a weight-only quantised w: int8 per output row (int4_group 0) or int4."""
    if int4_group == 0:
        return torch.ops.aten._weight_int8pack_mm(x, w, scales)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, int4_group, scales)


def quantized_token_step(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         start: int, pos: Optional[torch.Tensor], cos: torch.Tensor,
                         sin: torch.Tensor, mask: Optional[torch.Tensor],
                         ln1: List[torch.Tensor], qkv_w: List[torch.Tensor],
                         qkv_s: List[torch.Tensor], o_w: List[torch.Tensor],
                         o_s: List[torch.Tensor], ln2: List[torch.Tensor],
                         gate_up_w: List[torch.Tensor], gate_up_s: List[torch.Tensor],
                         down_w: List[torch.Tensor], down_s: List[torch.Tensor],
                         int4_groups: List[int], eps: float, h_q: int, h_kv: int, d: int,
                         inter: int) -> torch.Tensor:
    """One token per row through every weight-only quantised layer: the arithmetic of
    FastLlamaDecoder's layer loop (x [B, 1, C] bf16; keys/values the cache's float32 [L, B,
    H_kv, capacity, D]; `pos` each row's position when rows differ in length, else all at `start`;
    `int4_groups` the int4 group size of q/k/v, o, gate/up and down, 0 for int8). Run as
    TorchScript (token_step()), so the GIL is free while it runs and the web server's threads
    do not stall the model between kernels."""
    b = x.shape[0]
    group = h_q // h_kv
    rows = torch.arange(b, device=x.device)
    for i in range(len(ln1)):
        h = ln1[i] * F.rms_norm(x.float(), [x.shape[-1]], eps=eps).to(x.dtype)
        out = _qmm(h.view(b, -1), qkv_w[i], qkv_s[i], int4_groups[0])
        # q and k side by side, rotated in one go (see _rope)
        qk = out[:, :(h_q + h_kv) * d].view(b, h_q + h_kv, 1, d)
        qk = qk * cos + qk.unflatten(-1, [2, d // 2]).flip(-2).flatten(-2) * sin
        q, k = qk[:, :h_q], qk[:, h_q:]  # [B, H, 1, D]
        v = out[:, (h_q + h_kv) * d:].view(b, h_kv, 1, d)
        if pos is None:
            keys[i, :, :, start:start + 1] = k
            values[i, :, :, start:start + 1] = v
        else:
            keys[i, rows, :, pos] = k[:, :, 0].to(keys.dtype)
            values[i, rows, :, pos] = v[:, :, 0].to(values.dtype)
        y = _attend(q.reshape(b, h_kv, group, d), keys[i, :, :, :start + 1],
                    values[i, :, :, :start + 1], mask, x.dtype).reshape(b, h_q * d)
        x = x + _qmm(y, o_w[i], o_s[i], int4_groups[1]).view(b, 1, -1)
        h = ln2[i] * F.rms_norm(x.float(), [x.shape[-1]], eps=eps).to(x.dtype)
        gate_up = _qmm(h.view(b, -1), gate_up_w[i], gate_up_s[i], int4_groups[2])
        m = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        x = x + _qmm(m, down_w[i], down_s[i], int4_groups[3]).view(b, 1, -1)
    return x


def _scripted(fn):
    """`fn` as TorchScript, or `fn` itself where scripting fails (a torch without it): the
    same numbers either way (tests/test_fast_llama.py), only slower."""
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates jit.script; torch is pinned
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception:
        return fn


# Scripted at import (20 ms), not at first use: TorchScript reads the function's source from
# its file, and a file replaced under a running process (an upgrade in place) would otherwise
# compile whatever then sits at those lines (seen once: another function, so every draft
# failed at its first step).
_TOKEN_STEP = _scripted(quantized_token_step)


def token_step():
    """quantized_token_step as it runs: TorchScript (one call instead of ~1,200 Python
    dispatches, the GIL free meanwhile) or, where scripting failed, the plain function."""
    return _TOKEN_STEP


class FastLlamaDecoder:
    """KVDecoder interface: prefill(embeds) -> (logits, cache); step(tokens, cache)."""

    def __init__(self, lm, head_ids: list[int] | torch.Tensor | None = None, room: int = 160,
                 prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
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
        # The output layer computes in float32 whatever the LM's dtype: logits rounded to bf16
        # (8 bits of mantissa: steps of 0.06 at a logit of 10) made near ties, and a restricted
        # layer's draft then parted from the whole vocabulary's (1 of 8 val drafts on an AVX2
        # host). A restricted layer's float32 rows are small (366 x 576: 0.8 MB).
        self.head_w = w.detach().float().contiguous()
        self._head_t = self.head_w.t()
        self._cos = self._sin = None
        # one-token steps of int8- or int4-weights layers: one TorchScript call for all
        # layers, with q, k, v in one kernel call and gate, up in another (7 calls become 4)
        self._quantized = quantized_layer_weights(self.model)
        self._inter = self.model.layers[0].mlp.gate_proj.out_features
        # P-Tuning v2: keys and values [L, H_kv, P, D] before every prompt (none: P = 0)
        self.prefix = None if prefix is None else tuple(
            t.detach().to(self.dtype) for t in prefix)

    def _new_cache(self, rows: int, capacity: int, like: torch.Tensor) -> LlamaKV:
        """An empty cache for `rows` prompts of up to `capacity` positions, after the learned
        prefix when there is one (its positions come first and count in every row's length).
        Float32 whatever the LM's dtype (bf16 keys and values are exact in it): attention then
        reads it without a conversion per step (_attend)."""
        n_prefix = 0 if self.prefix is None else self.prefix[0].shape[2]
        cache = LlamaKV.empty(len(self.model.layers), rows, self.n_kv, n_prefix + capacity,
                              self.head_dim, like.new_zeros((), dtype=torch.float32))
        if n_prefix:
            cache.k[:, :, :, :n_prefix] = self.prefix[0][:, None]
            cache.v[:, :, :, :n_prefix] = self.prefix[1][:, None]
            cache.lengths = [n_prefix] * rows
        return cache

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
        # one product per row (a batch of 1-row products against the same weight): a row's
        # logits do not depend on how many rows the call holds, so a pass of several positions
        # (extend) gives those of one-token steps bit for bit, as the layers below do. Never a
        # batch of one: on an AVX-512 host it took another kernel than batches of 2 or more
        # (a last-bit difference); nor torch.mv per row, whose sums follow the thread count.
        xf = x.float()[:, None]
        n = xf.shape[0]
        if n == 1:
            xf = xf.expand(2, -1, -1)
        part = torch.bmm(xf, self._head_t.expand(xf.shape[0], -1, -1))[:n, 0]
        if self.head_ids is None:
            return part
        full = part.new_full((part.shape[0], self.vocab), MASKED)
        full[:, self.head_ids] = part
        return full

    def _qkv(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """A layer's input norm, q/k/v projections and rotary embedding for x [B, T, C]:
        q [B, H, T, D], k and v [B, H_kv, T, D]."""
        b, t, _ = x.shape
        att, d = layer.self_attn, self.head_dim
        h = _rms(x, layer.input_layernorm.weight, self.eps)
        q, k, v = att.q_proj(h), att.k_proj(h), att.v_proj(h)
        q = _rope(q.reshape(b, t, self.n_head, d).transpose(1, 2), cos, sin)
        k = _rope(k.reshape(b, t, self.n_kv, d).transpose(1, 2), cos, sin)
        return q, k, v.reshape(b, t, self.n_kv, d).transpose(1, 2)

    def _mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x plus the layer's MLP of its post-attention norm."""
        mlp = layer.mlp
        h = _rms(x, layer.post_attention_layernorm.weight, self.eps)
        return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, cache: LlamaKV, real: list[int] | None = None
                 ) -> torch.Tensor:
        """x [B, T, C] after each row's filled positions; fills the cache; the hidden state of
        each row's last position. T == 1 (one token per row) at each row's own position when
        the rows differ in length; T > 1 (a prompt, or the rest of prompts after a shared
        beginning) after rows of equal length. `real`: each row's number of real positions
        when rows of a T > 1 call are padded on the right (the cache keeps only those)."""
        b, t, _ = x.shape
        start = cache.length
        ragged = t == 1 and min(cache.lengths) != start
        if t > 1 and min(cache.lengths) != start:
            raise ValueError("a prompt goes after rows of equal length")
        real = real or [t] * b
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
        if t == 1 and self._quantized is not None:
            weights, groups = self._quantized
            x = token_step()(x, cache.k, cache.v, start, pos if ragged else None, cos, sin,
                             mask if ragged else None, *weights, groups, self.eps, h_q, h_kv,
                             d, self._inter)
            cache.lengths = [n + t for n in cache.lengths]
            return _rms(x[:, -1], self.model.norm.weight, self.eps)
        # a prompt after `start` shared positions: each position sees the shared ones and the
        # prompt's own up to itself (from 0, plain causal attention)
        causal = None if not start or t == 1 else torch.ones(
            t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            q, k, v = self._qkv(layer, x, cos, sin)
            if ragged:
                cache.k[i, rows, :, pos] = k[:, :, 0].float()
                cache.v[i, rows, :, pos] = v[:, :, 0].float()
            else:
                cache.k[i, :, :, start:start + t] = k
                cache.v[i, :, :, start:start + t] = v
            keys, vals = cache.k[i, :, :, :start + t], cache.v[i, :, :, :start + t]
            if t == 1:  # one new token: grouped heads against the cached keys
                # (F.scaled_dot_product_attention measured in a whole int8-weights step: the
                # same 10.9 ms at 2 rows, 40 ms against 25 at 16; it keeps the scores in float32
                # where this rounds them to bf16, so 30 of 72 val drafts changed words)
                y = _attend(q.reshape(b, h_kv, group, d), keys, vals, mask if ragged else None,
                            x.dtype).reshape(b, 1, h_q * d)
            else:  # a prompt (the cache's float32 keys and values back in the LM's dtype: exact)
                keys, vals = keys.to(x.dtype), vals.to(x.dtype)
                y = F.scaled_dot_product_attention(
                    q, keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1),
                    attn_mask=causal, is_causal=causal is None
                ).transpose(1, 2).reshape(b, t, h_q * d)
            x = self._mlp(layer, x + att.o_proj(y))
        cache.lengths = [n + r for n, r in zip(cache.lengths, real)]
        last = x[torch.arange(b, device=x.device), torch.tensor(real, device=x.device) - 1]
        return _rms(last, self.model.norm.weight, self.eps)

    @torch.inference_mode()
    def _forward_many(self, x: torch.Tensor, cache: LlamaKV) -> torch.Tensor:
        """x [B, T, C]: T positions per row, each row after its own filled positions (rows of
        different lengths), with the arithmetic of the one-token step at every position (the
        same formulas, keys beyond a position masked), so that each position's logits are
        those of T one-token steps (tests/test_fast_llama.py). The final norm of every
        position [B, T, C]; the cache keeps all T (rewind() drops the ones not wanted)."""
        b, t, _ = x.shape
        h_q, h_kv, d = self.n_head, self.n_kv, self.head_dim
        group = h_q // h_kv
        dev = x.device
        pos = torch.tensor(cache.lengths, device=dev)[:, None] + torch.arange(t, device=dev)
        need = int(pos.max()) + 1
        if need > cache.capacity:
            cache.grow(max(2 * cache.capacity, need))
        cos_t, sin_t = self._rope_tables(need)
        cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]  # [B, 1, T, D]
        hidden = torch.arange(need, device=dev)[None, None] > pos[:, :, None]  # [B, T, S]
        mask = torch.zeros(hidden.shape, device=dev).masked_fill_(hidden, float("-inf"))
        mask = mask[:, None, None].expand(b, 1, group, t, need).reshape(b, 1, group * t, need)
        rows = torch.arange(b, device=dev)[:, None]
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            q, k, v = self._qkv(layer, x, cos, sin)
            cache.k[i, rows, :, pos] = k.transpose(1, 2).float()  # [B, T, H_kv, D] at [row, pos]
            cache.v[i, rows, :, pos] = v.transpose(1, 2).float()
            # the one-token step's grouped attention, T queries per group at once
            y = _attend(q.reshape(b, h_kv, group * t, d), cache.k[i, :, :, :need],
                        cache.v[i, :, :, :need], mask, x.dtype)
            y = y.reshape(b, h_q, t, d).transpose(1, 2)
            x = self._mlp(layer, x + att.o_proj(y.reshape(b, t, h_q * d)))
        cache.lengths = [n + t for n in cache.lengths]
        return _rms(x, self.model.norm.weight, self.eps)

    def extend(self, tokens: torch.Tensor, cache: LlamaKV):
        """tokens [B, T] after each row's own length: logits [B, T, V] of every position (a
        speculative draft's proposals checked in one pass), the cache T longer per row."""
        b, t = tokens.shape
        x = self.model.embed_tokens.weight[tokens]
        out = self._forward_many(x, cache)
        return self._logits(out.reshape(b * t, -1)).reshape(b, t, -1), cache

    @property
    def can_extend(self) -> bool:
        """extend() gives the one-token steps' logits bit for bit with weight-only quantised
        layers (the same kernels per row; tests/test_fast_llama.py); in fp32 or bf16 only to
        rounding, which could change a greedy draft, so speculation stays off there."""
        return self._quantized is not None

    @staticmethod
    def rewind(cache: LlamaKV, drop: int) -> None:
        """Forget the last `drop` positions of every row (proposals not taken)."""
        cache.lengths = [n - drop for n in cache.lengths]

    def prefill(self, embeds: torch.Tensor):
        b, t, _ = embeds.shape
        cache = self._new_cache(b, t + self.room, embeds)
        return self._logits(self._forward(embeds.to(self.dtype), cache)), cache

    def prefill_shared(self, common: torch.Tensor, ends: list[torch.Tensor]):
        """Prompts that all begin with `common` [1, Tc, C] and end in `ends` (each [1, Ti, C],
        Ti >= 1): the beginning is computed once, then every prompt's end as one batch
        (padded on the right; a row's padding stays beyond its length). A guided draft's two
        prompts share the visual tokens and most of the instruction (41 of 47 and 45
        positions with the shipped model): a third of the prefill work. Logits [N, V] of
        each prompt's last position, and one cache with a row per prompt."""
        lens = [e.shape[1] for e in ends]
        if common.shape[0] != 1 or min(lens) < 1:
            raise ValueError("one shared beginning, and at least one position of each end")
        tc, n, tmax = common.shape[1], len(ends), max(lens)
        one = self._new_cache(1, tc + tmax + self.room, common)
        self._forward(common.to(self.dtype), one)
        cache = LlamaKV(one.k.expand(-1, n, -1, -1, -1).clone(),
                        one.v.expand(-1, n, -1, -1, -1).clone(), one.lengths * n)
        x = torch.cat([F.pad(e, (0, 0, 0, tmax - e.shape[1])) for e in ends]).to(self.dtype)
        return self._logits(self._forward(x, cache, real=lens)), cache

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
