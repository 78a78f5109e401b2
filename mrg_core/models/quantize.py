"""Inference precision of a loaded ReportModel's language model: fp32 (default), bf16 or int8.

    model = ReportModel.from_pretrained(folder)
    apply_precision(model, "int8")      # in place; returns the model

Only the causal LM that writes the draft changes. The image encoder, the classifier and the
bridge stay fp32, so the probability and the Grad-CAM map are exactly those of fp32.

- "fp32": nothing changes (the default everywhere).
- "fp32-merged": LoRA folded into the LM weights (W + BA), still float32: the same model with
  fewer layers to call per token.
- "bf16": LoRA merged into the LM weights, the LM cast to bfloat16; its input embeddings are
  cast on the way in, the logits are read as float32 by the decoder.
- "int8": LoRA merged, GPT-2's Conv1D layers turned into nn.Linear, then PyTorch dynamic
  quantisation (int8 weights per output channel, activations quantised per call) of every
  Linear layer in the transformer blocks. The tied embedding / output layer stays fp32.
  CPU only.
- "int8-weights": as "bf16", then every Linear layer in the transformer blocks keeps its
  weights as int8 per output channel (symmetric, scale max|w| / 127) and multiplies bfloat16
  activations with torch's weight-only kernel (_weight_int8pack_mm): a quarter of fp32's bytes
  per token like "int8", without quantising the activations (SmolLM2's outlier features make
  that change drafts). The output layer stays bf16 (restrict it with head_vocab). CPU only.
- "int4-weights": as "int8-weights", but the layers that LoRA did not adapt keep int4 weights
  in groups of 32 (torch's _weight_int4pack_mm_for_cpu). The adapted ones (SmolLM2: q, v),
  and the projections that share their input (k), stay int8: the adapter's change is smaller
  than int4's rounding, and with q and v in int4 the shipped model wrote nonsense. CPU only.

The result is for drafting only: do not train, fine-tune or save a model changed here (the
engine fine-tunes from the model folder on disk, never from the live model). Quality and speed
of each setting on COV-CTR val: bench/precision_quality.py and bench/run.py --precision.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "fp32-merged", "bf16", "int8", "int8-weights", "int4-weights")
CPU_ONLY = ("int8", "int8-weights", "int4-weights")  # torch's weight-only kernels are CPU ones


def check_precision(precision: str | None) -> str:
    p = (precision or "fp32").lower()
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return p


def model_precision(model) -> str:
    """What apply_precision made of this model ("fp32" when it was never applied)."""
    return getattr(model, "inference_precision", "fp32")


def apply_precision(model, precision: str | None = "fp32"):
    """Change the LM of `model` (a ReportModel) to `precision`, in place; returns the model."""
    p = check_precision(precision)
    current = model_precision(model)
    if p == current:
        return model
    if current != "fp32":
        raise ValueError(f"this model is already {current}: load it again for {p}")
    if p == "fp32":
        return model
    if p in CPU_ONLY and model.device.type != "cpu":
        raise ValueError(f"{p} runs on the CPU only; use bf16 on a GPU")
    model.eval()
    adapted = lora_adapted(model)
    merge_lora(model)
    lm = model.base_lm
    if p == "fp32-merged":
        pass
    elif p in ("bf16", "int8-weights", "int4-weights"):
        model.lm.to(torch.bfloat16)
        _cast_embeds_on_entry(lm, torch.bfloat16)
        if p != "bf16":
            replace_conv1d(lm)
            quantize_linear_weights(lm.base_model, Int8WeightLinear if p == "int8-weights"
                                    else Int4WeightLinear, keep_int8=adapted)
    else:
        replace_conv1d(lm)
        quantize_linear_int8(lm.base_model)  # the blocks; lm_head (tied to the embedding) stays
    for prm in model.lm.parameters():
        prm.requires_grad_(False)
    model.inference_precision = p
    return model


# Projections that read the same input; the lean decoder calls each set as one kernel, so a
# set is quantised alike.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def lora_adapted(model) -> set[str]:
    """Names, under the causal LM's transformer (lm.base_model once merged), of the Linear
    layers LoRA adapts, with the projections that share their input: empty without LoRA."""
    from peft import PeftModel

    lm = model.lm
    if not isinstance(lm, PeftModel):
        return set()
    inner = lm.get_base_model().base_model
    names = {n for n, m in inner.named_modules() if hasattr(m, "lora_A")}
    for n in list(names):
        parent, _, leaf = n.rpartition(".")
        for group in SHARED_INPUT:
            if leaf in group:
                names.update(f"{parent}.{g}" if parent else g for g in group)
    return names


def merge_lora(model) -> bool:
    """Fold LoRA weights into the LM (W + BA) and drop the adapter layers; True when merged.
    Other adapters (prefix tuning) are left as they are."""
    from peft import PeftModel

    lm = model.lm
    if not isinstance(lm, PeftModel) or lm.peft_config[lm.active_adapter].peft_type != "LORA":
        return False
    with warnings.catch_warnings():  # transformers' deprecation notes from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        model.lm = lm.merge_and_unload()
    return True


def conv1d_to_linear(conv) -> nn.Linear:
    """GPT-2's Conv1D (y = x W + b, W stored [in, out]) as an equal nn.Linear."""
    n_in, n_out = conv.weight.shape
    lin = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device,
                    dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


def replace_conv1d(root: nn.Module) -> int:
    """Replace every transformers Conv1D under `root` by an equal nn.Linear; returns how many."""
    from transformers.pytorch_utils import Conv1D

    todo = [(name, m) for name, m in root.named_modules() if isinstance(m, Conv1D)]
    for name, conv in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, conv1d_to_linear(conv))
    return len(todo)


def quantize_linear_int8(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation (per-channel weights) of every nn.Linear in `module`, in place."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization warns it moves to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8, inplace=True)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without it, bf16 math is
    emulated: a matmul and its backward ran 13x slower than float32 on an AVX2-only host."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def grad_dtype() -> torch.dtype:
    """The dtype of a weight-only layer's matmul when gradients flow through it (sentence
    grounding: the kernels have no backward, so the weights are unpacked). bfloat16 where the
    CPU computes it natively; float32 elsewhere: on an AVX2-only CPU a bf16 matmul and its
    backward ran 13x slower than float32's (150 x 576 x 1536: 199 against 15 ms), and grounding
    one draft took 442 s instead of seconds."""
    return torch.bfloat16 if native_bf16() else torch.float32


def _grad_matmul(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """flat @ weight.T in grad_dtype(), returned as bfloat16 like the kernels' output (an int8
    weight times its bf16 scale is exact in float32, so its bf16 rounding is the one product's)."""
    dt = grad_dtype()
    return (flat.to(dt) @ weight.to(dt).t()).to(torch.bfloat16)


class Int8WeightLinear(nn.Module):
    """nn.Linear with int8 weights (one scale per output channel) and bfloat16 activations."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if lin.bias is None
                             else lin.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if torch.is_grad_enabled() and flat.requires_grad:  # the kernel has no backward:
            # sentence grounding differentiates through the LM to the image, with these weights
            y = _grad_matmul(flat, self.weight_int8 * self.scales[:, None].float())
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4WeightLinear(nn.Module):
    """nn.Linear with int4 weights and bfloat16 activations: per group of GROUP input weights
    of an output channel, w = q * scale + min with q in 0..15 (asymmetric, as torchao's int4
    weight-only form), through torch's CPU kernel (_weight_int4pack_mm_for_cpu). Half the
    bytes of int8 per token. Layers whose input width is not a multiple of GROUP stay int8."""

    GROUP = 32

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        n, k = w.shape
        g = self.GROUP
        groups = w.reshape(n, k // g, g)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = (hi - lo).clamp(min=1e-6) / 15
        q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
        self.in_features, self.out_features = k, n
        # the kernel's layout: two weights a byte, and per group (scale, zero) with the
        # weight read as (q - 8) * scale + zero, so zero = min + 8 * scale
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.reshape(n, k).to(torch.int32), 1))
        self.register_buffer("scales_zeros", torch.stack([scale, lo + 8 * scale], -1)
                             .transpose(0, 1).contiguous().to(torch.bfloat16))  # [k/g, n, 2]
        self.register_buffer("bias", None if lin.bias is None
                             else lin.bias.detach().to(torch.bfloat16))

    @classmethod
    def fits(cls, lin: nn.Linear) -> bool:
        return lin.in_features % cls.GROUP == 0

    def dequantized(self) -> torch.Tensor:
        """The weights as bfloat16 [out, in] (the kernel has no backward)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.weight_int4.device)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.weight_int4, self.GROUP, self.scales_zeros).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if torch.is_grad_enabled() and flat.requires_grad:  # as Int8WeightLinear
            y = _grad_matmul(flat, self.dequantized())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.GROUP,
                                                           self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_linear_weights(module: nn.Module, kind=None, keep_int8=frozenset()) -> int:
    """Replace every nn.Linear under `module` by a weight-only quantised layer of `kind`
    (Int8WeightLinear by default; Int4WeightLinear where the width fits its groups and the name
    is not in `keep_int8`, else Int8WeightLinear); returns how many."""
    kind = kind or Int8WeightLinear
    todo = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    for name, lin in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        fits = getattr(kind, "fits", lambda _: True)(lin) and name not in keep_int8
        setattr(parent, attr, (kind if fits else Int8WeightLinear)(lin))
    return len(todo)


def quantize_linear_int8_weights(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by an Int8WeightLinear; returns how many."""
    return quantize_linear_weights(module, Int8WeightLinear)


def _cast_embeds_on_entry(lm: nn.Module, dtype: torch.dtype) -> None:
    """The prefix (visual tokens from the fp32 bridge) enters the LM as inputs_embeds: cast it
    where the transformer takes it (peft calls the LM's forward directly, its inner model by
    __call__, so the hook sits on the inner model)."""
    def hook(module, args, kwargs):
        e = kwargs.get("inputs_embeds")
        if e is not None and e.dtype != dtype:
            kwargs["inputs_embeds"] = e.to(dtype)
        return args, kwargs

    lm.base_model.register_forward_pre_hook(hook, with_kwargs=True)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights read by one forward pass: parameters (tied ones once) plus the packed
    int8 weights of dynamically quantised layers."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for m in module.modules():
        if isinstance(m, (Int8WeightLinear, Int4WeightLinear)):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
        packed = getattr(m, "_packed_params", None)
        if packed is not None and callable(getattr(m, "weight", None)):
            w, b = m._weight_bias()
            total += w.numel() * w.element_size() + (0 if b is None else b.numel() * 4)
    return total
