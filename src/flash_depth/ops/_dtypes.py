"""A dtype cast that is safe at the end of an autograd Function's forward under torch.compile."""

from __future__ import annotations

import torch


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the call when x already has it. A no-op ``.to`` returns x itself, and
    when a torch.compile'd autograd Function returns it, torch 2.11 sees the output as the same object
    as a traced intermediate and routes the output's gradient to that intermediate: every input's
    gradient came back zero (pytorch/pytorch#180642; HC/mHC on an H200,
    benchmarks/results/logs/s10_gpu_tests_h200.log)."""
    return x if x.dtype == dtype else x.to(dtype)
