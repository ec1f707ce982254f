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

A stream given the pseudo-queries its reads take rows of (``queries``, as
:class:`~flash_depth.nn.attnres.AttnResQueries` does) defers their gradients too: a read's
backward then never reads the sources (it only stores the rowsum), each source's pass adds
its terms of every reader's query gradient, and one node ahead of the first write, whose
backward autograd runs after every source's, returns the query and key-norm gradients.
"""

from __future__ import annotations

import torch

from flash_depth.ops._checks import shape_of
from flash_depth.ops.attnres import (ATTNRES_BACKENDS, attention_residual, fused_backward, fused_forward,
                                     select_attnres_backend)

from ._checks import check_choice, check_float_dtype
from .slot_stream import SlotStream, check_slots, check_write_args


class SourceStream(SlotStream):
    """AttnRes sources ``[B, T, D]`` of one forward pass (source 0 is the embedding)."""

    def __init__(self, slots: int, backend: str = "auto", dtype: torch.dtype | None = None,
                 queries: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        """``queries``: optional (pseudo-queries ``[Q, D]``, key-norm weights ``[Q, D]`` or None)
        whose row i a read with ``index=i`` takes; their gradients are then deferred on the fused path.
        ``dtype``: what the sources are stored in, writes of any floating dtype cast to it (None: the
        first write's, which every later write must have)."""
        super().__init__(slots, slot_dim=0, names=("sources",), dtype=dtype)
        check_choice("backend", backend, ATTNRES_BACKENDS)
        if queries is not None:
            w, g = queries
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise ValueError(f"queries[0] must be a tensor [Q, D], got {shape_of(w)}")
            if g is not None and (not isinstance(g, torch.Tensor) or g.shape != w.shape):
                raise ValueError(f"queries[1] must be None or a tensor of the queries' shape {tuple(w.shape)}, "
                                 f"got {shape_of(g)}")
        self.backend, self.queries = backend, queries
        self.eps: float | None = None  # read buffers (reader_bufs): u [R, D]; do [R, M, D]; lse, delta [R, M]
        self.defers_queries = False  # decided at the first write
        self.reader_query: list[int | None] = []  # per fused read: its row of queries when deferred
        self.du_partials: torch.Tensor | None = None  # [P, R, D]: the sources' terms of du (summed over P)
        self.du_task: int | None = None  # the backward pass that du_partials belongs to

    @torch.compiler.disable
    def write(self, *values: torch.Tensor) -> None:
        """Append one source ``[B, T, D]``; the first write decides whether the queries' gradients are deferred."""
        self.check_write(values)
        if self.count == 0 and self._query_grads_deferrable(values[0]):
            self.defers_queries = True
            self.handle = _QueryGrads.apply(self, *self.queries)  # the first write chains to it
        elif self.defers_queries and not torch.is_grad_enabled():
            # This source gets no backward pass: later reads form their own query gradients (earlier
            # reads read only sources with one).
            self.defers_queries = False
        self.append(values)

    def _query_grads_deferrable(self, x: torch.Tensor) -> bool:
        if self.queries is None or not torch.is_grad_enabled():
            return False
        if not any(q is not None and q.requires_grad for q in self.queries):
            return False
        like = x if self.dtype is None else x.new_empty(0, dtype=self.dtype)
        return select_attnres_backend(self.backend, like, return_weights=False) == "triton"

    def tracks(self, values) -> bool:
        # Deferred query gradients come from every source's backward, even of a source without a gradient.
        return super().tracks(values) or (self.defers_queries and torch.is_grad_enabled())

    def register_reader(self, eps: float, index: int | None = None) -> int:
        """Index of a new fused read of every written source (its buffers are filled in backward);
        ``index``: the read's row of the stream's queries."""
        if self.eps is not None and eps != self.eps:
            raise ValueError(f"every read of one source stream needs one eps; got {eps} after {self.eps}")
        self.eps = eps
        # A read of one source has a query gradient of exactly zero, which its own backward gets
        # (the rowsum and dO . v summed alike); the source pass's sums differ in their last bits.
        self.reader_query.append(index if self.defers_queries and self.count > 1 else None)
        return super().register_reader(((0, self.count),))

    def keep_reader(self, r: int, u: torch.Tensor, do: torch.Tensor, lse: torch.Tensor):
        """Stores read r's u ``[1, D]``, dO ``[1, M, D]`` and lse ``[1, M]``; returns its rowsum buffer ``[M]``."""
        task = torch._C._current_graph_task_id()
        if self.du_task != task and any(i is not None for i in self.reader_query):
            # fresh partials for each backward pass (retain_graph, or a pass that stopped early)
            from flash_depth.ops.attnres_triton import query_grad_partials

            self.du_partials = query_grad_partials(len(self.reader_spans), u.shape[-1], u.device)
            self.du_task = task
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
                                     out_dtype=dtypes[0], du_partials=self.du_partials).view(source.shape)
        return (dv,) if grads is None else (grads[0] + dv,)

    def query_grads(self, w: torch.Tensor, g: torch.Tensor | None):
        """The deferred gradients of the queries ``w`` and key-norm weights ``g`` (u = w * g), once
        every source's backward ran; None where no fused read took a row."""
        rows = [(r, i) for r, i in enumerate(self.reader_query) if i is not None]
        if self.du_partials is None or not rows:
            return None, None
        du, self.du_partials, self.du_task = self.du_partials.sum(0), None, None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        dg = None if g is None else torch.zeros_like(dw)
        (r0, i0), n = rows[0], len(rows)
        if rows == [(r0 + k, i0 + k) for k in range(n)]:  # the model's reads: read r takes row r + i0
            spans = [(slice(r0, r0 + n), slice(i0, i0 + n))]
        else:
            spans = [(slice(r, r + 1), slice(i, i + 1)) for r, i in rows]
        for r, i in spans:
            dw[i] += du[r] * (1 if g is None else g[i])
            if g is not None:
                dg[i] += du[r] * w[i]
        return dw.to(w.dtype), None if g is None else dg.to(g.dtype)

    def _check_row(self, index, query, norm_weight) -> None:
        """ValueError unless query and norm_weight are row ``index`` of the stream's queries (views
        of it: their deferred gradients are formed for those rows)."""
        rows = 0 if self.queries is None else self.queries[0].shape[0]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < rows:
            raise ValueError(f"index must be a row of the stream's queries, in [0, {rows}), got {index!r}")
        for name, x, table in (("query", query, self.queries[0]), ("norm_weight", norm_weight, self.queries[1])):
            row = None if table is None else table[index]
            same = (x is None) if row is None else (
                isinstance(x, torch.Tensor) and x.shape == row.shape and x.data_ptr() == row.data_ptr()
                and x.stride() == row.stride() and x.dtype == row.dtype)
            if not same:
                want = "None" if row is None else f"row {index} of the stream's queries[{int(name != 'query')}]"
                raise ValueError(f"with index={index}, {name} must be {want} (a view of it), got "
                                 f"{'None' if x is None else shape_of(x)}")

    def sources(self, n: int | None = None) -> torch.Tensor:
        """The first n (default: all written) sources ``[n, B, T, D]`` (a view, no gradient)."""
        return self.views(n)[0]

    @torch.compiler.disable  # reads of the in-place buffer run eagerly under torch.compile
    def read(self, query: torch.Tensor, norm_weight: torch.Tensor, eps: float, partial: torch.Tensor | None = None,
             return_weights: bool = False, index: int | None = None):
        """Read of query ``[D]`` over the written sources (plus ``partial``); ``[B, T, D]``
        (and the weights ``[n(+1), B, T]`` with ``return_weights``, a reference-path option).
        ``index``: query and norm_weight are row ``index`` of the stream's ``queries`` (their
        gradients are then deferred on the fused path)."""
        if self.count == 0:
            raise ValueError("an AttnRes read needs at least one written source")
        if index is not None:
            self._check_row(index, query, norm_weight)
        backend = "reference" if return_weights else self.backend
        handle = self.read_handle()
        if handle is None:  # nothing to differentiate through the stream: the plain op
            return attention_residual(self.sources(), query, norm_weight, eps=eps, partial=partial,
                                      return_weights=return_weights, backend=backend)
        out, weights = _Read.apply(self, handle, query, norm_weight, partial, eps, backend, index)
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
    def forward(ctx, stream, handle, query, norm_weight, partial, eps, backend, index):
        sources = stream.sources()
        ctx.stream, ctx.n, ctx.eps = stream, stream.count, eps
        if select_attnres_backend(backend, sources, return_weights=False) == "reference":
            # Plain PyTorch: let autograd differentiate it.
            with torch.enable_grad():
                leaves = [None if x is None else x.detach().requires_grad_()
                          for x in (sources, query, norm_weight, partial)]
                out, weights = attention_residual(*leaves[:3], eps=eps, partial=leaves[3], return_weights=True,
                                                  backend="reference")
            ctx.graph = (out, leaves)
            ctx.mark_non_differentiable(weights)
            return out.detach(), weights.detach()
        ctx.graph = None
        out, _, saved, ctx.source_shape = fused_forward(sources, query, norm_weight, partial, eps)
        ctx.save_for_backward(*saved)
        ctx.reader = stream.register_reader(eps, index) if query.dim() == 1 else None
        weights = out.new_empty(0)
        ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    def backward(ctx, dout, _dweights):
        stream, n = ctx.stream, ctx.n
        if ctx.graph is not None:
            (grad_sources,) = stream.grad_views(n)
            out, leaves = ctx.graph
            ctx.graph = None
            inputs = [x for x in leaves if x is not None]
            found = iter(torch.autograd.grad(out, inputs, dout))
            d_sources, dq, dg, dp = (None if x is None else next(found) for x in leaves)
            grad_sources += d_sources
            return None, torch.zeros((), device=dout.device), dq, dg, dp, None, None, None
        saved = ctx.saved_tensors
        if ctx.reader is None:  # several queries at once: add into the float32 buffer
            (grad_sources,) = stream.grad_views(n)
            _, dq, dg, dp = fused_backward(dout, saved, ctx.source_shape, ctx.eps, grad_sources=grad_sources)
        else:
            out, lse, u = saved[4:]
            delta = stream.keep_reader(ctx.reader, u, dout.reshape(out.shape), lse)
            _, dq, dg, dp = fused_backward(dout, saved, ctx.source_shape, ctx.eps, delta_out=delta,
                                           defer_query=stream.reader_query[ctx.reader] is not None)
        return None, torch.zeros((), device=dout.device), dq, dg, dp, None, None, None


class _QueryGrads(torch.autograd.Function):
    """Ahead of a stream's first write, taking its queries: the backward runs after every
    source's (each write chains to the one before) and returns the deferred query gradients."""

    @staticmethod
    def forward(ctx, stream, w, g):
        ctx.stream = stream
        ctx.save_for_backward(w, g)
        return w.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_handle):
        return None, *ctx.stream.query_grads(*ctx.saved_tensors)


class SourceList:
    """The AttnRes sources of one decoding step, for ``torch.compile`` and CUDA graphs when nothing
    is differentiated (generation): one ``[N_max, B, T, D]`` buffer written in place and read as
    a slice by :func:`~flash_depth.ops.attention_residual`'s plain-PyTorch path (a few kernels a
    read, whatever the source count), with :class:`SourceStream`'s ``write`` / ``read`` /
    ``read_two_phase`` and no hand-routed gradients, so a traced step has no graph breaks.
    ``dtype``: the sources' (writes of any floating dtype are cast to it; None: the first write's,
    which every later write must have)."""

    def __init__(self, slots: int, dtype: torch.dtype | None = None):
        check_slots(slots)
        check_float_dtype(dtype)
        self.slots_max, self.dtype, self.count = slots, dtype, 0
        self.buffer: torch.Tensor | None = None  # allocated at the first write

    def write(self, x: torch.Tensor) -> None:
        """Append one source ``[B, T, D]`` (cast to an explicit ``dtype`` by the copy)."""
        check_write_args(("x",), (x,), None if self.buffer is None else self.buffer.dtype, cast=self.dtype is not None)
        if self.buffer is None:
            self.buffer = x.new_empty((self.slots_max, *x.shape), dtype=self.dtype or x.dtype)
        if self.count >= self.slots_max:
            raise RuntimeError(f"source list is full ({self.slots_max} sources)")
        if x.shape != self.buffer.shape[1:]:
            raise ValueError(f"sources must be {tuple(self.buffer.shape[1:])}, got {tuple(x.shape)}")
        if x.device != self.buffer.device:
            raise ValueError(f"x must be on the source list's device {self.buffer.device}, got {x.device}")
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
