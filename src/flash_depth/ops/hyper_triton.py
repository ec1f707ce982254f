"""Triton kernels for Hyper-Connections (nn/hyper_connections.py), as torch custom ops so that
torch.compile'd blocks call them without a graph break:

- ``flash_depth::sinkhorn``: the Sinkhorn projection ``[R, n, n]`` with a one-kernel forward and a
  one-kernel backward (exact reverse mode through every iteration). The per-op PyTorch chain runs
  ~70 tiny kernels per call in the backward.
- ``flash_depth::stream_gram``: ``sum_{m, d} a[m, i, d] b[m, j, d]`` for ``a [M, na, D]``,
  ``b [M, nb, D]``: the gradients of static HC's mixes, sums over every token that inductor splits
  badly (1.3 ms per call at M = 16384, n = 4, D = 384).
- ``flash_depth::hyper_write`` (+ ``_backward``) and ``flash_depth::hyper_read`` (+ ``_backward``):
  mHC's write ``X' = H_res @ X + H_post y`` and read ``sum_i H_pre[i] X[i]``, each way one pass over
  the streams (the write's backward from one read of g, X and y).
- ``flash_depth::mhc_projection`` (+ ``_backward``): ``rms_norm(X) @ phi`` without a float32 copy of X.

All compute in float32 on CUDA (or under TRITON_INTERPRET=1). ``fused_sinkhorn`` and ``stream_gram``
fall back to PyTorch for float64 or other devices; the read, write and projection callers check
``*_fusable`` first and otherwise keep the PyTorch formulas.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import triton_usable
from ._triton_common import cdiv, last_dim_contiguous

# Tokens and warps per Sinkhorn program. Each iteration is a chain of tiny reductions and divisions,
# so latency binds: many small programs win. H200 sweep at 16384 tokens, n=4, 20 iterations
# (benchmarks/results/logs/s10_tune_mhc_h200.log): 16 tokens on 2 warps
# 15 / 39 us forward / backward, the old 32 on 4 warps 31 / 85 us.
_SINKHORN_BLOCK, _SINKHORN_WARPS = 16, 2
# Stages of the tl.range stream loops of the projection and write kernels. H200, 16384 tokens, n=4,
# D=384, float32 streams (same log), projection forward / backward (dX + dphi) / write backward:
# 3 stages 118 / 125 / 100 us, 1 stage 124 / 159 / 134 us; the code before (nested loops, the write's
# loop plain) took 123 / 157 / 129 us in the step profile (s10_profile_mhc_small48_h200.log).
_STREAM_STAGES = 3
_GRAM_BLOCK_M = 16


@triton.jit
def _div(a, b):
    """a / b broadcast, rounded to nearest as torch divides (``/`` on float32 is approximate)."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def _row_col_step(m, eps, AXIS_FIRST: tl.constexpr, AXIS_SECOND: tl.constexpr):
    """One normalisation along AXIS_FIRST then AXIS_SECOND, as torch's ``m / m.sum().clamp_min(eps)``."""
    m = _div(m, tl.maximum(tl.sum(m, AXIS_FIRST), eps).expand_dims(AXIS_FIRST))
    return _div(m, tl.maximum(tl.sum(m, AXIS_SECOND), eps).expand_dims(AXIS_SECOND))


@triton.jit
def _softmax_col(logits_ptr, offs, mask, row_valid, eps):
    """The first Sinkhorn pair: row softmax then column normalisation; returns (softmax, result)."""
    x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    x_max = tl.where(row_valid, tl.max(x, 2), 0.0)
    e = tl.where(mask, tl.exp(x - x_max.expand_dims(2)), 0.0)
    p = _div(e, tl.where(row_valid, tl.sum(e, 2), 1.0).expand_dims(2))
    return p, _div(p, tl.maximum(tl.sum(p, 1), eps).expand_dims(1))


@triton.jit
def _tile(R, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets into a contiguous ``[R, N, N]`` for this program's ``[BLOCK, NP, NP]`` tile, its mask
    and the mask of its real rows."""
    t = (tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)).expand_dims(1).expand_dims(2)
    i = tl.arange(0, NP).expand_dims(0).expand_dims(2)
    j = tl.arange(0, NP).expand_dims(0).expand_dims(1)
    row_valid = (t < R) & (i < N)
    return t * (N * N) + i * N + j, row_valid & (j < N), tl.sum(row_valid.to(tl.int32), 2) > 0


@triton.jit
def _sinkhorn_fwd_kernel(logits, out, R, iters, eps, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, row_valid = _tile(R, N, NP, BLOCK)
    _, m = _softmax_col(logits, offs, mask, row_valid, eps)
    for _ in range(1, iters):
        m = _row_col_step(m, eps, 2, 1)
    tl.store(out + offs, m.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _normalise_bwd(g, m, eps, mask, AXIS: tl.constexpr):
    """dL/dm from g = dL/dm' for m' = m / max(s, eps), s = sum(m, AXIS):
    (g - [s >= eps] sum(g m', AXIS)) / max(s, eps), as torch's clamp_min passes where s >= eps.
    Re-masked: padding would otherwise grow as 1/eps each step."""
    s = tl.sum(m, AXIS)
    r = tl.maximum(s, eps).expand_dims(AXIS)
    dot = tl.where(s >= eps, tl.sum(g * _div(m, r), AXIS), 0.0).expand_dims(AXIS)
    return tl.where(mask, _div(g - dot, r), 0.0)


@triton.jit
def _sinkhorn_bwd_kernel(logits, grad, dlogits, scratch, R, iters, eps,
                         N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, row_valid = _tile(R, N, NP, BLOCK)
    # recompute the forward, keeping each pair's input (pairs 1..iters-1) in scratch [iters-1, R, N, N]
    p, m = _softmax_col(logits, offs, mask, row_valid, eps)
    plane = R * (N * N)
    for k in range(1, iters):
        tl.store(scratch + (k - 1) * plane + offs, m, mask=mask)
        m = _row_col_step(m, eps, 2, 1)
    g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    for k in range(iters - 1, 0, -1):
        a = tl.load(scratch + (k - 1) * plane + offs, mask=mask, other=0.0)
        g = _normalise_bwd(g, _div(a, tl.maximum(tl.sum(a, 2), eps).expand_dims(2)), eps, mask, 1)
        g = _normalise_bwd(g, a, eps, mask, 2)
    g = _normalise_bwd(g, p, eps, mask, 1)
    dx = p * (g - tl.sum(g * p, 2).expand_dims(2))  # softmax
    tl.store(dlogits + offs, dx.to(dlogits.dtype.element_ty), mask=mask)


def _sinkhorn_reference(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    from ..nn.hyper_connections import sinkhorn

    return sinkhorn(logits, iters, eps)


def _fused(x: torch.Tensor) -> bool:
    return triton_usable(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _sinkhorn_launch(logits: torch.Tensor, iters: int, eps: float, grad: torch.Tensor | None = None):
    n = logits.shape[-1]
    x = logits.contiguous()
    R = x.numel() // (n * n)
    np_ = triton.next_power_of_2(n)
    grid = (max(1, cdiv(R, _SINKHORN_BLOCK)),)
    out = torch.empty_like(x)
    if R == 0:
        return out
    if grad is None:
        _sinkhorn_fwd_kernel[grid](x, out, R, iters, eps, N=n, NP=np_, BLOCK=_SINKHORN_BLOCK,
                                   num_warps=_SINKHORN_WARPS)
    else:
        scratch = torch.empty(max(1, (iters - 1) * R * n * n), device=x.device, dtype=torch.float32)
        _sinkhorn_bwd_kernel[grid](x, grad.contiguous(), out, scratch, R, iters, eps,
                                   N=n, NP=np_, BLOCK=_SINKHORN_BLOCK, num_warps=_SINKHORN_WARPS)
    return out


@torch.library.custom_op("flash_depth::sinkhorn", mutates_args=())
def _sinkhorn_op(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    return _sinkhorn_launch(logits, iters, eps)


@_sinkhorn_op.register_fake
def _(logits, iters, eps):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("flash_depth::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(grad: torch.Tensor, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    return _sinkhorn_launch(logits, iters, eps, grad)


@_sinkhorn_backward_op.register_fake
def _(grad, logits, iters, eps):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _sinkhorn_setup(ctx, inputs, output):
    logits, ctx.iters, ctx.eps = inputs
    ctx.save_for_backward(logits)


def _sinkhorn_grad(ctx, grad):
    (logits,) = ctx.saved_tensors
    return _sinkhorn_backward_op(grad, logits, ctx.iters, ctx.eps), None, None


_sinkhorn_op.register_autograd(_sinkhorn_grad, setup_context=_sinkhorn_setup)


def fused_sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-12) -> torch.Tensor:
    """:func:`~flash_depth.nn.hyper_connections.sinkhorn` ``[..., n, n]`` in one Triton kernel forward
    and one backward (float32 arithmetic; float64 or non-CUDA tensors take the PyTorch reference)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must be a tensor [..., n, n], got {getattr(logits, 'shape', type(logits).__name__)}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not isinstance(eps, float) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    # the backward's scratch [iters-1, R, n, n] is addressed with int32 offsets
    if not _fused(logits) or (iters - 1) * logits.numel() >= 2**31:
        return _sinkhorn_reference(logits, iters, eps)
    return _sinkhorn_op(logits, iters, eps)


@triton.jit
def _stream_gram_kernel(a, b, part, M, D, sa_m, sa_n, sb_m, sb_n, NA: tl.constexpr, NB: tl.constexpr,
                        NAP: tl.constexpr, NBP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ri = tl.arange(0, NAP)
    rj = tl.arange(0, NBP)
    acc = tl.zeros([NAP, NBP], dtype=tl.float32)
    a_rows = a + (rm * sa_m).expand_dims(1).expand_dims(2) + (ri * sa_n).expand_dims(0).expand_dims(2)
    a_mask = (rm < M).expand_dims(1).expand_dims(2) & (ri < NA).expand_dims(0).expand_dims(2)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = (rd < D).expand_dims(0)
        A = tl.load(a_rows + rd.expand_dims(0).expand_dims(1), mask=a_mask & d_ok.expand_dims(1),
                    other=0.0).to(tl.float32)
        for j in tl.static_range(NB):
            Bj = tl.load(b + (rm * sb_m).expand_dims(1) + j * sb_n + rd.expand_dims(0),
                         mask=(rm < M).expand_dims(1) & d_ok, other=0.0).to(tl.float32)
            s = tl.sum(tl.sum(A * Bj.expand_dims(1), 2), 0)
            acc += tl.where(rj.expand_dims(0) == j, s.expand_dims(1), 0.0)
    out = part + pid * (NA * NB) + ri.expand_dims(1) * NB + rj.expand_dims(0)
    tl.store(out, acc, mask=(ri < NA).expand_dims(1) & (rj < NB).expand_dims(0))


@torch.library.custom_op("flash_depth::stream_gram", mutates_args=())
def _stream_gram_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not (_fused(a) and _fused(b)):
        dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return torch.einsum("mid,mjd->ij", a.to(dt), b.to(dt))
    a, b = last_dim_contiguous(a), last_dim_contiguous(b)
    M, na, D = a.shape
    nb = b.shape[1]
    programs = max(1, cdiv(M, _GRAM_BLOCK_M))
    part = torch.empty(programs, na, nb, device=a.device, dtype=torch.float32)
    if M == 0:
        return part.zero_().sum(0)
    _stream_gram_kernel[(programs,)](a, b, part, M, D, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                     NA=na, NB=nb, NAP=triton.next_power_of_2(na), NBP=triton.next_power_of_2(nb),
                                     BLOCK_M=_GRAM_BLOCK_M, BLOCK_D=min(128, triton.next_power_of_2(D)))
    return part.sum(0)


@_stream_gram_op.register_fake
def _(a, b):
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.new_empty(a.shape[1], b.shape[1], dtype=dt)


def stream_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, na, D]``, ``b [M, nb, D]`` (any strides and float dtypes) -> ``sum_{m, d} a[m, i, d] b[m, j, d]``
    ``[na, nb]`` in at least float32 (no autograd: it computes gradients)."""
    if not isinstance(a, torch.Tensor) or a.dim() != 3:
        raise ValueError(f"a must be a tensor [M, na, D], got {getattr(a, 'shape', type(a).__name__)}")
    if not isinstance(b, torch.Tensor) or b.dim() != 3 or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[2]:
        raise ValueError(f"b must be a tensor [M={a.shape[0]}, nb, D={a.shape[2]}], got "
                         f"{getattr(b, 'shape', type(b).__name__)}")
    if not (a.is_floating_point() and b.is_floating_point()) or b.device != a.device:
        raise TypeError(f"a and b must be floating point on one device, got {a.dtype} on {a.device} and "
                        f"{b.dtype} on {b.device}")
    return _stream_gram_op(a, b)


@triton.jit
def _write_bwd_kernel(g, X, y, H, h_post, dX, dy, dH, dh_post, M, D, sx_m, sx_n, sy_m,
                      N: tl.constexpr, NP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      STAGES: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, NP)
    m_ok = rm < M
    m2, n2 = rm.expand_dims(1), rn.expand_dims(0)
    mn_ok = m_ok.expand_dims(1) & (n2 < N)
    m3, n3 = m2.expand_dims(2), n2.expand_dims(2)
    h_post_all = tl.load(h_post + m2 * N + n2, mask=mn_ok, other=0.0).to(tl.float32)
    acc_h = tl.zeros([BLOCK_M, NP, NP], dtype=tl.float32)  # dH [m, i, j]
    acc_p = tl.zeros([BLOCK_M, NP], dtype=tl.float32)  # dh_post [m, i]
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        rd = d0 + tl.arange(0, BLOCK_D)
        d2 = rd.expand_dims(0)
        md_ok = m_ok.expand_dims(1) & (d2 < D)
        d3 = d2.expand_dims(1)
        mnd_ok = mn_ok.expand_dims(2) & (d3 < D)
        x = tl.load(X + m3 * sx_m + n3 * sx_n + d3, mask=mnd_ok, other=0.0).to(tl.float32)  # [m, j, d]
        yv = tl.load(y + m2 * sy_m + d2, mask=md_ok, other=0.0).to(tl.float32)
        dx = tl.zeros([BLOCK_M, NP, BLOCK_D], dtype=tl.float32)
        dyv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(N):
            gi = tl.load(g + (m2 * N + i) * D + d2, mask=md_ok, other=0.0).to(tl.float32)  # [m, d]
            h_i = tl.load(H + (m2 * N + i) * N + n2, mask=mn_ok, other=0.0).to(tl.float32)  # H[m, i, j]
            dx += h_i.expand_dims(2) * gi.expand_dims(1)
            dyv += tl.sum(tl.where(n2 == i, h_post_all, 0.0), 1).expand_dims(1) * gi
            sel = n3 == i  # [1, NP, 1]: row i of dH, entry i of dh_post
            acc_h += tl.where(sel, tl.sum(gi.expand_dims(1) * x, 2).expand_dims(1), 0.0)
            acc_p += tl.where(n2 == i, tl.sum(gi * yv, 1).expand_dims(1), 0.0)
        tl.store(dX + (m3 * N + n3) * D + d3, dx.to(dX.dtype.element_ty), mask=mnd_ok)
        tl.store(dy + m2 * D + d2, dyv.to(dy.dtype.element_ty), mask=md_ok)
    j3 = rn.expand_dims(0).expand_dims(1)
    tl.store(dH + (m3 * N + n3) * N + j3, acc_h, mask=mn_ok.expand_dims(2) & (j3 < N))
    tl.store(dh_post + m2 * N + n2, acc_p, mask=mn_ok)


_WRITE_BLOCK_M, _WRITE_BLOCK_D = 16, 64


@torch.library.custom_op("flash_depth::hyper_write_backward", mutates_args=())
def _write_backward_op(g: torch.Tensor, X: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor,
                       h_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, n, D = X.shape
    g, X, y = g.contiguous(), last_dim_contiguous(X), last_dim_contiguous(y)
    h_post, h_res = h_post.contiguous(), h_res.contiguous()
    dX = torch.empty(M, n, D, device=X.device, dtype=X.dtype)
    dy = torch.empty_like(y, memory_format=torch.contiguous_format)
    dH, dh_post = torch.empty_like(h_res), torch.empty_like(h_post)
    if M > 0:
        _write_bwd_kernel[(cdiv(M, _WRITE_BLOCK_M),)](
            g, X, y, h_res, h_post, dX, dy, dH, dh_post, M, D, X.stride(0), X.stride(1), y.stride(0),
            N=n, NP=triton.next_power_of_2(n), BLOCK_M=_WRITE_BLOCK_M, BLOCK_D=_WRITE_BLOCK_D,
            STAGES=_STREAM_STAGES)
    return dX, dy, dh_post, dH


@_write_backward_op.register_fake
def _(g, X, y, h_post, h_res):
    return X.new_empty(X.shape), y.new_empty(y.shape), torch.empty_like(h_post), torch.empty_like(h_res)


def _check_stream_op(X: torch.Tensor, **others) -> None:
    """X ``[M, n, D]`` floating point and, by name, the other inputs of a stream op: ``y``
    ``[M, D]``, ``g`` ``[M, n, D]`` floating point, ``h_pre``/``h_post`` ``[M, n]`` and ``h_res``
    ``[M, n, n]`` float32, all on X's device."""
    if not isinstance(X, torch.Tensor) or X.dim() != 3 or not X.is_floating_point():
        raise ValueError(f"X must be a floating-point tensor [M, n, D], got {getattr(X, 'shape', type(X).__name__)}")
    M, n, D = X.shape
    want = {"y": (M, D), "g": (M, n, D), "h_pre": (M, n), "h_post": (M, n), "h_res": (M, n, n)}
    for name, t in others.items():
        shape = want[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be a tensor {list(shape)} (X is {list(X.shape)}), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.device != X.device:
            raise ValueError(f"{name} must be on X's device {X.device}, got {t.device}")
        if not t.is_floating_point() or (name.startswith("h_") and t.dtype != torch.float32):
            raise TypeError(f"{name} must be {'float32' if name.startswith('h_') else 'floating point'}, "
                            f"got {t.dtype}")


def write_fusable(X: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> bool:
    """:func:`stream_write` and :func:`write_backward` apply: CUDA (or interpreted) half/float32
    streams, float32 mixes."""
    return _fused(X) and _fused(y) and h_res.dtype == h_post.dtype == torch.float32


def write_backward(g, X, y, h_post, h_res):
    """Gradients of the token-dependent write ``X' = H_res @ X + H_post y`` (HyperConnection.post)
    in one pass: ``g, X [M, n, D]``, ``y [M, D]``, ``h_post [M, n]``, ``h_res [M, n, n]`` (float32)
    -> (dX in X's dtype, dy in y's, dh_post, dh_res). Only where :func:`write_fusable`."""
    _check_stream_op(X, g=g, y=y, h_post=h_post, h_res=h_res)
    return _write_backward_op(g, X, y, h_post, h_res)


# mHC's read and write forward, and the read's backward. As per-op PyTorch (eager between compiled
# blocks) they build [M, n, n, D] / [M, n, D] float32 products and reduce them: 15 of the 63 ms of
# CUDA time of a 12-layer small-48 step went to such elementwise kernels
# (benchmarks/results/logs/s13_profile_mhc_small48_l12_h200.log). These read each input once.
@triton.jit
def _write_fwd_kernel(X, y, H, h_post, out, M, D, sx_m, sx_n, sy_m, N: tl.constexpr, NP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, NP)
    m2, n2, d2 = rm.expand_dims(1), rn.expand_dims(0), rd.expand_dims(0)
    mn_ok = (m2 < M) & (n2 < N)
    md_ok = (m2 < M) & (d2 < D)
    h_post_all = tl.load(h_post + m2 * N + n2, mask=mn_ok, other=0.0)  # [m, j]
    yv = tl.load(y + m2 * sy_m + d2, mask=md_ok, other=0.0).to(tl.float32)
    acc = h_post_all.expand_dims(2) * yv.expand_dims(1)  # [m, j, d]
    for i in tl.static_range(N):
        x_i = tl.load(X + m2 * sx_m + i * sx_n + d2, mask=md_ok, other=0.0).to(tl.float32)  # [m, d]
        h_col = tl.load(H + (m2 * N + n2) * N + i, mask=mn_ok, other=0.0)  # H[m, j, i]
        acc += h_col.expand_dims(2) * x_i.expand_dims(1)
    m3, n3, d3 = m2.expand_dims(2), n2.expand_dims(2), d2.expand_dims(1)
    tl.store(out + (m3 * N + n3) * D + d3, acc.to(out.dtype.element_ty), mask=mn_ok.expand_dims(2) & (d3 < D))


@triton.jit
def _read_fwd_kernel(X, h, out, M, D, sx_m, sx_n, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md_ok = (rm < M)[:, None] & (rd < D)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(N):
        h_i = tl.load(h + rm * N + i, mask=rm < M, other=0.0)
        x_i = tl.load(X + rm[:, None] * sx_m + i * sx_n + rd[None, :], mask=md_ok, other=0.0).to(tl.float32)
        acc += h_i[:, None] * x_i
    tl.store(out + rm[:, None] * D + rd[None, :], acc.to(out.dtype.element_ty), mask=md_ok)


@triton.jit
def _read_bwd_kernel(g, X, h, dX, dh, M, D, sx_m, sx_n, N: tl.constexpr, NP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    # dX[m, i, :] = h[m, i] g[m, :]; dh[m, i] = X[m, i, :] . g[m, :]
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, NP)
    m2, n2 = rm.expand_dims(1), rn.expand_dims(0)
    mn_ok = (m2 < M) & (n2 < N)
    m3, n3 = m2.expand_dims(2), n2.expand_dims(2)
    h_all = tl.load(h + m2 * N + n2, mask=mn_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, NP], dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        rd = d0 + tl.arange(0, BLOCK_D)
        d2 = rd.expand_dims(0)
        d3 = d2.expand_dims(1)
        mnd_ok = mn_ok.expand_dims(2) & (d3 < D)
        gv = tl.load(g + m2 * D + d2, mask=(m2 < M) & (d2 < D), other=0.0).to(tl.float32).expand_dims(1)
        x = tl.load(X + m3 * sx_m + n3 * sx_n + d3, mask=mnd_ok, other=0.0).to(tl.float32)  # [m, i, d]
        acc += tl.sum(x * gv, 2)
        tl.store(dX + (m3 * N + n3) * D + d3, (h_all.expand_dims(2) * gv).to(dX.dtype.element_ty), mask=mnd_ok)
    tl.store(dh + m2 * N + n2, acc, mask=mn_ok)


# tiles of the read and write forwards (M, D); not swept: each program's loads are the stream rows it needs once
_STREAM_BLOCK_M, _STREAM_BLOCK_D = 16, 128


@torch.library.custom_op("flash_depth::hyper_write", mutates_args=())
def _write_op(X: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
    M, n, D = X.shape
    X, y = last_dim_contiguous(X), last_dim_contiguous(y)
    h_post, h_res = h_post.contiguous(), h_res.contiguous()
    out = torch.empty(M, n, D, device=X.device, dtype=X.dtype)
    if M > 0:
        grid = (cdiv(M, _STREAM_BLOCK_M), cdiv(D, _STREAM_BLOCK_D))
        _write_fwd_kernel[grid](X, y, h_res, h_post, out, M, D, X.stride(0), X.stride(1), y.stride(0), N=n,
                                NP=triton.next_power_of_2(n), BLOCK_M=_STREAM_BLOCK_M, BLOCK_D=_STREAM_BLOCK_D)
    return out


@_write_op.register_fake
def _(X, y, h_post, h_res):
    return X.new_empty(X.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _write_grad(ctx, g):
    return _write_backward_op(g, *ctx.saved_tensors)


_write_op.register_autograd(_write_grad, setup_context=_save_inputs)


def stream_write(X: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
    """mHC's write ``X' = H_res @ X + H_post y``: ``X [M, n, D]`` (any strides but the last),
    ``y [M, D]``, ``h_post [M, n]``, ``h_res [M, n, n]`` (float32) -> ``[M, n, D]`` in X's dtype,
    differentiable (backward: :func:`write_backward`). Only where :func:`write_fusable`."""
    _check_stream_op(X, y=y, h_post=h_post, h_res=h_res)
    return _write_op(X, y, h_post, h_res)


@torch.library.custom_op("flash_depth::hyper_read", mutates_args=())
def _read_op(X: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    M, n, D = X.shape
    X, h_pre = last_dim_contiguous(X), h_pre.contiguous()
    out = torch.empty(M, D, device=X.device, dtype=X.dtype)
    if M > 0:
        _read_fwd_kernel[(cdiv(M, _STREAM_BLOCK_M), cdiv(D, _STREAM_BLOCK_D))](
            X, h_pre, out, M, D, X.stride(0), X.stride(1), N=n, BLOCK_M=_STREAM_BLOCK_M, BLOCK_D=_STREAM_BLOCK_D)
    return out


@_read_op.register_fake
def _(X, h_pre):
    return X.new_empty(X.shape[0], X.shape[2])


@torch.library.custom_op("flash_depth::hyper_read_backward", mutates_args=())
def _read_backward_op(g: torch.Tensor, X: torch.Tensor, h_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, n, D = X.shape
    g, X, h_pre = g.contiguous(), last_dim_contiguous(X), h_pre.contiguous()
    dX = torch.empty(M, n, D, device=X.device, dtype=X.dtype)
    dh = torch.empty_like(h_pre)
    if M > 0:
        _read_bwd_kernel[(cdiv(M, _WRITE_BLOCK_M),)](g, X, h_pre, dX, dh, M, D, X.stride(0), X.stride(1), N=n,
                                                     NP=triton.next_power_of_2(n), BLOCK_M=_WRITE_BLOCK_M,
                                                     BLOCK_D=_WRITE_BLOCK_D, STAGES=_STREAM_STAGES)
    return dX, dh


@_read_backward_op.register_fake
def _(g, X, h_pre):
    return X.new_empty(X.shape), torch.empty_like(h_pre)


def _read_grad(ctx, g):
    return _read_backward_op(g, *ctx.saved_tensors)


_read_op.register_autograd(_read_grad, setup_context=_save_inputs)


def read_fusable(X: torch.Tensor, h_pre: torch.Tensor) -> bool:
    """:func:`stream_read` applies: CUDA (or interpreted) half/float32 streams, float32 weights."""
    return _fused(X) and h_pre.dtype == torch.float32


def stream_read(X: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """mHC's read ``sum_i h_pre[:, i] X[:, i]``: ``X [M, n, D]`` (any strides but the last),
    ``h_pre [M, n]`` float32 -> ``[M, D]`` in X's dtype, differentiable. Only where :func:`read_fusable`."""
    _check_stream_op(X, h_pre=h_pre)
    return _read_op(X, h_pre)


# mHC's projection ``rms_norm(X.flatten(-2)) @ phi`` (phi [n*D, K], K = n*(n+2)): the compiler writes the
# normalised float32 X (twice X's bytes) for cuBLAS and keeps it for the backward. These kernels read X
# instead; tf32x3 dots (each operand split into a tf32 head and tail) keep float32 accuracy on tensor cores.
@triton.jit
def _proj_fwd_kernel(X, phi, proj, rstd, M, D, sx_m, sx_n, eps, N: tl.constexpr, K: tl.constexpr,
                     KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     STAGES: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, KP)
    acc = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    chunks = tl.cdiv(D, BLOCK_D)
    # one flat loop over (stream, D chunk): tl.range pipelines its loads (nested plain ranges are not)
    for c in tl.range(0, N * chunks, num_stages=STAGES):
        i = c // chunks
        rd = (c % chunks) * BLOCK_D + tl.arange(0, BLOCK_D)
        x = tl.load(X + rm[:, None] * sx_m + i * sx_n + rd[None, :], mask=(rm < M)[:, None] & (rd < D)[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(phi + (i * D + rd)[:, None] * K + rk[None, :], mask=(rd < D)[:, None] & (rk < K)[None, :],
                    other=0.0)
        sumsq += tl.sum(x * x, 1)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    r = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), tl.sqrt_rn(sumsq / (N * D) + eps))
    tl.store(proj + rm[:, None] * K + rk[None, :], acc * r[:, None], mask=(rm < M)[:, None] & (rk < K)[None, :])
    tl.store(rstd + rm, r, mask=rm < M)


@triton.jit
def _proj_bwd_x_kernel(X, phi, proj, rstd, dproj, dX, M, D, sx_m, sx_n, N: tl.constexpr, K: tl.constexpr,
                       KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                       STAGES: tl.constexpr):
    # dX = r (dproj phi^T) - X r^2 (dproj . proj) / (n D): the rms-norm backward, with
    # sum_k (dproj phi^T)_k x_k = dproj . proj from the [M, K] tensors
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, KP)
    mk_ok = (rm < M)[:, None] & (rk < K)[None, :]
    dp = tl.load(dproj + rm[:, None] * K + rk[None, :], mask=mk_ok, other=0.0)
    p = tl.load(proj + rm[:, None] * K + rk[None, :], mask=mk_ok, other=0.0)
    r = tl.load(rstd + rm, mask=rm < M, other=0.0)
    coef = r * r * tl.sum(dp * p, 1) / (N * D)
    chunks = tl.cdiv(D, BLOCK_D)
    for c in tl.range(0, N * chunks, num_stages=STAGES):  # flat, as in the forward
        i = c // chunks
        rd = (c % chunks) * BLOCK_D + tl.arange(0, BLOCK_D)
        md_ok = (rm < M)[:, None] & (rd < D)[None, :]
        w_t = tl.load(phi + (i * D + rd)[None, :] * K + rk[:, None], mask=(rd < D)[None, :] & (rk < K)[:, None],
                      other=0.0)
        x = tl.load(X + rm[:, None] * sx_m + i * sx_n + rd[None, :], mask=md_ok, other=0.0).to(tl.float32)
        dx = r[:, None] * tl.dot(dp, w_t, input_precision=PRECISION) - x * coef[:, None]
        tl.store(dX + (rm[:, None] * N + i) * D + rd[None, :], dx.to(dX.dtype.element_ty), mask=md_ok)


@triton.jit
def _proj_bwd_phi_kernel(X, rstd, dproj, part, M, D, sx_m, sx_n, tokens_per_split, N: tl.constexpr, K: tl.constexpr,
                         KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                         STAGES: tl.constexpr):
    # dphi[k, :] = sum_m X[m, k] r[m] dproj[m, :], one split of the tokens per program row
    rk_blk, split = tl.program_id(0), tl.program_id(1)
    blocks_per_row = tl.cdiv(D, BLOCK_D)
    i, d0 = rk_blk // blocks_per_row, (rk_blk % blocks_per_row) * BLOCK_D
    rd = d0 + tl.arange(0, BLOCK_D)
    rk = tl.arange(0, KP)
    acc = tl.zeros([BLOCK_D, KP], dtype=tl.float32)
    start = split.to(tl.int64) * tokens_per_split
    for m0 in tl.range(0, tokens_per_split, BLOCK_M, num_stages=STAGES):
        rm = start + m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M  # tokens_per_split is a multiple of BLOCK_M
        x = tl.load(X + rm[None, :] * sx_m + i * sx_n + rd[:, None], mask=m_ok[None, :] & (rd < D)[:, None],
                    other=0.0).to(tl.float32)
        r = tl.load(rstd + rm, mask=m_ok, other=0.0)
        dp = tl.load(dproj + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        acc = tl.dot(x, dp * r[:, None], acc, input_precision=PRECISION)
    out = part + (split.to(tl.int64) * N * D + i * D + rd[:, None]) * K + rk[None, :]
    tl.store(out, acc, mask=(rd < D)[:, None] & (rk < K)[None, :])


_PROJ_BLOCK_M, _PROJ_BLOCK_D, _PHI_SPLITS = 32, 64, 32  # 512 token blocks at 16384 tokens (H200: 132 SMs)


def _proj_meta(X, phi):
    n, D = X.shape[1:]
    # tf32x3 keeps float32 accuracy on tensor cores; the interpreter computes dots in float32 anyway
    precision = "ieee" if X.device.type != "cuda" else "tf32x3"
    return dict(N=n, K=phi.shape[1], KP=max(16, triton.next_power_of_2(phi.shape[1])), BLOCK_M=_PROJ_BLOCK_M,
                BLOCK_D=min(_PROJ_BLOCK_D, max(16, triton.next_power_of_2(D))), PRECISION=precision,
                STAGES=_STREAM_STAGES)


@torch.library.custom_op("flash_depth::mhc_projection", mutates_args=())
def _projection_op(X: torch.Tensor, phi: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    X, phi = last_dim_contiguous(X), phi.contiguous()
    M, n, D = X.shape
    proj = torch.empty(M, phi.shape[1], device=X.device, dtype=torch.float32)
    rstd = torch.empty(M, device=X.device, dtype=torch.float32)
    if M > 0:
        _proj_fwd_kernel[(cdiv(M, _PROJ_BLOCK_M),)](X, phi, proj, rstd, M, D, X.stride(0), X.stride(1), eps,
                                                   **_proj_meta(X, phi))
    return proj, rstd


@_projection_op.register_fake
def _(X, phi, eps):
    return X.new_empty(X.shape[0], phi.shape[1], dtype=torch.float32), X.new_empty(X.shape[0], dtype=torch.float32)


@torch.library.custom_op("flash_depth::mhc_projection_backward", mutates_args=())
def _projection_backward_op(dproj: torch.Tensor, X: torch.Tensor, phi: torch.Tensor, proj: torch.Tensor,
                            rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    X, phi, dproj = last_dim_contiguous(X), phi.contiguous(), dproj.contiguous()
    M, n, D = X.shape
    meta = _proj_meta(X, phi)
    dX = torch.empty(M, n, D, device=X.device, dtype=X.dtype)
    splits = max(1, min(_PHI_SPLITS, cdiv(M, _PROJ_BLOCK_M)))
    part = torch.zeros(splits, n * D, phi.shape[1], device=X.device, dtype=torch.float32)
    if M > 0:
        _proj_bwd_x_kernel[(cdiv(M, _PROJ_BLOCK_M),)](X, phi, proj, rstd, dproj, dX, M, D, X.stride(0), X.stride(1),
                                                     **meta)
        per_split = cdiv(cdiv(M, splits), _PROJ_BLOCK_M) * _PROJ_BLOCK_M
        _proj_bwd_phi_kernel[(n * cdiv(D, meta["BLOCK_D"]), splits)](
            X, rstd, dproj, part, M, D, X.stride(0), X.stride(1), per_split, **meta)
    return dX, part.sum(0).to(phi.dtype)


@_projection_backward_op.register_fake
def _(dproj, X, phi, proj, rstd):
    return X.new_empty(X.shape), torch.empty_like(phi)


def _projection_setup(ctx, inputs, output):
    X, phi, _ = inputs
    ctx.save_for_backward(X, phi, *output)
    ctx.mark_non_differentiable(output[1])


def _projection_grad(ctx, dproj, _drstd):
    X, phi, proj, rstd = ctx.saved_tensors
    dX, dphi = _projection_backward_op(dproj, X, phi, proj, rstd)
    return dX, dphi, None


_projection_op.register_autograd(_projection_grad, setup_context=_projection_setup)


def projection_fusable(X: torch.Tensor, phi: torch.Tensor) -> bool:
    """:func:`rms_projection` applies: CUDA (or interpreted) half/float32 streams, a float32 phi."""
    return _fused(X) and phi.dtype == torch.float32


def rms_projection(X: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm(X.flatten(-2).float(), eps=eps) @ phi``: ``X [M, n, D]`` (any strides but the
    last), ``phi [n*D, K]`` float32 -> ``[M, K]`` float32, without the normalised X in memory.
    Only where :func:`projection_fusable`."""
    return _projection_op(X, phi, eps)[0]
