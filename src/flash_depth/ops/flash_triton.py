"""Triton flash attention (sequence part of MoDA) with native GQA.

Runs on any CUDA GPU Triton supports (and under ``TRITON_INTERPRET=1`` on CPU).
The causal mask is aligned at the end (query i sits at position i + Tk - Tq), so
the same kernels serve training (Tq == Tk) and cached decoding (Tq < Tk).
The backward takes o and lse as inputs; MoDA passes the MERGED ones, which makes
the sequence gradients those of the joint softmax.

Two optional masks, each a constexpr flag (off, their code is compiled out):
- VARLEN, packed documents (B = 1, cu_seqlens): a per-token document id ``DOC`` keeps a score
  only within one document, and each tile's loop runs over the keys (queries) of the documents
  its rows span, found from ``CU`` (cu_seqlens): tile pairs that share no document are skipped.
- KV_START, left padding: keys before ``KVS[b]`` are padding. The forward and dq loops start at
  that key; a query with no valid key (a padded one) gets o = 0 and lse = -inf.

Each program's loop is split, as in flash attention, into tiles that need no mask and tiles
that do. A tile needs none when every row sees every column: below the causal diagonal, inside Tq
and Tk, and (VARLEN) inside the one document that the program's whole tile belongs to. Those
skip the bounds, causal and document tests and the ``DOC`` loads (done on every tile, those made
the packed path up to 1.26x slower than the dense one on an H200). The diagonal, the ragged end
of Tq / Tk, key tiles with padding (dk/dv) and, with VARLEN, every tile of a program whose tile
spans several documents take the masked body. The unmasked body runs the masked one's operations
minus the masking, and the tiles keep their ascending order, so the split changes no result (bit
for bit under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import cdiv, dot_precision, head_dim_tile, last_dim_contiguous


@triton.jit
def _key_range(pid_m, DOC, CU, KVS, b, TQ, TK, shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, VARLEN: tl.constexpr, KV_START: tl.constexpr):
    """[lo, hi): the keys query tile pid_m can see (the forward's and dq's loop bounds). Its key
    tiles lo + i * BLOCK_N before mask_from are seen whole by every row; those from it on need masks."""
    m_start = pid_m * BLOCK_M
    lo = 0
    hi = TK
    clean_end = TK  # the keys before it, in whole tiles from lo, need no mask
    if CAUSAL:
        hi = tl.minimum(TK, m_start + BLOCK_M + shift)
        # the tile's first row sees up to its own position, every later row further
        clean_end = tl.minimum(clean_end, m_start + 1 + shift)
    if VARLEN:
        # from the start of the tile's first document to the end of its last (causal: its last row)
        first = tl.load(DOC + m_start)
        last = tl.load(DOC + tl.minimum(m_start + BLOCK_M, TQ) - 1)
        lo = tl.load(CU + first)
        doc_end = tl.load(CU + last + 1)
        if not CAUSAL:
            hi = doc_end
        # rows of several documents see different keys: every key tile masked
        clean_end = tl.where(first == last, tl.minimum(clean_end, doc_end), lo)
    if KV_START:
        # keys before lo are never visited, so padding needs no mask of its own
        lo = tl.maximum(tl.load(KVS + b), 0)
    # clamped: clean_end < lo (a padded tile, rows before the first key) means no unmasked tile
    mask_from = lo + tl.maximum(clean_end - lo, 0) // BLOCK_N * BLOCK_N
    return lo, hi, mask_from


@triton.jit
def _score_mask(keep, offs_m, offs_n, n_ok, q_doc, DOC, shift, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """``keep`` [M, N] narrowed to the causal scores and (VARLEN) those within one document."""
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
    if VARLEN:
        keep = keep & (q_doc[:, None] == tl.load(DOC + offs_n, mask=n_ok, other=-2)[None, :])
    return keep


@triton.jit
def _key_tile(n0, TK, dim_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Key rows n0 .. n0 + BLOCK_N - 1 (int32 and int64 offsets), which of them exist, and their
    tile's load mask (the head dimension's bounds only when MASKED=False)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < TK
    mask = dim_ok[None, :]
    if MASKED:
        mask = n_ok[:, None] & mask
    return offs_n, offs_n.to(tl.int64), n_ok, mask


@triton.jit
def _fwd_tiles_loop(acc, m_i, l_i, q, k_base, v_base, sk_t, sv_t, offs_m, q_doc, DOC, TK, shift, qk_scale,
                    start, stop, dims, dim_ok, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    VARLEN: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over key tiles start, start + BLOCK_N, ... < stop; MASKED=False for tiles
    every row sees whole (no score is -inf there, so no row's max can be)."""
    for n0 in range(start, stop, BLOCK_N):
        offs_n, offs_n64, n_ok, kv_mask = _key_tile(n0, TK, dim_ok, BLOCK_N, MASKED)
        k = tl.load(k_base + offs_n64[:, None] * sk_t + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = _score_mask(n_ok[None, :], offs_m, offs_n, n_ok, q_doc, DOC, shift, CAUSAL, VARLEN)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = m_new
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n64[:, None] * sv_t + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE, DOC, CU, KVS,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, sl_b, sl_h, sl_t,
    TQ, TK, HQ, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, KV_START: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    m_ok = offs_m < TQ
    offs_m64 = offs_m.to(tl.int64)
    q = tl.load(Q + b * sq_b + offs_m64[:, None] * sq_t + h * sq_h + dims[None, :],
                mask=m_ok[:, None] & dim_ok[None, :], other=0.0)
    scale = tl.cast(scale, tl.float32)  # Inductor may pass a float64, which would widen every tile it scales
    qk_scale = scale * 1.4426950408889634
    shift = TK - TQ
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi, mask_from = _key_range(pid_m, DOC, CU, KVS, b, TQ, TK, shift, BLOCK_M, BLOCK_N, CAUSAL, VARLEN,
                                   KV_START)
    q_doc = offs_m  # unused without VARLEN
    if VARLEN:
        q_doc = tl.load(DOC + offs_m, mask=m_ok, other=-1)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    acc, m_i, l_i = _fwd_tiles_loop(acc, m_i, l_i, q, k_base, v_base, sk_t, sv_t, offs_m, q_doc, DOC, TK, shift,
                                    qk_scale, lo, mask_from, dims, dim_ok, BLOCK_N, CAUSAL, VARLEN, PRECISION,
                                    MASKED=False)
    acc, m_i, l_i = _fwd_tiles_loop(acc, m_i, l_i, q, k_base, v_base, sk_t, sv_t, offs_m, q_doc, DOC, TK, shift,
                                    qk_scale, mask_from, hi, dims, dim_ok, BLOCK_N, CAUSAL, VARLEN, PRECISION,
                                    MASKED=True)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * so_b + offs_m64[:, None] * so_t + h * so_h + dims[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + b * sl_b + h * sl_h + offs_m64 * sl_t, (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=m_ok)


@triton.jit
def _query_range(pid_n, DOC, CU, KVS, b, TQ, TK, shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, VARLEN: tl.constexpr, KV_START: tl.constexpr):
    """[lo, hi): the queries that can see key tile pid_n (the dk/dv loop bounds). Its query tiles
    lo + i * BLOCK_M in [clean_from, clean_to) see the key tile whole; those before and after need masks."""
    n_start = pid_n * BLOCK_N
    lo = 0
    hi = TQ
    clean_lo = 0  # the unmasked query tiles lie in [clean_lo, clean_hi)
    clean_hi = TQ
    # a key tile past Tk's edge, of several documents or partly padding: every query tile masked
    whole = n_start + BLOCK_N <= TK
    if CAUSAL:
        lo = tl.maximum(n_start - shift, 0) // BLOCK_M * BLOCK_M
        # queries at or after the tile's last key's position see all of it
        clean_lo = n_start + BLOCK_N - 1 - shift
    if VARLEN:
        # the queries of the documents this key tile spans
        first = tl.load(DOC + n_start)
        last = tl.load(DOC + tl.minimum(n_start + BLOCK_N, TK) - 1)
        doc_start = tl.load(CU + first)
        if not CAUSAL:
            lo = doc_start
        hi = tl.load(CU + last + 1)
        clean_lo = tl.maximum(clean_lo, doc_start)
        clean_hi = hi
        whole = whole & (first == last)
    if KV_START:
        kv0 = tl.load(KVS + b)
        whole = whole & (n_start >= kv0)
        hi = tl.where(n_start + BLOCK_N <= kv0, lo, hi)  # a tile of padding only: dK = dV = 0
    # in tiles from lo; the clamps keep lo <= clean_from <= clean_to <= lo + n_tiles * BLOCK_M
    n_tiles = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
    i0 = tl.minimum((tl.maximum(clean_lo - lo, 0) + BLOCK_M - 1) // BLOCK_M, n_tiles)
    i1 = tl.maximum(tl.minimum(tl.maximum(clean_hi - lo, 0) // BLOCK_M, n_tiles), i0)
    i1 = tl.where(whole, i1, i0)
    return lo, hi, lo + i0 * BLOCK_M, lo + i1 * BLOCK_M


@triton.jit
def _dkdv_tiles_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sdo_t, sl_t, offs_n, n_live,
                     k_doc, DOC, TQ, shift, qk_scale, start, stop, dims, dim_ok, BLOCK_M: tl.constexpr,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dK, dV over query tiles start, start + BLOCK_M, ... < stop; MASKED=False for tiles whose every
    row sees the whole key tile."""
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_m64 = offs_m.to(tl.int64)
        if MASKED:
            m_ok = offs_m < TQ
            qmask = m_ok[:, None] & dim_ok[None, :]
            lse2 = tl.load(lse_base + offs_m64 * sl_t, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m64 * sl_t, mask=m_ok, other=0.0)
        else:
            qmask = dim_ok[None, :]
            lse2 = tl.load(lse_base + offs_m64 * sl_t) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m64 * sl_t)
        q = tl.load(q_base + offs_m64[:, None] * sq_t + dims[None, :], mask=qmask, other=0.0)
        do = tl.load(do_base + offs_m64[:, None] * sdo_t + dims[None, :], mask=qmask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [N, M]
        if MASKED:
            keep = n_live[:, None] & m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + shift)
            if VARLEN:
                keep = keep & (k_doc[:, None] == tl.load(DOC + offs_m, mask=m_ok, other=-1)[None, :])
            p_t = tl.where(keep, tl.exp2(s_t - lse2[None, :]), 0.0)
        else:
            p_t = tl.exp2(s_t - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, CU, KVS,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sl_b, sl_h, sl_t, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
    TQ, TK, HK, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, KV_START: tl.constexpr,
):
    # One program per (key block, KV head): it visits all G query heads of its group, so dK/dV
    # need no atomics.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    n_ok = offs_n < TK
    offs_n64 = offs_n.to(tl.int64)
    kmask = n_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + b * sk_b + offs_n64[:, None] * sk_t + hk * sk_h + dims[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * sv_b + offs_n64[:, None] * sv_t + hk * sv_h + dims[None, :], mask=kmask, other=0.0)
    scale = tl.cast(scale, tl.float32)  # Inductor may pass a float64, which would widen every tile it scales
    qk_scale = scale * 1.4426950408889634
    shift = TK - TQ
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, hi, clean_from, clean_to = _query_range(pid_n, DOC, CU, KVS, b, TQ, TK, shift, BLOCK_M, BLOCK_N, CAUSAL,
                                                VARLEN, KV_START)
    n_live = n_ok
    k_doc = offs_n  # unused without VARLEN
    if VARLEN:
        k_doc = tl.load(DOC + offs_n, mask=n_ok, other=-2)
    if KV_START:
        n_live = n_live & (offs_n >= tl.load(KVS + b))
    for g in range(G):
        h = hk * G + g
        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        lse_base = LSE + b * sl_b + h * sl_h
        delta_base = DELTA + b * sl_b + h * sl_h
        # masked (diagonal, or the start of the documents), unmasked, masked (Tq's edge, the end
        # of the key tile's document): the ascending order of a single loop
        dk, dv = _dkdv_tiles_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sdo_t, sl_t, offs_n,
                                  n_live, k_doc, DOC, TQ, shift, qk_scale, lo, clean_from, dims, dim_ok, BLOCK_M,
                                  CAUSAL, VARLEN, PRECISION, MASKED=True)
        dk, dv = _dkdv_tiles_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sdo_t, sl_t, offs_n,
                                  n_live, k_doc, DOC, TQ, shift, qk_scale, clean_from, clean_to, dims, dim_ok,
                                  BLOCK_M, CAUSAL, VARLEN, PRECISION, MASKED=False)
        dk, dv = _dkdv_tiles_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sdo_t, sl_t, offs_n,
                                  n_live, k_doc, DOC, TQ, shift, qk_scale, clean_to, hi, dims, dim_ok, BLOCK_M,
                                  CAUSAL, VARLEN, PRECISION, MASKED=True)
    tl.store(DK + b * sdk_b + offs_n64[:, None] * sdk_t + hk * sdk_h + dims[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * sdv_b + offs_n64[:, None] * sdv_t + hk * sdv_h + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dq_tiles_loop(dq, q, do, lse2, delta, k_base, v_base, sk_t, sv_t, offs_m, m_ok, q_doc, DOC, TK, shift,
                   qk_scale, start, stop, dims, dim_ok, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   VARLEN: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dQ over key tiles start, start + BLOCK_N, ... < stop; MASKED=False for tiles every row sees
    whole (rows past Tq are not stored, so they need no mask either)."""
    for n0 in range(start, stop, BLOCK_N):
        offs_n, offs_n64, n_ok, kmask = _key_tile(n0, TK, dim_ok, BLOCK_N, MASKED)
        k = tl.load(k_base + offs_n64[:, None] * sk_t + dims[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + offs_n64[:, None] * sv_t + dims[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = _score_mask(m_ok[:, None] & n_ok[None, :], offs_m, offs_n, n_ok, q_doc, DOC, shift, CAUSAL, VARLEN)
            p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        else:
            p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, CU, KVS,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sl_b, sl_h, sl_t, sdq_b, sdq_t, sdq_h,
    TQ, TK, HQ, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, KV_START: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    m_ok = offs_m < TQ
    offs_m64 = offs_m.to(tl.int64)
    qmask = m_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + b * sq_b + offs_m64[:, None] * sq_t + h * sq_h + dims[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sdo_b + offs_m64[:, None] * sdo_t + h * sdo_h + dims[None, :], mask=qmask, other=0.0)
    lse2 = tl.load(LSE + b * sl_b + h * sl_h + offs_m64 * sl_t, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b * sl_b + h * sl_h + offs_m64 * sl_t, mask=m_ok, other=0.0)
    scale = tl.cast(scale, tl.float32)  # Inductor may pass a float64, which would widen every tile it scales
    qk_scale = scale * 1.4426950408889634
    shift = TK - TQ
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi, mask_from = _key_range(pid_m, DOC, CU, KVS, b, TQ, TK, shift, BLOCK_M, BLOCK_N, CAUSAL, VARLEN,
                                   KV_START)
    q_doc = offs_m  # unused without VARLEN
    if VARLEN:
        q_doc = tl.load(DOC + offs_m, mask=m_ok, other=-1)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    dq = _dq_tiles_loop(dq, q, do, lse2, delta, k_base, v_base, sk_t, sv_t, offs_m, m_ok, q_doc, DOC, TK, shift,
                        qk_scale, lo, mask_from, dims, dim_ok, BLOCK_N, CAUSAL, VARLEN, PRECISION, MASKED=False)
    dq = _dq_tiles_loop(dq, q, do, lse2, delta, k_base, v_base, sk_t, sv_t, offs_m, m_ok, q_doc, DOC, TK, shift,
                        qk_scale, mask_from, hi, dims, dim_ok, BLOCK_N, CAUSAL, VARLEN, PRECISION, MASKED=True)
    tl.store(DQ + b * sdq_b + offs_m64[:, None] * sdq_t + h * sdq_h + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


def _fwd_tiles(block_d: int) -> tuple[int, int, int]:
    if block_d <= 64:
        return 128, 64, 4
    if block_d <= 128:
        return 128, 64, 8
    return 64, 32, 8


def _bwd_tiles(block_d: int) -> tuple[int, int, int]:
    if block_d <= 64:
        return 64, 64, 4
    if block_d <= 128:
        return 64, 64, 8
    return 32, 32, 8


def _mask_args(q, cu_seqlens, kv_start):
    """(DOC, CU, KVS) kernel arguments and the constexpr flags; unused pointers get a placeholder."""
    doc = cu = kvs = q
    if cu_seqlens is not None:
        tokens = torch.arange(q.shape[1], device=q.device, dtype=torch.int32)
        doc = torch.searchsorted(cu_seqlens[1:], tokens, right=True).to(torch.int32)  # document of each token
        cu = cu_seqlens
    if kv_start is not None:
        kvs = kv_start
    return (doc, cu, kvs), dict(VARLEN=cu_seqlens is not None, KV_START=kv_start is not None)


def flash_forward(q, k, v, *, causal: bool, scale: float, cu_seqlens=None, max_seqlen=None, kv_start=None):
    """q ``[B, Tq, Hq, d]``, k/v ``[B, Tk, Hk, d]`` -> o ``[B, Tq, Hq, d]``, lse ``[B, Hq, Tq]`` float32.

    cu_seqlens int32 ``[num_docs + 1]`` (B = 1, Tq = Tk): packed documents, attention within each.
    kv_start int32 ``[B]``: keys before it are padding. max_seqlen is not needed by these kernels
    (their grid covers all tokens); it is taken so that callers pass the flash-attn set unchanged.
    """
    B, Tq, Hq, d = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    block_d = head_dim_tile(d)
    block_m, block_n, num_warps = _fwd_tiles(block_d)
    masks, flags = _mask_args(q, cu_seqlens, kv_start)
    grid = (cdiv(Tq, block_m), B * Hq)
    _flash_fwd_kernel[grid](
        q, k, v, o, lse, *masks,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *lse.stride(),
        Tq, Tk, Hq, scale,
        G=Hq // Hk, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, PRECISION=dot_precision(q.dtype), **flags, num_warps=num_warps, num_stages=3,
    )
    return o, lse


def flash_backward(do, q, k, v, o, lse, *, causal: bool, scale: float, cu_seqlens=None, max_seqlen=None,
                   kv_start=None):
    """Gradients of sequence attention given the (possibly merged) o and lse ``[B, Hq, Tq]``; masks
    as :func:`flash_forward`."""
    B, Tq, Hq, d = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    q, k, v, do = (last_dim_contiguous(x) for x in (q, k, v, do))
    # rowsum(dO * O), in the [B, H, T] layout of lse
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    lse = lse.contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=q.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=q.dtype)
    block_d = head_dim_tile(d)
    block_m, block_n, num_warps = _bwd_tiles(block_d)
    masks, flags = _mask_args(q, cu_seqlens, kv_start)
    common = dict(G=Hq // Hk, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                  CAUSAL=causal, PRECISION=dot_precision(q.dtype), **flags, num_warps=num_warps, num_stages=2)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *lse.stride())
    _flash_bwd_dkdv_kernel[(cdiv(Tk, block_n), B * Hk)](
        q, k, v, do, lse, delta, dk, dv, *masks, *strides, *dk.stride()[:3], *dv.stride()[:3],
        Tq, Tk, Hk, scale, **common,
    )
    _flash_bwd_dq_kernel[(cdiv(Tq, block_m), B * Hq)](
        q, k, v, do, lse, delta, dq, *masks, *strides, *dq.stride()[:3],
        Tq, Tk, Hq, scale, **common,
    )
    return dq, dk, dv
