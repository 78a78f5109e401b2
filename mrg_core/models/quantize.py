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

The result is for drafting only: do not train, fine-tune or save a model changed here (the
engine fine-tunes from the model folder on disk, never from the live model). Quality and speed
of each setting on COV-CTR val: bench/precision_quality.py and bench/run.py --precision.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "fp32-merged", "bf16", "int8", "int8-weights")


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
    if p.startswith("int8") and model.device.type != "cpu":
        raise ValueError("int8 runs on the CPU only; use bf16 on a GPU")
    model.eval()
    merge_lora(model)
    lm = model.base_lm
    if p == "fp32-merged":
        pass
    elif p in ("bf16", "int8-weights"):
        model.lm.to(torch.bfloat16)
        _cast_embeds_on_entry(lm, torch.bfloat16)
        if p == "int8-weights":
            replace_conv1d(lm)
            quantize_linear_int8_weights(lm.base_model)
    else:
        replace_conv1d(lm)
        quantize_linear_int8(lm.base_model)  # the blocks; lm_head (tied to the embedding) stays
    for prm in model.lm.parameters():
        prm.requires_grad_(False)
    model.inference_precision = p
    return model


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
            w = self.weight_int8.to(torch.bfloat16) * self.scales[:, None]
            y = flat @ w.t()
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_linear_int8_weights(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by an Int8WeightLinear; returns how many."""
    todo = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    for name, lin in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, Int8WeightLinear(lin))
    return len(todo)


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
        if isinstance(m, Int8WeightLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
        packed = getattr(m, "_packed_params", None)
        if packed is not None and callable(getattr(m, "weight", None)):
            w, b = m._weight_bias()
            total += w.numel() * w.element_size() + (0 if b is None else b.numel() * 4)
    return total
