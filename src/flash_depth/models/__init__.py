"""The depth-retrieval language model and vision encoder, registered with the transformers Auto classes on import."""

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification, AutoTokenizer,
                          PreTrainedTokenizerFast)

from .configuration_flash_depth import DEPTH_MECHANISMS, PRESETS, FlashDepthConfig
from .modeling_flash_depth import FlashDepthForCausalLM, FlashDepthModel
from .vit import (VIT_MECHANISMS, VIT_PRESETS, FlashDepthViTConfig, FlashDepthViTForImageClassification,
                  FlashDepthViTModel)

AutoConfig.register(FlashDepthConfig.model_type, FlashDepthConfig, exist_ok=True)
AutoModelForCausalLM.register(FlashDepthConfig, FlashDepthForCausalLM, exist_ok=True)
# Checkpoints hold a bare tokenizer.json; transformers 4.x finds no tokenizer class for the model
# type without this (fast_tokenizer_class: the one keyword both 4.x and 5.x take).
AutoTokenizer.register(FlashDepthConfig, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)
AutoConfig.register(FlashDepthViTConfig.model_type, FlashDepthViTConfig, exist_ok=True)
AutoModelForImageClassification.register(FlashDepthViTConfig, FlashDepthViTForImageClassification, exist_ok=True)

__all__ = ["DEPTH_MECHANISMS", "PRESETS", "VIT_MECHANISMS", "VIT_PRESETS", "FlashDepthConfig",
           "FlashDepthForCausalLM", "FlashDepthModel", "FlashDepthViTConfig", "FlashDepthViTForImageClassification",
           "FlashDepthViTModel"]
