"""Hyper-Connections: n parallel residual streams mixed around each sublayer (SPEC 6, 10).

The stream state is ``X [B, T, n, D]``. Around a sublayer F:

    x_in = sum_i H_pre[i] X[i]                  # [B, T, D]
    X'   = H_res @ X + H_post[:, None] * F(x_in)

kind="mhc" (manifold-constrained HC, DeepSeek, arXiv 2512.24880), per token, with x the RMS-normalised
flattened stream ``[n*D]`` (no learned norm weight: phi absorbs it):

    H_pre  = sigmoid(alpha_pre * x phi_pre + b_pre)            # [n]
    H_post = 2 * sigmoid(alpha_post * x phi_post + b_post)      # [n]
    H_res  = sinkhorn(alpha_res * mat(x phi_res) + b_res)       # [n, n], doubly stochastic

kind="hc" (static Hyper-Connections, Zhu et al. 2024): H_pre, H_post, H_res are learned directly
(no token dependence, no Sinkhorn).

Checked against DeepSeek's TileKernels (deepseek-ai/TileKernels, ``tile_kernels/torch/mhc.py`` and
``tile_kernels/modeling/mhc/functional.py``). Matches: the RMS norm of the flattened ``[n*D]`` stream
before one projection to ``n*(n+2)`` mixes; three scalar gates (pre, post, res) times the projection
plus per-entry biases; sigmoid for H_pre, ``post_mult_value * sigmoid`` for H_post (2 as in the
paper); Sinkhorn starts with a row softmax (the row normalisation of exp, overflow-safe) and then
alternates column and row sums; the entry copies the embedding n times. Differences:
  * their Sinkhorn adds eps=1e-6 to every entry and every denominator (rows/columns then sum to
    1 - O(eps)); here denominators are only clamped at 1e-12: columns sum to 1 to rounding, rows
    to the convergence residual.
    ``sinkhorn_iters`` counts (row, column) pairs as TileKernels' ``repeat`` does (default 10 there);
    DeepSeek-V4-Flash's config sets hc_sinkhorn_iters=20, hc_eps=1e-6 (seen in third-party copies;
    the official V4 inference code was not checked).
  * they add pre_eps=1e-6 to H_pre; not here, so that init is exactly a plain residual.
  * their post applies the transpose, ``X'[j] = sum_i C[i, j] X[i]``; here ``H_res @ X`` as in
    SPEC 10. Both orientations are learned the same way (Sinkhorn is symmetric in rows/columns).
  * their exit (``mhc_head``) is a learned sigmoid read of the streams; ``collapse_streams`` takes the
    mean (the HC paper sums; the final RMSNorm makes sum and mean equal up to its eps).

On CUDA (or under TRITON_INTERPRET=1) the Sinkhorn, mHC's projection, read and write and static HC's
mix gradients run as Triton custom ops (ops/hyper_triton.py, float32 arithmetic); float64 and other
devices take the plain PyTorch formulas, which stay the reference (``sinkhorn`` here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton is installed on Linux only; without it every path below is plain PyTorch
    from ..ops import hyper_triton
except ImportError:
    hyper_triton = None
from ..ops._aliasing import to_dtype
from ._checks import check_float_tensor, check_int, check_number
from ._recorder import record


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-12) -> torch.Tensor:
    """exp(logits) ``[..., n, n]`` -> doubly stochastic ``[..., n, n]`` by ``iters`` (row, column)
    normalisation pairs; columns sum to 1 exactly, rows to the convergence residual."""
    check_float_tensor("logits", logits, "[..., n, n]")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must be a tensor [..., n, n] (square), got {tuple(logits.shape)}")
    check_int("iters", iters, 1)
    check_number("eps", eps)
    m = logits.softmax(-1)
    m = m / m.sum(-2, keepdim=True).clamp_min(eps)
    for _ in range(iters - 1):
        m = m / m.sum(-1, keepdim=True).clamp_min(eps)
        m = m / m.sum(-2, keepdim=True).clamp_min(eps)
    return m


def _sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`sinkhorn`, fused into one Triton kernel each way where Triton runs."""
    return sinkhorn(logits, iters) if hyper_triton is None else hyper_triton.fused_sinkhorn(logits, iters)


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_{m, d} a[m, i, d] b[m, j, d]`` ``[na, nb]`` in at least float32 (a Triton kernel where it runs)."""
    if hyper_triton is not None:
        return hyper_triton.stream_gram(a, b)
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.einsum("mid,mjd->ij", a.to(dt), b.to(dt))


def expand_streams(x: torch.Tensor, streams: int) -> torch.Tensor:
    """Entry: ``x [B, T, D]`` -> ``[B, T, n, D]``, n copies (a broadcast view, no copy)."""
    check_float_tensor("x", x, "[B, T, D]")
    check_int("streams", streams, 1)
    if x.dim() != 3:
        raise ValueError(f"x must be a tensor [B, T, D], got {tuple(x.shape)}")
    return x.unsqueeze(-2).expand(*x.shape[:-1], streams, x.shape[-1])


def collapse_streams(X: torch.Tensor) -> torch.Tensor:
    """Exit: ``X [B, T, n, D]`` -> ``[B, T, D]``, the mean of the streams (the plain residual at init)."""
    check_float_tensor("X", X, "[B, T, n, D]")
    if X.dim() != 4:
        raise ValueError(f"X must be a tensor [B, T, n, D], got {tuple(X.shape)}")
    return X.mean(-2)


def _read(X, h_pre):
    """``sum_i h_pre[..., i] X[..., i, :]`` in X's dtype. Products and a sum over n, not a batched
    [1, n] @ [n, D] matmul: the compiler fuses them into one pass over X (cuBLAS runs such tiny
    per-token matmuls as slow GEMVs)."""
    dt = torch.promote_types(X.dtype, h_pre.dtype)
    return to_dtype((to_dtype(h_pre, dt).unsqueeze(-1) * to_dtype(X, dt)).sum(-2), X.dtype)


def _write(X, y, h_post, h_res):
    """``H_res @ X + H_post y`` in X's dtype, as products and sums over n (see _read)."""
    dt = torch.promote_types(X.dtype, h_res.dtype)
    mixed = (to_dtype(h_res, dt).unsqueeze(-1) * to_dtype(X, dt).unsqueeze(-3)).sum(-2)
    return to_dtype(mixed + to_dtype(h_post, dt).unsqueeze(-1) * to_dtype(y, dt).unsqueeze(-2), X.dtype)


def _tokens(x):
    """``[..., k, D]`` -> ``[M, k, D]`` (a view where the leading dimensions allow it)."""
    return x.reshape(-1, *x.shape[-2:])


# Static HC's mixes are shared by every token: their gradients are sums over all tokens, which the
# compiler turns into slow split reductions (1.3 ms a call at 16384 tokens). These two Functions
# keep the elementwise parts to the compiler and take those sums from one stream_gram kernel.
class _StaticRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, h_pre):
        ctx.save_for_backward(X, h_pre)
        return _read(X, h_pre)

    @staticmethod
    def backward(ctx, g):
        X, h_pre = ctx.saved_tensors
        dt = torch.promote_types(X.dtype, h_pre.dtype)
        dX = to_dtype(to_dtype(h_pre, dt).unsqueeze(-1) * to_dtype(g, dt).unsqueeze(-2), X.dtype)
        dh_pre = _gram(_tokens(X), _tokens(g.unsqueeze(-2)))[:, 0]
        return dX, to_dtype(dh_pre, h_pre.dtype)


class _StaticWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, y, h_post, h_res):
        ctx.save_for_backward(X, y, h_post, h_res)
        return _write(X, y, h_post, h_res)

    @staticmethod
    def backward(ctx, g):
        X, y, h_post, h_res = ctx.saved_tensors
        dt = torch.promote_types(X.dtype, h_res.dtype)
        gd = to_dtype(g, dt)
        dX = to_dtype((to_dtype(h_res, dt).unsqueeze(-1) * gd.unsqueeze(-2)).sum(-3), X.dtype)  # H_res^T g
        dy = to_dtype((to_dtype(h_post, dt).unsqueeze(-1) * gd).sum(-2), y.dtype)
        dh_res = _gram(_tokens(g), _tokens(X))
        dh_post = _gram(_tokens(g), _tokens(y.unsqueeze(-2)))[:, 0]
        return dX, dy, to_dtype(dh_post, h_post.dtype), to_dtype(dh_res, h_res.dtype)


class HyperConnection(nn.Module):
    """The read/write of n residual streams ``X [B, T, n, D]`` around one sublayer.

    Init is a plain residual: every stream starts as the same embedding copy, H_post = 1 and H_res
    doubly stochastic keep them equal, and H_pre sums to 1, so ``x_in`` is the residual stream.
    mhc: alpha = 0 (H are the biases), b_pre = logit(1/n) (reads the average), b_post = 0
    (H_post = 1), b_res = 0 on the diagonal and -1 off it: H_res is exactly doubly stochastic (its
    rows are permutations of each other) and leans to the identity (diagonal 0.48 at n=4, against
    0.25 uniform). A larger gap (closer to I) makes 20 Sinkhorn pairs converge badly once b_res
    moves: at n=4 after a 0.3 perturbation the row-sum residual is ~1e-10 at -1, ~3e-5 at -2 and
    ~5e-3 at -8 (small entries move slowly).
    phi ~ N(0, 1/(nD)) so that the token-dependent terms (and phi's gradient) switch on as soon
    as alpha moves.
    hc: H_pre = one-hot on stream ``layer mod n``, H_post = 1, H_res = I (the HC paper's init; the
    layer index is what breaks the symmetry between the otherwise identical streams).
    """

    def __init__(self, dim: int, streams: int = 4, kind: str = "mhc", layer: int = 0, sinkhorn_iters: int = 20,
                 eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("streams", streams, 2)
        check_int("layer", layer, 0)  # any layer index: hc's one-hot init takes it mod streams
        check_int("sinkhorn_iters", sinkhorn_iters, 1)
        check_number("eps", eps)
        if kind not in ("mhc", "hc"):
            raise ValueError(f"kind must be 'mhc' or 'hc', got {kind!r}")
        self.dim, self.streams, self.kind, self.sinkhorn_iters, self.eps = dim, streams, kind, sinkhorn_iters, eps
        self.layer = layer
        n, kw = streams, dict(device=device, dtype=dtype)
        if kind == "hc":
            self.h_pre = nn.Parameter(torch.eye(n, **kw)[layer % n].clone())
            self.h_post = nn.Parameter(torch.ones(n, **kw))
            self.h_res = nn.Parameter(torch.eye(n, **kw))
            return
        std = (n * dim) ** -0.5
        self.phi_pre = nn.Parameter(torch.randn(n * dim, n, **kw) * std)
        self.phi_post = nn.Parameter(torch.randn(n * dim, n, **kw) * std)
        self.phi_res = nn.Parameter(torch.randn(n * dim, n * n, **kw) * std)
        self.alpha_pre = nn.Parameter(torch.zeros((), **kw))
        self.alpha_post = nn.Parameter(torch.zeros((), **kw))
        self.alpha_res = nn.Parameter(torch.zeros((), **kw))
        self.b_pre = nn.Parameter(torch.full((n,), -math.log(n - 1), **kw))
        self.b_post = nn.Parameter(torch.zeros(n, **kw))
        self.b_res = nn.Parameter(torch.eye(n, **kw) - 1)

    def mixes(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``X [B, T, n, D]`` -> H_pre ``[B, T, n]``, H_post ``[B, T, n]``, H_res ``[B, T, n, n]``
        (static HC: ``[n]``, ``[n]``, ``[n, n]``), in at least float32."""
        self._check_stream(X)
        if self.kind == "hc":
            return self.h_pre, self.h_post, self.h_res
        n, dt = self.streams, torch.promote_types(X.dtype, torch.float32)
        # one matmul for the three projections: X is read once
        phi = torch.cat([self.phi_pre, self.phi_post, self.phi_res], 1).to(dt)
        if hyper_triton is not None and hyper_triton.projection_fusable(X, phi):
            proj = hyper_triton.rms_projection(X.flatten(0, -3), phi, self.eps).view(*X.shape[:-2], phi.shape[1])
        else:
            proj = F.rms_norm(X.flatten(-2).to(dt), (n * self.dim,), None, self.eps) @ phi
        p_pre, p_post, p_res = proj.split([n, n, n * n], -1)
        h_pre = torch.sigmoid(self.alpha_pre * p_pre + self.b_pre)
        h_post = 2 * torch.sigmoid(self.alpha_post * p_post + self.b_post)
        h_res = _sinkhorn(self.alpha_res * p_res.view(*p_res.shape[:-1], n, n) + self.b_res, self.sinkhorn_iters)
        return h_pre, h_post, h_res

    def pre(self, X: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Read: ``X [B, T, n, D]`` -> the sublayer input ``[B, T, D]`` (X's dtype) and the
        (H_post, H_res) that ``post`` needs."""
        h_pre, h_post, h_res = self.mixes(X)
        record(self, "hyper", self.layer, h_pre, h_post, h_res)
        if h_pre.dim() == 1:
            return _StaticRead.apply(X, h_pre), (h_post, h_res)
        if hyper_triton is not None and hyper_triton.read_fusable(X, h_pre):
            x_in = hyper_triton.stream_read(_tokens(X), h_pre.reshape(-1, self.streams))
            return x_in.view(*X.shape[:-2], self.dim), (h_post, h_res)
        return _read(X, h_pre), (h_post, h_res)

    def post(self, X: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
        """Write: ``X [B, T, n, D]``, sublayer output ``y [B, T, D]``, and ``pre``'s H_post ``[B, T, n]``
        and H_res ``[B, T, n, n]`` (static HC: ``[n]``, ``[n, n]``) -> ``X' [B, T, n, D]``."""
        self._check_stream(X)
        n = self.streams
        for name, h, static, dynamic in (("h_post", h_post, (n,), X.shape[:-1]),
                                         ("h_res", h_res, (n, n), X.shape[:-1] + (n,))):
            if not isinstance(h, torch.Tensor) or h.shape not in (static, dynamic):
                raise ValueError(f"{name} must be a tensor {list(dynamic)} (static HC: {list(static)}), as pre "
                                 f"returns it, got {getattr(h, 'shape', type(h).__name__)}")
        if (h_res.dim() == 2) != (h_post.dim() == 1):
            raise ValueError(f"h_post and h_res must both be static ([n], [n, n]) or both per token, got "
                             f"{list(h_post.shape)} and {list(h_res.shape)}")
        if not isinstance(y, torch.Tensor) or y.shape != X.shape[:-2] + X.shape[-1:]:
            raise ValueError(f"y must be a tensor {list(X.shape[:-2] + X.shape[-1:])}, got "
                             f"{getattr(y, 'shape', type(y).__name__)}")
        if h_res.dim() == 2:
            return _StaticWrite.apply(X, y, h_post, h_res)
        if hyper_triton is not None and hyper_triton.write_fusable(X, y, h_post, h_res):
            n, D = self.streams, self.dim
            return hyper_triton.stream_write(_tokens(X), y.reshape(-1, D), h_post.reshape(-1, n),
                                             h_res.reshape(-1, n, n)).view(X.shape)
        return _write(X, y, h_post, h_res)

    def forward(self, X: torch.Tensor, fn) -> torch.Tensor:
        """``X [B, T, n, D]`` -> ``X' [B, T, n, D]`` around ``fn: [B, T, D] -> [B, T, D]``."""
        if not callable(fn):
            raise TypeError(f"fn must be callable [B, T, D] -> [B, T, D], got {type(fn).__name__}")
        x_in, (h_post, h_res) = self.pre(X)
        return self.post(X, fn(x_in), h_post, h_res)

    def _check_stream(self, X):
        if not isinstance(X, torch.Tensor) or not X.is_floating_point():
            got = X.dtype if isinstance(X, torch.Tensor) else type(X).__name__
            raise TypeError(f"X must be a floating-point tensor [B, T, n, D], got {got}")
        if X.ndim != 4 or tuple(X.shape[-2:]) != (self.streams, self.dim):
            raise ValueError(f"X must have shape [B, T, {self.streams}, {self.dim}], got {list(X.shape)}")

    def extra_repr(self) -> str:
        iters = f", sinkhorn_iters={self.sinkhorn_iters}" if self.kind == "mhc" else ""
        return f"dim={self.dim}, streams={self.streams}, kind={self.kind!r}{iters}"
