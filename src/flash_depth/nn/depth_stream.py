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

from flash_depth.ops import depth_attention, moda_attention
from flash_depth.ops.moda import fused_backward, fused_forward, select_backend
from flash_depth.ops.reference import attention_reference


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

    def close(self) -> None:
        """Call once the last read is done: drops the handle, which would otherwise keep the
        stream alive in a reference cycle (stream -> handle -> its autograd node -> stream)
        until Python's garbage collector runs, holding the buffers' memory."""
        self.handle = None

    def slots(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n (default: all written) slots ``[B, T, n, Hk, d]`` (views, no gradient)."""
        n = self.count if n is None else n
        # .data: views with their own version counter, so later in-place writes to other slots do
        # not invalidate tensors that an earlier read saved for backward (those slots never change).
        return self.k.data[:, :, :n], self.v.data[:, :, :n]

    def ensure_grad_buffers(self) -> None:
        if self.grad_k is None:  # at least float32: the sum over every later reader stays accurate
            dtype = torch.promote_types(self.k.dtype, torch.float32)
            self.grad_k = torch.zeros(self.k.shape, dtype=dtype, device=self.k.device)
            self.grad_v = torch.zeros(self.v.shape, dtype=dtype, device=self.v.device)


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
        o, lse, state, seq_backend = fused_forward(q, k, v, k_depth, v_depth, causal, q.shape[-1] ** -0.5, chosen,
                                                   fallback=backend == "auto")
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.fused = (state, causal, seq_backend)
        return o

    @staticmethod
    def backward(ctx, do):
        stream, n = ctx.stream, ctx.n
        stream.ensure_grad_buffers()
        if ctx.graph is not None:
            o, inputs = ctx.graph
            *grads, dkd, dvd = torch.autograd.grad(o, inputs, do)
            ctx.graph = None
            stream.grad_k[:, :, :n] += dkd
            stream.grad_v[:, :, :n] += dvd
            dq, dk, dv = grads if ctx.has_seq else (grads[0], None, None)
        else:
            q, k, v, o, lse = ctx.saved_tensors
            state, causal, seq_backend = ctx.fused
            k_depth, v_depth = stream.slots(n)
            dq, dk, dv, _, _ = fused_backward(
                do, q, k, v, k_depth, v_depth, o, lse, state, causal, q.shape[-1] ** -0.5, seq_backend,
                depth_grads_into=(stream.grad_k[:, :, :n], stream.grad_v[:, :, :n]),
            )
        return None, torch.zeros((), device=do.device), dq, dk, dv, None, None


def read_moda(stream: DepthStream, q, k, v, *, causal: bool = True, backend: str = "auto") -> torch.Tensor:
    """MoDA of q ``[B, Tq, Hq, d]`` over sequence k/v and the stream's written depth slots."""
    if stream.count == 0:
        return moda_attention(q, k, v, causal=causal, backend=backend)
    return _read(stream, q, k, v, causal, backend)


def read_depth(stream: DepthStream, q, *, backend: str = "auto") -> torch.Tensor:
    """Flash Depth Attention of q ``[B, T, Hq, d]`` over the stream's written slots."""
    if stream.count == 0:
        raise ValueError("read_depth needs at least one written depth slot")
    return _read(stream, q, None, None, False, backend)


def _read(stream: DepthStream, q, k, v, causal: bool, backend: str) -> torch.Tensor:
    if torch.is_grad_enabled() and stream.handle is not None:
        return _Read.apply(stream, stream.handle, q, k, v, causal, backend)
    kd, vd = stream.slots()  # nothing to differentiate through the stream: the plain ops
    if k is None:
        return depth_attention(q, kd, vd, backend=backend)
    return moda_attention(q, k, v, kd, vd, causal=causal, backend=backend)
