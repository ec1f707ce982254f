"""flash-depth: let transformer layers retrieve from earlier layers.

Public ops:
- :func:`moda_attention`: Mixture-of-Depths Attention (sequence + depth KV, one softmax).
- :func:`depth_attention`: Flash Depth Attention (depth KV only).
- :func:`attention_residual`: Attention Residuals read (softmax over earlier layer outputs).
- :func:`attention_residual_merge`: adds one source to a finished read (two-phase inference).

The language model lives in :mod:`flash_depth.models`. Importing the package registers it with
the transformers Auto classes, so ``AutoModelForCausalLM.from_pretrained(checkpoint)`` works
after ``import flash_depth`` alone.
"""

import importlib.util

from .ops import depth_attention, moda_attention
from .ops.attnres import attention_residual, attention_residual_merge

__version__ = "0.1.0"
__all__ = ["__version__", "attention_residual", "attention_residual_merge", "depth_attention", "moda_attention"]

# transformers is a dependency, but the ops above do not need it: an environment without it
# keeps them importable rather than failing here
if importlib.util.find_spec("transformers") is not None:
    from . import models  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM)
