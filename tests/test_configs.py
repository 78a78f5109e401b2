"""Every training config in configs/ parses and builds its model (random weights, no data)."""
from pathlib import Path

import pytest
import torch

from mrg_core.models import ReportModel, ReportModelConfig
from mrg_core.models.factory import SAMPLE_REPORTS
from mrg_core.text import train_tokenizer
from mrg_core.training import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_a_model_that_runs(path):
    cfg = TrainConfig.load(path)
    model_cfg = ReportModelConfig.from_dict(cfg.model)
    model_cfg.lm.path = None  # architecture only: a local LM folder is not needed here
    phrases = list(model_cfg.finding_phrases.values()) + list(model_cfg.label_phrases)
    tok = train_tokenizer(list(SAMPLE_REPORTS) + phrases + [model_cfg.instruction, ", ."],
                          min_frequency=1)
    torch.manual_seed(0)
    model = ReportModel.build(model_cfg, tok).eval()
    s = model_cfg.preprocess.image_size
    logits = model.encoder(torch.zeros(1, 1, 1, s, s)).logits
    assert logits.shape == (1, len(model_cfg.labels))
