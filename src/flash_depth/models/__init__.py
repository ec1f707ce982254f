"""The depth-retrieval language model, registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .configuration_flash_depth import DEPTH_MECHANISMS, PRESETS, FlashDepthConfig
from .modeling_flash_depth import FlashDepthForCausalLM, FlashDepthModel

AutoConfig.register(FlashDepthConfig.model_type, FlashDepthConfig, exist_ok=True)
AutoModelForCausalLM.register(FlashDepthConfig, FlashDepthForCausalLM, exist_ok=True)
# Checkpoints hold a bare tokenizer.json; transformers 4.x finds no tokenizer class for the model
# type without this (fast_tokenizer_class: the one keyword both 4.x and 5.x take).
AutoTokenizer.register(FlashDepthConfig, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)

__all__ = ["DEPTH_MECHANISMS", "PRESETS", "FlashDepthConfig", "FlashDepthForCausalLM", "FlashDepthModel"]
