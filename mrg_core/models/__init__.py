"""Report-generation models: MRG-LLM customized prompts ("prompt", "promptbook") and MedVLM."""
from mrg_core.models.config import (EncoderConfig, LMConfig, MedVLMConfig, PromptConfig,
                                    ReportModelConfig)
from mrg_core.models.factory import tiny_config, tiny_model
from mrg_core.models.generation import GenerationSettings
from mrg_core.models.report_model import EncodedStudy, Prediction, ReportModel

__all__ = ["ReportModel", "ReportModelConfig", "EncoderConfig", "LMConfig", "PromptConfig",
           "MedVLMConfig", "GenerationSettings", "Prediction", "EncodedStudy", "tiny_model",
           "tiny_config"]
