"""The depth-retrieval language model, registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_flash_depth import DEPTH_MECHANISMS, PRESETS, FlashDepthConfig
from .modeling_flash_depth import FlashDepthForCausalLM, FlashDepthModel

AutoConfig.register(FlashDepthConfig.model_type, FlashDepthConfig, exist_ok=True)
AutoModelForCausalLM.register(FlashDepthConfig, FlashDepthForCausalLM, exist_ok=True)

__all__ = ["DEPTH_MECHANISMS", "PRESETS", "FlashDepthConfig", "FlashDepthForCausalLM", "FlashDepthModel"]
