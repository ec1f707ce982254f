"""Plain PyTorch MoDA / depth attention: the CPU path and the readable definition.

Memory stays bounded: queries are processed in chunks, so the largest score
tensor is ``[B, Hq, chunk, Tk + L]``; a ``[T, T*L]`` matrix is never built. Under
autograd each chunk is recomputed in backward (activation checkpointing), so
backward memory is bounded the same way.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Chunks are sized so a score block holds about this many elements.
_SCORE_BUDGET = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_probabilities(q, k, k_depth, q_start: int, causal: bool, scale: float, kv_start=None):
    """Softmax over [sequence keys | depth slots] for one query chunk.

    q ``[B, C, Hk, G, d]``; k ``[B, Tk, Hk, d]`` or None; k_depth ``[B, C, L, Hk, d]`` or None;
    kv_start ``[B]`` or None (keys before it are padding). Returns p ``[B, Hk, G, C, Tk + L]`` and
    lse ``[B, Hk, G, C]``. A row with no key at all (a padded query with no depth slots) gets
    p = 0 and lse = -inf, as the kernels give.
    """
    logits = []
    empty = None
    if k is not None:
        s_seq = torch.einsum("bchgd,bjhd->bhgcj", q, k) * scale
        C, Tk = q.shape[1], k.shape[1]
        cols = torch.arange(Tk, device=q.device)
        keep = torch.ones(1, C, Tk, dtype=torch.bool, device=q.device)  # [B or 1, C, Tk]
        if causal:
            # query row i sits at absolute position q_start + i of a Tk-long sequence
            rows = torch.arange(q_start, q_start + C, device=q.device)
            keep = (cols[None, :] <= rows[:, None])[None]
        if kv_start is not None:
            keep = keep & (cols >= kv_start[:, None, None])
            if k_depth is None:
                # rows with no key are filled with 0 before the softmax and zeroed after it:
                # all -inf would give NaN, in the output and in every gradient
                empty = ~keep.any(-1)[:, None, None, :]  # [B, 1, 1, C]
        if causal or kv_start is not None:
            s_seq = s_seq.masked_fill(~keep[:, None, None], float("-inf"))
        if empty is not None:
            s_seq = s_seq.masked_fill(empty[..., None], 0.0)
        logits.append(s_seq)
    if k_depth is not None:
        logits.append(torch.einsum("bchgd,bclhd->bhgcl", q, k_depth) * scale)
    s = torch.cat(logits, dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    if empty is not None:
        p = p.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return p, lse


def _chunk_attention(q, k, v, k_depth, v_depth, q_start: int, causal: bool, scale: float, kv_start=None):
    """One query chunk. q ``[B, C, Hk, G, d]``; k/v ``[B, Tk, Hk, d]`` or None;
    k_depth/v_depth ``[B, C, L, Hk, d]`` or None. Returns o ``[B, C, Hk, G, d]``, lse ``[B, Hk, G, C]``."""
    p, lse = _chunk_probabilities(q, k, k_depth, q_start, causal, scale, kv_start)
    o = 0
    n_seq = 0
    if k is not None:
        n_seq = k.shape[1]
        o = torch.einsum("bhgcj,bjhd->bchgd", p[..., :n_seq], v)
    if k_depth is not None:
        o = o + torch.einsum("bhgcl,bclhd->bchgd", p[..., n_seq:], v_depth)
    return o, lse


def attention_probabilities(q, k, k_depth, *, causal: bool, scale: float) -> torch.Tensor:
    """The MoDA softmax itself, for analysis: p ``[B, Hq, Tq, Tk + L]`` over [sequence keys | depth
    slots] (float32 or float64). Same math as the reference and the kernels; O(Tq * (Tk + L)) memory."""
    B, Tq, Hq, d = q.shape
    Hk = (k if k is not None else k_depth).shape[-2]
    cdt = _compute_dtype(q.dtype)
    qg = q.to(cdt).reshape(B, Tq, Hk, Hq // Hk, d)
    Tk = 0 if k is None else k.shape[1]
    p, _ = _chunk_probabilities(qg, None if k is None else k.to(cdt),
                                None if k_depth is None else k_depth.to(cdt), Tk - Tq, causal, scale)
    return p.reshape(B, Hq, Tq, -1)


def attention_reference(q, k, v, k_depth, v_depth, *, causal: bool, scale: float, chunk_size: int | None = None,
                        cu_seqlens=None, kv_start=None, max_seqlen=None):
    """MoDA (or depth-only when k is None) in plain PyTorch.

    q ``[B, Tq, Hq, d]``, k/v ``[B, Tk, Hk, d]`` or None, k_depth/v_depth ``[B, Tq, L, Hk, d]`` or None.
    cu_seqlens int32 ``[num_docs + 1]`` (B = 1, Tq = Tk): packed documents, each attended alone.
    kv_start ``[B]``: keys before kv_start[b] are padding. max_seqlen is unused (taken for the
    kernels' signature). Returns o ``[B, Tq, Hq, d]`` (q's dtype) and lse ``[B, Hq, Tq]``
    (float32, or float64 for float64 inputs). Inputs are assumed validated.
    """
    if cu_seqlens is not None and k is not None:
        # one document at a time: exact, and no [T, T] document mask is built
        bounds = cu_seqlens.tolist()
        parts = [attention_reference(q[:, s:e], k[:, s:e], v[:, s:e],
                                     None if k_depth is None else k_depth[:, s:e],
                                     None if v_depth is None else v_depth[:, s:e],
                                     causal=causal, scale=scale, chunk_size=chunk_size)
                 for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([lse for _, lse in parts], dim=-1)
    B, Tq, Hq, d = q.shape
    Hk = (k if k is not None else k_depth).shape[-2]
    G = Hq // Hk
    cdt = _compute_dtype(q.dtype)
    qg = q.to(cdt).reshape(B, Tq, Hk, G, d)
    k_, v_ = (None, None) if k is None else (k.to(cdt), v.to(cdt))
    kd_, vd_ = (None, None) if k_depth is None else (k_depth.to(cdt), v_depth.to(cdt))
    Tk = 0 if k is None else k.shape[1]
    L = 0 if k_depth is None else k_depth.shape[2]
    if chunk_size is None:
        chunk_size = max(1, _SCORE_BUDGET // max(1, B * Hq * (Tk + L)))
    offset = Tk - Tq  # causal mask aligned at the end (kv-cache convention)
    use_ckpt = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, k_depth, v_depth)
    )
    kv_start = None if k is None else kv_start
    outs, lses = [], []
    for c0 in range(0, Tq, chunk_size):
        c1 = min(Tq, c0 + chunk_size)
        args = (
            qg[:, c0:c1],
            k_,
            v_,
            None if kd_ is None else kd_[:, c0:c1],
            None if vd_ is None else vd_[:, c0:c1],
            c0 + offset,
            causal,
            scale,
            kv_start,
        )
        if use_ckpt and c1 - c0 < Tq:
            o, lse = checkpoint(_chunk_attention, *args, use_reentrant=False)
        else:
            o, lse = _chunk_attention(*args)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, dim=1).reshape(B, Tq, Hq, d).to(q.dtype)
    lse = torch.cat(lses, dim=-1).reshape(B, Hq, Tq)
    return o, lse
