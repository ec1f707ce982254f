"""Building blocks of the decoder (OLMo2 style: RMSNorm, rotary embeddings, SwiGLU) and of the vision
encoder (DeiT style: a GELU MLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # bf16 activations under autocast with a float32 weight: PyTorch's fused kernel refuses
        # mixed dtypes and falls back to ~6 elementwise kernels. Normalising without the weight
        # keeps the fused kernel; like the fallback, the result has the activations' dtype.
        return F.rms_norm(x, (x.shape[-1],), None, self.eps) * self.weight.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position tables for positions ``[0, max_positions)``, computed per call (no buffers,
    so nothing is left uninitialised when a checkpoint is loaded onto the meta device)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta

    def forward(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``start .. start+length-1`` -> cos, sin ``[length, 1, head_dim/2]`` float32."""
        if start + length > self.max_positions:
            raise ValueError(
                f"positions up to {start + length - 1} are past the rotary limit max_position_embeddings="
                f"{self.max_positions}; use shorter sequences or a config with a larger limit"
            )
        return self.tables(torch.arange(start, start + length, device=device))

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit positions, an integer tensor ``[T]`` or ``[B, T]`` (e.g. restarting at each
        document) -> cos, sin ``[..., T, 1, head_dim/2]`` float32. Reads the smallest and largest
        position to check them (one device sync)."""
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex():
            got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise TypeError(f"positions must be an integer tensor [T] or [B, T], got {got}")
        low, high = torch.stack([positions.min(), positions.max()]).tolist()
        if low < 0 or high >= self.max_positions:
            raise ValueError(f"positions must lie in [0, max_position_embeddings={self.max_positions}), got "
                             f"values from {low} to {high}")
        return self.tables(positions)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`at`, without the range check and its device sync: for callers that bound the
        positions themselves (a decoding step on a cache no longer than ``max_positions``)."""
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        angles = positions.to(torch.float32)[..., None] / (self.theta**exponent)
        return angles.cos()[..., None, :], angles.sin()[..., None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, T, H, d]`` (or ``[B, T, ..., H, d]`` with matching cos/sin), rotating half-pairs."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_gate_up(self.gate_up(x))

    def from_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The output from ``gate_up(x)`` ``[..., 2 * hidden]`` computed elsewhere (a decoding
        step takes it from one GEMM with the FFN's depth K/V projection)."""
        width = self.gate_up.out_features
        if not isinstance(gate_up, torch.Tensor) or gate_up.dim() == 0 or gate_up.shape[-1] != width:
            got = tuple(gate_up.shape) if isinstance(gate_up, torch.Tensor) else type(gate_up).__name__
            raise ValueError(f"gate_up must be a tensor [..., {width}], got {got}")
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MLP(nn.Module):
    """The ViT/DeiT feed-forward: ``x [..., dim] -> fc2(GELU(fc1(x))) [..., dim]``, ``fc1`` to
    ``hidden`` features, with biases unless ``bias=False``."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
