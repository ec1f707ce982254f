"""MUDDFormer: multiway dynamic dense connections (Caiyun-AI, ICML 2025; SPEC 6, 10).

Every block output is kept: ``X_0`` (the embedding), ``X_1 .. X_i``, each ``[B, T, D]``. After block i,
per token and per way s in (q, k, v, r):

    A     = W2 gelu(W1 rmsnorm(X_i)) + b       # [B, T, ways, i+1]; rmsnorm without a learned scale
    In_s  = sum_j A[s, j] X_j                  # [B, T, D]

q, k, v feed the next block's attention projections (each through its own pre-norm), r is its
residual input. After the last block a single way is mixed: the stack's output (before the final norm).

Checked against ``Caiyun-AI/MUDDFormer``: ``pytorch/muddformer/modeling_muddformer.py`` (forward and
``MultiwayDynamicDenseBlock``) for the formula and ``jax/MaxText/layers/llama2.py`` (the training code)
for the init. Matches: the unscaled RMS norm of the current output, two bias-free linears with GELU
between, the hidden width ``ways * (i+1)`` (times 4 for the last block) rounded to a multiple of 64,
the static bias added to the dynamic weights with no normalisation of A, one way after the last
block; init W1 ~ N(0, 1/D) (fan-in), W2 = 0 and b = (0, .., 0, 1) for every way, so all four ways
start as the plain residual ``X_i``. Differences: the reference rounds to ``(h // 64 + 1) * 64``
(one extra 64 when h is a multiple of 64), here to the next multiple; the JAX code's GELU is the tanh
approximation, the PyTorch one (and this one) the exact erf GELU; the JAX code's optional
``mudd_prenorm``/``mudd_postnorm`` (normalised kept outputs, off by default) are not built.

The kept outputs live in one :class:`MuddStream` buffer ``[L+1, B, T, D]`` written in place
(:mod:`flash_depth.nn.slot_stream`): a mix reads the slice ``[:i+1]`` without restacking, and its
backward adds the outputs' gradients into the stream's float32 gradient buffer, two mixes per
pass over it (:meth:`MuddStream.read_backward`). The mixes are ops/dense_mix.py: Triton kernels
on CUDA that read each kept output once per pass for all four ways, plain PyTorch elsewhere.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from flash_depth.ops.dense_mix import (
    MIX_BACKENDS,
    mix_backward,
    mix_forward,
    mix_reference,
    mix_reference_backward,
    select_mix_backend,
)

from ._checks import check_choice, check_dims, check_number
from ._recorder import record
from .slot_stream import SlotStream


class DenseWeights(nn.Module):
    """Per-token weights ``[B, T, ways, sources]`` over the kept outputs, from the current ``[B, T, D]``."""

    def __init__(self, dim: int, sources: int, ways: int, expand: int = 1, eps: float = 1e-6, device=None,
                 dtype=None):
        super().__init__()
        hidden = 64 * math.ceil(ways * sources * expand / 64)  # a GEMM-friendly width
        self.sources, self.ways, self.eps = sources, ways, eps
        self.w1 = nn.Linear(dim, hidden, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden, ways * sources, bias=False, device=device, dtype=dtype)
        self.bias = nn.Parameter(self.residual_bias(ways, sources, device=device, dtype=dtype))
        nn.init.normal_(self.w1.weight, std=dim**-0.5)  # fan-in, as the reference
        nn.init.zeros_(self.w2.weight)

    @staticmethod
    def residual_bias(ways: int, sources: int, device=None, dtype=None) -> torch.Tensor:
        """The init of ``bias`` ``[ways, sources]``: every way one-hot on the latest output, so with
        W2 = 0 each way starts as that output (a plain residual)."""
        bias = torch.zeros(ways, sources, device=device, dtype=dtype)
        bias[:, -1] = 1
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x.to(self.w1.weight.dtype), (x.shape[-1],), None, self.eps)
        # the bias's shape, not the int attributes: torch.compile would specialise on those, once per block
        return self.w2(F.gelu(self.w1(x))).view(*x.shape[:-1], *self.bias.shape) + self.bias


class MuddStream(SlotStream):
    """The kept block outputs ``X_0 .. X_i`` ``[B, T, D]`` of one forward (slot 0: the embedding)."""

    def __init__(self, slots: int, dtype: torch.dtype | None = None):
        super().__init__(slots, slot_dim=0, names=("states",), dtype=dtype)
        # (forward, backward) with the signatures of ops.dense_mix.mix_reference(_backward)
        self.kernels = (mix_reference, mix_reference_backward)
        # (a, dout) of a mix whose terms of the gradients of all but its newest output wait for
        # the next mix's backward: both are added in one read-modify-write of the float32 buffer
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def states(self, n: int | None = None) -> torch.Tensor:
        """The first n (default: all written) outputs ``[n, B, T, D]`` (a view, no gradient)."""
        return self.views(n)[0]

    def read_backward(self, a: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
        """Backward of the mix a ``[B, T, S, n]`` for dout ``[S, B, T, D]``: returns da. On
        return the gradient of X_(n-1), whose write's backward comes next, is complete. Backward
        runs the mixes newest first; every other one defers its terms for X_0 .. X_(n-2) to the
        next (the mix over one output fewer), which adds both, so each gradient buffer element is
        read and written once per two mixes."""
        n = a.shape[-1]
        pending, self.pending = self.pending, None
        if pending is not None and pending[0].shape[-1] != n + 1:  # not the mix before this one
            self._flush(pending)
            pending = None
        (grad,) = self.grad_views(n)
        if pending is None:
            self.pending = (a, dout)
            return self.kernels[1](a, self.states(n), dout, grad, grad_from=n - 1)
        return self.kernels[1](a, self.states(n), dout, grad, pending=pending)

    def _flush(self, pending) -> None:
        """Adds a deferred mix's terms for its outputs but the newest (its da is recomputed, unused)."""
        a, dout = pending
        m = a.shape[-1] - 1
        if m > 0:
            self.kernels[1](a[..., :m], self.states(m), dout, self.grad_views(m)[0])

    def slot_grads(self, slot, dtypes):
        """As :meth:`SlotStream.slot_grads`, after adding a deferred mix's terms if it owes this slot."""
        if self.pending is not None and slot < self.pending[0].shape[-1] - 1:
            pending, self.pending = self.pending, None
            self._flush(pending)
        return super().slot_grads(slot, dtypes)

    @torch.compiler.disable  # reads of the in-place buffer run eagerly under torch.compile
    def mix(self, a: torch.Tensor, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """a ``[B, T, S, n]`` with n the written outputs -> S mixes ``[B, T, D]`` in ``out_dtype``
        (default: the stream's)."""
        if not isinstance(a, torch.Tensor) or a.dim() != 4 or a.shape[-1] != self.count:
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(f"a must be a tensor [B, T, ways, {self.count} written outputs], got {got}")
        states = self.states()
        out_dtype = out_dtype or states.dtype
        handle = self.read_handle()
        if torch.is_grad_enabled() and (handle is not None or a.requires_grad):
            return tuple(_Mix.apply(self, handle, a, out_dtype).unbind(0))
        return tuple(self.kernels[0](a, states, out_dtype).unbind(0))


class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream, handle, a, out_dtype):
        ctx.stream, ctx.has_handle = stream, handle is not None
        ctx.save_for_backward(a)
        return stream.kernels[0](a, stream.states(), out_dtype)

    @staticmethod
    def backward(ctx, dout):
        (a,) = ctx.saved_tensors
        da = ctx.stream.read_backward(a, dout)
        return None, torch.zeros((), device=dout.device) if ctx.has_handle else None, da, None


class MuddConnections(nn.Module):
    """The dense-connection MLPs of a stack of ``num_layers`` blocks.

    ``forward(stream, x)`` appends block i's output ``x = X_i`` ``[B, T, D]`` to ``stream`` (holding
    ``X_0 .. X_{i-1}``, 1 <= i <= num_layers) and returns the next block's inputs ``(x_q, x_k, x_v,
    x_r)``, each ``[B, T, D]`` in the stream's dtype; after the last block (i == num_layers) it returns
    ``(x_out,)``. Block 1 takes ``X_0`` for every way. Start a forward with :meth:`new_stream`.
    ``backend`` picks where the mixes run (ops/dense_mix.py): "auto" (the Triton kernels on CUDA),
    "reference" or "triton".
    """

    ways = ("q", "k", "v", "r")

    def __init__(self, dim: int, num_layers: int, last_expand: int = 4, eps: float = 1e-6, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__()
        check_dims(dim=dim, num_layers=num_layers, last_expand=last_expand)
        check_number("eps", eps)
        check_choice("backend", backend, MIX_BACKENDS)
        self.dim, self.num_layers, self.backend = dim, num_layers, backend
        self.weights = nn.ModuleList(
            DenseWeights(dim, i + 1, 1 if i == num_layers else len(self.ways), last_expand if i == num_layers else 1,
                         eps, device, dtype)
            for i in range(1, num_layers + 1)
        )
        self.reference = (mix_reference, mix_reference_backward)  # the mix where the Triton kernels do not run

    def new_stream(self, x0: torch.Tensor, dtype: torch.dtype | None = None) -> MuddStream:
        """A stream for one forward holding ``X_0 = x0`` ``[B, T, D]``; ``dtype`` (default x0's) is
        what the outputs are stored and mixed in. Its mixes run on ``backend`` (ops/dense_mix.py;
        "auto": the Triton kernels on CUDA)."""
        self._check_x(x0, "x0")
        stream = MuddStream(self.num_layers + 1, dtype=dtype)
        stream.write(x0)
        if select_mix_backend(self.backend, stream.states(), len(self.ways)) == "triton":
            stream.kernels = (partial(mix_forward, backend="triton"), partial(mix_backward, backend="triton"))
        else:
            stream.kernels = self.reference
        return stream

    def compile_mixing(self, **options) -> None:
        """``torch.compile`` the reference mix (its forward and backward; the path wherever the
        Triton kernels do not run, e.g. CPU) with dynamic shapes by default: one graph serves every
        depth. ``options`` go to ``torch.compile``. The weight MLPs stay eager: torch.compile keeps
        parameter shapes static, so each block's would be a graph of its own."""
        options = {"dynamic": True, **options}
        self.reference = tuple(torch.compile(fn, **options) for fn in (mix_reference, mix_reference_backward))

    def mix_weights(self, stream: MuddStream, x: torch.Tensor) -> torch.Tensor:
        """A ``[B, T, ways, i+1]`` after block i (ways = 4, or 1 after the last block), from its output x."""
        self._check(stream, x)
        return self.weights[stream.count - 1](x)

    def forward(self, stream: MuddStream, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.mix_weights(stream, x)
        record(self, "mudd", stream.count - 1, a)  # the index of the block whose output x is
        stream.write(x)
        return stream.mix(a)

    def _check(self, stream, x):
        if not isinstance(stream, MuddStream):
            raise TypeError(f"stream must be a MuddStream (from new_stream), got {type(stream).__name__}")
        if not 1 <= stream.count <= self.num_layers:
            raise ValueError(f"stream must hold X_0 .. X_(i-1) for 1 <= i <= num_layers={self.num_layers}, "
                             f"got {stream.count} outputs")
        self._check_x(x, "x")
        if x.shape != stream.slot_shape():
            raise ValueError(f"x must have the stream's shape {list(stream.slot_shape())}, got {list(x.shape)}")

    def _check_x(self, x, name):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a tensor [B, T, {self.dim}], got {got}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor [B, T, {self.dim}], got dtype {x.dtype}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_layers={self.num_layers}"
