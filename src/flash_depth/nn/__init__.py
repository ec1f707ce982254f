"""Layers and depth mixers."""

from .depth_stream import DepthStream, read_depth, read_moda
from .layers import RMSNorm, Rotary, SwiGLU, apply_rotary

__all__ = ["DepthStream", "RMSNorm", "Rotary", "SwiGLU", "apply_rotary", "read_depth", "read_moda"]
