"""Tiny random models for tests of other modules (app, storage, benchmarks). Build in < 2 s."""
from __future__ import annotations

import torch

from mrg_core.models.config import (EncoderConfig, LMConfig, MedVLMConfig, PromptConfig,
                                    ReportModelConfig)
from mrg_core.models.report_model import ReportModel
from mrg_core.preprocess import PreprocessConfig
from mrg_core.text import train_tokenizer

SAMPLE_REPORTS = [
    "The lungs are clear bilaterally.",
    "No pleural effusion or pneumothorax.",
    "Multiple ground-glass opacities in both lungs.",
    "Patchy consolidation in the right lower lobe.",
    "Ground-glass opacity in the left upper lobe.",
    "The heart size is normal.",
    "The mediastinum is unremarkable.",
    "No enlarged lymph nodes in the mediastinum.",
    "Bilateral peripheral ground-glass opacities are seen.",
    "Consolidation with air bronchogram in the left lower lobe.",
    "The trachea and main bronchi are patent.",
    "No obvious abnormality in the lungs.",
    "Interlobular septal thickening in the right lung.",
    "Crazy paving pattern in the right middle lobe.",
    "Small nodules in the right upper lobe.",
    "The lung markings are increased.",
    "Findings are consistent with viral pneumonia.",
    "Pneumonia is likely in both lower lobes.",
    "No signs of pneumonia.",
    "Subpleural linear opacities in the left lower lobe.",
    "The pleura is not thickened.",
    "No pericardial effusion.",
    "The bony thorax is intact.",
    "Mild emphysema in both upper lobes.",
    "Fibrous stripes in the right lower lobe.",
    "The density of both lungs is increased.",
    "Scattered opacities in the peripheral zones of both lungs.",
    "The lesions are absorbed compared with before.",
    "Normal chest CT.",
    "Describe the findings of this chest CT slice.",
]


def tiny_config(method: str = "prompt", family: str = "gpt2", adapter: str = "lora",
                image_size: int = 64) -> ReportModelConfig:
    return ReportModelConfig(
        method=method,
        encoder=EncoderConfig(kind="resnet", hidden_sizes=[16, 32], depths=[1, 1],
                              embedding_size=8, n_visual_tokens=4),
        lm=LMConfig(family=family, n_layer=2, n_embd=64, n_head=2, n_positions=256),
        prompt=PromptConfig(length=4, book_size=3),
        medvlm=MedVLMConfig(num_queries=4, qformer_layers=1, qformer_heads=2,
                            label_embed_dim=8, adapter=adapter, lora_r=4, lora_alpha=8,
                            prefix_length=4),
        preprocess=PreprocessConfig(image_size=image_size),
        name="mrg-studio-tiny", max_report_tokens=64)


def tiny_model(method: str = "prompt", family: str = "gpt2", seed: int = 0,
               texts: list[str] | None = None, adapter: str = "lora",
               members: int = 1) -> ReportModel:
    """A random tiny ReportModel in eval mode (image 64 px, 2-layer width-64 LM)."""
    cfg = tiny_config(method, family, adapter)
    cfg.encoder.members = members
    tok = train_tokenizer(list(texts or SAMPLE_REPORTS) + [cfg.instruction], min_frequency=1)
    torch.manual_seed(seed)
    return ReportModel.build(cfg, tok).eval()
