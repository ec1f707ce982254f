"""Conversions that are safe at the end of an autograd Function's forward under torch.compile.

A no-op ``.to(dtype)`` or ``.contiguous()`` returns its input itself. When a torch.compile'd autograd
Function returns such a tensor, torch 2.11 takes the output for a traced intermediate and routes its
gradient there: the inputs' gradients came back zero or wrong (pytorch/pytorch#180642's mechanism;
HC/mHC and MoDA on an H200, benchmarks/results/logs/s10_gpu_tests_h200.log and
s11_compiled_fp32_h200.log). These skip the call when it would do nothing.
"""

from __future__ import annotations

import torch


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, or x itself when it already has that dtype."""
    return x if x.dtype == dtype else x.to(dtype)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``, or x itself when it already is."""
    return x if x.is_contiguous() else x.contiguous()
