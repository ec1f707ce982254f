"""DenseFormer's depth-weighted average: after each block, a learned mix of every earlier state."""

from __future__ import annotations

import torch
from torch import nn


class DenseFormerMixer(nn.Module):
    """Mixes after block i the i + 2 states ``[B, T, D]`` (the embedding, blocks 0..i's outputs).

    ``weights [layers, layers + 1]``: row i holds block i's mix, its entries past i + 1 unused.
    It starts as the identity (row i picks block i's output), so each block passes on its own
    output, as in a plain residual stack.
    """

    def __init__(self, layers: int):
        super().__init__()
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        self.weights = nn.Parameter(self.identity(layers))

    @staticmethod
    def identity(layers: int) -> torch.Tensor:
        return torch.eye(layers + 1)[1:]

    def forward(self, i: int, states: list[torch.Tensor]) -> torch.Tensor:
        """i: the block just run; states: its i + 2 inputs ``[B, T, D]`` -> ``[B, T, D]``."""
        if not isinstance(i, int) or not 0 <= i < self.weights.shape[0]:
            raise ValueError(f"i must be a block index in [0, {self.weights.shape[0]}), got {i!r}")
        if len(states) != i + 2:
            raise ValueError(f"states must hold the embedding and blocks 0..{i}'s outputs ({i + 2}), got {len(states)}")
        return sum(a * s for a, s in zip(self.weights[i, : i + 2], states))

    def extra_repr(self) -> str:
        return f"layers={self.weights.shape[0]}"
