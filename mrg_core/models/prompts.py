"""MRG-LLM customized prompt tuning: instance-specific soft prompts.

A learned prompt P (L x D) is conditioned on the image by an affine transform whose scale γ and
shift β come from the visual feature f:  P̂ = γ(f) ⊙ P + β(f).
Promptbook-wise, a book of K prompts is first mixed with softmax weights computed from f.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mrg_core.models.config import PromptConfig
from mrg_core.models.encoder import EncoderOutput


class PromptTransform(nn.Module):
    """f -> (γ, β); γ is centred on 1 so training starts near the plain learned prompt."""

    def __init__(self, feat_dim: int, lm_dim: int):
        super().__init__()
        self.film = nn.Linear(feat_dim, 2 * lm_dim)

    def forward(self, prompt: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(feat).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, D] each
        return (1.0 + gamma) * prompt + beta


class PromptwisePrompts(nn.Module):
    def __init__(self, cfg: PromptConfig, feat_dim: int, lm_dim: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(cfg.length, lm_dim) * 0.02)
        self.transform = PromptTransform(feat_dim, lm_dim)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.transform(self.prompt.unsqueeze(0), feat), None


class PromptbookPrompts(nn.Module):
    def __init__(self, cfg: PromptConfig, feat_dim: int, lm_dim: int):
        super().__init__()
        self.book = nn.Parameter(torch.randn(cfg.book_size, cfg.length, lm_dim) * 0.02)
        self.selector = nn.Linear(feat_dim, cfg.book_size)
        self.transform = PromptTransform(feat_dim, lm_dim)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.selector(feat), dim=-1)  # [B, K]
        mixed = torch.einsum("bk,kld->bld", weights, self.book)
        return self.transform(mixed, feat), weights


class PromptBridge(nn.Module):
    """Visual tokens projected to the LM width + customized prompts, in the configured order."""

    def __init__(self, cfg: PromptConfig, feat_dim: int, lm_dim: int, book: bool):
        super().__init__()
        self.position = cfg.position
        self.visual_proj = nn.Sequential(nn.Linear(feat_dim, lm_dim), nn.GELU(),
                                         nn.Linear(lm_dim, lm_dim))
        self.prompts = (PromptbookPrompts if book else PromptwisePrompts)(cfg, feat_dim, lm_dim)
        self.last_weights: torch.Tensor | None = None  # promptbook mixing weights, for inspection

    def forward(self, enc: EncoderOutput) -> torch.Tensor:
        visual = self.visual_proj(enc.tokens)
        prompts, self.last_weights = self.prompts(enc.global_feat)
        parts = (prompts, visual) if self.position == "before_visual" else (visual, prompts)
        return torch.cat(parts, dim=1)
