"""Layers and depth mixers."""

from .attnres import AttnResQueries
from .depth_stream import DepthStream, read_depth, read_moda
from .layers import RMSNorm, Rotary, SwiGLU, apply_rotary
from .moda import DepthKV

__all__ = ["AttnResQueries", "DepthKV", "DepthStream", "RMSNorm", "Rotary", "SwiGLU", "apply_rotary", "read_depth",
           "read_moda"]
