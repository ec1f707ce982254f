"""The depth KV stream: one buffer per forward, written slot by slot, read in place.

Published MoDA models re-stack every earlier layer's K/V at each layer (O(L^2) copies and
memory). Here each forward allocates one ``[B, T, L_max, Hk, d]`` buffer for K and one for V;
a layer writes its slot in place and later layers read the slice ``[:, :, :n]`` without a copy.

Gradients: in-place writes hide the buffer from autograd, so the stream routes them itself.
Each read accumulates the gradient of the slots it read into a float32 gradient buffer; each
write hands its slot's accumulated gradient to the producer. Autograd runs a write's backward
only after every read that depends on it: each write returns a scalar "handle" that the next
write and every later read take as input, so the handles chain all reads after the writes
they follow.
"""

from __future__ import annotations

import torch

from flash_depth.ops import moda_attention


class DepthStream:
    """Depth K/V slots of the tokens of one forward pass."""

    def __init__(self, slots: int):
        self.slots_max = slots
        self.k: torch.Tensor | None = None  # [B, T, slots, Hk, d], allocated at the first write
        self.v: torch.Tensor | None = None
        self.grad_k: torch.Tensor | None = None
        self.grad_v: torch.Tensor | None = None
        self.count = 0
        self.handle: torch.Tensor | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one slot: k, v ``[B, T, Hk, d]`` (the first write fixes shape and dtype)."""
        if self.k is None:
            B, T, Hk, d = k.shape
            self.k = torch.empty((B, T, self.slots_max, Hk, d), dtype=k.dtype, device=k.device)
            self.v = torch.empty_like(self.k)
        if self.count >= self.slots_max:
            raise RuntimeError(f"depth stream is full ({self.slots_max} slots)")
        want = self.k.shape[:2] + self.k.shape[3:]
        if k.shape != want or v.shape != want:
            raise ValueError(f"depth slot must be {tuple(want)}, got k {tuple(k.shape)} and v {tuple(v.shape)}")
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            self.handle = _Write.apply(self, self.count, k, v, self.handle)
        else:
            self.k[:, :, self.count].copy_(k)
            self.v[:, :, self.count].copy_(v)
        self.count += 1

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The written slots ``[B, T, n, Hk, d]`` (views, no gradient)."""
        # .data: views with their own version counter, so later in-place writes to other slots do
        # not invalidate tensors that an earlier read saved for backward (those slots never change).
        return self.k.data[:, :, : self.count], self.v.data[:, :, : self.count]

    def _accumulate(self, n: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        if self.grad_k is None:  # at least float32: the sum over every later reader stays accurate
            dtype = torch.promote_types(self.k.dtype, torch.float32)
            self.grad_k = torch.zeros(self.k.shape, dtype=dtype, device=self.k.device)
            self.grad_v = torch.zeros(self.v.shape, dtype=dtype, device=self.v.device)
        self.grad_k[:, :, :n] += dk
        self.grad_v[:, :, :n] += dv


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream, slot, k, v, prev_handle):
        stream.k[:, :, slot].copy_(k)
        stream.v[:, :, slot].copy_(v)
        ctx.stream, ctx.slot, ctx.has_prev = stream, slot, prev_handle is not None
        return k.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_handle):
        stream, slot = ctx.stream, ctx.slot
        if stream.grad_k is None:  # no read used this stream
            return None, None, None, None, None
        dk = stream.grad_k[:, :, slot].to(stream.k.dtype)
        dv = stream.grad_v[:, :, slot].to(stream.v.dtype)
        prev = torch.zeros((), device=dk.device) if ctx.has_prev else None
        return None, None, dk, dv, prev


class _Read(torch.autograd.Function):
    """moda_attention over the stream's first n slots; depth gradients go into the stream."""

    @staticmethod
    def forward(ctx, stream, handle, q, k, v, causal, backend):
        k_depth, v_depth = stream.slots()
        ctx.stream, ctx.n = stream, stream.count
        ctx.has_seq = k is not None
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() if x is not None else None for x in (q, k, v)]
            kd, vd = k_depth.detach().requires_grad_(), v_depth.detach().requires_grad_()
            if ctx.has_seq:
                o = moda_attention(leaves[0], leaves[1], leaves[2], kd, vd, causal=causal, backend=backend)
            else:
                from flash_depth.ops import depth_attention

                o = depth_attention(leaves[0], kd, vd, backend=backend)
        ctx.graph = (o, [x for x in leaves if x is not None] + [kd, vd])
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        o, inputs = ctx.graph
        grads = torch.autograd.grad(o, inputs, do)
        ctx.graph = None
        ctx.stream._accumulate(ctx.n, grads[-2], grads[-1])
        dq = grads[0]
        dk, dv = (grads[1], grads[2]) if ctx.has_seq else (None, None)
        return None, torch.zeros((), device=do.device), dq, dk, dv, None, None


def read_moda(stream: DepthStream, q, k, v, *, causal: bool = True, backend: str = "auto") -> torch.Tensor:
    """MoDA of q ``[B, Tq, Hq, d]`` over sequence k/v and the stream's written depth slots."""
    if stream.count == 0:
        return moda_attention(q, k, v, causal=causal, backend=backend)
    if not torch.is_grad_enabled() or stream.handle is None:
        kd, vd = stream.slots()
        return moda_attention(q, k, v, kd, vd, causal=causal, backend=backend)
    return _Read.apply(stream, stream.handle, q, k, v, causal, backend)


def read_depth(stream: DepthStream, q, *, backend: str = "auto") -> torch.Tensor:
    """Flash Depth Attention of q ``[B, T, Hq, d]`` over the stream's written slots."""
    if stream.count == 0:
        raise ValueError("read_depth needs at least one written depth slot")
    if not torch.is_grad_enabled() or stream.handle is None:
        from flash_depth.ops import depth_attention

        kd, vd = stream.slots()
        return depth_attention(q, kd, vd, backend=backend)
    return _Read.apply(stream, stream.handle, q, None, None, False, backend)
