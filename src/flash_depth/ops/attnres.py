"""Attention Residuals read (SPEC section 5): a softmax over earlier sublayer outputs.

    alpha_i = softmax_i( w . RMSNorm_g(v_i) )        (no 1/sqrt(D): w is learned, zero at init)
    out     = sum_i alpha_i v_i

Public functions:
- :func:`attention_residual`: the read, for one pseudo-query ``[D]`` or several ``[S, D]`` at
  once, over sources ``[N, ..., D]`` plus an optional extra source (block AttnRes' running
  partial sum, so finished sources never need restacking). Backends: ``"reference"`` (plain
  PyTorch, the CPU path), ``"triton"`` (ops/attnres_triton.py), ``"auto"``.
- :func:`attention_residual_merge`: adds one more source to a finished read from its
  (out, lse): the second phase of two-phase inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from ._checks import check_bools, check_number, shape_of, triton_usable

ATTNRES_BACKENDS = ("auto", "reference", "triton")


def _check_sources(sources) -> tuple[torch.Tensor, torch.Size]:
    """A tensor with the sources' dtype, device and D, and the shape ``[..., D]`` of one source."""
    if isinstance(sources, torch.Tensor):
        if sources.dim() < 2 or sources.shape[0] == 0:
            raise ValueError(f"sources as one tensor must be [N, ..., D] with N >= 1, got shape {shape_of(sources)}")
        like, shape = sources, sources.shape[1:]  # no sources[0]: indexing costs microseconds per call
    else:
        if not isinstance(sources, Sequence) or len(sources) == 0:
            raise ValueError("sources must be a non-empty list of tensors [..., D] (or one tensor [N, ..., D])")
        like = sources[0]
        for i, s in enumerate(sources):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"sources[{i}] must be a torch.Tensor, got {type(s).__name__}")
            if s.shape != like.shape:
                raise ValueError(f"sources[{i}] has shape {shape_of(s)}, sources[0] has {shape_of(like)}; all must match")
            if s.dtype != like.dtype or s.device != like.device:
                raise TypeError(f"sources[{i}] is {s.dtype} on {s.device}, sources[0] is {like.dtype} on {like.device}")
        shape = like.shape
    if not like.is_floating_point():
        raise TypeError(f"sources must be floating point, got {like.dtype}")
    if shape[-1] == 0:
        raise ValueError(f"sources must have D >= 1 features, got one source's shape {tuple(shape)}")
    return like, shape


def _check_floating(**tensors) -> None:
    for name, x in tensors.items():
        if x is not None and not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")


def _check(sources, query, norm_weight, eps, partial, backend):
    like, source_shape = _check_sources(sources)
    D = source_shape[-1]
    if not isinstance(query, torch.Tensor) or query.dim() not in (1, 2) or query.shape[-1] != D:
        raise ValueError(f"query must be a tensor of shape [D={D}] or [S, D={D}], got {shape_of(query)}")
    S = query.shape[0] if query.dim() == 2 else None
    if norm_weight is not None:
        ok_shapes = [(D,)] + ([(S, D)] if S is not None else [])
        if not isinstance(norm_weight, torch.Tensor) or tuple(norm_weight.shape) not in ok_shapes:
            want = " or ".join(f"[{', '.join(map(str, s))}]" for s in ok_shapes)
            raise ValueError(f"norm_weight must be None or a tensor of shape {want}, got {shape_of(norm_weight)}")
    _check_floating(query=query, norm_weight=norm_weight)
    for name, x in (("query", query), ("norm_weight", norm_weight)):
        if x is not None and x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but the sources are on {like.device}")
    if partial is not None:
        if not isinstance(partial, torch.Tensor) or partial.shape != source_shape:
            raise ValueError(f"partial must be None or a tensor of the sources' shape {tuple(source_shape)}, "
                             f"got {shape_of(partial)}")
        if partial.device != like.device or not partial.is_floating_point():
            raise TypeError(f"partial must be a floating tensor on {like.device}, got {partial.dtype} on {partial.device}")
    check_number("eps", eps, positive=True)
    if backend not in ATTNRES_BACKENDS:
        raise ValueError(f"backend must be one of {ATTNRES_BACKENDS}, got {backend!r}")
    return like


def select_attnres_backend(backend: str, like: torch.Tensor, return_weights: bool) -> str:
    """The backend ``backend`` resolves to for sources of ``like``'s dtype and device ("reference"
    or "triton")."""
    if backend == "auto":
        fused = like.is_cuda and like.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return "triton" if fused and not return_weights else "reference"
    if backend == "triton":
        if return_weights:
            raise ValueError("return_weights=True needs backend='reference' (the fused kernels never form the weights)")
        if not triton_usable(like):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {like.device}")
        if like.dtype == torch.float64:
            raise TypeError("backend='triton' takes float16, bfloat16 or float32 sources, got float64")
    return backend


def attention_residual(
    sources: Sequence[torch.Tensor] | torch.Tensor,
    query: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    partial: torch.Tensor | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    backend: str = "auto",
):
    """Softmax read over depth sources.

    Args:
        sources: one tensor ``[N, ..., D]`` (e.g. ``[N, B, T, D]``; a slice of a preallocated
            buffer is read in place) or a list of N tensors ``[..., D]`` (stacked first on the
            fused path).
        query: the pseudo-query ``w``: ``[D]``, or ``[S, D]`` for S reads of the same sources.
        norm_weight: optional RMSNorm weight on the keys, ``[D]`` (shared) or ``[S, D]``.
        eps: RMSNorm epsilon.
        partial: optional extra source ``[..., D]`` read after the others (block AttnRes'
            running partial sum); it may have its own float dtype.
        return_lse: also return the log-sum-exp of the logits ``[...]`` / ``[S, ...]`` (at least float32).
        return_weights: also return the softmax weights ``[N(+1), ...]`` / ``[S, N(+1), ...]``
            (reference backend).
        backend: ``"auto"`` (Triton on CUDA, reference otherwise), ``"reference"`` or ``"triton"``.

    Returns:
        ``[..., D]`` (``[S, ..., D]`` for S queries) in the sources' dtype, then lse and/or
        weights if asked.
    """
    like = _check(sources, query, norm_weight, eps, partial, backend)
    check_bools(return_lse=return_lse, return_weights=return_weights)
    chosen = select_attnres_backend(backend, like, return_weights)
    single = query.dim() == 1
    with _autocast_off(like.device.type):
        if chosen == "reference":
            stacked = sources if isinstance(sources, torch.Tensor) else torch.stack(list(sources))
            D = like.shape[-1]
            u_norm = None if norm_weight is None else norm_weight.reshape(-1, D)
            out, lse, weights = _reference(stacked, query.reshape(-1, D), u_norm, eps, partial)
            if single:
                out, lse, weights = out[0], lse[0], weights[0]
        else:
            stacked = sources if isinstance(sources, torch.Tensor) else torch.stack(list(sources))
            out, lse = _AttnResFunction.apply(stacked, query, norm_weight, partial, float(eps))
            weights = None
    extra = ([lse] if return_lse else []) + ([weights] if return_weights else [])
    return (out, *extra) if extra else out


def _autocast_off(device_type: str):
    """Reads run outside autocast: it would save a low-precision copy of every source at every
    read. Entering the context costs microseconds per call, so only when autocast is on."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _effective_query(query, norm_weight, cdt):
    """u = w * g: the key-norm weight folded into the query (same logits, no weighted copy of v)."""
    return query.to(cdt) if norm_weight is None else query.to(cdt) * norm_weight.to(cdt)


def _logits(v, u, eps):
    """u . RMSNorm(v) for v ``[..., D]`` and u ``[S, D]`` (or ``[D]``), both in the compute dtype:
    ``[..., S]`` (or ``[...]``), without a normalised copy of v."""
    return (v @ u.t()) * torch.rsqrt(v.pow(2).mean(-1, keepdim=u.dim() == 2) + eps)


def _reference(sources, query, norm_weight, eps, partial):
    """Plain PyTorch: sources ``[N, ..., D]``, query ``[S, D]``, norm_weight ``[S|1, D]`` or None.
    Returns out ``[S, ..., D]``, lse ``[S, ...]`` and weights ``[S, N, ...]``, all from one
    formula over all sources at once (a few kernels a read, whatever N: what a compiled
    decoding step wants)."""
    cdt = torch.promote_types(sources.dtype, torch.float32)
    v = sources.to(cdt)
    if partial is not None:
        v = torch.cat([v, partial.to(cdt)[None]])
    u = _effective_query(query, norm_weight, cdt)
    logits = _logits(v, u, eps).movedim(-1, 0)  # [S, N, ...]
    weights = torch.softmax(logits, dim=1)
    out = torch.einsum("sn...,n...d->s...d", weights, v)
    return out.to(sources.dtype), torch.logsumexp(logits, dim=1), weights


def fused_forward(sources, query, norm_weight, partial, eps: float):
    """The Triton read. sources ``[N, ..., D]``, query ``[D]`` or ``[S, D]``, norm_weight ``[D]``,
    ``[S, D]`` or None, partial ``[..., D]`` or None. Returns out (``[..., D]`` for a query
    ``[D]``, else ``[S, ..., D]``), lse (the same without D), the tensors :func:`fused_backward`
    needs and the sources' shape."""
    from ._triton_common import last_dim_contiguous
    from .attnres_triton import attnres_forward

    D = sources.shape[-1]
    rows = last_dim_contiguous(sources.reshape(sources.shape[0], -1, D))
    query = last_dim_contiguous(query)
    norm_weight = None if norm_weight is None else last_dim_contiguous(norm_weight)
    p_rows = None if partial is None else last_dim_contiguous(partial.reshape(-1, D))
    out, lse, u = attnres_forward(rows, query, norm_weight, p_rows, eps)
    lead = sources.shape[1:-1] if query.dim() == 1 else (query.shape[0], *sources.shape[1:-1])
    return out.view(*lead, D), lse.view(lead), (rows, query, norm_weight, p_rows, out, lse, u), sources.shape


def fused_backward(dout, saved, source_shape, eps: float, grad_sources=None, delta_out=None, defer_query=False):
    """Gradients of :func:`fused_forward`: (sources, query, norm_weight, partial), None where an
    input was None. With ``grad_sources`` (``[N, ..., D]``, any float dtype) the source gradients
    are added into it in place instead; with ``delta_out`` (``[M]`` float32, one query) they are
    left to ``attnres_source_backward`` (None) and rowsum(dO * o) is stored there for it; with
    ``defer_query`` too, so are the sources' terms of the query and norm weight gradients (see
    ``attnres_backward``)."""
    from ._triton_common import last_dim_contiguous
    from .attnres_triton import attnres_backward

    rows, query, norm_weight, p_rows, out, lse, u = saved
    into = None if grad_sources is None else grad_sources.view(rows.shape)
    d_rows, d_partial, dq, dg = attnres_backward(last_dim_contiguous(dout.reshape(out.shape)), rows, query,
                                                 norm_weight, p_rows, out, lse, u, eps, grad_sources=into,
                                                 delta_out=delta_out, defer_query=defer_query)
    d_sources = None if d_rows is None else d_rows.view(source_shape)
    return d_sources, dq, dg, None if d_partial is None else d_partial.view(source_shape[1:])


class _AttnResFunction(torch.autograd.Function):
    """The fused read as one autograd node: the query/norm products and the output's final
    shape are handled inside, not by a chain of small autograd ops."""

    @staticmethod
    def forward(ctx, sources, query, norm_weight, partial, eps):
        # lse never has a gradient: no zeros launched for it. backward only runs when out has one.
        ctx.set_materialize_grads(False)
        out, lse, saved, ctx.source_shape = fused_forward(sources, query, norm_weight, partial, eps)
        ctx.save_for_backward(*saved)
        ctx.eps = eps
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        return (*fused_backward(dout, ctx.saved_tensors, ctx.source_shape, ctx.eps), None)


def attention_residual_merge(out: torch.Tensor, lse: torch.Tensor, extra: torch.Tensor, query: torch.Tensor,
                             norm_weight: torch.Tensor | None = None, *, eps: float = 1e-6) -> torch.Tensor:
    """Add one more source to a finished read (phase two of two-phase inference).

    ``out`` ``[..., D]`` and ``lse`` ``[...]`` come from :func:`attention_residual` over some
    sources with ``return_lse=True``; the result equals that read over the sources plus
    ``extra`` ``[..., D]`` with the same query ``[D]`` and norm weight.
    """
    if not isinstance(out, torch.Tensor) or not isinstance(extra, torch.Tensor) or out.shape != extra.shape:
        raise ValueError(f"out and extra must be tensors of one shape [..., D], got {shape_of(out)} and {shape_of(extra)}")
    if not isinstance(lse, torch.Tensor) or lse.shape != out.shape[:-1]:
        raise ValueError(f"lse must have shape {tuple(out.shape[:-1])} (out without D), got {shape_of(lse)}")
    D = out.shape[-1]
    if not isinstance(query, torch.Tensor) or query.shape != (D,):
        raise ValueError(f"query must be a tensor of shape [D={D}], got {shape_of(query)}")
    if norm_weight is not None and (not isinstance(norm_weight, torch.Tensor) or norm_weight.shape != (D,)):
        raise ValueError(f"norm_weight must be None or a tensor of shape [D={D}], got {shape_of(norm_weight)}")
    _check_floating(out=out, lse=lse, extra=extra, query=query, norm_weight=norm_weight)
    check_number("eps", eps, positive=True)
    for name, x in (("lse", lse), ("extra", extra), ("query", query), ("norm_weight", norm_weight)):
        if x is not None and x.device != out.device:
            raise ValueError(f"{name} is on {x.device} but out is on {out.device}; all inputs need one device")
    with _autocast_off(out.device.type):
        cdt = torch.promote_types(out.dtype, torch.float32)
        e = extra.to(cdt)
        logit = _logits(e, _effective_query(query, norm_weight, cdt), eps)
        lse_new = torch.logaddexp(lse.to(cdt), logit)
        merged = torch.exp(lse - lse_new)[..., None] * out.to(cdt) + torch.exp(logit - lse_new)[..., None] * e
    return merged.to(out.dtype)
