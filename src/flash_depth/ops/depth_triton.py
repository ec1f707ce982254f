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

Deferred slot gradients (a model's depth stream): a slot written by one layer is
read by every later layer. Instead of each reader adding its share into a float32
gradient buffer (a read-modify-write of 4x the bf16 K/V bytes per reader), readers
compute only dq (``depth_backward(..., slot_grads=False)``, which also stores
rowsum(dO * o)), and when the backward reaches the producer, one launch of
``depth_slot_backward`` recomputes p and dS for all of the slot's readers from their
q, dO, lse and rowsum and sums dK/dV in registers: each slot gradient is written once,
in the slot's dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_common import cdiv, dot_precision, head_dim_tile, last_dim_contiguous


@triton.jit
def _depth_fwd_kernel(
    Q, KD, VD, KS, VS, O_SEQ, LSE_SEQ, O, LSE,
    sq_b, sq_t, sq_h,
    skd_b, skd_t, skd_l, skd_h,
    svd_b, svd_t, svd_l, svd_h,
    sks_b, sks_t, sks_l, sks_h,
    svs_b, svs_t, svs_l, svs_h,
    sos_b, sos_t, sos_h,
    sls_b, sls_h, sls_t,
    so_b, so_t, so_h,
    sl_b, sl_h, sl_t,
    T, L, HK, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr, FP8: tl.constexpr, COL_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
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
    scale = tl.cast(scale, tl.float32)  # Inductor may pass a float64, which would widen every tile it scales
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
        if FP8:  # e4m3 codes are exact in q's dtype; a slot row's scale multiplies its score column
            ks = tl.load(KS + b * sks_b + col_tok64 * sks_t + col_slot * sks_l + hk * sks_h, mask=col_ok, other=0.0)
            s = tl.dot(q, tl.trans(kd.to(q.dtype)), input_precision=PRECISION) * (ks * qk_scale)[None, :]
        else:
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
        if FP8:  # ... and its probability column
            vs = tl.load(VS + b * svs_b + col_tok64 * svs_t + col_slot * svs_l + hk * svs_h, mask=col_ok, other=0.0)
            acc = acc * alpha[:, None] + tl.dot((p * vs[None, :]).to(COL_DTYPE), vd.to(COL_DTYPE),
                                                input_precision=PRECISION)
        else:
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
    Q, KD, VD, KS, VS, O, DO, LSE, DQ_IN, DQ, DKD, DVD, DELTA,
    sq_b, sq_t, sq_h,
    skd_b, skd_t, skd_l, skd_h,
    svd_b, svd_t, svd_l, svd_h,
    sks_b, sks_t, sks_l, sks_h,
    svs_b, svs_t, svs_l, svs_h,
    so_b, so_t, so_h,
    sdo_b, sdo_t, sdo_h,
    sl_b, sl_h, sl_t,
    sdqi_b, sdqi_t, sdqi_h,
    sdq_b, sdq_t, sdq_h,
    sdk_b, sdk_t, sdk_l, sdk_h,
    sdv_b, sdv_t, sdv_l, sdv_h,
    sdl_b, sdl_h, sdl_t,
    T, L, HK, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DQ_IN: tl.constexpr, SLOT_GRADS: tl.constexpr, STORE_DELTA: tl.constexpr, FP8: tl.constexpr,
    COL_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
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
    if STORE_DELTA:  # for the deferred slot gradients
        tl.store(DELTA + b * sdl_b + row_head * sdl_h + row_tok64 * sdl_t, delta, mask=row_ok)
    lse2 = tl.load(LSE + b * sl_b + row_head * sl_h + row_tok64 * sl_t, mask=row_ok, other=0.0).to(tl.float32)
    lse2 = lse2 * 1.4426950408889634
    scale = tl.cast(scale, tl.float32)  # Inductor may pass a float64, which would widen every tile it scales
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
        if FP8:  # the scales multiply score, dP and dS columns, as in the forward
            ks = tl.load(KS + b * sks_b + col_tok64 * sks_t + col_slot * sks_l + hk * sks_h, mask=col_ok, other=0.0)
            vs = tl.load(VS + b * svs_b + col_tok64 * svs_t + col_slot * svs_l + hk * svs_h, mask=col_ok, other=0.0)
            kd, vd = kd.to(q.dtype), vd.to(q.dtype)
            s = tl.dot(q, tl.trans(kd), input_precision=PRECISION) * (ks * qk_scale)[None, :]
        else:
            s = tl.dot(q, tl.trans(kd), input_precision=PRECISION) * qk_scale
        keep = row_ok[:, None] & col_ok[None, :] & (row_tok[:, None] == col_tok[None, :])
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vd), input_precision=PRECISION)
        if FP8:
            dp = dp * vs[None, :]
        ds = p * (dp - delta[:, None])
        if FP8:
            dq += tl.dot((ds * ks[None, :]).to(COL_DTYPE), kd.to(COL_DTYPE), input_precision=PRECISION)
        else:
            dq += tl.dot(ds.to(kd.dtype), kd, input_precision=PRECISION)
        if SLOT_GRADS:
            dkd = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
            dvd = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dkd_ptr = DKD + b * sdk_b + col_tok64[:, None] * sdk_t + col_slot[:, None] * sdk_l + hk * sdk_h + dims[None, :]
            dvd_ptr = DVD + b * sdv_b + col_tok64[:, None] * sdv_t + col_slot[:, None] * sdv_l + hk * sdv_h + dims[None, :]
            tl.store(dkd_ptr, dkd.to(DKD.dtype.element_ty), mask=cmask)
            tl.store(dvd_ptr, dvd.to(DVD.dtype.element_ty), mask=cmask)

    dq = dq * scale
    if HAS_DQ_IN:
        dq += tl.load(DQ_IN + b * sdqi_b + row_tok64[:, None] * sdqi_t + row_head[:, None] * sdqi_h + dims[None, :],
                      mask=rmask, other=0.0).to(tl.float32)
    tl.store(DQ + b * sdq_b + row_tok64[:, None] * sdq_t + row_head[:, None] * sdq_h + dims[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask)



@triton.jit
def _slot_grad_reader(q_ptr, do_ptr, lse_ptr, delta_ptr, r, b, head, toks64, tok_ok, dims, rmask,
                      sq_r, sq_b, sq_t, sq_h, sdo_r, sdo_b, sdo_t, sdo_h, sl_r, sl_b, sl_h, sl_t,
                      sd_r, sd_b, sd_h, sd_t):
    """One reader's q, dO (float32 ``[BLOCK_T, BLOCK_D]``), lse (log2 units) and rowsum for one head."""
    r64 = b * 0 + r  # 64-bit reader offset (b is int64; the loop index is int32, or an int when interpreted)
    q = tl.load(q_ptr + r64 * sq_r + b * sq_b + toks64[:, None] * sq_t + head * sq_h + dims[None, :],
                mask=rmask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + r64 * sdo_r + b * sdo_b + toks64[:, None] * sdo_t + head * sdo_h + dims[None, :],
                 mask=rmask, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + r64 * sl_r + b * sl_b + head * sl_h + toks64 * sl_t, mask=tok_ok, other=0.0)
    delta = tl.load(delta_ptr + r64 * sd_r + b * sd_b + head * sd_h + toks64 * sd_t, mask=tok_ok, other=0.0)
    return q, do, lse2 * 1.4426950408889634, delta


@triton.jit
def _slot_grad_step(q, do, lse2, delta, k, v, dk, dv, qk_scale):
    """Adds one reader head's share to one slot's dK (unscaled) and dV: p and dS from one query row per token."""
    p = tl.exp2(tl.sum(q * k, 1) * qk_scale - lse2)
    ds = p * (tl.sum(do * v, 1) - delta)
    return dk + ds[:, None] * q, dv + p[:, None] * do


@triton.jit
def _depth_slot_grad_kernel(
    Q, DO, LSE, DELTA, KD, VD, KS, VS, DKD, DVD,
    sq_r, sq_b, sq_t, sq_h,
    sdo_r, sdo_b, sdo_t, sdo_h,
    sl_r, sl_b, sl_h, sl_t,
    sd_r, sd_b, sd_h, sd_t,
    skd_b, skd_t, skd_l, skd_h,
    svd_b, svd_t, svd_l, svd_h,
    sks_b, sks_t, sks_l, sks_h,
    svs_b, svs_t, svs_l, svs_h,
    sdk_b, sdk_t, sdk_l, sdk_h,
    sdv_b, sdv_t, sdv_l, sdv_h,
    T, HK, SLOT0, R_START, R_END, scale,
    G: tl.constexpr, SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    FP8: tl.constexpr, STAGES: tl.constexpr,
):
    """dK/dV of depth slots SLOT0 (and SLOT0 + 1 when SLOTS == 2) summed over readers
    R_START..R_END-1, all of which read both slots. One program: BLOCK_T tokens of one KV head.
    Each (reader, head, token) touches one K/V row per slot: row-wise products on the CUDA
    cores (a tensor-core tile would be block-diagonal, mostly masked)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < T
    toks64 = toks.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    rmask = tok_ok[:, None] & (dims < HEAD_DIM)[None, :]
    scale = tl.cast(scale, tl.float32)  # Inductor may pass a float64, which would widen every tile it scales
    qk_scale = scale * 1.4426950408889634

    kv_row = b * skd_b + toks64[:, None] * skd_t + hk * skd_h + dims[None, :]
    vv_row = b * svd_b + toks64[:, None] * svd_t + hk * svd_h + dims[None, :]
    k0 = tl.load(KD + kv_row + SLOT0 * skd_l, mask=rmask, other=0.0).to(tl.float32)
    v0 = tl.load(VD + vv_row + SLOT0 * svd_l, mask=rmask, other=0.0).to(tl.float32)
    if FP8:  # dequantised once per program: the gradient is that of the dequantised slot (straight through)
        ks_row = b * sks_b + toks64 * sks_t + hk * sks_h
        vs_row = b * svs_b + toks64 * svs_t + hk * svs_h
        k0 *= tl.load(KS + ks_row + SLOT0 * sks_l, mask=tok_ok, other=0.0)[:, None]
        v0 *= tl.load(VS + vs_row + SLOT0 * svs_l, mask=tok_ok, other=0.0)[:, None]
    dk0 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if SLOTS == 2:
        k1 = tl.load(KD + kv_row + (SLOT0 + 1) * skd_l, mask=rmask, other=0.0).to(tl.float32)
        v1 = tl.load(VD + vv_row + (SLOT0 + 1) * svd_l, mask=rmask, other=0.0).to(tl.float32)
        if FP8:
            k1 *= tl.load(KS + ks_row + (SLOT0 + 1) * sks_l, mask=tok_ok, other=0.0)[:, None]
            v1 *= tl.load(VS + vs_row + (SLOT0 + 1) * svs_l, mask=tok_ok, other=0.0)[:, None]
        dk1 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    # tl.range: later readers' q and dO load while one is reduced. With a plain range the launch's
    # num_stages changed nothing (H200: 7.22 ms a step at 2, 3 and 4 stages; 6.17 ms like this).
    for r in tl.range(R_START, R_END, num_stages=STAGES):
        for g in tl.static_range(G):
            q, do, lse2, delta = _slot_grad_reader(
                Q, DO, LSE, DELTA, r, b, hk * G + g, toks64, tok_ok, dims, rmask,
                sq_r, sq_b, sq_t, sq_h, sdo_r, sdo_b, sdo_t, sdo_h, sl_r, sl_b, sl_h, sl_t, sd_r, sd_b, sd_h, sd_t)
            dk0, dv0 = _slot_grad_step(q, do, lse2, delta, k0, v0, dk0, dv0, qk_scale)
            if SLOTS == 2:
                dk1, dv1 = _slot_grad_step(q, do, lse2, delta, k1, v1, dk1, dv1, qk_scale)

    dk_row = b * sdk_b + toks64[:, None] * sdk_t + hk * sdk_h + dims[None, :]
    dv_row = b * sdv_b + toks64[:, None] * sdv_t + hk * sdv_h + dims[None, :]
    tl.store(DKD + dk_row, (dk0 * scale).to(DKD.dtype.element_ty), mask=rmask)
    tl.store(DVD + dv_row, dv0.to(DVD.dtype.element_ty), mask=rmask)
    if SLOTS == 2:
        tl.store(DKD + dk_row + sdk_l, (dk1 * scale).to(DKD.dtype.element_ty), mask=rmask)
        tl.store(DVD + dv_row + sdv_l, dv1.to(DVD.dtype.element_ty), mask=rmask)


def _scaled_column_dtype(dtype: torch.dtype):
    """The operand dtype of fp8 slots' scaled probability and dS columns (and of the codes beside
    them): q's, except float32 (tf32 dots) for fp16 queries, whose columns (times amax / 448) fall
    into fp16's subnormals. e4m3 codes are exact in all three."""
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float32


def _slot_scales(k_depth, v_depth, slot_scales):
    """(FP8, KS, VS, their 8 strides) for a launch. fp8 slots need ``slot_scales`` = (k_scale, v_scale)
    ``[B, T, L, Hk]`` float32, one per row of d values; other slots take none (placeholders: never read)."""
    e4m3 = getattr(torch, "float8_e4m3fn", None)
    fp8 = k_depth.dtype == e4m3
    if fp8 != (v_depth.dtype == e4m3) or fp8 != (slot_scales is not None):
        raise ValueError(f"slot_scales (k_scale, v_scale) go with float8_e4m3fn k_depth and v_depth, and only "
                         f"with them; got k_depth {k_depth.dtype}, v_depth {v_depth.dtype}, slot_scales "
                         f"{'given' if slot_scales is not None else None}")
    if not fp8:
        return False, k_depth, v_depth, (0,) * 8
    for name, x, depth in (("k_scale", slot_scales[0], k_depth), ("v_scale", slot_scales[1], v_depth)):
        if x.shape != depth.shape[:4] or x.dtype != torch.float32 or x.device != depth.device:
            raise ValueError(f"{name} must be float32 {tuple(depth.shape[:4])} on {depth.device} ([B, T, L, Hk]), "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}")
    return True, slot_scales[0], slot_scales[1], (*slot_scales[0].stride(), *slot_scales[1].stride())


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


def depth_forward(q, k_depth, v_depth, scale: float, o_seq=None, lse_seq=None, tiles=None, slot_scales=None):
    """q ``[B, T, Hq, d]``, k_depth/v_depth ``[B, T, L, Hk, d]`` (any strides, last dim contiguous).

    float8_e4m3fn k_depth/v_depth take ``slot_scales`` = (k_scale, v_scale) ``[B, T, L, Hk]`` float32:
    the slots hold ``k_depth * k_scale[..., None]`` (ops/fp8.py).

    With o_seq ``[B, T, Hq, d]`` and lse_seq ``[B, Hq, T]`` the result is the merged MoDA output.
    Returns o ``[B, T, Hq, d]`` and lse ``[B, Hq, T]`` float32 (same strides as lse_seq when given).
    ``tiles`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the defaults (for tuning).
    """
    B, T, Hq, d = q.shape
    L, Hk = k_depth.shape[2], k_depth.shape[3]
    G = Hq // Hk
    fp8, k_scale, v_scale, scale_strides = _slot_scales(k_depth, v_depth, slot_scales)
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
        q, k_depth, v_depth, k_scale, v_scale, o_seq, lse_seq, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        *k_depth.stride()[:4], *v_depth.stride()[:4], *scale_strides,
        o_seq.stride(0), o_seq.stride(1), o_seq.stride(2),
        lse_seq.stride(0), lse_seq.stride(1), lse_seq.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        T, L, Hk, scale,
        G=G, HEAD_DIM=d, BLOCK_D=head_dim_tile(d), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SEQ=has_seq, FP8=fp8, COL_DTYPE=_scaled_column_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def depth_backward(q, k_depth, v_depth, o, lse, do, scale: float, dq_in=None, tiles=None,
                   slot_grads: bool = True, delta_out=None, slot_scales=None):
    """Gradients of the depth entries given the (merged) o and lse.

    Returns dq ``[B, T, Hq, d]`` (dq_in added when given), dk_depth and dv_depth ``[B, T, L, Hk, d]``.
    With ``slot_grads=False`` only dq is computed (dk_depth, dv_depth are None): the deferred
    path, where ``depth_slot_backward`` forms the slot gradients later. ``delta_out`` ``[B, Hq, T]``
    float32 receives rowsum(dO * o) (what that later pass needs). ``slot_scales``: as
    :func:`depth_forward`; the slot gradients are those of the dequantised slots, in q's dtype.
    """
    B, T, Hq, d = q.shape
    L, Hk = k_depth.shape[2], k_depth.shape[3]
    G = Hq // Hk
    fp8, k_scale, v_scale, scale_strides = _slot_scales(k_depth, v_depth, slot_scales)
    q, k_depth, v_depth, o, do = (last_dim_contiguous(x) for x in (q, k_depth, v_depth, o, do))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if slot_grads:
        dkd = torch.empty(k_depth.shape, device=q.device, dtype=q.dtype)
        dvd = torch.empty(v_depth.shape, device=q.device, dtype=q.dtype)
    else:
        dkd = dvd = None
    has_dq_in = dq_in is not None
    dq_in = last_dim_contiguous(dq_in) if has_dq_in else dq
    dk_arg, dv_arg = (dkd, dvd) if slot_grads else (k_depth, v_depth)  # placeholders: never written
    delta_arg = delta_out if delta_out is not None else lse
    block_m, block_n, num_warps, num_stages = tiles or _tiles(G, d, backward=True)
    grid = (cdiv(T, block_m // G), B * Hk)
    _depth_bwd_kernel[grid](
        q, k_depth, v_depth, k_scale, v_scale, o, do, lse, dq_in, dq, dk_arg, dv_arg, delta_arg,
        q.stride(0), q.stride(1), q.stride(2),
        *k_depth.stride()[:4], *v_depth.stride()[:4], *scale_strides,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        dq_in.stride(0), dq_in.stride(1), dq_in.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *dk_arg.stride()[:4], *dv_arg.stride()[:4],
        delta_arg.stride(0), delta_arg.stride(1), delta_arg.stride(2),
        T, L, Hk, scale,
        G=G, HEAD_DIM=d, BLOCK_D=head_dim_tile(d), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_DQ_IN=has_dq_in, SLOT_GRADS=slot_grads, STORE_DELTA=delta_out is not None, FP8=fp8,
        COL_DTYPE=_scaled_column_dtype(q.dtype),
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dkd, dvd


def depth_slot_backward(q, do, lse, delta, k_depth, v_depth, slot0: int, slots: int, readers: tuple[int, int],
                        scale: float, out_dtype=None, block_t=None, num_warps=None, num_stages=None,
                        slot_scales=None):
    """Deferred gradients of depth slots ``slot0 .. slot0 + slots - 1`` (slots 1 or 2).

    q, do ``[R, B, T, Hq, d]``, lse, delta ``[R, B, Hq, T]`` float32: every reader's query,
    output gradient, merged log-sum-exp and rowsum(dO * o); readers ``readers[0] .. readers[1] - 1``
    all read these slots. k_depth, v_depth ``[B, T, L, Hk, d]`` (any strides, last dim contiguous).
    Returns dk, dv ``[slots, B, T, Hk, d]`` in ``out_dtype`` (default the slots' dtype, q's for fp8
    slots): each slot's gradient contiguous, as the producer's backward receives it. ``slot_scales``:
    as :func:`depth_forward`; the gradients are those of the dequantised slots (straight through).
    ``block_t``, ``num_warps``, ``num_stages`` (sweeps): the tile, default 16 tokens on 4 warps, 3 stages.
    """
    if slots not in (1, 2):
        raise ValueError(f"slots must be 1 or 2, got {slots}")
    _, B, T, Hq, d = q.shape
    Hk = k_depth.shape[3]
    fp8, k_scale, v_scale, scale_strides = _slot_scales(k_depth, v_depth, slot_scales)
    k_depth, v_depth = last_dim_contiguous(k_depth), last_dim_contiguous(v_depth)
    dtype = out_dtype or (q.dtype if fp8 else k_depth.dtype)
    dk = torch.empty((slots, B, T, Hk, d), device=q.device, dtype=dtype)
    dv = torch.empty((slots, B, T, Hk, d), device=q.device, dtype=dtype)
    slot_major = (1, 2, 0, 3)  # the kernel takes (batch, token, slot, head) strides
    block_d = head_dim_tile(d)
    block_t = block_t or 16
    grid = (cdiv(T, block_t), B * Hk)
    _depth_slot_grad_kernel[grid](
        q, do, lse, delta, k_depth, v_depth, k_scale, v_scale, dk, dv,
        *q.stride()[:4], *do.stride()[:4], *lse.stride(), *delta.stride(),
        *k_depth.stride()[:4], *v_depth.stride()[:4], *scale_strides,
        *(dk.stride(i) for i in slot_major), *(dv.stride(i) for i in slot_major),
        T, Hk, slot0, readers[0], readers[1], scale,
        G=Hq // Hk, SLOTS=slots, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t, FP8=fp8, STAGES=num_stages or 3,
        num_warps=num_warps or 4,
    )
    return dk, dv

