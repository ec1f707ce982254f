"""Dense mix: S per-token weighted sums of n kept outputs (MUDDFormer's multiway read; SPEC 10).

    out[s] = sum_j a[..., s, j] X_j          a [B, T, S, n], X (states) [n, B, T, D] -> out [S, B, T, D]
    da[..., s, j] = <dout_s, X_j>            dX_j = sum_s a[..., s, j] dout_s

Backends: ``"reference"`` (plain PyTorch, the CPU path; its broadcast-and-sum form is what
``torch.compile`` fuses), ``"triton"`` (ops/dense_mix_triton.py: each state read once per pass
for all S ways), ``"auto"`` (Triton on CUDA, reference otherwise).

Public: :func:`dense_mix` (autograd-aware), and :func:`mix_forward` / :func:`mix_backward`, the
same without autograd, whose backward adds the states' gradient into a float32 buffer in place
(the model's stream, nn/mudd.py, where every later mix adds into the gradient of a kept output).
"""

from __future__ import annotations

import torch

from ._checks import shape_of, triton_usable
from ._aliasing import to_dtype

MIX_BACKENDS = ("auto", "reference", "triton")
MAX_WAYS = 4  # the Triton kernels unroll the ways (ops/dense_mix_triton.py)


def _check(a, states) -> None:
    if not isinstance(states, torch.Tensor) or states.dim() != 4 or states.numel() == 0:
        raise ValueError(f"states must be a non-empty tensor [n, B, T, D], got {shape_of(states)}")
    n, B, T, _ = states.shape
    if not isinstance(a, torch.Tensor) or a.dim() != 4 or a.shape[:2] != (B, T) or a.shape[3] != n or a.shape[2] == 0:
        raise ValueError(f"a must be a tensor [B={B}, T={T}, S, n={n}] with S >= 1, got {shape_of(a)}")
    for name, x in (("a", a), ("states", states)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if a.device != states.device:
        raise ValueError(f"a is on {a.device} but states is on {states.device}")


def _check_on(name: str, x: torch.Tensor, states: torch.Tensor) -> None:
    """x (one of the backward's tensors, shape already checked) is floating point on the states' device."""
    if not x.is_floating_point() or x.device != states.device:
        raise TypeError(f"{name} must be a floating-point tensor on {states.device}, got {x.dtype} on {x.device}")


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")


def select_mix_backend(backend: str, states: torch.Tensor, ways: int = 1) -> str:
    """The backend ``backend`` resolves to for ``states`` and ``ways`` (S) mixes ("reference" or "triton")."""
    if backend not in MIX_BACKENDS:
        raise ValueError(f"backend must be one of {MIX_BACKENDS}, got {backend!r}")
    if backend == "auto":
        fused = states.is_cuda and states.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return "triton" if fused and ways <= MAX_WAYS else "reference"
    if backend == "triton":
        if ways > MAX_WAYS:
            raise ValueError(f"backend='triton' mixes at most {MAX_WAYS} ways at once, got {ways}")
        if states.dtype == torch.float64:
            raise TypeError("backend='triton' takes float16, bfloat16 or float32 states, got float64")
        if not triton_usable(states):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {states.device}")
    return backend


def mix_reference(a: torch.Tensor, states: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Plain PyTorch forward: ``[S, B, T, D]`` in ``out_dtype``."""
    if torch.compiler.is_compiling():
        # Inductor fuses the product into one reduction over j: every state is read once, in
        # float32, and no [S, n, B, T, D] temporary is formed
        return to_dtype((a.permute(2, 3, 0, 1)[..., None] * states[None].float()).sum(1), out_dtype)
    # eager: one batched GEMM over tokens (the states are read in place: batch stride D, row stride B*T*D)
    out = torch.bmm(a.flatten(0, 1).to(states.dtype), states.flatten(1, 2).transpose(0, 1))
    return to_dtype(out.transpose(0, 1).unflatten(1, a.shape[:2]), out_dtype)


def mix_reference_backward(a: torch.Tensor, states: torch.Tensor, dout: torch.Tensor, grad_states: torch.Tensor,
                           pending: tuple[torch.Tensor, torch.Tensor] | None = None,
                           grad_from: int = 0) -> torch.Tensor:
    """Plain PyTorch backward: adds d states[grad_from:] (and the pending read's terms, see
    :func:`mix_backward`) into ``grad_states`` (float32 or float64) in place; returns da
    ``[B, T, S, n]`` in a's dtype."""
    # (weights, dout, first state) of each read whose terms join the gradient
    terms = [(a, dout, grad_from)] + ([] if pending is None else [(pending[0][..., :states.shape[0]], pending[1], 0)])
    if torch.compiler.is_compiling():
        da = (dout[:, None].float() * states[None].float()).sum(-1).permute(2, 3, 0, 1)
        for w, d, start in terms:
            grad_states[start:] += (w[..., start:].permute(3, 2, 0, 1)[..., None].float() * d[None].float()).sum(1)
        return da.to(a.dtype)
    flat_states, flat_dout = states.flatten(1, 2), dout.flatten(1, 2)  # [n, M, D], [S, M, D]
    da = torch.bmm(flat_dout.transpose(0, 1).to(states.dtype), flat_states.permute(1, 2, 0))
    for w, d, start in terms:
        # grad[j, m] += sum_s w[m, s, j] d[s, m]: a GEMM per token m, written into the buffer in place
        grad_states[start:].flatten(1, 2).transpose(0, 1).baddbmm_(
            w[..., start:].flatten(0, 1).transpose(1, 2).to(grad_states.dtype),
            d.flatten(1, 2).transpose(0, 1).to(grad_states.dtype))
    return da.unflatten(0, a.shape[:2]).to(a.dtype)


def mix_forward(a: torch.Tensor, states: torch.Tensor, out_dtype: torch.dtype | None = None,
                backend: str = "auto") -> torch.Tensor:
    """The mix without autograd: a ``[B, T, S, n]``, states ``[n, B, T, D]`` (read in place: any
    strides) -> ``[S, B, T, D]`` in ``out_dtype`` (default the states')."""
    _check(a, states)
    _check_out_dtype(out_dtype)
    out_dtype = out_dtype or states.dtype
    if select_mix_backend(backend, states, a.shape[2]) == "reference":
        return mix_reference(a, states, out_dtype)
    from .dense_mix_triton import mix_forward as fused

    return fused(a, states, out_dtype)


def mix_backward(a: torch.Tensor, states: torch.Tensor, dout: torch.Tensor, grad_states: torch.Tensor,
                 backend: str = "auto", *, pending: tuple[torch.Tensor, torch.Tensor] | None = None,
                 grad_from: int = 0) -> torch.Tensor:
    """Backward of :func:`mix_forward` for dout ``[S, B, T, D]``: adds d states into
    ``grad_states`` ``[n, B, T, D]`` (float32, or float64 for float64 states) in place and returns
    da ``[B, T, S, n]`` in a's dtype.

    ``grad_from``: only d states[grad_from:] is added (the rest is left to a later call, as
    ``pending``). ``pending``: (a2 ``[B, T, S2, n2 >= n]``, dout2 ``[S2, B, T, D]``) of another
    read of these states, whose terms sum_s a2[..., s, j] dout2_s for j < n are added in the same
    pass (its da is not formed): two reads' gradients for one read-modify-write of the buffer. The
    two are not combined: a pending read's terms cover every state, so ``grad_from`` must be 0."""
    _check(a, states)
    want = (a.shape[2], *states.shape[1:])
    if not isinstance(dout, torch.Tensor) or dout.shape != want:
        raise ValueError(f"dout must be a tensor {list(want)} (the mix's output), got {shape_of(dout)}")
    _check_on("dout", dout, states)
    if not isinstance(grad_states, torch.Tensor) or grad_states.shape != states.shape:
        raise ValueError(f"grad_states must be a tensor of the states' shape {list(states.shape)}, got "
                         f"{shape_of(grad_states)}")
    _check_on("grad_states", grad_states, states)
    if grad_states.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"grad_states must be float32 or float64 (a running sum over readers), got {grad_states.dtype}")
    n = states.shape[0]
    if isinstance(grad_from, bool) or not isinstance(grad_from, int) or not 0 <= grad_from <= n:
        raise ValueError(f"grad_from must be an int in [0, n={n}], got {grad_from!r}")
    if pending is not None:
        if not isinstance(pending, tuple) or len(pending) != 2:
            raise ValueError(f"pending must be None or a tuple (a2, dout2), got {type(pending).__name__}")
        a2, dout2 = pending
        B, T = states.shape[1:3]
        if (not isinstance(a2, torch.Tensor) or a2.dim() != 4 or a2.shape[:2] != (B, T) or a2.shape[3] < n
                or not 1 <= a2.shape[2] <= MAX_WAYS or a2.device != states.device):
            raise ValueError(f"pending's a2 must be a tensor [B={B}, T={T}, S2 <= {MAX_WAYS}, >= n={n}] on "
                             f"{states.device}, got {shape_of(a2)}")
        if not isinstance(dout2, torch.Tensor) or dout2.shape != (a2.shape[2], *states.shape[1:]):
            raise ValueError(f"pending's dout2 must be a tensor {[a2.shape[2], *states.shape[1:]]}, "
                             f"got {shape_of(dout2)}")
        _check_on("pending's a2", a2, states)
        _check_on("pending's dout2", dout2, states)
        if grad_from:
            raise ValueError(f"pending needs grad_from=0 (its terms cover every state), got grad_from={grad_from}")
    if select_mix_backend(backend, states, a.shape[2]) == "reference":
        return mix_reference_backward(a, states, dout, grad_states, pending, grad_from)
    from .dense_mix_triton import mix_backward as fused

    return fused(a, states, dout, grad_states, pending, grad_from)[0]


def dense_mix(a: torch.Tensor, states: torch.Tensor, out_dtype: torch.dtype | None = None, *,
              backend: str = "auto") -> torch.Tensor:
    """S weighted sums of n states, per token, with gradients for a and states.

    Args:
        a: the weights ``[B, T, S, n]`` (any float dtype, any strides).
        states: ``[n, B, T, D]`` (e.g. the first n slots of a preallocated buffer, read in place).
        out_dtype: the output's dtype (default the states').
        backend: ``"auto"`` (Triton on CUDA, reference otherwise), ``"reference"`` or ``"triton"``.

    Returns:
        ``[S, B, T, D]``: ``out[s] = sum_j a[..., s, j] states[j]``. The Triton kernels take a in
        its own dtype and accumulate in float32; the eager reference is a batched GEMM in the
        states' dtype (a rounded to it).
    """
    _check(a, states)
    _check_out_dtype(out_dtype)
    return _DenseMix.apply(a, states, out_dtype or states.dtype, select_mix_backend(backend, states, a.shape[2]))


class _DenseMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, states, out_dtype, backend):
        ctx.backend = backend
        ctx.save_for_backward(a, states)
        return mix_forward(a, states, out_dtype, backend)

    @staticmethod
    def backward(ctx, dout):
        a, states = ctx.saved_tensors
        if ctx.backend == "triton":  # the states' gradient stored once, in their dtype: no float32 buffer
            from .dense_mix_triton import mix_backward as fused

            da, d_states = fused(a, states, dout, None)
            return da, d_states, None, None
        grad = torch.zeros(states.shape, dtype=torch.promote_types(states.dtype, torch.float32), device=states.device)
        da = mix_reference_backward(a, states, dout, grad)
        return da, grad.to(states.dtype), None, None
