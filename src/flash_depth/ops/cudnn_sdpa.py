"""Sequence attention through torch's cuDNN SDPA ops (the fastest attention torch
ships on Hopper), used as the sequence half of MoDA.

These private aten ops return the log-sum-exp, and their backward takes ``out``
and ``logsumexp`` as inputs, which is what the exact lse merge needs: MoDA feeds
the backward its MERGED output and lse (SPEC section 4).
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten
# None until the first call finds out whether cuDNN takes fewer K/V heads than Q heads.
_native_gqa: bool | None = None


def supports(q: torch.Tensor, k: torch.Tensor, causal: bool) -> bool:
    """Whether the cuDNN path can compute this problem (else the Triton path is used)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not hasattr(_aten, "_scaled_dot_product_cudnn_attention_backward"):
        return False
    d = q.shape[-1]
    if d % 8 != 0 or d > 128:
        return False
    # cuDNN aligns a causal mask at the top left; decoding (Tq < Tk) needs it at the end.
    return not causal or q.shape[1] == k.shape[1]


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    if group == 1:
        return x
    B, T, Hk, d = x.shape
    return x.unsqueeze(3).expand(B, T, Hk, group, d).reshape(B, T, Hk * group, d)


def _call_forward(q, k, v, causal, scale):
    return _aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False, scale=scale
    )


def forward(q, k, v, *, causal: bool, scale: float):
    """q ``[B, T, Hq, d]``, k/v ``[B, T, Hk, d]``.

    Returns o ``[B, T, Hq, d]`` (a view), lse ``[B, Hq, T]`` float32 and the state the backward needs.
    """
    global _native_gqa
    group = q.shape[2] // k.shape[2]
    if group > 1 and _native_gqa is not False:
        try:
            res = _call_forward(q, k, v, causal, scale)
            _native_gqa = True
        except RuntimeError:
            _native_gqa = False
    if group == 1 or not _native_gqa:
        res = _call_forward(q, _expand_heads(k, group), _expand_heads(v, group), causal, scale)
    out, lse = res[0], res[1]
    state = (res[2], res[3], res[4], res[5], res[6], res[7], lse.dim())
    lse3 = lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])
    return out.transpose(1, 2), lse3, state


def backward(do, q, k, v, o, lse, state, *, causal: bool, scale: float):
    """dq, dk, dv of the sequence part for the given (merged) o ``[B, T, Hq, d]`` and lse ``[B, Hq, T]``."""
    cum_q, cum_k, max_q, max_k, seed, offset, lse_rank = state
    group = q.shape[2] // k.shape[2]
    expand = group > 1 and not _native_gqa
    k_in, v_in = (_expand_heads(k, group), _expand_heads(v, group)) if expand else (k, v)
    if lse_rank == 4:
        lse = lse.unsqueeze(-1)
    # cuDNN wants dO laid out like o.
    do = do.contiguous() if do.stride() != o.stride() else do
    dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
        do.transpose(1, 2), q.transpose(1, 2), k_in.transpose(1, 2), v_in.transpose(1, 2),
        o.transpose(1, 2), lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale,
    )
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if expand:
        B, T, Hk, d = k.shape
        dk = dk.reshape(B, T, Hk, group, d).sum(3)
        dv = dv.reshape(B, T, Hk, group, d).sum(3)
    return dq, dk, dv
