"""Host-side helpers shared by the Triton kernels' launchers."""

from __future__ import annotations

import functools

import torch
import triton


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs get full-precision dots (tf32 would cost ~3e-4 relative error)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids (``triton.cdiv`` costs microseconds per host call)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def head_dim_tile(head_dim: int) -> int:
    """The power-of-two tile (at least 16, ``tl.dot``'s minimum) that holds a head dimension."""
    return max(16, triton.next_power_of_2(head_dim))


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides except in the last dimension."""
    return x if x.stride(-1) == 1 else x.contiguous()
