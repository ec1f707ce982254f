"""Triton kernels for the dense mix (MUDDFormer's multiway read, ops/dense_mix.py).

    out[s] = sum_j a[..., s, j] X_j         a [B, T, S, n], X [n, B, T, D], out [S, B, T, D]

The mix is memory-bound: per token it reads n rows of D values for S*n*D multiply-adds. Each
kernel walks j = 0 .. n-1 once per row block, so every byte of X is read once for all S ways:
- forward: a program owns (BLOCK_M rows, BLOCK_D columns) and keeps S float32 accumulators;
- backward: a program owns BLOCK_M whole rows (the dot over D is complete in the program) and
  keeps the S rows of dout in registers; per j it writes da[t, s, j] = <dout_s, X_j> and
  dX_j = sum_s a[s, j] dout_s, added into a float32 buffer (the model's stream, which every
  later mix adds into) or stored (the only reader). The stream pairs its mixes: one adds only
  dX of its newest state (``GRAD_FROM``), the next adds its own dX_j together with the terms of
  that pending one (A2, DO2) in a single read-modify-write of the float32 buffer.

Tiles are ``[BLOCK_M, BLOCK_D]``, one per way (at most 4, ``MAX_WAYS`` in ops/dense_mix.py;
unrolled at compile time): a 3-D ``[S, BLOCK_M, BLOCK_D]`` tile compiled (sm_90, Triton 3.9) with
a layout conversion of X through shared memory at every j, the per-way tiles with none. Rows are
tokens (b, t), addressed through the B and T strides of each tensor: X is a slice of the stream
buffer, a may be any view.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_common import cdiv, last_dim_contiguous


@triton.jit
def _row_offsets(rows, T, s_b, s_t):
    """Offsets of token rows (b * T + t, int64) in a tensor with B stride s_b and T stride s_t."""
    return (rows // T) * s_b + (rows % T) * s_t


@triton.jit
def _fwd_way(acc, A, a_offs, row_ok, x):
    w = tl.load(A + a_offs, mask=row_ok, other=0.0).to(tl.float32)
    return acc + w[:, None] * x


@triton.jit(do_not_specialize=["N"])  # one compiled kernel for every depth
def _mix_fwd_kernel(
    A, X, O,
    sa_b, sa_t, sa_s, sa_j, sx_j, sx_b, sx_t, so_s, so_b, so_t,
    T, M, N, D,
    S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    mask = row_ok[:, None] & (dims < D)[None, :]
    x_offs = _row_offsets(rows, T, sx_b, sx_t)[:, None] + dims[None, :]
    a_offs = _row_offsets(rows, T, sa_b, sa_t)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for _ in range(N):
        x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        acc0 = _fwd_way(acc0, A, a_offs, row_ok, x)
        if S > 1:
            acc1 = _fwd_way(acc1, A, a_offs + sa_s, row_ok, x)
        if S > 2:
            acc2 = _fwd_way(acc2, A, a_offs + 2 * sa_s, row_ok, x)
        if S > 3:
            acc3 = _fwd_way(acc3, A, a_offs + 3 * sa_s, row_ok, x)
        X += sx_j  # 64-bit base pointers step by step: j * sx_j passes 2^31 at training shapes
        A += sa_j
    o_ptrs = O + _row_offsets(rows, T, so_b, so_t)[:, None] + dims[None, :]
    tl.store(o_ptrs, acc0.to(O.dtype.element_ty), mask=mask)
    if S > 1:  # pointers step by step here too: 3 * so_s can pass 2^31 where so_s does not
        o_ptrs += so_s
        tl.store(o_ptrs, acc1.to(O.dtype.element_ty), mask=mask)
    if S > 2:
        o_ptrs += so_s
        tl.store(o_ptrs, acc2.to(O.dtype.element_ty), mask=mask)
    if S > 3:
        o_ptrs += so_s
        tl.store(o_ptrs, acc3.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _load_ways(DO, offs, s_s, mask, S: tl.constexpr):
    """The first S (<= 4) way tiles of dout in float32; placeholders for the rest (never read)."""
    ptrs = DO + offs
    do0 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    do1, do2, do3 = do0, do0, do0
    if S > 1:  # pointers step by step: 3 * s_s can pass 2^31
        ptrs += s_s
        do1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if S > 2:
        ptrs += s_s
        do2 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if S > 3:
        ptrs += s_s
        do3 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return do0, do1, do2, do3


@triton.jit
def _dx_ways(dx, do0, do1, do2, do3, A, a_offs, sa_s, row_ok, S: tl.constexpr):
    """dx + sum_s a[s, j] dout_s over S ways (A at column j)."""
    dx += tl.load(A + a_offs, mask=row_ok, other=0.0).to(tl.float32)[:, None] * do0
    if S > 1:
        dx += tl.load(A + a_offs + sa_s, mask=row_ok, other=0.0).to(tl.float32)[:, None] * do1
    if S > 2:
        dx += tl.load(A + a_offs + 2 * sa_s, mask=row_ok, other=0.0).to(tl.float32)[:, None] * do2
    if S > 3:
        dx += tl.load(A + a_offs + 3 * sa_s, mask=row_ok, other=0.0).to(tl.float32)[:, None] * do3
    return dx


@triton.jit
def _store_da(DA, offs, do, x, row_ok):
    tl.store(DA + offs, tl.sum(do * x, 1).to(DA.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["N", "GRAD_FROM"])
def _mix_bwd_kernel(
    A, X, DO, DA, DX, A2, DO2,
    sa_b, sa_t, sa_s, sa_j, sx_j, sx_b, sx_t, sdo_s, sdo_b, sdo_t, sda_b, sda_t, sda_s, sda_j,
    sdx_j, sdx_b, sdx_t, sa2_b, sa2_t, sa2_s, sa2_j, sdo2_s, sdo2_b, sdo2_t,
    T, M, N, D, GRAD_FROM,
    S: tl.constexpr, S2: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """da of this read for every j; dX_j for j >= GRAD_FROM, with the terms of a pending read
    (A2, DO2: S2 ways, 0 for none) added in the same read-modify-write."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    dims = tl.max_contiguous(tl.arange(0, BLOCK_D), 4)  # X and dout (16-bit) in the float32 layout of dX
    row_ok = rows < M
    mask = row_ok[:, None] & (dims < D)[None, :]
    do0, do1, do2, do3 = _load_ways(DO, _row_offsets(rows, T, sdo_b, sdo_t)[:, None] + dims[None, :], sdo_s, mask, S)
    if S2 > 0:
        pd0, pd1, pd2, pd3 = _load_ways(DO2, _row_offsets(rows, T, sdo2_b, sdo2_t)[:, None] + dims[None, :], sdo2_s,
                                        mask, S2)
    x_offs = _row_offsets(rows, T, sx_b, sx_t)[:, None] + dims[None, :]
    dx_offs = _row_offsets(rows, T, sdx_b, sdx_t)[:, None] + dims[None, :]
    a_offs = _row_offsets(rows, T, sa_b, sa_t)
    a2_offs = _row_offsets(rows, T, sa2_b, sa2_t)
    da_offs = _row_offsets(rows, T, sda_b, sda_t)
    for j in range(N):
        x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        _store_da(DA, da_offs, do0, x, row_ok)
        if S > 1:
            _store_da(DA, da_offs + sda_s, do1, x, row_ok)
        if S > 2:
            _store_da(DA, da_offs + 2 * sda_s, do2, x, row_ok)
        if S > 3:
            _store_da(DA, da_offs + 3 * sda_s, do3, x, row_ok)
        if j >= GRAD_FROM:
            dx = _dx_ways(tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), do0, do1, do2, do3, A, a_offs, sa_s,
                          row_ok, S)
            if S2 > 0:
                dx = _dx_ways(dx, pd0, pd1, pd2, pd3, A2, a2_offs, sa2_s, row_ok, S2)
            if ACCUMULATE:
                dx += tl.load(DX + dx_offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)
        X += sx_j
        A += sa_j
        A2 += sa2_j
        DA += sda_j
        DX += sdx_j


@functools.lru_cache(maxsize=None)  # on every call's host path
def _tiles(S: int, D: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): one row per program on one warp (per 512 columns). Swept on
    an H200 at D=384, S=4 (benchmarks/bench_dense_mix.py --tune, log
    benchmarks/results/logs/s9_bench_dense_mix_h200.log): the forward's 128-column chunks ran at
    3142 GB/s on (1, 128, 1) against 2785 on the (8, 128, 2) first guess, and the pairing
    backward (whole rows, D padded to a power of two for the dot over D) at 3090 GB/s on
    (1, 512, 1) against 1999 on (2, 512, 2): small programs keep more of them, and so more
    loads, in flight per SM."""
    if backward:
        block_d = triton.next_power_of_2(D)
        return 1, block_d, max(1, block_d // 512)
    return 1, min(128, triton.next_power_of_2(D)), 1


def mix_forward(a: torch.Tensor, states: torch.Tensor, out_dtype: torch.dtype,
                tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """a ``[B, T, S, n]``, states ``[n, B, T, D]`` (any strides) -> out ``[S, B, T, D]`` in
    ``out_dtype``. ``tiles`` overrides :func:`_tiles` (for tuning)."""
    states = last_dim_contiguous(states)
    n, B, T, D = states.shape
    S, M = a.shape[2], B * T
    out = torch.empty((S, B, T, D), dtype=out_dtype, device=states.device)
    block_m, block_d, num_warps = tiles or _tiles(S, D, backward=False)
    sa, sx, so = a.stride(), states.stride(), out.stride()
    _mix_fwd_kernel[(cdiv(M, block_m), cdiv(D, block_d))](
        a, states, out,
        sa[0], sa[1], sa[2], sa[3], sx[0], sx[1], sx[2], so[0], so[1], so[2],
        T, M, n, D,
        S=S, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def mix_backward(a: torch.Tensor, states: torch.Tensor, dout: torch.Tensor, grad_states: torch.Tensor | None,
                 pending: tuple[torch.Tensor, torch.Tensor] | None = None, grad_from: int = 0,
                 tiles: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`mix_forward` for dout ``[S, B, T, D]``. Returns (da ``[B, T, S, n]`` in
    a's dtype, d states ``[n, B, T, D]``). With ``grad_states`` (``[n, B, T, D]``, any float
    dtype, unit stride in D: written in place) d states is added into it and it is returned;
    without, a new tensor in the states' dtype. Only d states[grad_from:] is formed. ``pending``:
    (a2 ``[B, T, S2, >= n]``, dout2 ``[S2, B, T, D]``) of another read, whose terms
    sum_s a2[s, j] dout2_s for j < n join d states (its da is not formed)."""
    if grad_states is not None and grad_states.stride(-1) != 1:
        raise ValueError(f"grad_states must have unit stride in D (added into in place), got strides "
                         f"{grad_states.stride()}")
    states, dout = last_dim_contiguous(states), last_dim_contiguous(dout)
    n, B, T, D = states.shape
    S, M = a.shape[2], B * T
    a2, dout2 = (a, dout) if pending is None else (pending[0], last_dim_contiguous(pending[1]))
    S2 = 0 if pending is None else a2.shape[2]
    da = torch.empty((B, T, S, n), dtype=a.dtype, device=a.device)
    accumulate = grad_states is not None
    if not accumulate:  # every element is written once, with the whole sum over the ways
        grad_states = torch.empty((n, B, T, D), dtype=states.dtype, device=states.device)
    block_m, block_d, num_warps = tiles or _tiles(S + S2, D, backward=True)
    if block_d < D:
        raise ValueError(f"the backward's BLOCK_D must hold a whole row (D={D}), got tiles {tiles}")
    sa, sx, sdo, sda, sdx = a.stride(), states.stride(), dout.stride(), da.stride(), grad_states.stride()
    sa2, sdo2 = a2.stride(), dout2.stride()
    _mix_bwd_kernel[(cdiv(M, block_m),)](
        a, states, dout, da, grad_states, a2, dout2,
        sa[0], sa[1], sa[2], sa[3], sx[0], sx[1], sx[2], sdo[0], sdo[1], sdo[2], sda[0], sda[1], sda[2], sda[3],
        sdx[0], sdx[1], sdx[2], sa2[0], sa2[1], sa2[2], sa2[3], sdo2[0], sdo2[1], sdo2[2],
        T, M, n, D, grad_from,
        S=S, S2=S2, ACCUMULATE=accumulate, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return da, grad_states
