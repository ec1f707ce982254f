"""The learned side of Attention Residuals: one pseudo-query per read (SPEC 5)."""

from __future__ import annotations

import torch
from torch import nn

from flash_depth.ops.attnres import attention_residual_merge

from ._checks import check_dims, check_int, check_number
from .attnres_stream import SourceList, SourceStream


class AttnResQueries(nn.Module):
    """Pseudo-queries and key-norm weights of ``reads`` AttnRes reads over sources ``[B, T, dim]``.

    ``queries [reads, dim]`` start at zero, so every read starts as the plain average of its
    sources; ``key_norms [reads, dim]`` (ones) weight each read's RMSNorm of the sources.
    Read i is ``softmax_n(queries[i] . RMSNorm_{key_norms[i]}(source_n)) . source_n``.
    """

    def __init__(self, reads: int, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        check_dims(reads=reads, dim=dim)
        check_number("eps", eps, positive=True)  # what attention_residual takes
        self.eps = eps
        self.queries = nn.Parameter(torch.zeros(reads, dim, device=device, dtype=dtype))
        self.key_norms = nn.Parameter(torch.ones(reads, dim, device=device, dtype=dtype))

    def new_stream(self, slots: int, backend: str = "auto", dtype: torch.dtype | None = None) -> SourceStream:
        """A :class:`SourceStream` of ``slots`` sources for one forward of these reads (on the fused
        path it defers the queries' gradients to the sources' backward: no read re-reads its sources)."""
        return SourceStream(slots, backend=backend, dtype=dtype, queries=(self.queries, self.key_norms))

    def read(self, stream: SourceStream | SourceList, i: int, partial: torch.Tensor | None = None,
             return_weights: bool = False):
        """Read i over the stream's written sources, plus ``partial [B, T, dim]`` (block AttnRes'
        running sum) if given. Returns ``[B, T, dim]``, and with ``return_weights`` the softmax
        weights ``[sources (+1), B, T]`` too (computed by the reference path)."""
        self._check_stream(stream)
        self._check_index(i)
        query, norm_weight = self.queries[i], self.key_norms[i]
        if isinstance(stream, SourceStream) and stream.queries is not None and stream.queries[0] is self.queries:
            return stream.read(query, norm_weight, self.eps, partial, return_weights=return_weights, index=i)
        return stream.read(query, norm_weight, self.eps, partial, return_weights=return_weights)  # e.g. a SourceList

    def read_two_phase(self, stream: SourceStream, i: int, count: int):
        """Phase one of an inference read (no gradients): reads i .. i+count-1 (fewer past the
        last) over the written sources at once. Returns out ``[count, B, T, dim]`` and lse
        ``[count, B, T]``; :meth:`merge` adds a partial sum to one of them."""
        self._check_stream(stream)
        self._check_index(i)
        check_int("count", count)
        return stream.read_two_phase(self.queries[i:i + count], self.key_norms[i:i + count], self.eps)

    def merge(self, i: int, out: torch.Tensor, lse: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        """Phase two: read i's phase-one ``out [B, T, dim]`` and ``lse [B, T]`` merged with
        ``partial [B, T, dim]`` as one more source. Returns ``[B, T, dim]``."""
        self._check_index(i)
        if isinstance(out, torch.Tensor) and (not isinstance(partial, torch.Tensor) or partial.shape != out.shape):
            got = tuple(partial.shape) if isinstance(partial, torch.Tensor) else type(partial).__name__
            raise ValueError(f"partial must be a tensor of out's shape {tuple(out.shape)}, got {got}")
        return attention_residual_merge(out, lse, partial, self.queries[i], self.key_norms[i], eps=self.eps)

    @staticmethod
    def _check_stream(stream) -> None:
        if not isinstance(stream, (SourceStream, SourceList)):
            raise TypeError(f"stream must be a SourceStream (from new_stream) or a SourceList, got "
                            f"{type(stream).__name__}")

    def _check_index(self, i) -> None:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.queries.shape[0]:
            raise ValueError(f"i must be a read index in [0, {self.queries.shape[0]}), got {i!r}")

    def extra_repr(self) -> str:
        return f"reads={self.queries.shape[0]}, dim={self.queries.shape[1]}"
