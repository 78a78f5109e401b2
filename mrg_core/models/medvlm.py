"""MedVLM discrimination-enhanced bridge.

The classifier's probabilities are embedded, concatenated to every visual token and projected
back to the token width, so the report decoder sees what the classifier decided. A small
query transformer (learned queries cross-attending to those tokens) gives N LM-space tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mrg_core.models.config import MedVLMConfig
from mrg_core.models.encoder import EncoderOutput


class MedVLMBridge(nn.Module):
    def __init__(self, cfg: MedVLMConfig, feat_dim: int, lm_dim: int, n_labels: int):
        super().__init__()
        dim = cfg.qformer_dim or feat_dim
        self.label_embed = nn.Sequential(nn.Linear(n_labels, cfg.label_embed_dim), nn.GELU())
        self.fuse = nn.Linear(feat_dim + cfg.label_embed_dim, dim)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, dim) * 0.02)
        heads = math.gcd(cfg.qformer_heads, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=2 * dim,
                                           dropout=0.1, batch_first=True, norm_first=True)
        self.qformer = nn.TransformerDecoder(layer, cfg.qformer_layers)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, lm_dim))

    def forward(self, enc: EncoderOutput, probs: torch.Tensor | None = None) -> torch.Tensor:
        """probs: label probabilities to embed (default: the classifier's own)."""
        if probs is None:
            probs = torch.sigmoid(enc.logits)
        lab = self.label_embed(probs).unsqueeze(1).expand(-1, enc.tokens.shape[1], -1)
        memory = self.fuse(torch.cat([enc.tokens, lab], dim=-1))
        q = self.queries.unsqueeze(0).expand(enc.tokens.shape[0], -1, -1)
        return self.out(self.qformer(q, memory))
