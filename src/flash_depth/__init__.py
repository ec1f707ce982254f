"""flash-depth: let transformer layers retrieve from earlier layers.

Public ops:
- :func:`moda_attention`: Mixture-of-Depths Attention (sequence + depth KV, one softmax).
- :func:`depth_attention`: Flash Depth Attention (depth KV only).
- :func:`attention_residual`: Attention Residuals read (softmax over earlier layer outputs).
- :func:`attention_residual_merge`: adds one source to a finished read (two-phase inference).

The language model lives in :mod:`flash_depth.models` (imported on demand: it needs transformers).
"""

from .ops import depth_attention, moda_attention
from .ops.attnres import attention_residual, attention_residual_merge

__version__ = "0.1.0"
__all__ = ["__version__", "attention_residual", "attention_residual_merge", "depth_attention", "moda_attention"]
