"""Depth K/V writers for MoDA.

A MoDA attention reads the depth K/V that earlier sublayers wrote for the same token
(:func:`~flash_depth.nn.depth_stream.read_moda`). Attention layers write the K/V they already
computed; :class:`DepthKV` gives any other sublayer (the FFN, in the MoDA paper's default
variant) its own small K/V projection, so that it writes a slot too.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import RMSNorm, apply_rotary


class DepthKV(nn.Module):
    """Projects a sublayer's input to one depth K/V slot.

    ``x [B, T, dim] -> k, v [B, T, kv_heads, head_dim]``. The key is RMS-normalised per head
    (``k_norm=True``, for models whose queries are normalised too) and rotated like the query of
    the same token: a depth logit pairs a query with a key of its own position, so the rotation
    cancels and the logit depends on content alone, as a sequence logit at distance 0 does.

    Args:
        dim: width of the input.
        kv_heads, head_dim: shape of the slot; those of the attention that reads it.
        k_norm: RMS-normalise each key head (a learned weight, initialised to ones).
        eps: the key norm's epsilon.
        bias: a bias on the projection.

    ``proj`` holds K then V: ``proj.weight[: kv_heads * head_dim]`` makes the key.
    """

    def __init__(self, dim: int, kv_heads: int, head_dim: int, *, k_norm: bool = True, eps: float = 1e-6,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, value in (("dim", dim), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got {head_dim}")
        self.dim, self.kv_heads, self.head_dim = dim, kv_heads, head_dim
        self.proj = nn.Linear(dim, 2 * kv_heads * head_dim, bias=bias, device=device, dtype=dtype)
        self.k_norm = RMSNorm(head_dim, eps).to(device=device, dtype=dtype) if k_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
        """x ``[B, T, dim]``; cos, sin ``[T, 1, head_dim/2]`` or ``[B, T, 1, head_dim/2]`` (as
        :class:`~flash_depth.nn.Rotary` returns them), or both None for no rotation.
        Returns k, v ``[B, T, kv_heads, head_dim]``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor [B, T, {self.dim}], got {got}")
        if (cos is None) != (sin is None):
            raise ValueError("pass both cos and sin, or neither (no rotation)")
        B, T, _ = x.shape
        k, v = self.proj(x).view(B, T, 2, self.kv_heads, self.head_dim).unbind(2)
        k = self.k_norm(k)
        if cos is None:
            return k, v
        want = (self.head_dim // 2,)
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() not in (3, 4) or t.shape[-2:] != (1, *want) or t.shape[-3] != T:
                raise ValueError(f"{name} must be [T, 1, {want[0]}] or [B, T, 1, {want[0]}] with T={T}, "
                                 f"got {tuple(t.shape)}")
        return apply_rotary(k, cos, sin), v

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kv_heads={self.kv_heads}, head_dim={self.head_dim}"
