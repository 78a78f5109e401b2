"""Visual encoder: transformers vision backbone -> spatial map -> global feature, visual tokens,
classifier logits.

Every backbone kind is reduced to one spatial map [B*V, C, h, w] that passes through
`self.spatial` (an identity module): Grad-CAM hooks that one layer whatever the architecture.

`members` > 1 makes the classifier a deep ensemble: independently initialised copies of the
backbone and classifier head, each trained on the labels on its own, whose logits are averaged.
With a few hundred training images one network's AUC swings by several points with its seed;
the average does not. All members' maps pass through `self.spatial` together (stacked on the
batch axis), so one Grad-CAM pass covers the ensemble. Tokens for the LM and the finding head
come from the first member.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModel, ConvNextConfig, ConvNextModel, ResNetConfig,
                          ResNetModel, SwinConfig, SwinModel, ViTConfig, ViTModel)

from mrg_core.models.config import EncoderConfig


@dataclass
class EncoderOutput:
    global_feat: torch.Tensor  # [B, C] views fused
    tokens: torch.Tensor  # [B, N, C] pooled grid, views fused
    logits: torch.Tensor  # [B, n_labels]; an ensemble's classifier logits are the members' mean
    view_weights: torch.Tensor  # [B, V] fusion weights
    member_logits: torch.Tensor | None = None  # [B, K, n_classifier_labels] for K > 1 members
    feature_map: torch.Tensor | None = None  # [B*V, C, h, w] the (first member's) Grad-CAM layer


def _grid(n: int) -> tuple[int, int]:
    """n tokens as an (h, w) grid, as square as possible (16 -> 4x4, 8 -> 2x4)."""
    h = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return h, n // h


def build_backbone(cfg: EncoderConfig, image_size: int,
                   input_norm: tuple[float, float] = (0.5, 0.25)) -> nn.Module:
    """input_norm: (mean, std) of the preprocessing, for backbones with their own input scale."""
    if cfg.kind.startswith("efficientnet-lite"):
        from mrg_core.models.efficientnet_lite import EfficientNetLiteBackbone
        return EfficientNetLiteBackbone(cfg.kind, pretrained=cfg.imagenet,
                                        input_mean=input_norm[0], input_std=input_norm[1])
    if cfg.pretrained_path:
        model = AutoModel.from_pretrained(cfg.pretrained_path, local_files_only=True)
        cfg.backbone_config = model.config.to_dict()  # lets from_pretrained rebuild it offline
        return model
    if cfg.backbone_config:  # reloading a saved model: architecture only, weights come later
        conf = AutoConfig.for_model(**cfg.backbone_config)
        return AutoModel.from_config(conf)
    if cfg.kind == "resnet":
        return ResNetModel(ResNetConfig(num_channels=1, embedding_size=cfg.embedding_size,
                                        hidden_sizes=list(cfg.hidden_sizes),
                                        depths=list(cfg.depths), layer_type=cfg.layer_type))
    if cfg.kind == "convnext":
        return ConvNextModel(ConvNextConfig(num_channels=1, patch_size=cfg.patch_size,
                                            num_stages=len(cfg.hidden_sizes),
                                            hidden_sizes=list(cfg.hidden_sizes),
                                            depths=list(cfg.depths), image_size=image_size))
    if cfg.kind == "swin":
        return SwinModel(SwinConfig(num_channels=1, image_size=image_size,
                                    patch_size=cfg.patch_size, embed_dim=cfg.embedding_size,
                                    depths=list(cfg.depths),
                                    num_heads=list(cfg.num_heads)[: len(cfg.depths)],
                                    window_size=cfg.window_size), add_pooling_layer=False)
    if cfg.kind == "vit":
        width = cfg.hidden_sizes[-1]
        return ViTModel(ViTConfig(num_channels=1, image_size=image_size,
                                  patch_size=cfg.patch_size * 4, hidden_size=width,
                                  num_hidden_layers=sum(cfg.depths),
                                  num_attention_heads=cfg.num_heads[-1],
                                  intermediate_size=2 * width), add_pooling_layer=False)
    raise ValueError(f"unknown encoder kind {cfg.kind!r}")


class VisualEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, image_size: int, n_labels: int,
                 n_token_labels: int = 0, input_norm: tuple[float, float] = (0.5, 0.25)):
        """n_token_labels: the last labels (findings, lobes) read by their own linear head from
        the pooled token grid, which keeps where a finding is (global pooling loses it), on
        detached features: their loss never moves the features the first labels use."""
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, image_size, input_norm)
        self.n_members = max(1, cfg.members)
        # members 2..K (member 1 keeps the single-network names, so older weights still load)
        self.member_backbones = nn.ModuleList(build_backbone(cfg, image_size, input_norm)
                                              for _ in range(self.n_members - 1))
        self.in_channels = getattr(self.backbone.config, "num_channels", 1)
        self.spatial = nn.Identity()  # Grad-CAM target layer
        self.grid = _grid(cfg.n_visual_tokens)
        with torch.no_grad():  # infer the map width once instead of per-architecture arithmetic
            was = self.backbone.training
            self.backbone.eval()
            self.feat_dim = self._map(torch.zeros(1, 1, image_size, image_size)).shape[1]
            self.backbone.train(was)
        self.view_score = nn.Linear(self.feat_dim, 1) if cfg.fusion == "attention" else None
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout),
                                        nn.Linear(self.feat_dim, n_labels - n_token_labels))
        self.member_classifiers = nn.ModuleList(
            nn.Sequential(nn.Dropout(cfg.dropout),
                          nn.Linear(self.feat_dim, n_labels - n_token_labels))
            for _ in range(self.n_members - 1))
        self.token_classifier = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(self.feat_dim * cfg.n_visual_tokens, n_token_labels)) \
            if n_token_labels else None

    def _map(self, x: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """[N, 1, S, S] -> [N, C, h, w] for any backbone kind."""
        if self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)  # grey repeated for RGB weights
        h = (backbone or self.backbone)(pixel_values=x).last_hidden_state
        if h.dim() == 3:  # token sequence (ViT with CLS, Swin without): back to a grid
            side = math.isqrt(h.shape[1])
            if side * side != h.shape[1]:
                h = h[:, 1:]
                side = math.isqrt(h.shape[1])
            h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)
        return h

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        b, v = pixel_values.shape[:2]
        flat = pixel_values.flatten(0, 1)
        maps = [self._map(flat)] + [self._map(flat, bb) for bb in self.member_backbones]
        stacked = maps[0] if len(maps) == 1 else torch.cat(maps)
        fmaps = self.spatial(stacked).chunk(self.n_members)  # K x [B*V, C, h, w]
        fmap = fmaps[0]
        glob = fmap.mean(dim=(2, 3)).view(b, v, -1)
        toks = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)
        toks = toks.reshape(b, v, toks.shape[1], toks.shape[2])
        if self.view_score is not None:
            w = torch.softmax(self.view_score(glob).squeeze(-1), dim=1)
        else:
            w = torch.full((b, v), 1.0 / v, device=glob.device, dtype=glob.dtype)
        glob = (w[..., None] * glob).sum(1)
        toks = (w[..., None, None] * toks).sum(1)
        logits, members = self.classifier(glob), None
        if self.n_members > 1:
            others = [head((w[..., None] * m.mean(dim=(2, 3)).view(b, v, -1)).sum(1))
                      for head, m in zip(self.member_classifiers, fmaps[1:])]
            members = torch.stack([logits] + others, dim=1)
            logits = members.mean(1)
        if self.token_classifier is not None:
            logits = torch.cat([logits, self.token_classifier(toks.detach().flatten(1))], dim=1)
        return EncoderOutput(glob, toks, logits, w, members, fmap)
