"""Triton kernels for the depth half of MoDA (= Flash Depth Attention).

Layout (SPEC section 4, "chunk-aware + group-aware"): one program owns a block of
tokens for one KV head. Its query tile stacks the G query heads of each token
(rows = token-major, head-minor), so every depth K/V row is read once for all G
heads. Columns walk the block's depth entries (token, slot) in order; a score
is kept only where the row's token equals the column's token. Because a
program owns all the depth entries of its tokens, the depth dK/dV are complete
inside one program: no atomics, deterministic.

The forward can start its online softmax from a finished sequence-attention
result (o_seq, lse_seq): that is the exact lse merge of SPEC section 4, fused.
The backward takes the MERGED o and lse, so its probabilities are those of the
one MoDA softmax.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_common import cdiv, dot_precision, head_dim_tile, last_dim_contiguous


@triton.jit
def _depth_fwd_kernel(
    Q, KD, VD, O_SEQ, LSE_SEQ, O, LSE,
    sq_b, sq_t, sq_h,
    skd_b, skd_t, skd_l, skd_h,
    svd_b, svd_t, svd_l, svd_h,
    sos_b, sos_t, sos_h,
    sls_b, sls_h, sls_t,
    so_b, so_t, so_h,
    sl_b, sl_h, sl_t,
    T, L, HK, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr, PRECISION: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // G
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    t0 = pid_t * TOKENS

    rows = tl.arange(0, BLOCK_M)
    row_tok = t0 + rows // G
    row_head = hk * G + rows % G
    row_ok = (rows < TOKENS * G) & (row_tok < T)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    row_tok64 = row_tok.to(tl.int64)

    q = tl.load(
        Q + b * sq_b + row_tok64[:, None] * sq_t + row_head[:, None] * sq_h + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    qk_scale = scale * 1.4426950408889634

    if HAS_SEQ:
        # Resume the online softmax from the sequence part: state (m=lse, l=1, acc=o).
        lse_seq = tl.load(LSE_SEQ + b * sls_b + row_head * sls_h + row_tok64 * sls_t, mask=row_ok, other=0.0)
        m_i = lse_seq.to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        acc = tl.load(
            O_SEQ + b * sos_b + row_tok64[:, None] * sos_t + row_head[:, None] * sos_h + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
        ).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_cols = TOKENS * L
    for n0 in range(0, n_cols, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_tok = t0 + cols // L
        col_slot = cols % L
        col_ok = (cols < n_cols) & (col_tok < T)
        col_tok64 = col_tok.to(tl.int64)
        kd = tl.load(
            KD + b * skd_b + col_tok64[:, None] * skd_t + col_slot[:, None] * skd_l + hk * skd_h + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )
        s = tl.dot(q, tl.trans(kd), input_precision=PRECISION) * qk_scale
        keep = row_ok[:, None] & col_ok[None, :] & (row_tok[:, None] == col_tok[None, :])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vd = tl.load(
            VD + b * svd_b + col_tok64[:, None] * svd_t + col_slot[:, None] * svd_l + hk * svd_h + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(vd.dtype), vd, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(
        O + b * so_b + row_tok64[:, None] * so_t + row_head[:, None] * so_h + dims[None, :],
        out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :],
    )
    tl.store(LSE + b * sl_b + row_head * sl_h + row_tok64 * sl_t, lse, mask=row_ok)


@triton.jit
def _depth_bwd_kernel(
    Q, KD, VD, O, DO, LSE, DQ_IN, DQ, DKD, DVD,
    sq_b, sq_t, sq_h,
    skd_b, skd_t, skd_l, skd_h,
    svd_b, svd_t, svd_l, svd_h,
    so_b, so_t, so_h,
    sdo_b, sdo_t, sdo_h,
    sl_b, sl_h, sl_t,
    sdqi_b, sdqi_t, sdqi_h,
    sdq_b, sdq_t, sdq_h,
    sdk_b, sdk_t, sdk_l, sdk_h,
    sdv_b, sdv_t, sdv_l, sdv_h,
    T, L, HK, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DQ_IN: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // G
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    t0 = pid_t * TOKENS

    rows = tl.arange(0, BLOCK_M)
    row_tok = t0 + rows // G
    row_head = hk * G + rows % G
    row_ok = (rows < TOKENS * G) & (row_tok < T)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    row_tok64 = row_tok.to(tl.int64)
    rmask = row_ok[:, None] & dim_ok[None, :]

    q = tl.load(Q + b * sq_b + row_tok64[:, None] * sq_t + row_head[:, None] * sq_h + dims[None, :], mask=rmask, other=0.0)
    do = tl.load(DO + b * sdo_b + row_tok64[:, None] * sdo_t + row_head[:, None] * sdo_h + dims[None, :], mask=rmask, other=0.0)
    o = tl.load(O + b * so_b + row_tok64[:, None] * so_t + row_head[:, None] * so_h + dims[None, :], mask=rmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse2 = tl.load(LSE + b * sl_b + row_head * sl_h + row_tok64 * sl_t, mask=row_ok, other=0.0).to(tl.float32)
    lse2 = lse2 * 1.4426950408889634
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_cols = TOKENS * L
    for n0 in range(0, n_cols, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_tok = t0 + cols // L
        col_slot = cols % L
        col_ok = (cols < n_cols) & (col_tok < T)
        col_tok64 = col_tok.to(tl.int64)
        cmask = col_ok[:, None] & dim_ok[None, :]
        kd = tl.load(KD + b * skd_b + col_tok64[:, None] * skd_t + col_slot[:, None] * skd_l + hk * skd_h + dims[None, :], mask=cmask, other=0.0)
        vd = tl.load(VD + b * svd_b + col_tok64[:, None] * svd_t + col_slot[:, None] * svd_l + hk * svd_h + dims[None, :], mask=cmask, other=0.0)
        s = tl.dot(q, tl.trans(kd), input_precision=PRECISION) * qk_scale
        keep = row_ok[:, None] & col_ok[None, :] & (row_tok[:, None] == col_tok[None, :])
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vd), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kd.dtype), kd, input_precision=PRECISION)
        dkd = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
        dvd = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dkd_ptr = DKD + b * sdk_b + col_tok64[:, None] * sdk_t + col_slot[:, None] * sdk_l + hk * sdk_h + dims[None, :]
        dvd_ptr = DVD + b * sdv_b + col_tok64[:, None] * sdv_t + col_slot[:, None] * sdv_l + hk * sdv_h + dims[None, :]
        if ACCUMULATE:  # add into gradients that other readers of the same slots also feed
            dkd += tl.load(dkd_ptr, mask=cmask, other=0.0).to(tl.float32)
            dvd += tl.load(dvd_ptr, mask=cmask, other=0.0).to(tl.float32)
        tl.store(dkd_ptr, dkd.to(DKD.dtype.element_ty), mask=cmask)
        tl.store(dvd_ptr, dvd.to(DVD.dtype.element_ty), mask=cmask)

    dq = dq * scale
    if HAS_DQ_IN:
        dq += tl.load(DQ_IN + b * sdqi_b + row_tok64[:, None] * sdqi_t + row_head[:, None] * sdqi_h + dims[None, :],
                      mask=rmask, other=0.0).to(tl.float32)
    tl.store(DQ + b * sdq_b + row_tok64[:, None] * sdq_t + row_head[:, None] * sdq_h + dims[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask)


@functools.lru_cache(maxsize=None)
def _tiles(group: int, head_dim: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M holds whole tokens (G rows each)."""
    block_m = max(16, triton.next_power_of_2(group))
    block_d = head_dim_tile(head_dim)
    # Tiles measured on an H100 (benchmarks/tune_depth.py): within 3% of the best everywhere.
    block_n = 64 if block_d <= 128 else 32
    if backward:
        block_n //= 2
    num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    return block_m, block_n, num_warps, 2


def depth_forward(q, k_depth, v_depth, scale: float, o_seq=None, lse_seq=None, tiles=None):
    """q ``[B, T, Hq, d]``, k_depth/v_depth ``[B, T, L, Hk, d]`` (any strides, last dim contiguous).

    With o_seq ``[B, T, Hq, d]`` and lse_seq ``[B, Hq, T]`` the result is the merged MoDA output.
    Returns o ``[B, T, Hq, d]`` and lse ``[B, Hq, T]`` float32 (same strides as lse_seq when given).
    ``tiles`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the defaults (for tuning).
    """
    B, T, Hq, d = q.shape
    L, Hk = k_depth.shape[2], k_depth.shape[3]
    G = Hq // Hk
    q, k_depth, v_depth = (last_dim_contiguous(x) for x in (q, k_depth, v_depth))
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    has_seq = o_seq is not None
    if has_seq:
        o_seq = last_dim_contiguous(o_seq)
        lse = torch.empty_like(lse_seq)
    else:
        lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
        o_seq, lse_seq = o, lse  # unused placeholders
    block_m, block_n, num_warps, num_stages = tiles or _tiles(G, d, backward=False)
    grid = (cdiv(T, block_m // G), B * Hk)
    _depth_fwd_kernel[grid](
        q, k_depth, v_depth, o_seq, lse_seq, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        *k_depth.stride()[:4], *v_depth.stride()[:4],
        o_seq.stride(0), o_seq.stride(1), o_seq.stride(2),
        lse_seq.stride(0), lse_seq.stride(1), lse_seq.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        T, L, Hk, scale,
        G=G, HEAD_DIM=d, BLOCK_D=head_dim_tile(d), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SEQ=has_seq, PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def depth_backward(q, k_depth, v_depth, o, lse, do, scale: float, dq_in=None, tiles=None,
                   accumulate_into=None):
    """Gradients of the depth entries given the (merged) o and lse.

    Returns dq ``[B, T, Hq, d]`` (dq_in added when given), dk_depth and dv_depth ``[B, T, L, Hk, d]``.
    With ``accumulate_into=(gk, gv)`` (tensors shaped like the depth K/V, any strides) the depth
    gradients are added into them in place and returned.
    """
    B, T, Hq, d = q.shape
    L, Hk = k_depth.shape[2], k_depth.shape[3]
    G = Hq // Hk
    q, k_depth, v_depth, o, do = (last_dim_contiguous(x) for x in (q, k_depth, v_depth, o, do))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if accumulate_into is not None:
        dkd, dvd = accumulate_into
        if dkd.shape != k_depth.shape or dvd.shape != v_depth.shape or dkd.stride(-1) != 1 or dvd.stride(-1) != 1:
            raise ValueError("accumulate_into must match the depth K/V shapes with a contiguous last dim")
    else:
        dkd = torch.empty(k_depth.shape, device=q.device, dtype=q.dtype)
        dvd = torch.empty(v_depth.shape, device=q.device, dtype=q.dtype)
    has_dq_in = dq_in is not None
    if has_dq_in:
        dq_in = last_dim_contiguous(dq_in)
    else:
        dq_in = dq
    block_m, block_n, num_warps, num_stages = tiles or _tiles(G, d, backward=True)
    grid = (cdiv(T, block_m // G), B * Hk)
    _depth_bwd_kernel[grid](
        q, k_depth, v_depth, o, do, lse, dq_in, dq, dkd, dvd,
        q.stride(0), q.stride(1), q.stride(2),
        *k_depth.stride()[:4], *v_depth.stride()[:4],
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        dq_in.stride(0), dq_in.stride(1), dq_in.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *dkd.stride()[:4], *dvd.stride()[:4],
        T, L, Hk, scale,
        G=G, HEAD_DIM=d, BLOCK_D=head_dim_tile(d), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_DQ_IN=has_dq_in, ACCUMULATE=accumulate_into is not None, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dkd, dvd

