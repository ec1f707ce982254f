"""Attention ops over sequence and depth. Each op: a plain PyTorch reference
(``reference.py``), Triton kernels, and one public autograd-aware function."""

from .moda import BACKENDS, decode_attention, depth_attention, moda_attention
from .reference import attention_reference

__all__ = ["BACKENDS", "attention_reference", "decode_attention", "depth_attention", "moda_attention"]
