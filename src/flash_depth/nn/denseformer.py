"""DenseFormer's depth-weighted average: after each block, a learned mix of every earlier state."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_dims


class DenseFormerMixer(nn.Module):
    """Mixes after block i the i + 2 states ``[B, T, D]`` (the embedding, blocks 0..i's outputs).

    ``weights [layers, layers + 1]``: row i holds block i's mix, its entries past i + 1 unused.
    It starts as the identity (row i picks block i's output), so each block passes on its own
    output, as in a plain residual stack.
    """

    def __init__(self, layers: int):
        super().__init__()
        check_dims(layers=layers)
        self.weights = nn.Parameter(self.identity(layers))

    @staticmethod
    def identity(layers: int) -> torch.Tensor:
        return torch.eye(layers + 1)[1:]

    def forward(self, i: int, states: list[torch.Tensor]) -> torch.Tensor:
        """i: the block just run; states: its i + 2 inputs ``[B, T, D]`` (one shape, floating dtype
        and device) -> ``[B, T, D]``."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.weights.shape[0]:
            raise ValueError(f"i must be a block index in [0, {self.weights.shape[0]}), got {i!r}")
        if not isinstance(states, (list, tuple)):
            raise TypeError(f"states must be a list of tensors [B, T, D], got {type(states).__name__}")
        if len(states) != i + 2:
            raise ValueError(f"states must hold the embedding and blocks 0..{i}'s outputs ({i + 2}), got {len(states)}")
        first = states[0]
        if not isinstance(first, torch.Tensor) or not first.is_floating_point() or first.dim() != 3:
            got = f"{first.dtype} {tuple(first.shape)}" if isinstance(first, torch.Tensor) else type(first).__name__
            raise TypeError(f"states[0] must be a floating-point tensor [B, T, D], got {got}")
        for j, s in enumerate(states[1:], 1):
            if (not isinstance(s, torch.Tensor) or s.shape != first.shape or s.dtype != first.dtype
                    or s.device != first.device):
                got = f"{s.dtype} {tuple(s.shape)} on {s.device}" if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"states[{j}] must be a tensor like states[0] ({first.dtype} {tuple(first.shape)} on "
                                 f"{first.device}), got {got}")
        return sum(a * s for a, s in zip(self.weights[i, : i + 2], states))

    def extra_repr(self) -> str:
        return f"layers={self.weights.shape[0]}"
