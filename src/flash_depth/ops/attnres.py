"""Attention Residuals read (SPEC section 5): a softmax over earlier sublayer outputs.

    alpha_i = softmax_i( w . RMSNorm(v_i) )        (no 1/sqrt(D): w is learned, zero at init)
    out     = sum_i alpha_i v_i

Plain PyTorch for now (fused kernels are a later step). Sources are taken as a list, so a
model can grow its source list by reference without stacking a copy at every layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _check(sources, query, norm_weight, eps) -> None:
    if isinstance(sources, torch.Tensor):
        if sources.dim() < 2:
            raise ValueError(f"sources as one tensor must be [N, ..., D], got shape {tuple(sources.shape)}")
        sources = list(sources.unbind(0))
    if not isinstance(sources, Sequence) or len(sources) == 0:
        raise ValueError("sources must be a non-empty list of tensors [..., D] (or one tensor [N, ..., D])")
    first = sources[0]
    for i, s in enumerate(sources):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"sources[{i}] must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != first.shape:
            raise ValueError(f"sources[{i}] has shape {tuple(s.shape)}, sources[0] has {tuple(first.shape)}; all must match")
        if s.dtype != first.dtype or s.device != first.device:
            raise TypeError(f"sources[{i}] is {s.dtype} on {s.device}, sources[0] is {first.dtype} on {first.device}")
    if not first.is_floating_point():
        raise TypeError(f"sources must be floating point, got {first.dtype}")
    D = first.shape[-1]
    if not isinstance(query, torch.Tensor) or query.shape != (D,):
        got = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"query must be a tensor of shape [D={D}], got {got}")
    if norm_weight is not None and (not isinstance(norm_weight, torch.Tensor) or norm_weight.shape != (D,)):
        got = tuple(norm_weight.shape) if isinstance(norm_weight, torch.Tensor) else type(norm_weight).__name__
        raise ValueError(f"norm_weight must be None or a tensor of shape [D={D}], got {got}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


def attention_residual(
    sources: Sequence[torch.Tensor] | torch.Tensor,
    query: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    return_weights: bool = False,
):
    """Softmax read over depth sources.

    Args:
        sources: N tensors ``[..., D]`` (e.g. ``[B, T, D]``), or one tensor ``[N, ..., D]``.
        query: the pseudo-query ``w`` ``[D]``.
        norm_weight: optional RMSNorm weight ``[D]`` applied to the keys.
        eps: RMSNorm epsilon.
        return_weights: also return the softmax weights ``[N, ...]`` (at least float32).

    Returns:
        ``[..., D]`` in the sources' dtype (and the weights if asked).
    """
    _check(sources, query, norm_weight, eps)
    if isinstance(sources, torch.Tensor):
        sources = list(sources.unbind(0))
    # Outside autocast: it would save a bf16 copy of every source at every read (O(L^2) memory).
    with torch.autocast(sources[0].device.type, enabled=False):
        return _attention_residual(sources, query, norm_weight, eps, return_weights)


def _attention_residual(sources, query, norm_weight, eps, return_weights):
    cdt = torch.promote_types(sources[0].dtype, torch.float32)
    w = query.to(cdt) if norm_weight is None else query.to(cdt) * norm_weight.to(cdt)
    logits = []
    for v in sources:
        vf = v.to(cdt)
        inv_rms = torch.rsqrt(vf.pow(2).mean(-1) + eps)
        logits.append((vf @ w) * inv_rms)  # w . (v / rms(v) * g) without a normalised copy of v
    alpha = torch.softmax(torch.stack(logits, 0), dim=0)
    out = sum(a[..., None] * v.to(cdt) for a, v in zip(alpha, sources)).to(sources[0].dtype)
    return (out, alpha) if return_weights else out
