"""Sequence attention through torch's cuDNN SDPA ops (the fastest attention torch
ships on Hopper), used as the sequence half of MoDA.

These private aten ops return the log-sum-exp, and their backward takes ``out``
and ``logsumexp`` as inputs, which is what the exact lse merge needs: MoDA feeds
the backward its MERGED output and lse (SPEC section 4).
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten


def supports(q: torch.Tensor, k: torch.Tensor, causal: bool) -> bool:
    """Whether cuDNN computes this problem forward AND backward (else the Triton path runs).

    Decided from the shapes alone, never by catching a cuDNN error. The rules come from
    ``benchmarks/probe_cudnn.py`` on an H200 (torch 2.11, cuDNN 9.19; its output is in
    ``benchmarks/results/logs/probe_cudnn_h200.log``): GQA is native, every head dim that is a
    multiple of 8 runs, one query against one key does not run backward. Strides are no reason
    to refuse: :func:`conform` copies an input whose layout cuDNN rejects.
    """
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not hasattr(_aten, "_scaled_dot_product_cudnn_attention_backward"):
        return False
    return shape_supported(q.shape[1], k.shape[1], q.shape[-1], causal)


def shape_supported(q_len: int, kv_len: int, head_dim: int, causal: bool) -> bool:
    """The shape half of :func:`supports`."""
    if head_dim % 8 != 0 or head_dim > 128:  # 192 and 256 ran on Hopper only; Triton covers them
        return False
    if q_len == 1 and kv_len == 1:  # "s_q = s_kv = 1 is not supported" (backward)
        return False
    # cuDNN aligns a causal mask at the top left; decoding (Tq < Tk) needs it at the end.
    return not causal or q_len == kv_len


def conform(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where cuDNN would refuse its layout (the last dim needs stride 1;
    the other strides and the start address are kept 16-byte aligned)."""
    aligned = x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0
    return x if aligned else x.clone(memory_format=torch.contiguous_format)


def forward(q, k, v, *, causal: bool, scale: float):
    """q ``[B, T, Hq, d]``, k/v ``[B, T, Hk, d]`` (GQA native), each as :func:`conform` returns it.

    Returns o ``[B, T, Hq, d]`` (a view), lse ``[B, Hq, T]`` float32 and the state the backward needs.
    """
    res = _aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False, scale=scale
    )
    out, lse = res[0], res[1]
    state = (res[2], res[3], res[4], res[5], res[6], res[7], lse.dim())
    lse3 = lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])
    return out.transpose(1, 2), lse3, state


def backward(do, q, k, v, o, lse, state, *, causal: bool, scale: float):
    """dq, dk, dv of the sequence part for the given (merged) o ``[B, T, Hq, d]`` and lse ``[B, Hq, T]``."""
    cum_q, cum_k, max_q, max_k, seed, offset, lse_rank = state
    if lse_rank == 4:
        lse = lse.unsqueeze(-1)
    # cuDNN wants dO laid out like o.
    do = do.contiguous() if do.stride() != o.stride() else do
    dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
        do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        o.transpose(1, 2), lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
