"""Ops over sequence and depth: attention, and the dense mix (``dense_mix.py``). Each op: a plain
PyTorch reference, Triton kernels, and one public autograd-aware function."""

from .dense_mix import dense_mix
from .moda import BACKENDS, decode_attention, depth_attention, moda_attention
from .reference import attention_reference

__all__ = ["BACKENDS", "attention_reference", "decode_attention", "dense_mix", "depth_attention", "moda_attention"]
