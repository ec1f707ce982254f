"""Triton MoDA for one decoding token: split-K (flash-decoding) attention over a fixed-length KV
cache and the token's depth slots, both read in place, under one softmax.

A CUDA-graphed decoding step otherwise joins cache and slots with ``torch.cat`` (a copy of the
whole cache per layer) and builds an additive mask for SDPA. Here the cache is cut into chunks
and the slots are one more chunk; each program keeps the online softmax of one (row, KV head,
chunk) for the G query heads of that KV head (no GQA expansion), and a second kernel merges
the chunks by their log-sum-exp. The pair is one opaque custom op (``flash_depth::decode_attention``,
with a fake implementation): a compiled step calls it as one node, and a CUDA graph of the step
records its two launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import cdiv

_LOG2E = 1.4426950408889634
# programs to aim for: a few per SM of an H100/H200, so a short cache still fills the GPU
_TARGET_PROGRAMS = 264


@triton.jit
def _scan(q, k_ptr, v_ptr, stride_kn, stride_vn, start, end, mask_ptr, offs_d, d_ok,
          HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of q ``[BLOCK_G, BLOCK_D]`` (scaled by log2 e) over keys ``[start, end)``:
    (running max, running sum, unnormalised output), base-2 logits, float32."""
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = offs_n < end
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + offs_n, mask=keep, other=0) != 0)
        ok = keep[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], 2)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing kept yet: no inf - inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        s_sum = s_sum * alpha + tl.sum(p, 1)
        m = m_new
    return m, s_sum, acc


@triton.jit
def _decode_split_kernel(
    Q, K, V, MASK, KD, VD, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb,
    stride_kdb, stride_kdl, stride_kdh, stride_vdb, stride_vdl, stride_vdh,
    Hk, Tk, L, chunk, n_seq, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b * Hk + h, c): chunk c < n_seq of the cache, or the depth slots (c == n_seq).
    Writes the chunk's normalised output ``O_PART[b, h, c, :G]`` and base-2 lse ``LSE_PART``."""
    bh, c = tl.program_id(0), tl.program_id(1)
    b, h = (bh // Hk).to(tl.int64), bh % Hk  # 64-bit: b * stride_kb passes 2**31 at long caches
    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    g_ok, d_ok = offs_g < G, offs_d < D
    q_ptrs = Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * qk_scale
    if c < n_seq:
        start = c * chunk
        m, s_sum, acc = _scan(q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, stride_kn,
                              stride_vn, start, tl.minimum(start + chunk, Tk), MASK + b * stride_mb, offs_d, d_ok,
                              True, BLOCK_G, BLOCK_N, BLOCK_D)
    else:
        m, s_sum, acc = _scan(q, KD + b * stride_kdb + h * stride_kdh, VD + b * stride_vdb + h * stride_vdh,
                              stride_kdl, stride_vdl, 0, L, MASK, offs_d, d_ok, False, BLOCK_G, BLOCK_N, BLOCK_D)
    kept = s_sum > 0  # a chunk with every key masked: lse = -inf, weight 0 in the merge
    s_safe = tl.where(kept, s_sum, 1.0)
    lse = tl.where(kept, m + tl.log2(s_safe), float("-inf"))
    out = acc / s_safe[:, None]
    n_parts = tl.num_programs(1)
    row = (bh * n_parts + c) * BLOCK_G + offs_g
    tl.store(O_PART + row[:, None] * BLOCK_D + offs_d[None, :], out)
    tl.store(LSE_PART + row, lse)


@triton.jit
def _decode_merge_kernel(O_PART, LSE_PART, OUT, stride_ob, stride_oh, Hk, n_parts,
                         G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Program (b * Hk + h, g): the chunks of query head h * G + g merged by their lse."""
    bh, g = tl.program_id(0), tl.program_id(1)
    b, h = (bh // Hk).to(tl.int64), bh % Hk
    offs_p, offs_d = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_D)
    p_ok = offs_p < n_parts
    row = (bh * n_parts + offs_p) * BLOCK_G + g
    lse = tl.load(LSE_PART + row, mask=p_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    o = tl.load(O_PART + row[:, None] * BLOCK_D + offs_d[None, :], mask=p_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)  # a row with no key at all: 0 / 0 = NaN, as SDPA
    tl.store(OUT + b * stride_ob + (h * G + g) * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < D)


@torch.library.custom_op("flash_depth::decode_attention", mutates_args=())
def decode_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                   k_depth: torch.Tensor, v_depth: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[B, 1, Hq, d]``; k, v ``[B, Tk, Hk, d]`` (Tk may be 0: depth only); key_mask bool
    ``[B, Tk]``; k_depth, v_depth ``[B, 1, L, Hk, d]`` (L may be 0); each with a contiguous last
    dim, other strides free. Returns o ``[B, 1, Hq, d]`` in q's dtype. Inputs are checked by
    :func:`~flash_depth.ops.decode_attention`, the public entry."""
    B, _, Hq, d = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    L = k_depth.shape[2]
    G = Hq // Hk
    block_g, block_d = triton.next_power_of_2(G), max(16, triton.next_power_of_2(d))
    # the [G, N, d] products of a tile stay within 8K float32 values (64 a thread of 4 warps)
    block_n = min(128, max(16, 8192 // (block_g * block_d)))
    splits = max(1, min(cdiv(Tk, block_n), cdiv(_TARGET_PROGRAMS, B * Hk)))
    chunk = cdiv(cdiv(Tk, splits), block_n) * block_n if Tk else block_n
    n_seq = cdiv(Tk, chunk)
    n_parts = n_seq + (1 if L else 0)
    o_part = q.new_empty((B * Hk * n_parts * block_g, block_d), dtype=torch.float32)
    lse_part = q.new_empty((B * Hk * n_parts * block_g,), dtype=torch.float32)
    mask = key_mask.view(torch.uint8)
    _decode_split_kernel[(B * Hk, n_parts)](
        q, k, v, mask, k_depth, v_depth, o_part, lse_part,
        q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), k_depth.stride(0), k_depth.stride(2), k_depth.stride(3), v_depth.stride(0),
        v_depth.stride(2), v_depth.stride(3),
        Hk, Tk, L, chunk, n_seq, scale * _LOG2E,
        G=G, D=d, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    out = q.new_empty((B, 1, Hq, d))
    _decode_merge_kernel[(B * Hk, G)](
        o_part, lse_part, out, out.stride(0), out.stride(2), Hk, n_parts,
        G=G, D=d, BLOCK_G=block_g, BLOCK_P=max(2, triton.next_power_of_2(n_parts)), BLOCK_D=block_d,
    )
    return out


@decode_forward.register_fake
def _(q, k, v, key_mask, k_depth, v_depth, scale):
    return q.new_empty(q.shape)
