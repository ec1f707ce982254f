"""Public MoDA and Flash Depth Attention ops: one function each, one API for all backends.

Backends:
- ``"reference"``: plain PyTorch (ops/reference.py). The CPU path.
- ``"triton"``: Triton sequence attention + Triton depth kernel with the lse merge fused.
- ``"cudnn"``: cuDNN SDPA sequence attention + the same Triton depth kernel.
- ``"auto"`` (default): reference on CPU; on CUDA cuDNN where it applies, else Triton.

Masks: ``cu_seqlens``/``max_seqlen`` (packed documents, flash-attn's convention) and ``kv_start``
(left padding) run on the reference or the Triton sequence kernels; on CUDA ``"auto"`` picks
Triton for them. torch's varlen flash op (``aten._flash_attention_forward`` with cum_seq_q/k) has
the right signature for the merged-lse backward (its backward takes out and logsumexp; its meta
gives the varlen lse as ``[Hq, total]``), but the Python sources do not show how its kernel uses
them and it has not been run here against the reference, so it is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cudnn_sdpa
from ._aliasing import contiguous
from ._checks import (
    check_bools,
    check_cu_seqlens,
    check_depth_inputs,
    check_kv_start,
    check_moda_inputs,
    check_same,
    check_tensor,
    resolve_scale,
    triton_usable,
)
from .reference import attention_reference

BACKENDS = ("auto", "reference", "triton", "cudnn")


def select_backend(backend: str, q: torch.Tensor, k, causal: bool, masked: bool = False) -> str:
    """The backend ``backend`` resolves to for these inputs ("reference", "triton" or "cudnn").
    ``masked``: packed documents or padding (cu_seqlens / kv_start), which cuDNN is not used for."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not q.is_cuda or q.dtype == torch.float64:
            return "reference"
        if k is not None and not masked and cudnn_sdpa.supports(q, k, causal):
            return "cudnn"
        return "triton"
    if backend in ("triton", "cudnn"):
        if q.dtype == torch.float64:
            raise TypeError(f"backend={backend!r} takes float16, bfloat16 or float32 inputs, got float64")
        if not triton_usable(q):
            raise ValueError(
                f"backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {q.device}"
            )
    if backend == "cudnn" and masked:
        raise ValueError("backend='cudnn' takes no cu_seqlens or kv_start (packed documents and padding run on "
                         "the Triton sequence kernels); use backend='auto' or 'triton'")
    if backend == "cudnn" and (k is None or not cudnn_sdpa.supports(q, k, causal)):
        raise ValueError(
            "backend='cudnn' needs CUDA float16/bfloat16 inputs, a head dim that is a multiple of 8 and <= 128, "
            "Tq == Tk when causal and not Tq == Tk == 1; got dtype "
            f"{q.dtype}, head dim {q.shape[-1]}, Tq={q.shape[1]}, Tk={k.shape[1] if k is not None else None}, "
            f"device {q.device}"
        )
    return backend


def check_masks(q, k, cu_seqlens, max_seqlen, kv_start) -> dict:
    """Validate the optional masks; returns them as keywords for the kernels ({} when none)."""
    if kv_start is not None and cu_seqlens is not None:
        raise ValueError("pass cu_seqlens (packed documents) or kv_start (padded rows), not both")
    if cu_seqlens is not None or max_seqlen is not None:
        check_cu_seqlens(cu_seqlens, max_seqlen, q, None if k is None else k.shape[1])
        return {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    if kv_start is not None:
        check_kv_start(kv_start, q)
        return {"kv_start": kv_start}
    return {}


def fused_forward(q, k, v, k_depth, v_depth, causal: bool, scale: float, seq_backend: str, masks=None,
                  slot_scales=None):
    """Forward of the fused path. Returns o, lse, the sequence backend's state for backward, and
    (q, k, v) as the backward must receive them (cuDNN takes copies of inputs whose layout it
    refuses). ``masks``: as :func:`check_masks` returns them (Triton only); they are the Triton
    sequence kernels' state. ``slot_scales``: fp8 depth slots' scales (``depth_triton.depth_forward``)."""
    from . import depth_triton, flash_triton

    seq_state = None
    if k is None:
        o, lse = depth_triton.depth_forward(q, k_depth, v_depth, scale, slot_scales=slot_scales)
    else:
        if seq_backend == "cudnn":
            q, k, v = cudnn_sdpa.conform(q), cudnn_sdpa.conform(k), cudnn_sdpa.conform(v)
            o, lse, seq_state = cudnn_sdpa.forward(q, k, v, causal=causal, scale=scale)
        else:
            seq_state = masks or None
            o, lse = flash_triton.flash_forward(q, k, v, causal=causal, scale=scale, **(masks or {}))
        if k_depth is not None:
            o, lse = depth_triton.depth_forward(q, k_depth, v_depth, scale, o_seq=o, lse_seq=lse,
                                                slot_scales=slot_scales)
    return contiguous(o), lse, seq_state, (q, k, v)  # not o.contiguous(): see ops/_aliasing.py


def fused_backward(do, q, k, v, k_depth, v_depth, o, lse, seq_state, causal: bool, scale: float,
                   seq_backend: str, slot_grads: bool = True, delta_out=None, slot_scales=None):
    """Backward of the fused path: dq, dk, dv, dk_depth, dv_depth (None where an input is None).

    Both halves get the MERGED o and lse, so each computes its share of the one softmax's
    gradient. Serial on purpose: the depth backward on a second stream beside cuDNN's measured
    no faster (cuDNN's kernels hold every SM's registers). ``slot_grads=False`` leaves the depth
    gradients to a later ``depth_slot_backward`` (dk_depth, dv_depth None) and stores
    rowsum(dO * o) into ``delta_out`` ``[B, Hq, T]`` for it. ``slot_scales``: as :func:`fused_forward`.
    """
    from . import depth_triton, flash_triton

    do = do.contiguous()
    dq = dk = dv = dkd = dvd = None
    if k is not None:
        if seq_backend == "cudnn":
            dq, dk, dv = cudnn_sdpa.backward(do, q, k, v, o, lse, seq_state, causal=causal, scale=scale)
        else:
            dq, dk, dv = flash_triton.flash_backward(do, q, k, v, o, lse, causal=causal, scale=scale,
                                                     **(seq_state or {}))
    if k_depth is not None:
        dq, dkd, dvd = depth_triton.depth_backward(
            q, k_depth, v_depth, o, lse, do, scale, dq_in=dq, slot_grads=slot_grads, delta_out=delta_out,
            slot_scales=slot_scales,
        )
    return dq, dk, dv, dkd, dvd


class _MoDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_depth, v_depth, causal, scale, seq_backend, masks):
        o, lse, seq_state, (q, k, v) = fused_forward(q, k, v, k_depth, v_depth, causal, scale, seq_backend, masks)
        ctx.save_for_backward(q, k, v, k_depth, v_depth, o, lse)
        ctx.causal, ctx.scale, ctx.seq_backend, ctx.seq_state = causal, scale, seq_backend, seq_state
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, k_depth, v_depth, o, lse = ctx.saved_tensors
        grads = fused_backward(do, q, k, v, k_depth, v_depth, o, lse, ctx.seq_state, ctx.causal, ctx.scale,
                               ctx.seq_backend)
        return (*grads, None, None, None, None)


def moda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_depth: torch.Tensor | None = None,
    v_depth: torch.Tensor | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    kv_start: torch.Tensor | None = None,
):
    """Mixture-of-Depths Attention: sequence and depth attention under one softmax.

    Args:
        q: ``[B, Tq, Hq, d]``.
        k, v: ``[B, Tk, Hk, d]`` with ``Hq % Hk == 0`` (query head h reads KV head ``h // (Hq // Hk)``).
            When causal and Tq < Tk, the queries are the last Tq tokens (kv-cache convention).
        k_depth, v_depth: ``[B, Tq, L, Hk, d]``, the L earlier-layer slots of each query token;
            None for plain attention. Any strides with a contiguous last dim (a slice of a larger
            depth buffer is read in place).
        causal: mask keys after the query's position.
        scale: logit scale, default ``d ** -0.5``.
        return_lse: also return the log-sum-exp ``[B, Hq, Tq]`` (float32; no gradient flows through it).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cudnn"`` (see module doc).
        cu_seqlens, max_seqlen: packed documents (flash-attn's convention): q, k, v ``[1, total, H, d]``
            hold the documents' tokens one after another, cu_seqlens int32 ``[num_docs + 1]`` is
            (0, len_0, len_0 + len_1, ..., total) and max_seqlen an int >= the longest document.
            Sequence attention stays within each document; the depth part is per token anyway.
        kv_start: int32 ``[B]``, left padding: keys before ``kv_start[b]`` of row b are masked. A
            query left with no key at all (a padded one, no depth slots) gets o = 0, lse = -inf.

    Returns:
        o ``[B, Tq, Hq, d]`` in q's dtype, and lse if ``return_lse``.
    """
    dims = check_moda_inputs(q, k, v, k_depth, v_depth, causal)
    check_bools(return_lse=return_lse)
    scale = resolve_scale(scale, dims.head_dim)
    masks = check_masks(q, k, cu_seqlens, max_seqlen, kv_start)
    chosen = select_backend(backend, q, k, causal, masked=bool(masks))
    if chosen == "reference":
        o, lse = attention_reference(q, k, v, k_depth, v_depth, causal=causal, scale=scale, **masks)
    else:
        o, lse = _MoDAFunction.apply(q, k, v, k_depth, v_depth, causal, scale, chosen, masks)
    return (o, lse) if return_lse else o


def depth_attention(
    q: torch.Tensor,
    k_depth: torch.Tensor,
    v_depth: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
):
    """Flash Depth Attention: each token's query attends only to its own L depth slots.

    Args:
        q: ``[B, T, Hq, d]``.
        k_depth, v_depth: ``[B, T, L, Hk, d]`` with ``Hq % Hk == 0``.
        scale: logit scale, default ``d ** -0.5``.
        return_lse: also return the log-sum-exp ``[B, Hq, T]`` (float32, no gradient).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        cu_seqlens, max_seqlen: packed documents as in :func:`moda_attention` (B = 1). Checked and
            otherwise unused: a token's depth slots are its own, so documents need no mask.

    Returns:
        o ``[B, T, Hq, d]`` in q's dtype, and lse if ``return_lse``.
    """
    dims = check_depth_inputs(q, k_depth, v_depth)
    check_bools(return_lse=return_lse)
    scale = resolve_scale(scale, dims.head_dim)
    check_masks(q, None, cu_seqlens, max_seqlen, None)
    if backend == "cudnn":
        raise ValueError("backend='cudnn' has no depth-only kernel; use 'auto', 'triton' or 'reference'")
    chosen = select_backend(backend, q, None, False)
    if chosen == "reference":
        o, lse = attention_reference(q, None, None, k_depth, v_depth, causal=False, scale=scale)
    else:
        o, lse = _MoDAFunction.apply(q, None, None, k_depth, v_depth, False, scale, "triton", None)
    return (o, lse) if return_lse else o


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_depth: torch.Tensor | None = None,
    v_depth: torch.Tensor | None = None,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """MoDA for a decoding step over a fixed-length KV cache: one softmax over the sequence keys
    that ``key_mask`` keeps and the depth slots. One CUDA token runs a Triton split-K kernel that
    reads cache and slots in place (ops/decode_triton.py); anything else plain PyTorch.

    Built for ``torch.compile`` and CUDA graphs: no data-dependent control flow, no host syncs,
    shapes that do not change from step to step (the whole cache is scored; unwritten and
    padding slots are masked out). There is no causal mask: each query sees every key its row
    of ``key_mask`` keeps, which is causal for the one new token of a decoding step.

    Args:
        q: ``[B, Tq, Hq, d]``; every other tensor has q's dtype and device.
        k, v: ``[B, Tk, Hk, d]`` (any strides: a transposed view of a cache is read in place), or
            both None for depth-only attention.
        k_depth, v_depth: ``[B, Tq, L, Hk, d]`` or both None.
        key_mask: bool ``[B, Tk]``, True where a sequence key is attended (needed with k). Every
            row must keep a key or have depth slots (not checked: it would need a host sync; an
            empty row's softmax is undefined, and its output zeros or NaN).
        scale: logit scale, default ``d ** -0.5``.

    Returns:
        o ``[B, Tq, Hq, d]`` in q's dtype.
    """
    check_tensor("q", q, 4, "[B, Tq, Hq, d]")
    B, Tq, Hq, d = q.shape
    if (k is None) != (v is None) or (k_depth is None) != (v_depth is None):
        raise ValueError("pass k and v together and k_depth and v_depth together (or leave a pair None)")
    if k is None and k_depth is None:
        raise ValueError("decode_attention needs sequence keys (k, v) or depth slots (k_depth, v_depth), got neither")
    for name, x, rank, layout in (("k", k, 4, "[B, Tk, Hk, d]"), ("v", v, 4, "[B, Tk, Hk, d]"),
                                  ("k_depth", k_depth, 5, "[B, Tq, L, Hk, d]"),
                                  ("v_depth", v_depth, 5, "[B, Tq, L, Hk, d]")):
        if x is not None:
            check_tensor(name, x, rank, layout)
            check_same(name, x, "q", q)
    Hk = (k if k is not None else k_depth).shape[-2]
    if Hq % Hk:
        raise ValueError(f"the query heads Hq={Hq} must be a multiple of the key/value heads Hk={Hk}")
    if k is not None:
        if k.shape[0] != B or k.shape[-1] != d or v.shape != k.shape:
            raise ValueError(f"k and v must be [B={B}, Tk, Hk, d={d}], got {tuple(k.shape)} and {tuple(v.shape)}")
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or key_mask.shape != (B, k.shape[1]):
            got = (f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, torch.Tensor)
                   else type(key_mask).__name__)
            raise ValueError(f"key_mask must be a bool tensor [B={B}, Tk={k.shape[1]}] with k, got {got}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device} but q is on {q.device}; all inputs need one device")
    if k_depth is not None and (k_depth.shape[:2] != (B, Tq) or k_depth.shape[-2:] != (Hk, d)
                                or v_depth.shape != k_depth.shape):
        keys = "k's" if k is not None else "k_depth's"
        raise ValueError(f"k_depth and v_depth must be [B={B}, Tq={Tq}, L, Hk={Hk} ({keys} heads), d={d}], got "
                         f"{tuple(k_depth.shape)} and {tuple(v_depth.shape)}")
    scale = resolve_scale(scale, d)
    if _decode_kernel_applies(q, k, v, k_depth, v_depth, key_mask):
        from . import decode_triton  # triton: imported only where it runs

        # Triton split-K over the cache and the slots in place (no cat of the cache, no float mask);
        # a missing half is an empty view, which the kernel skips
        if k is None:
            k = v = k_depth[:, 0, :0]
            key_mask = torch.ones((B, 1), dtype=torch.bool, device=q.device)[:, :0]
        elif k_depth is None:
            k_depth = v_depth = k[:, :1, None, :, :][:, :, :0]
        return decode_triton.decode_forward(q, k, v, key_mask, k_depth, v_depth, scale)
    G = Hq // Hk
    if k is not None and (k_depth is None or Tq == 1):
        # One fused attention call (cuDNN / memory-efficient on CUDA): the mask is per key, not per
        # query, so a KV head's G query heads and Tq tokens are rows of one query block (no GQA
        # expansion of the cache), and a single token's depth slots join the keys.
        qh = q.reshape(B, Tq, Hk, G, d).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * Tq, d)
        kh, vh, mask = k.transpose(1, 2), v.transpose(1, 2), key_mask
        if k_depth is not None:
            kh = torch.cat([kh, k_depth[:, 0].transpose(1, 2)], 2)
            vh = torch.cat([vh, v_depth[:, 0].transpose(1, 2)], 2)
            mask = torch.cat([key_mask, key_mask.new_ones(B, k_depth.shape[2])], 1)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None, None, :], scale=scale)
        return o.reshape(B, Hk, G, Tq, d).permute(0, 3, 1, 2, 4).reshape(B, Tq, Hq, d)
    qg = q.reshape(B, Tq, Hk, G, d)
    # depth slots per query token (several tokens, or no sequence keys): scores in the inputs'
    # dtype (the matmuls), softmax in float32
    scores = []
    if k is not None:
        s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k).float() * scale
        scores.append(s.masked_fill(~key_mask[:, None, None, None, :], float("-inf")))
    scores.append(torch.einsum("bqhgd,bqlhd->bhgql", qg, k_depth).float() * scale)
    p = torch.softmax(torch.cat(scores, -1), dim=-1)
    n_seq = 0 if k is None else k.shape[1]
    o = torch.einsum("bhgql,bqlhd->bqhgd", p[..., n_seq:].to(v_depth.dtype), v_depth)
    if k is not None:
        o = o + torch.einsum("bhgqk,bkhd->bqhgd", p[..., :n_seq].to(v.dtype), v)
    return o.reshape(B, Tq, Hq, d)


def _decode_kernel_applies(q, k, v, k_depth, v_depth, key_mask) -> bool:
    """Whether :func:`decode_attention` runs the Triton decoding kernel: one CUDA query token,
    every given tensor in q's float16/bfloat16/float32, all with a contiguous last dim, and
    nothing to differentiate (the kernel has no backward; the SDPA path does)."""
    given = [x for x in (q, k, v, k_depth, v_depth) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in given):
        return False
    return (q.is_cuda and q.shape[1] == 1 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and all(x.dtype == q.dtype and x.stride(-1) == 1 for x in given)
            and (key_mask is None or key_mask.stride(-1) == 1))
