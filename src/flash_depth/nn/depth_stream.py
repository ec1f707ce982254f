"""The depth KV stream: one ``[B, T, L_max, Hk, d]`` buffer for K and one for V per forward.

Published MoDA models re-stack every earlier layer's K/V at each layer (O(L^2) copies and
memory). Here a layer writes its slot in place and later layers read the slice
``[:, :, :n]`` without a copy; :mod:`flash_depth.nn.slot_stream` routes the gradients.
"""

from __future__ import annotations

import torch

from flash_depth.ops import depth_attention, moda_attention
from flash_depth.ops.moda import fused_backward, fused_forward, select_backend
from flash_depth.ops.reference import attention_reference

from .slot_stream import SlotStream


class DepthStream(SlotStream):
    """Depth K/V slots of the tokens of one forward pass."""

    def __init__(self, slots: int):
        super().__init__(slots, slot_dim=2, names=("k", "v"))

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one slot: k, v ``[B, T, Hk, d]`` (the first write fixes shape and dtype)."""
        super().write(k, v)

    def slots(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n (default: all written) slots ``[B, T, n, Hk, d]`` (views, no gradient)."""
        k, v = self.views(n)
        return k, v


class _Read(torch.autograd.Function):
    """MoDA (or depth-only attention when k is None) over the stream's first n slots; the depth
    gradients are added into the stream's gradient buffers."""

    @staticmethod
    def forward(ctx, stream, handle, q, k, v, causal, backend):
        k_depth, v_depth = stream.slots()
        ctx.stream, ctx.n, ctx.has_seq = stream, stream.count, k is not None
        chosen = select_backend(backend, q, k, causal)
        if chosen == "reference":  # plain PyTorch: let autograd differentiate it
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in (q, k, v) if x is not None]
                kd, vd = k_depth.detach().requires_grad_(), v_depth.detach().requires_grad_()
                o, _ = attention_reference(leaves[0], *(leaves[1:] or (None, None)), kd, vd,
                                           causal=causal, scale=q.shape[-1] ** -0.5)
            ctx.graph = (o, leaves + [kd, vd])
            return o.detach()
        ctx.graph = None
        o, lse, state, (q, k, v) = fused_forward(q, k, v, k_depth, v_depth, causal, q.shape[-1] ** -0.5, chosen)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.fused = (state, causal, chosen)
        return o

    @staticmethod
    def backward(ctx, do):
        stream, n = ctx.stream, ctx.n
        grad_k, grad_v = stream.grad_views(n)
        if ctx.graph is not None:
            o, inputs = ctx.graph
            *grads, dkd, dvd = torch.autograd.grad(o, inputs, do)
            ctx.graph = None
            grad_k += dkd
            grad_v += dvd
            dq, dk, dv = grads if ctx.has_seq else (grads[0], None, None)
        else:
            q, k, v, o, lse = ctx.saved_tensors
            state, causal, seq_backend = ctx.fused
            k_depth, v_depth = stream.slots(n)
            dq, dk, dv, _, _ = fused_backward(
                do, q, k, v, k_depth, v_depth, o, lse, state, causal, q.shape[-1] ** -0.5, seq_backend,
                depth_grads_into=(grad_k, grad_v),
            )
        return None, torch.zeros((), device=do.device), dq, dk, dv, None, None


# The reads run eagerly under torch.compile (graph breaks): they route gradients into the in-place
# buffer by hand, and branching on the slot count inside a graph would specialise it per layer.
@torch.compiler.disable
def read_moda(stream: DepthStream, q, k, v, *, causal: bool = True, backend: str = "auto") -> torch.Tensor:
    """MoDA of q ``[B, Tq, Hq, d]`` over sequence k/v and the stream's written depth slots."""
    if stream.count == 0:
        return moda_attention(q, k, v, causal=causal, backend=backend)
    return _read(stream, q, k, v, causal, backend)


@torch.compiler.disable
def read_depth(stream: DepthStream, q, *, backend: str = "auto") -> torch.Tensor:
    """Flash Depth Attention of q ``[B, T, Hq, d]`` over the stream's written slots."""
    if stream.count == 0:
        raise ValueError("read_depth needs at least one written depth slot")
    return _read(stream, q, None, None, False, backend)


def _read(stream: DepthStream, q, k, v, causal: bool, backend: str) -> torch.Tensor:
    handle = stream.read_handle()
    if handle is not None:
        return _Read.apply(stream, handle, q, k, v, causal, backend)
    kd, vd = stream.slots()  # nothing to differentiate through the stream: the plain ops
    if k is None:
        return depth_attention(q, kd, vd, backend=backend)
    return moda_attention(q, k, v, kd, vd, causal=causal, backend=backend)
