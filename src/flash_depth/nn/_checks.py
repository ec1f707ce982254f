"""Argument checks shared by the nn layers and streams.

Each raises a ``ValueError`` / ``TypeError`` naming the argument, the value it got and what it
needs. Checks on tensors compare shapes and dtypes only (no device syncs), so they are cheap in a
layer's forward and, under torch.compile, add guards rather than graph breaks.
"""

from __future__ import annotations

import torch

from flash_depth.ops._checks import check_bools, check_int, check_number

__all__ = ["check_bools", "check_choice", "check_dims", "check_float_dtype", "check_float_tensor", "check_int",
           "check_number"]


def check_dims(**dims) -> None:
    """:func:`check_int` (>= 1) of every keyword."""
    for name, value in dims.items():
        check_int(name, value, 1)


def check_choice(name: str, value, allowed: tuple) -> None:
    """ValueError unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_float_tensor(name: str, x, layout: str, last: int | None = None) -> None:
    """TypeError unless ``x`` is a floating-point tensor; ValueError unless its last dimension is
    ``last`` (when given). ``layout`` is what the message says it should be, e.g. ``"[..., {last}]"``
    (formatted only for a message: the check itself is a few comparisons, cheap in a forward)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a floating-point tensor {layout.format(last=last)}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor {layout.format(last=last)}, got dtype {x.dtype}")
    if last is not None and (x.dim() == 0 or x.shape[-1] != last):
        raise ValueError(f"{name} must be a tensor {layout.format(last=last)}, got {tuple(x.shape)}")


def check_float_dtype(dtype, name: str = "dtype") -> None:
    """TypeError unless ``dtype`` is None or a floating-point torch.dtype."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{name} must be None or a floating-point torch.dtype, got {dtype!r}")
