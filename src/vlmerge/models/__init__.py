"""Modality-specific (multiway) and modality-agnostic vision-language transformers."""

from vlmerge.models.checkpoint import load_model, save_model
from vlmerge.models.config import ExpertPlacement, ModelConfig
from vlmerge.models.factory import MODEL_SIZES, count_parameters, create_model, model_config
from vlmerge.models.multiway import Multiway, multiway, select_expert
from vlmerge.models.transformer import EncoderOutput, VLTransformer

__all__ = [
    "EncoderOutput",
    "ExpertPlacement",
    "MODEL_SIZES",
    "ModelConfig",
    "Multiway",
    "VLTransformer",
    "count_parameters",
    "create_model",
    "load_model",
    "save_model",
    "model_config",
    "multiway",
    "select_expert",
]
