"""The learned side of Attention Residuals: one pseudo-query per read (SPEC 5)."""

from __future__ import annotations

import torch
from torch import nn

from .attnres_stream import SourceStream


class AttnResQueries(nn.Module):
    """Pseudo-queries and key-norm weights of ``reads`` AttnRes reads over sources ``[B, T, dim]``.

    ``queries [reads, dim]`` start at zero, so every read starts as the plain average of its
    sources; ``key_norms [reads, dim]`` (ones) weight each read's RMSNorm of the sources.
    Read i is ``softmax_n(queries[i] . RMSNorm_{key_norms[i]}(source_n)) . source_n``.
    """

    def __init__(self, reads: int, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        for name, value in (("reads", reads), ("dim", dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.eps = eps
        self.queries = nn.Parameter(torch.zeros(reads, dim, device=device, dtype=dtype))
        self.key_norms = nn.Parameter(torch.ones(reads, dim, device=device, dtype=dtype))

    def read(self, stream: SourceStream, i: int, partial: torch.Tensor | None = None) -> torch.Tensor:
        """Read i over the stream's written sources, plus ``partial [B, T, dim]`` (block AttnRes'
        running sum) if given. Returns ``[B, T, dim]``."""
        if not isinstance(i, int) or not 0 <= i < self.queries.shape[0]:
            raise ValueError(f"i must be a read index in [0, {self.queries.shape[0]}), got {i!r}")
        return stream.read(self.queries[i], self.key_norms[i], self.eps, partial)

    def extra_repr(self) -> str:
        return f"reads={self.queries.shape[0]}, dim={self.queries.shape[1]}"
