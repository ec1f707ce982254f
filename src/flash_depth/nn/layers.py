"""Building blocks of the decoder (OLMo2 style: RMSNorm, rotary embeddings, SwiGLU) and of the vision
encoder (DeiT style: a GELU MLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_dims, check_float_tensor, check_int, check_number


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        check_dims(dim=dim)
        check_number("eps", eps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x, "[..., {last}]", self.weight.shape[-1])
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
        check_dims(head_dim=head_dim, max_positions=max_positions)
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        check_number("theta", theta, positive=True)
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta

    def forward(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``start .. start+length-1`` -> cos, sin ``[length, 1, head_dim/2]`` float32."""
        check_int("start", start, 0)
        check_int("length", length, 1)
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
        if positions.dtype == torch.bool or positions.dim() not in (1, 2) or positions.numel() == 0:
            raise ValueError(f"positions must be a non-empty integer tensor [T] or [B, T], got "
                             f"{positions.dtype} {tuple(positions.shape)}")
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
    """x ``[B, T, H, d]`` (or ``[B, T, ..., H, d]`` with matching cos/sin), rotating half-pairs;
    cos, sin ``[T, 1, d/2]`` or ``[B, T, 1, d/2]`` (they broadcast to x's shape, never widen it)."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2 and not x.shape[-1] % 2
            and _broadcasts(cos, x) and _broadcasts(sin, x)):
        _rotary_error(x, cos, sin)
    return rotate(x, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` without its checks (~3 us a call on the host), for layers that checked
    cos/sin against their own q/k shapes once per forward."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def _broadcasts(t, x: torch.Tensor) -> bool:
    """Whether ``t`` is a floating-point tensor that broadcasts to x's shape with ``d/2`` last
    without widening it (shape comparisons only)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() > x.dim() or t.shape[-1] * 2 != x.shape[-1]:
        return False
    return all(a == 1 or a == b for a, b in zip(t.shape[:-1], x.shape[x.dim() - t.dim():-1]))


def _rotary_error(x, cos, sin):
    check_float_tensor("x", x, "[B, T, H, d]")
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"x must be a tensor [B, T, H, d] with an even d, got {tuple(x.shape)}")
    want = (*x.shape[:-1], x.shape[-1] // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        check_float_tensor(name, t, f"broadcastable to {want}")
        if not _broadcasts(t, x):
            raise ValueError(f"{name} must broadcast to x's shape with d/2 last {want} (as [T, 1, d/2] or "
                             f"[B, T, 1, d/2]), got {tuple(t.shape)}")


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        check_dims(dim=dim, hidden=hidden)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x, "[..., {last}]", self.gate_up.in_features)
        return self.from_gate_up(self.gate_up(x))

    def from_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The output from ``gate_up(x)`` ``[..., 2 * hidden]`` computed elsewhere (a decoding
        step takes it from one GEMM with the FFN's depth K/V projection)."""
        width = self.gate_up.out_features
        check_float_tensor("gate_up", gate_up, "[..., {last}]", width)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MLP(nn.Module):
    """The ViT/DeiT feed-forward: ``x [..., dim] -> fc2(GELU(fc1(x))) [..., dim]``, ``fc1`` to
    ``hidden`` features, with biases unless ``bias=False``."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        check_dims(dim=dim, hidden=hidden)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x, "[..., {last}]", self.fc1.in_features)
        return self.fc2(F.gelu(self.fc1(x)))
