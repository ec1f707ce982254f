"""Layers and depth mixers."""

from .attnres import AttnResQueries
from .denseformer import DenseFormerMixer
from .depth_stream import DepthStream, read_depth, read_moda
from .layers import RMSNorm, Rotary, SwiGLU, apply_rotary
from .moda import DepthKV, DepthRead, MoDAAttention

__all__ = ["AttnResQueries", "DenseFormerMixer", "DepthKV", "DepthRead", "DepthStream", "MoDAAttention", "RMSNorm",
           "Rotary", "SwiGLU", "apply_rotary", "read_depth", "read_moda"]
