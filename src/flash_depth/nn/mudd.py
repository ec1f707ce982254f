"""MUDDFormer: multiway dynamic dense connections (Caiyun-AI, ICML 2025; SPEC 6, 10).

Every block output is kept: ``X_0`` (the embedding), ``X_1 .. X_i``, each ``[B, T, D]``. After block i,
per token and per way s in (q, k, v, r):

    A     = W2 gelu(W1 rmsnorm(X_i)) + b       # [B, T, ways, i+1]; rmsnorm without a learned scale
    In_s  = sum_j A[s, j] X_j                  # [B, T, D]

q, k, v feed the next block's attention projections, r is its residual input. After the last block a
single way is mixed: the stack's output (before the final norm).

Checked against ``Caiyun-AI/MUDDFormer``: ``pytorch/muddformer/modeling_muddformer.py`` (forward and
``MultiwayDynamicDenseBlock``) for the formula and ``jax/MaxText/layers/llama2.py`` (the training code)
for the init. Matches: the unscaled RMS norm of the current output, two bias-free linears with GELU
between, the hidden width ``ways * (i+1)`` (times 4 for the last block) rounded to a multiple of 64,
the static bias added to the dynamic weights with no normalisation of A, one way after the last
block; init W1 ~ N(0, 1/D) (fan-in), W2 = 0 and b = (0, .., 0, 1) for every way, so all four ways
start as the plain residual ``X_i``. Differences: the reference rounds to ``(h // 64 + 1) * 64``
(one extra 64 when h is a multiple of 64), here to the next multiple; the JAX code's GELU is the tanh
approximation, the PyTorch one (and this one) the exact erf GELU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DenseWeights(nn.Module):
    """Per-token weights ``[B, T, ways, sources]`` over the kept outputs, from the current ``[B, T, D]``."""

    def __init__(self, dim: int, sources: int, ways: int, expand: int = 1, eps: float = 1e-6, device=None,
                 dtype=None):
        super().__init__()
        hidden = 64 * math.ceil(ways * sources * expand / 64)  # a GEMM-friendly width
        self.sources, self.ways, self.eps = sources, ways, eps
        self.w1 = nn.Linear(dim, hidden, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.w1.weight, std=dim**-0.5)
        self.w2 = nn.Linear(hidden, ways * sources, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.w2.weight)
        bias = torch.zeros(ways, sources, device=device, dtype=dtype)
        bias[:, -1] = 1  # every way starts as the latest output: a plain residual
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x.to(self.w1.weight.dtype), (x.shape[-1],), None, self.eps)
        a = self.w2(F.gelu(self.w1(x))).unflatten(-1, (self.ways, self.sources))
        return a + self.bias


class MuddConnections(nn.Module):
    """The dense-connection MLPs of a stack of ``num_layers`` blocks.

    ``forward(states)`` with ``states = [X_0, .., X_i]`` (each ``[B, T, D]``, 1 <= i <= num_layers) returns
    the next block's inputs ``(x_q, x_k, x_v, x_r)``, each ``[B, T, D]`` in the states' dtype; after the
    last block (i == num_layers) it returns ``(x_out,)``. Block 1 takes ``X_0`` for every way.
    """

    ways = ("q", "k", "v", "r")

    def __init__(self, dim: int, num_layers: int, last_expand: int = 4, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        for name, value in (("dim", dim), ("num_layers", num_layers), ("last_expand", last_expand)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim, self.num_layers = dim, num_layers
        self.weights = nn.ModuleList(
            DenseWeights(dim, i + 1, 1 if i == num_layers else len(self.ways), last_expand if i == num_layers else 1,
                         eps, device, dtype)
            for i in range(1, num_layers + 1)
        )

    def mix_weights(self, states: list[torch.Tensor]) -> torch.Tensor:
        """``[X_0 .. X_i]`` -> A ``[B, T, ways, i+1]`` (ways = 4, or 1 after the last block)."""
        self._check(states)
        return self.weights[len(states) - 2](states[-1])

    def forward(self, states: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        a = self.mix_weights(states).to(states[-1].dtype)
        # a running sum, not a stack: stacking would copy (and save for backward) all i+1 outputs per block
        outs = []
        for s in range(a.shape[-2]):
            out = a[..., s, 0, None] * states[0]
            for j in range(1, len(states)):
                out = out + a[..., s, j, None] * states[j]
            outs.append(out)
        return tuple(outs)

    def _check(self, states):
        if not isinstance(states, (list, tuple)) or not all(isinstance(x, torch.Tensor) for x in states):
            raise TypeError(f"states must be a list of tensors [B, T, D], got {type(states).__name__}")
        if not 2 <= len(states) <= self.num_layers + 1:
            raise ValueError(f"states must hold X_0 .. X_i for 1 <= i <= num_layers={self.num_layers}, "
                             f"got {len(states)} tensors")
        shape = states[0].shape
        if len(shape) != 3 or shape[-1] != self.dim or any(x.shape != shape for x in states):
            raise ValueError(f"states must all have shape [B, T, {self.dim}], got {[list(x.shape) for x in states]}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_layers={self.num_layers}"
