"""Triton kernels for the Attention Residuals read (SPEC section 5).

The read is memory-bound: per token it touches N source rows of D values and does O(N*D)
arithmetic. Layout: sources ``V [N, M, D]`` (M = B*T rows, rows contiguous in D) plus an
optional extra source ``P [M, D]`` (block AttnRes' running partial sum, kept apart so the
sources never need restacking). One program owns BLOCK_M rows and walks the sources once
with an online softmax, so every source byte is read once in the forward and once in the
backward, which also writes each source gradient once.

The forward forms ``u = w * g`` (pseudo-query times key-norm weight) and keeps it for the
backward. The query gradient sums over all rows: each persistent backward program keeps its
own partial du in registers and writes it to ``DU[program]``; a small second kernel sums those
rows in a fixed order and writes dw = du * g and dg = du * w, so the result does not depend
on scheduling (deterministic, no atomics). Every gradient is written in its input's dtype.

Deferred source gradients (a model's source stream, where every later read reads a source):
the read's backward can skip the source gradients (``source_grads=False``; it stores
rowsum(dO * o) instead), and ``attnres_source_backward`` later forms one source's gradient over
all of its readers from their u, dO, lse and rowsum, written once: no float32 buffer that every
read adds into.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_common import cdiv


@triton.jit
def _logit(v, u, D, eps):
    """logit = u . v / rms(v) per row, and 1/rms(v)."""
    rstd = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
    return tl.sum(v * u[None, :], 1) * rstd, rstd


@triton.jit
def _fwd_step(v, u, m_i, l_i, acc, D, eps):
    logit, _ = _logit(v, u, D, eps)
    m_new = tl.maximum(m_i, logit)
    scale = tl.exp(m_i - m_new)
    p = tl.exp(logit - m_new)
    return m_new, l_i * scale + p, acc * scale[:, None] + p[:, None] * v


@triton.jit
def _attnres_fwd_kernel(
    V, P, W, G, U, O, LSE,
    sv_n, sv_m, sp_m, sw_s, sg_s, so_s, so_m, sl_s,
    M, N, D, eps,
    HAS_PARTIAL: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)  # s * so_s passes 2^31 for several queries over large B*T*D
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (dims < D)[None, :]
    u = tl.load(W + s * sw_s + dims, mask=dims < D, other=0.0).to(tl.float32)  # sg_s = 0: one g for every query
    if HAS_NORM_WEIGHT:
        u *= tl.load(G + s * sg_s + dims, mask=dims < D, other=0.0).to(tl.float32)
    if pid_m == 0:  # the backward reads u as it was used here
        tl.store(U + s * D + dims, u, mask=dims < D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    v_ptrs = V + rows[:, None] * sv_m + dims[None, :]
    for _ in tl.range(N, num_stages=STAGES):  # a plain range is not pipelined (see the backward)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
        m_i, l_i, acc = _fwd_step(v.to(tl.float32), u, m_i, l_i, acc, D, eps)
        v_ptrs += sv_n  # 64-bit pointers step by step: no int32 overflow of i * stride
    if HAS_PARTIAL:
        v = tl.load(P + rows[:, None] * sp_m + dims[None, :], mask=mask, other=0.0)
        m_i, l_i, acc = _fwd_step(v.to(tl.float32), u, m_i, l_i, acc, D, eps)

    out = acc / l_i[:, None]
    tl.store(O + s * so_s + rows[:, None] * so_m + dims[None, :], out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + s * sl_s + rows, m_i + tl.log(l_i), mask=rows < M)


@triton.jit
def _grad_step(v, u, do, delta, lse, D, eps):
    """Gradient of one source row block and its contribution to du (see the module docstring)."""
    logit, rstd = _logit(v, u, D, eps)
    alpha = tl.exp(logit - lse)
    dlogit = alpha * (tl.sum(do * v, 1) - delta)
    c = dlogit * rstd
    dv = alpha[:, None] * do + c[:, None] * u[None, :] - (c * logit * rstd / D)[:, None] * v
    return dv, tl.sum(c[:, None] * v, 0)


@triton.jit
def _attnres_bwd_kernel(
    V, P, U, O, DO, LSE, DV, DP, DU, DELTA,
    sv_n, sv_m, sp_m, so_m, sdo_m, sdv_n, sdv_m, sdp_m,
    M, N, D, eps, num_blocks,
    HAS_PARTIAL: tl.constexpr, ACCUMULATE_V: tl.constexpr, ACCUMULATE_P: tl.constexpr,
    SOURCE_GRADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    # One query per launch, at its tensors' own base pointers, u read as the forward formed it.
    # Variants that offset by a query index here or formed u = w * g here measured 14-27%
    # slower at D=384 with float32 accumulation (H100), with the loop itself unchanged.
    pid = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)
    u = tl.load(U + dims, mask=dims < D, other=0.0).to(tl.float32)
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    for blk in range(pid, num_blocks, tl.num_programs(0)):
        rows = (blk * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < M)[:, None] & (dims < D)[None, :]
        do = tl.load(DO + rows[:, None] * sdo_m + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        o = tl.load(O + rows[:, None] * so_m + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        delta = tl.sum(do * o, 1)
        lse = tl.load(LSE + rows, mask=rows < M, other=0.0)
        v_ptrs = V + rows[:, None] * sv_m + dims[None, :]
        dv_ptrs = DV + rows[:, None] * sdv_m + dims[None, :]
        # tl.range's stages: later sources load asynchronously while one is reduced (a plain
        # range inside the persistent loop is not pipelined, whatever the launch's num_stages).
        for _ in tl.range(N, num_stages=STAGES):
            v = tl.load(v_ptrs, mask=mask, other=0.0)
            dv, du_i = _grad_step(v.to(tl.float32), u, do, delta, lse, D, eps)
            du += du_i
            if SOURCE_GRADS:
                if ACCUMULATE_V:
                    dv += tl.load(dv_ptrs, mask=mask, other=0.0).to(tl.float32)
                tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)
            v_ptrs += sv_n
            dv_ptrs += sdv_n
        if not SOURCE_GRADS:  # what attnres_source_backward needs
            tl.store(DELTA + rows, delta, mask=rows < M)
        if HAS_PARTIAL:
            v = tl.load(P + rows[:, None] * sp_m + dims[None, :], mask=mask, other=0.0)
            dp, du_p = _grad_step(v.to(tl.float32), u, do, delta, lse, D, eps)
            du += du_p
            dp_ptr = DP + rows[:, None] * sdp_m + dims[None, :]
            if ACCUMULATE_P:
                dp += tl.load(dp_ptr, mask=mask, other=0.0).to(tl.float32)
            tl.store(dp_ptr, dp.to(DP.dtype.element_ty), mask=mask)
    tl.store(DU + pid * D + dims, du, mask=dims < D)


@triton.jit
def _attnres_source_grad_kernel(
    V, U, DO, LSE, DELTA, DV, C,
    sv_m, su_r, sdo_r, sdo_m, sl_r, sd_r, sdv_m, sc_r,
    M, D, eps, R_START, R_END,
    STORE_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    """One source's gradient ``[M, D]`` summed over reads R_START..R_END-1 (each read's u, dO, lse
    and rowsum stacked on a leading reader axis). dv = sum_r alpha_r dO_r + c_r u_r - (c_r logit_r
    rstd / D) v: the last term is a per-row scalar times v, summed before the one multiply.
    STORE_C: also stores every c_r ``[M]`` as row r - R_START of C, this source's share of read
    r's query gradient being du_r = sum_m c_r[m] v[m]."""
    pid = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    mask = row_ok[:, None] & (dims < D)[None, :]
    v = tl.load(V + rows[:, None] * sv_m + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    coef = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r in tl.range(R_START, R_END, num_stages=STAGES):  # later readers load while one is reduced
        r64 = rows * 0 + r  # 64-bit reader offsets (the loop index is int32, or an int when interpreted)
        u = tl.load(U + r * su_r + dims, mask=dims < D, other=0.0)
        do = tl.load(DO + r64[:, None] * sdo_r + rows[:, None] * sdo_m + dims[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        lse = tl.load(LSE + r64 * sl_r + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + r64 * sd_r + rows, mask=row_ok, other=0.0)
        logit = tl.sum(v * u[None, :], 1) * rstd
        alpha = tl.exp(logit - lse)
        c = alpha * (tl.sum(do * v, 1) - delta) * rstd
        acc += alpha[:, None] * do + c[:, None] * u[None, :]
        coef += c * logit
        if STORE_C:
            tl.store(C + (r64 - R_START) * sc_r + rows, c, mask=row_ok)
    dv = acc - (coef * rstd / D)[:, None] * v
    tl.store(DV + rows[:, None] * sdv_m + dims[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attnres_c_times_source_kernel(
    C, V, DU, sc_r, sv_m, sdu_p, sdu_r, R, M, D, rows_per_split,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """DU[split] += C[:, rows of split] @ V[rows of split]: one source's share of R reads' query
    gradients (C ``[R, M]`` float32 from the source-gradient kernel, V ``[M, D]``), each split of
    the rows summed into its own float32 partial, so the order of every sum is fixed."""
    rs = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # rs * sc_r: R * M may pass 2^31
    dims = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    first = split * rows_per_split
    last = tl.minimum(M, first + rows_per_split)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for k in range(first, last, BLOCK_K):
        ks = (k + tl.arange(0, BLOCK_K)).to(tl.int64)
        c = tl.load(C + rs[:, None] * sc_r + ks[None, :], mask=(rs < R)[:, None] & (ks < last)[None, :], other=0.0)
        v = tl.load(V + ks[:, None] * sv_m + dims[None, :], mask=(ks < last)[:, None] & (dims < D)[None, :], other=0.0)
        acc += tl.dot(c, v.to(tl.float32), input_precision=PRECISION)
    ptrs = DU + split * sdu_p + rs[:, None] * sdu_r + dims[None, :]
    mask = (rs < R)[:, None] & (dims < D)[None, :]
    tl.store(ptrs, acc + tl.load(ptrs, mask=mask, other=0.0), mask=mask)


@triton.jit
def _attnres_query_grad_kernel(
    DU, W, G, DW, DG, S, P, D, sw_s, sg_s, sdw_s, sdg_s,
    HAS_NORM_WEIGHT: tl.constexpr, SHARED_NORM_WEIGHT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dw = du * g and dg = du * w from the backward programs' partial sums DU ``[S, P, D]``,
    summed in a fixed order; a norm weight shared by the S queries gets the sum over s."""
    dims = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    progs = tl.arange(0, BLOCK_P)
    dg_total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(S):
        tile = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            mask = ((p0 + progs) < P)[:, None] & (dims < D)[None, :]
            tile += tl.load(DU + (s * P + p0 + progs)[:, None] * D + dims[None, :], mask=mask, other=0.0)
        du = tl.sum(tile, 0)
        if HAS_NORM_WEIGHT:
            w = tl.load(W + s * sw_s + dims, mask=dims < D, other=0.0).to(tl.float32)
            g = tl.load(G + s * sg_s + dims, mask=dims < D, other=0.0).to(tl.float32)
            tl.store(DW + s * sdw_s + dims, (du * g).to(DW.dtype.element_ty), mask=dims < D)
            if SHARED_NORM_WEIGHT:
                dg_total += du * w
            else:
                tl.store(DG + s * sdg_s + dims, (du * w).to(DG.dtype.element_ty), mask=dims < D)
        else:
            tl.store(DW + s * sdw_s + dims, du.to(DW.dtype.element_ty), mask=dims < D)
    if SHARED_NORM_WEIGHT:
        tl.store(DG + dims, dg_total.to(DG.dtype.element_ty), mask=dims < D)


@functools.lru_cache(maxsize=None)  # on every call's host path (next_power_of_2 costs microseconds)
def _tiles(D: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): one row per program and about 16 values a thread (at D <= 512
    one warp), so every row sum stays in one warp. The forward measured 78% of copy bandwidth this
    way at D=384 on the H200 (benchmarks/results/logs/tune_attnres_d384_h200.log; two rows on two
    warps <= 68%). The read's backward, pipelined (BWD_STAGES), compiles to 92-96 registers a thread
    at D=384 for sm_90 (triton 3.6 / 3.9) this way; its old 4 rows on 2 warps took 128 and summed du
    across the warps through shared memory on every source. Above D=512 (not swept since) the
    backward keeps its old 2-4 rows on 4 warps."""
    block_d = triton.next_power_of_2(D)
    if backward:
        return (1, block_d, 1) if block_d <= 512 else (max(2, min(4, 4096 // block_d)), block_d, 4)
    return 1, block_d, 1 if block_d <= 512 else max(2, min(8, block_d // 1024))


@functools.lru_cache(maxsize=None)
def _source_tiles(D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the deferred source gradient: 4 rows on one warp (the
    pipeline copies each reader's float32 u ``[D]`` once a program through L2, 2 KB at D=384,
    more than a row's dO: more rows share it); row sums stay in the warp. Swept on the H200 at
    D=384 (benchmarks/results/logs/s9_tune_attnres_h200.log): 4 rows 70% of copy bandwidth,
    2 rows 63%, the old 4 rows on 2 warps unpipelined 42%. Above D=512 the read backward's tiles."""
    block_d = triton.next_power_of_2(D)
    return (4, block_d, 1) if block_d <= 512 else _tiles(D, backward=True)


# The forward's source loop: not pipelined, as measured (78% of copy at D=384 on the H200 without
# any pipeline; tune_attnres.py sweeps the stages).
FWD_STAGES = 1
# Backward source / reader loops: stages of tl.range's pipeline (2 loads in flight ahead of the one
# being reduced, through shared memory, without holding registers). 4 measured the same.
BWD_STAGES = 3
# Warps per SM of the persistent read backward at D <= 512 (one warp a program). A program that does
# not fit waits for a whole other program to finish: 20 warps of 32 threads fit at <= 96 registers a
# thread (65536 registers, allocated in steps of 8), what the default tiles take at D=384 for sm_90.
# H200 sweep (benchmarks/results/logs/s10_tune_attnres_h200.log): 20 warps 73% of copy, 16 71%, 12 65%.
WARPS_PER_SM = 20
# Above D=512 (4 warps a program, more registers, not swept since): 4 programs an SM.
WARPS_PER_SM_WIDE = 16


def _query_strides(query: torch.Tensor, norm_weight: torch.Tensor | None) -> tuple[int, int]:
    """Per-query strides of w (``[S, D]`` or ``[D]``) and g (0: one g for every query)."""
    sw = query.stride(0) if query.dim() == 2 else 0
    sg = 0 if norm_weight is None or norm_weight.dim() == 1 or norm_weight.shape[0] == 1 else norm_weight.stride(0)
    return sw, sg


def attnres_forward(sources: torch.Tensor, query: torch.Tensor, norm_weight: torch.Tensor | None,
                    partial: torch.Tensor | None, eps: float, tiles: tuple[int, ...] | None = None):
    """sources ``[N, M, D]``, query ``[S, D]`` or ``[D]``, norm_weight ``[S, D]``, ``[D]`` or
    None (any float dtypes, unit stride in D), partial ``[M, D]`` or None.
    Returns out ``[S, M, D]`` (sources' dtype; S = 1 for a query ``[D]``), lse ``[S, M]`` and the
    effective queries u = w * g ``[S, D]``, both float32, which the backward takes. ``tiles``
    (sweeps): (BLOCK_M, num_warps[, stages]) instead of the defaults."""
    N, M, D = sources.shape
    S = query.shape[0] if query.dim() == 2 else 1
    out = torch.empty((S, M, D), dtype=sources.dtype, device=sources.device)
    lse = torch.empty((S, M), dtype=torch.float32, device=sources.device)
    u = torch.empty((S, D), dtype=torch.float32, device=sources.device)
    block_m, block_d, num_warps = _tiles(D, backward=False)
    stages = FWD_STAGES
    if tiles is not None:
        block_m, num_warps, stages = (*tiles, stages)[:3]
    p = sources if partial is None else partial
    sw, sg = _query_strides(query, norm_weight)
    _attnres_fwd_kernel[(cdiv(M, block_m), S)](
        sources, p, query, query if norm_weight is None else norm_weight, u, out, lse,
        sources.stride(0), sources.stride(1), p.stride(-2), sw, sg, out.stride(0), out.stride(1), lse.stride(0),
        M, N, D, eps,
        HAS_PARTIAL=partial is not None, HAS_NORM_WEIGHT=norm_weight is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, STAGES=stages, num_warps=num_warps,
    )
    return out, lse, u


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _num_programs(device: torch.device, num_blocks: int, per_sm: int) -> tuple[int, int]:
    """Persistent backward grid: per_sm programs an SM, each summing its own du (a few in the CPU
    interpreter, so the per-program sums are still exercised); and the tile of those partial sums
    that the query-gradient kernel reduces at once."""
    programs = max(1, min(num_blocks, per_sm * _multiprocessors(device) if device.type == "cuda" else 4))
    return programs, min(256, triton.next_power_of_2(programs))


def attnres_backward(do: torch.Tensor, sources: torch.Tensor, query: torch.Tensor, norm_weight: torch.Tensor | None,
                     partial: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, u: torch.Tensor,
                     eps: float, *, grad_sources: torch.Tensor | None = None,
                     tiles: tuple[int, ...] | None = None, delta_out: torch.Tensor | None = None,
                     defer_query: bool = False):
    """Gradients of :func:`attnres_forward`. do, out ``[S, M, D]``; lse ``[S, M]``; u ``[S, D]``;
    query and norm_weight as there; all with unit stride in D.

    Returns (d_sources ``[N, M, D]``, d_partial ``[M, D]`` or None, d_query, d_norm_weight or
    None), each gradient in its input's dtype and shape. With ``grad_sources`` (any float dtype,
    ``[N, M, D]``) the source gradients are added into it in place and it is returned as d_sources.
    With ``delta_out`` ``[M]`` float32 (one query) the source gradients are left to
    :func:`attnres_source_backward` (d_sources is None) and rowsum(dO * o) is stored there for it;
    with ``defer_query`` too, so are the sources' terms of the query gradient (its ``du_partials``):
    the sources are not read at all, and d_query and d_norm_weight hold only the partial source's
    terms (None without a partial).
    ``tiles`` (sweeps): (BLOCK_M, num_warps[, stages[, warps per SM]]) instead of the defaults.
    """
    N, M, D = sources.shape
    S = query.shape[0] if query.dim() == 2 else 1
    source_grads = delta_out is None
    if not source_grads and (S != 1 or grad_sources is not None):
        raise ValueError("delta_out (deferred source gradients) takes one query and no grad_sources")
    if defer_query and source_grads:
        raise ValueError("defer_query needs delta_out: the sources' query terms come with their deferred gradients")
    accumulate_v = grad_sources is not None
    if not source_grads:
        grad_sources = sources  # placeholder: never written
    elif grad_sources is None:
        # Several queries add into one gradient: keep the running sum in float32 until the end.
        grad_dtype = sources.dtype if S == 1 else torch.promote_types(sources.dtype, torch.float32)
        grad_sources = torch.empty((N, M, D), dtype=grad_dtype, device=sources.device)
    d_partial = None
    if partial is not None:
        p_dtype = partial.dtype if S == 1 else torch.promote_types(partial.dtype, torch.float32)
        d_partial = torch.empty((M, D), dtype=p_dtype, device=sources.device)
    block_m, block_d, num_warps = _tiles(D, backward=True)
    # Above D=512 the pipeline's registers (154 a thread at D=1024) would not fit the 4 programs an SM.
    stages, warps_per_sm = (BWD_STAGES, WARPS_PER_SM) if block_d <= 512 else (1, WARPS_PER_SM_WIDE)
    if tiles is not None:
        block_m, num_warps, stages, warps_per_sm = (*tiles, stages, warps_per_sm)[:4]
    num_blocks = cdiv(M, block_m)
    programs, block_p = _num_programs(sources.device, num_blocks, max(1, warps_per_sm // num_warps))
    du = torch.empty((S, programs, D), dtype=torch.float32, device=sources.device)
    p = sources if partial is None else partial
    dp = grad_sources if d_partial is None else d_partial
    g = query if norm_weight is None else norm_weight
    sw, sg = _query_strides(query, norm_weight)
    for s in range(S):
        # S = 1 (training) passes the tensors whole: indexing them costs microseconds per call.
        per_query = (u, out, do, lse, du) if S == 1 else (u[s], out[s], do[s], lse[s], du[s])
        u_s, o_s, do_s, lse_s, du_s = per_query
        _attnres_bwd_kernel[(programs,)](
            sources, p, u_s, o_s, do_s, lse_s, grad_sources, dp, du_s, lse_s if source_grads else delta_out,
            sources.stride(0), sources.stride(1), p.stride(-2), out.stride(1), do.stride(1),
            grad_sources.stride(0), grad_sources.stride(1), dp.stride(-2),
            M, 0 if defer_query else N, D, eps, num_blocks,
            HAS_PARTIAL=partial is not None, ACCUMULATE_V=accumulate_v or s > 0, ACCUMULATE_P=s > 0,
            SOURCE_GRADS=source_grads, BLOCK_M=block_m, BLOCK_D=block_d, STAGES=stages, num_warps=num_warps,
        )
    if defer_query and partial is None:  # rowsums only: no query terms here
        return None, None, None, None
    d_query = torch.empty_like(query)
    d_norm = None if norm_weight is None else torch.empty_like(norm_weight)
    dg = d_query if d_norm is None else d_norm
    # Narrow column tiles: D/16 programs, each reducing a few [256, 16] tiles of partial sums.
    _attnres_query_grad_kernel[(cdiv(D, 16),)](
        du, query, g, d_query, dg, S, programs, D, sw, sg, *_query_strides(d_query, d_norm),
        HAS_NORM_WEIGHT=norm_weight is not None, SHARED_NORM_WEIGHT=sg == 0 and norm_weight is not None,
        BLOCK_P=block_p, BLOCK_D=16, num_warps=8 if block_p == 256 else 4,
    )
    if not source_grads:
        grad_sources = None
    elif grad_sources.dtype != sources.dtype and not accumulate_v:
        grad_sources = grad_sources.to(sources.dtype)
    if d_partial is not None and d_partial.dtype != partial.dtype:
        d_partial = d_partial.to(partial.dtype)
    return grad_sources, d_partial, d_query, d_norm


# Row splits of the deferred query gradient: 6 column tiles (D=384) x 32 splits, more programs than SMs.
QUERY_GRAD_SPLITS = 32


def query_grad_partials(reads: int, D: int, device: torch.device) -> torch.Tensor:
    """Zeroed float32 ``[P, reads, D]`` for :func:`attnres_source_backward`'s ``du_partials``: P
    splits of the rows, each summed by its own programs (the query gradient is their sum over P;
    two in the CPU interpreter, so the split is still exercised)."""
    return torch.zeros((QUERY_GRAD_SPLITS if device.type == "cuda" else 2, reads, D), device=device)


def attnres_source_backward(source: torch.Tensor, u: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                            delta: torch.Tensor, readers: tuple[int, int], eps: float,
                            out_dtype: torch.dtype | None = None, tiles: tuple[int, ...] | None = None,
                            du_partials: torch.Tensor | None = None) -> torch.Tensor:
    """Deferred gradient of one source ``[M, D]`` (unit stride in D) over the reads
    ``readers[0] .. readers[1] - 1``, all of which read it. u ``[R, D]`` float32, do ``[R, M, D]``,
    lse and delta ``[R, M]`` float32: each read's effective query, output gradient, log-sum-exp and
    rowsum(dO * o). Returns ``[M, D]`` in ``out_dtype`` (default the source's dtype). ``tiles``
    (sweeps): (BLOCK_M, num_warps[, stages]) instead of the defaults.

    ``du_partials`` (``[P, R, D]`` float32, from :func:`query_grad_partials`): this source's terms
    of each read's effective-query gradient du_r = sum_m c_r[m] v[m] are added into rows
    ``readers[0] .. readers[1] - 1`` (summed over P, over every source, they are the gradient of
    u = w * g that a read with ``defer_query`` left out)."""
    M, D = source.shape
    dv = torch.empty((M, D), dtype=out_dtype or source.dtype, device=source.device)
    block_m, block_d, num_warps = _source_tiles(D)
    stages = BWD_STAGES if block_d <= 512 else 1  # the pipeline's buffers would not fit in shared memory
    if tiles is not None:
        block_m, num_warps, stages = (*tiles, stages)[:3]
    R = readers[1] - readers[0]
    if du_partials is not None:
        if (not isinstance(du_partials, torch.Tensor) or du_partials.dim() != 3 or du_partials.dtype != torch.float32
                or du_partials.shape[1] < readers[1] or du_partials.shape[2] != D or du_partials.stride(-1) != 1
                or du_partials.device != source.device):
            raise ValueError(f"du_partials must be a float32 tensor [P, >= {readers[1]}, {D}] with unit stride in D "
                             f"on {source.device} (query_grad_partials makes one), got "
                             f"{getattr(du_partials, 'dtype', type(du_partials).__name__)} "
                             f"{tuple(getattr(du_partials, 'shape', ()))}")
    c = None if du_partials is None else torch.empty((R, M), dtype=torch.float32, device=source.device)
    _attnres_source_grad_kernel[(cdiv(M, block_m),)](
        source, u, do, lse, delta, dv, dv if c is None else c,
        source.stride(0), u.stride(0), do.stride(0), do.stride(1), lse.stride(0), delta.stride(0), dv.stride(0),
        0 if c is None else c.stride(0), M, D, eps, readers[0], readers[1],
        STORE_C=c is not None, BLOCK_M=block_m, BLOCK_D=block_d, STAGES=stages, num_warps=num_warps,
    )
    if c is not None:
        splits = du_partials.shape[0]
        block_r, block_d = min(128, max(16, triton.next_power_of_2(R))), min(64, max(16, triton.next_power_of_2(D)))
        block_k = 32
        rows_per_split = cdiv(cdiv(M, splits), block_k) * block_k
        du = du_partials[:, readers[0]:readers[1]]
        # tf32x3: three tf32 products, about float32's accuracy at tensor-core speed (ieee runs on
        # the CUDA cores); v is exact in tf32 when it is bf16 or fp16.
        _attnres_c_times_source_kernel[(cdiv(D, block_d), cdiv(R, block_r), splits)](
            c, source, du, c.stride(0), source.stride(0), du.stride(0), du.stride(1), R, M, D, rows_per_split,
            BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION="tf32x3", num_warps=4,
        )
    return dv
