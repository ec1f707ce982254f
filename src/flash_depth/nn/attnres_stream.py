"""The AttnRes source stream: one ``[N_max, B, T, D]`` buffer of read sources per forward.

Full AttnRes writes every sublayer output as a source; block AttnRes writes each finished
block sum and passes the running partial sum to the read as an extra source. A read takes
the slice ``[:n]`` in place, so the source list grows by reference, never by restacking;
:mod:`flash_depth.nn.slot_stream` routes the gradients.

On the fused path the source gradients are deferred: a read's backward computes the gradients
of its query, norm weight and partial sum and keeps its u, dO, lse and rowsum(dO * o) in stacked
buffers; a source's write, whose backward autograd runs after every read of it, forms the
source's gradient over all of its readers in one kernel and writes it once (no float32 buffer
that every read adds into). The reference path adds into the stream's gradient buffer.
"""

from __future__ import annotations

import torch

from flash_depth.ops.attnres import attention_residual, fused_backward, fused_forward, select_attnres_backend

from .slot_stream import SlotStream, check_slots


class SourceStream(SlotStream):
    """AttnRes sources ``[B, T, D]`` of one forward pass (source 0 is the embedding)."""

    def __init__(self, slots: int, backend: str = "auto", dtype: torch.dtype | None = None):
        super().__init__(slots, slot_dim=0, names=("sources",), dtype=dtype)
        self.backend = backend
        self.eps: float | None = None  # read buffers (reader_bufs): u [R, D]; do [R, M, D]; lse, delta [R, M]

    def register_reader(self, eps: float) -> int:
        """Index of a new fused read of every written source (its buffers are filled in backward)."""
        if self.eps is not None and eps != self.eps:
            raise ValueError(f"every read of one source stream needs one eps; got {eps} after {self.eps}")
        self.eps = eps
        return super().register_reader(((0, self.count),))

    def keep_reader(self, r: int, u: torch.Tensor, do: torch.Tensor, lse: torch.Tensor):
        """Stores read r's u ``[1, D]``, dO ``[1, M, D]`` and lse ``[1, M]``; returns its rowsum buffer ``[M]``."""
        return super().keep_reader(r, {"delta": "lse"}, u=u[0], do=do[0], lse=lse[0])["delta"]

    def slot_grads(self, slot: int, dtypes):
        grads = super().slot_grads(slot, dtypes)  # reads on the reference path
        runs = self.readers(slot)  # one run: every read takes all sources written before it
        if not runs:
            return grads
        from flash_depth.ops.attnres_triton import attnres_source_backward  # triton: imported only where it runs

        bufs, source = self.reader_bufs, self.buffers[0][slot]
        dv = attnres_source_backward(source.reshape(-1, source.shape[-1]), bufs["u"], bufs["do"], bufs["lse"],
                                     bufs["delta"], (runs[0].start, runs[-1].stop), self.eps,
                                     out_dtype=dtypes[0]).view(source.shape)
        return (dv,) if grads is None else (grads[0] + dv,)

    def sources(self, n: int | None = None) -> torch.Tensor:
        """The first n (default: all written) sources ``[n, B, T, D]`` (a view, no gradient)."""
        return self.views(n)[0]

    @torch.compiler.disable  # reads of the in-place buffer run eagerly under torch.compile
    def read(self, query: torch.Tensor, norm_weight: torch.Tensor, eps: float, partial: torch.Tensor | None = None,
             return_weights: bool = False):
        """Read of query ``[D]`` over the written sources (plus ``partial``); ``[B, T, D]``
        (and the weights ``[n(+1), B, T]`` with ``return_weights``, a reference-path option)."""
        if self.count == 0:
            raise ValueError("an AttnRes read needs at least one written source")
        backend = "reference" if return_weights else self.backend
        handle = self.read_handle()
        if handle is None:  # nothing to differentiate through the stream: the plain op
            return attention_residual(self.sources(), query, norm_weight, eps=eps, partial=partial,
                                      return_weights=return_weights, backend=backend)
        out, weights = _Read.apply(self, handle, query, norm_weight, partial, eps, backend)
        return (out, weights) if return_weights else out

    @torch.compiler.disable
    def read_two_phase(self, queries: torch.Tensor, norm_weights: torch.Tensor, eps: float):
        """Phase one of two-phase inference: one read of S queries ``[S, D]`` over the written
        sources. Returns out ``[S, B, T, D]`` and lse ``[S, B, T]``; phase two finishes each
        with :func:`~flash_depth.ops.attnres.attention_residual_merge` and the partial sum."""
        return attention_residual(self.sources(), queries, norm_weights, eps=eps, return_lse=True,
                                  backend=self.backend)


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream, handle, query, norm_weight, partial, eps, backend):
        sources = stream.sources()
        ctx.stream, ctx.n, ctx.eps = stream, stream.count, eps
        if select_attnres_backend(backend, sources, return_weights=False) == "reference":
            # Plain PyTorch: let autograd differentiate it.
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in (sources, query, norm_weight)]
                p = None if partial is None else partial.detach().requires_grad_()
                out, weights = attention_residual(*leaves, eps=eps, partial=p, return_weights=True,
                                                  backend="reference")
            ctx.graph = (out, leaves + ([p] if p is not None else []))
            ctx.mark_non_differentiable(weights)
            return out.detach(), weights.detach()
        ctx.graph = None
        out, _, saved, ctx.source_shape = fused_forward(sources, query, norm_weight, partial, eps)
        ctx.save_for_backward(*saved)
        ctx.reader = stream.register_reader(eps) if query.dim() == 1 else None
        weights = out.new_empty(0)
        ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    def backward(ctx, dout, _dweights):
        stream, n = ctx.stream, ctx.n
        if ctx.graph is not None:
            (grad_sources,) = stream.grad_views(n)
            out, inputs = ctx.graph
            d_sources, dq, dg, *dp = torch.autograd.grad(out, inputs, dout)
            ctx.graph = None
            grad_sources += d_sources
            return None, torch.zeros((), device=dout.device), dq, dg, (dp[0] if dp else None), None, None
        saved = ctx.saved_tensors
        if ctx.reader is None:  # several queries at once: add into the float32 buffer
            (grad_sources,) = stream.grad_views(n)
            _, dq, dg, dp = fused_backward(dout, saved, ctx.source_shape, ctx.eps, grad_sources=grad_sources)
        else:
            out, lse, u = saved[4:]
            delta = stream.keep_reader(ctx.reader, u, dout.reshape(out.shape), lse)
            _, dq, dg, dp = fused_backward(dout, saved, ctx.source_shape, ctx.eps, delta_out=delta)
        return None, torch.zeros((), device=dout.device), dq, dg, dp, None, None


class SourceList:
    """The AttnRes sources of one decoding step, for ``torch.compile`` and CUDA graphs when nothing
    is differentiated (generation): one ``[N_max, B, T, D]`` buffer written in place and read as
    a slice by :func:`~flash_depth.ops.attention_residual`'s plain-PyTorch path (a few kernels a
    read, whatever the source count), with :class:`SourceStream`'s ``write`` / ``read`` /
    ``read_two_phase`` and no hand-routed gradients, so a traced step has no graph breaks.
    ``dtype``: the sources' (None: the first write's)."""

    def __init__(self, slots: int, dtype: torch.dtype | None = None):
        check_slots(slots)
        self.slots_max, self.dtype, self.count = slots, dtype, 0
        self.buffer: torch.Tensor | None = None  # allocated at the first write

    def write(self, x: torch.Tensor) -> None:
        """Append one source ``[B, T, D]`` (cast to the buffer's dtype by the copy)."""
        if self.buffer is None:
            self.buffer = x.new_empty((self.slots_max, *x.shape), dtype=self.dtype or x.dtype)
        if self.count >= self.slots_max:
            raise RuntimeError(f"source list is full ({self.slots_max} sources)")
        if x.shape != self.buffer.shape[1:]:
            raise ValueError(f"sources must be {tuple(self.buffer.shape[1:])}, got {tuple(x.shape)}")
        self.buffer[self.count] = x
        self.count += 1

    def _sources(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("an AttnRes read needs at least one written source")
        return self.buffer[: self.count]

    def read(self, query: torch.Tensor, norm_weight: torch.Tensor, eps: float, partial: torch.Tensor | None = None,
             return_weights: bool = False):
        """As :meth:`SourceStream.read`."""
        return attention_residual(self._sources(), query, norm_weight, eps=eps, partial=partial,
                                  return_weights=return_weights, backend="reference")

    def read_two_phase(self, queries: torch.Tensor, norm_weights: torch.Tensor, eps: float):
        """As :meth:`SourceStream.read_two_phase`."""
        return attention_residual(self._sources(), queries, norm_weights, eps=eps, return_lse=True,
                                  backend="reference")
