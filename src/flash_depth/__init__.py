"""flash-depth: let transformer layers retrieve from earlier layers.

Public ops:
- :func:`moda_attention`: Mixture-of-Depths Attention (sequence + depth KV, one softmax).
- :func:`depth_attention`: Flash Depth Attention (depth KV only).
"""

from .ops import depth_attention, moda_attention

__version__ = "0.1.0"
__all__ = ["__version__", "depth_attention", "moda_attention"]
