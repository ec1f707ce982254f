"""MoDA layers: the attention that reads and writes the depth stream, its K/V writer, the depth read.

A MoDA attention (:class:`MoDAAttention`) reads the depth K/V that earlier sublayers wrote for
the same token (:func:`~flash_depth.nn.depth_stream.read_moda`). Attention layers write the K/V
they already computed; :class:`DepthKV` gives any other sublayer (the FFN, in the MoDA paper's
default variant) its own small K/V projection, so that it writes a slot too. :class:`DepthRead`
is Flash Depth Attention as a layer: a query of its own over the depth slots only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from flash_depth.ops import BACKENDS, decode_attention, moda_attention

from ._checks import check_bools, check_choice, check_dims, check_float_tensor, check_int, check_number
from ._recorder import record_layer
from .depth_stream import DepthSlots, DepthStream, check_window, read_depth, read_moda
from .layers import RMSNorm, rotate

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

_MASKS = ("cu_seqlens", "max_seqlen", "kv_start")
# a fixed-length (static) KV cache: the new tokens' slots in it, and either how many slots are
# filled after this call (kv_len: a prefill, which reads those) or which slots each row attends
# (key_mask: a decoding step, which scores the whole cache)
_STATIC = ("cache_position", "kv_len", "key_mask")


def _check_x(x, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor [B, T, {dim}], got {got}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor [B, T, {dim}], got dtype {x.dtype}")


def _check_rotary(cos, sin, batch: int, length: int, head_dim: int) -> None:
    """cos, sin ``[T, 1, head_dim/2]`` (every row's positions alike) or ``[B, T, 1, head_dim/2]``
    (per row; a batch of 1 is the same for every row)."""
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        shape = t.shape if isinstance(t, torch.Tensor) else ()
        if (len(shape) not in (3, 4) or shape[-2:] != (1, half) or shape[-3] != length
                or (len(shape) == 4 and shape[0] not in (1, batch))):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [T, 1, {half}] or [B, T, 1, {half}] with B={batch} (or 1), T={length}, "
                             f"got {got}")
        check_float_tensor(name, t, f"[T, 1, {half}] or [B, T, 1, {half}]")  # rotate() takes it unchecked


def _rotation(cos, sin, batch: int, length: int, head_dim: int) -> bool:
    """Whether cos/sin rotate (both given, checked) or not (both None)."""
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin, or neither (no rotation)")
    if cos is not None:
        _check_rotary(cos, sin, batch, length, head_dim)
    return cos is not None


def _check_stream(stream, what: str) -> None:
    if not isinstance(stream, (DepthStream, DepthSlots)):
        raise ValueError(f"stream must be a DepthStream or DepthSlots ({what}), got {type(stream).__name__}")


class DepthKV(nn.Module):
    """Projects a sublayer's input to one depth K/V slot.

    ``x [B, T, dim] -> k, v [B, T, kv_heads, head_dim]``. The key is RMS-normalised per head
    (``k_norm=True``, for models whose queries are normalised too) and rotated like the query of
    the same token: a depth logit pairs a query with a key of its own position, so the rotation
    cancels and the logit depends on content alone, as a sequence logit at distance 0 does.

    Args:
        dim: width of the input.
        kv_heads, head_dim: shape of the slot; those of the attention that reads it.
        k_norm: RMS-normalise each key head (a learned weight, initialised to ones).
        eps: the key norm's epsilon.
        bias: a bias on the projection.

    ``proj`` holds K then V: ``proj.weight[: kv_heads * head_dim]`` makes the key.
    """

    def __init__(self, dim: int, kv_heads: int, head_dim: int, *, k_norm: bool = True, eps: float = 1e-6,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        check_dims(dim=dim, kv_heads=kv_heads, head_dim=head_dim)
        check_bools(k_norm=k_norm, bias=bias)
        check_number("eps", eps)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got {head_dim}")
        self.dim, self.kv_heads, self.head_dim = dim, kv_heads, head_dim
        self.proj = nn.Linear(dim, 2 * kv_heads * head_dim, bias=bias, device=device, dtype=dtype)
        self.k_norm = RMSNorm(head_dim, eps).to(device=device, dtype=dtype) if k_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
        """x ``[B, T, dim]``; cos, sin ``[T, 1, head_dim/2]`` or ``[B, T, 1, head_dim/2]`` (as
        :class:`~flash_depth.nn.Rotary` returns them), or both None for no rotation.
        Returns k, v ``[B, T, kv_heads, head_dim]``."""
        _check_x(x, self.dim)
        return self.from_projection(self.proj(x), cos, sin)

    def from_projection(self, kv: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
        """k, v ``[B, T, kv_heads, head_dim]`` from ``proj(x)`` ``[B, T, 2 * kv_heads * head_dim]``
        computed elsewhere (a decoding step computes it in one GEMM with the FFN's gate/up)."""
        width = 2 * self.kv_heads * self.head_dim
        if not isinstance(kv, torch.Tensor) or kv.dim() != 3 or kv.shape[-1] != width:
            got = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise ValueError(f"kv must be a tensor [B, T, {width}] (proj's output), got {got}")
        B, T, _ = kv.shape
        rotated = _rotation(cos, sin, B, T, self.head_dim)
        k, v = kv.view(B, T, 2, self.kv_heads, self.head_dim).unbind(2)
        k = self.k_norm(k)
        return (rotate(k, cos, sin) if rotated else k), v

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kv_heads={self.kv_heads}, head_dim={self.head_dim}"


class MoDAAttention(nn.Module):
    """GQA attention with per-head QK-norm that reads and writes the depth stream: causal with
    RoPE in the decoder, non-causal without rotation in a vision encoder.

    ``x [B, T, hidden] -> [B, T, hidden]``. Queries ``[B, T, heads, head_dim]``, keys and values
    ``[B, T, kv_heads, head_dim]``.

    Args:
        hidden: width of the input and output.
        heads, kv_heads, head_dim: query heads, K/V heads (``heads`` a multiple of them), head width.
        qk_norm: RMS-normalise each query and key head (learned weights).
        eps: the norms' epsilon.
        reads_depth: one softmax over the sequence K/V and the stream's written slots (MoDA);
            False: attention over the sequence only.
        causal: mask keys after the query's position (a decoder); False: every query sees every
            key (an encoder). The depth part is per token either way.
        bias: biases on the q, k/v and output projections (ViT/DeiT have them).
        writes_depth: after attending, append one slot to the stream for later layers: the
            layer's own rotated k and v (no new parameters), or with ``attn_kv_proj`` those of
            a :class:`DepthKV` of ``x``.
        attn_kv_proj: the written slot gets its own projection (needs ``writes_depth``).
        layer_idx: the layer's index in the KV cache.
        backend: kernels, as in :func:`~flash_depth.moda_attention`.
        depth_window, depth_anchors: read only the last ``depth_window`` slots plus the first
            ``depth_anchors`` (None: every written slot), as :func:`read_moda`'s window/anchors.

    Weights: ``q_proj``, ``kv_proj`` (K then V), ``o_proj``, ``q_norm``, ``k_norm``, ``depth_kv``.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qk_norm: bool = True,
                 eps: float = 1e-6, reads_depth: bool = True, writes_depth: bool = False, attn_kv_proj: bool = False,
                 layer_idx: int = 0, backend: str = "auto", depth_window: int | None = None, depth_anchors: int = 0,
                 causal: bool = True, bias: bool = False):
        super().__init__()
        check_dims(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
        check_bools(qk_norm=qk_norm, reads_depth=reads_depth, writes_depth=writes_depth, attn_kv_proj=attn_kv_proj,
                   causal=causal, bias=bias)
        check_number("eps", eps)
        check_int("layer_idx", layer_idx, 0)
        check_choice("backend", backend, BACKENDS)
        check_window(depth_window, depth_anchors)
        if heads % kv_heads:
            raise ValueError(f"heads must be a multiple of kv_heads, got heads={heads}, kv_heads={kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got {head_dim}")
        if attn_kv_proj and not writes_depth:
            raise ValueError("attn_kv_proj=True projects the slot this layer writes: it needs writes_depth=True")
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, kv_heads, head_dim
        self.reads_depth, self.writes_depth, self.causal = reads_depth, writes_depth, causal
        self.layer_idx, self.backend = layer_idx, backend
        self.window = {"window": depth_window, "anchors": depth_anchors}
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.kv_proj = nn.Linear(hidden, 2 * kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.depth_kv = DepthKV(hidden, kv_heads, head_dim, k_norm=qk_norm, eps=eps) if attn_kv_proj else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                stream: DepthStream | DepthSlots | None = None, cache: Cache | None = None,
                masks: dict | None = None, x_k: torch.Tensor | None = None,
                x_v: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, T, hidden]``; cos, sin ``[T, 1, head_dim/2]`` or ``[B, T, 1, head_dim/2]`` (as
        :class:`~flash_depth.nn.Rotary` returns them), or both None for no rotation (positions
        already in x, as a ViT's learned embeddings put them); ``stream`` the forward's depth stream
        (needed to read or write it); ``cache`` a transformers ``Cache`` of sequence K/V, which
        this call extends; ``masks`` the sequence attention's masks as the ops take them
        (``cu_seqlens`` and ``max_seqlen`` for packed documents, or ``kv_start`` for left
        padding), None for none. With a fixed-length cache (``cache.is_compileable``) masks also
        hold ``cache_position`` (LongTensor ``[T]``, the new tokens' slots) and either ``kv_len``
        (int, the slots filled after this call: a prefill reads those) or ``key_mask`` (bool
        ``[B, cache length]``, the slots each row attends: a decoding step, T = 1, which runs
        :func:`~flash_depth.ops.decode_attention` over the whole cache and reads ``stream``, a
        :class:`DepthSlots`, without host syncs). ``x_k``, ``x_v`` ``[B, T, hidden]``: separate
        inputs of the key and value projections (MUDDFormer's multiway inputs; both or neither), x
        then feeds the query only. Returns ``[B, T, hidden]``."""
        _check_x(x, self.hidden)
        if (x_k is None) != (x_v is None):
            raise ValueError("pass both x_k and x_v (separate key and value inputs), or neither")
        if x_k is not None:
            for name, t in (("x_k", x_k), ("x_v", x_v)):
                if not isinstance(t, torch.Tensor) or t.shape != x.shape:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{name} must be a tensor of x's shape {tuple(x.shape)}, got {got}")
        B, T, _ = x.shape
        rotated = _rotation(cos, sin, B, T, self.head_dim)
        if self.reads_depth or self.writes_depth:
            _check_stream(stream, "reads_depth or writes_depth is set")
        if masks is not None and (not isinstance(masks, dict) or not set(masks) <= set(_MASKS + _STATIC)):
            raise ValueError(f"masks must be None or a dict with keys among {_MASKS + _STATIC}, got "
                             f"{sorted(masks) if isinstance(masks, dict) else type(masks).__name__}")
        masks = dict(masks or {})
        slots, kv_len, key_mask = [masks.pop(name, None) for name in _STATIC]
        if key_mask is None and isinstance(stream, DepthSlots):
            raise ValueError("a DepthSlots stream is for a decoding step on a fixed-length cache: pass masks with "
                             "key_mask (the model does), or use a DepthStream")
        if key_mask is not None and (T != 1 or kv_len is not None or isinstance(stream, DepthStream) or not self.causal):
            raise ValueError(f"key_mask is for a decoding step of a causal layer: one token (got T={T}), no kv_len, "
                             f"and DepthSlots as the stream (got {type(stream).__name__})")
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim))
        if x_k is None:  # one GEMM for K and V
            k, v = self.kv_proj(x).view(B, T, 2, self.kv_heads, self.head_dim).unbind(2)
        else:  # the halves of the same weight (K then V), so the checkpoint keys do not change
            w_k, w_v = self.kv_proj.weight.chunk(2)
            b_k, b_v = self.kv_proj.bias.chunk(2) if self.kv_proj.bias is not None else (None, None)
            k = F.linear(x_k, w_k, b_k).view(B, T, self.kv_heads, self.head_dim)
            v = F.linear(x_v, w_v, b_v).view(B, T, self.kv_heads, self.head_dim)
        k = self.k_norm(k)
        if rotated:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_all, v_all = k, v
        if cache is not None:  # transformers' caches hold [B, H, T, d]
            # transformers 4.x's StaticCache takes the slots to write; other caches ignore them
            extra = () if slots is None else ({"cache_position": slots},)
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx, *extra)
            k_all, v_all = k_all.transpose(1, 2), v_all.transpose(1, 2)
            if kv_len is not None:
                k_all, v_all = k_all[:, :kv_len], v_all[:, :kv_len]
        record_layer(self, "attention", q, k_all, stream if self.reads_depth else None, self.window)
        if key_mask is not None:  # a decoding step (decoders only: causal)
            depth = stream.read(**self.window) if self.reads_depth and stream.count else (None, None)
            o = decode_attention(q, k_all, v_all, *depth, key_mask=key_mask)
        elif self.reads_depth:
            o = read_moda(stream, q, k_all, v_all, causal=self.causal, backend=self.backend, **self.window, **masks)
        else:
            o = moda_attention(q, k_all, v_all, causal=self.causal, backend=self.backend, **masks)
        if self.writes_depth:
            # the attention's own K/V joins the stream for later layers (it is already in its sequence set)
            stream.write(*(self.depth_kv(x, cos, sin) if self.depth_kv is not None else (k, v)))
        return self.o_proj(o.reshape(B, T, -1))

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"reads_depth={self.reads_depth}, writes_depth={self.writes_depth}, causal={self.causal}")


class DepthRead(nn.Module):
    """Flash Depth Attention as a layer: a query of its own reads the depth stream's slots only.

    ``x [B, T, hidden] -> [B, T, hidden]``: q ``[B, T, heads, head_dim]`` (per-head RMSNorm with
    ``qk_norm``, RoPE like the slots' keys when given cos/sin) attends over the written slots of its token; the
    heads go through ``o_proj``. ``layer_idx`` is what an attached analysis recorder is told.
    """

    def __init__(self, hidden: int, heads: int, head_dim: int, *, qk_norm: bool = True, eps: float = 1e-6,
                 layer_idx: int = 0, backend: str = "auto", depth_window: int | None = None, depth_anchors: int = 0):
        super().__init__()
        check_dims(hidden=hidden, heads=heads, head_dim=head_dim)
        check_bools(qk_norm=qk_norm)
        check_number("eps", eps)
        check_int("layer_idx", layer_idx, 0)
        check_choice("backend", backend, BACKENDS)
        check_window(depth_window, depth_anchors)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got {head_dim}")
        self.hidden, self.heads, self.head_dim = hidden, heads, head_dim
        self.layer_idx, self.backend = layer_idx, backend
        self.window = {"window": depth_window, "anchors": depth_anchors}
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                stream: DepthStream | DepthSlots | None = None) -> torch.Tensor:
        """x ``[B, T, hidden]``; cos, sin as :meth:`MoDAAttention.forward` (both None: no
        rotation); ``stream`` with at least one written slot (:class:`DepthSlots`: a decoding
        step's, read in plain PyTorch). Returns ``[B, T, hidden]``."""
        _check_x(x, self.hidden)
        B, T, _ = x.shape
        rotated = _rotation(cos, sin, B, T, self.head_dim)
        _check_stream(stream, "the slots to read")
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim))
        q = rotate(q, cos, sin) if rotated else q
        record_layer(self, "depth_read", q, stream, self.window)
        if isinstance(stream, DepthSlots):
            o = decode_attention(q, None, None, *stream.read(**self.window))
        else:
            o = read_depth(stream, q, backend=self.backend, **self.window)
        return self.o_proj(o.reshape(B, T, -1))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, heads={self.heads}, head_dim={self.head_dim}"
