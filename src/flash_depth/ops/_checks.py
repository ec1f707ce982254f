"""Input validation shared by every attention op.

Each check raises a ``ValueError`` / ``TypeError`` that names the argument, the
value it got and what it needs, so a wrong call never turns into a wrong answer.
"""

from __future__ import annotations

import math
import numbers
import os
import weakref
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionDims:
    batch: int
    q_len: int
    kv_len: int  # 0 when there is no sequence part
    q_heads: int
    kv_heads: int
    head_dim: int
    depth: int  # L, 0 when there is no depth part


def shape_of(x) -> str:
    """What an error message says an argument was: its shape, or its type if not a tensor."""
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def triton_usable(x: torch.Tensor) -> bool:
    """The Triton kernels can run on x: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(name: str, x, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)} {layout}")


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; all inputs need one dtype")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; all inputs need one device")


def check_bools(**flags) -> None:
    """TypeError unless every keyword is a bool."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_int(name: str, value, low: int = 1) -> None:
    """ValueError unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < low:
        want = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_number(name: str, value, *, positive: bool = False) -> None:
    """ValueError unless ``value`` is a finite real number (numpy's too, not a bool) >= 0, or > 0
    with ``positive`` (an eps, a rotary base: a bad one gives NaN, not an error, further on)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # numpy's float32 is a Real too
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_depth_pair(q: torch.Tensor, k_depth, v_depth, kv_heads: int | None) -> int:
    """Validate depth K/V ``[B, T, L, Hk, d]`` against q ``[B, T, Hq, d]``; returns L."""
    if (k_depth is None) != (v_depth is None):
        missing = "v_depth" if v_depth is None else "k_depth"
        raise ValueError(f"k_depth and v_depth must be given together, {missing} is None")
    if k_depth is None:
        return 0
    layout = "[B, T, L, Hk, d]"
    check_tensor("k_depth", k_depth, 5, layout)
    check_tensor("v_depth", v_depth, 5, layout)
    check_same("k_depth", k_depth, "q", q)
    check_same("v_depth", v_depth, "q", q)
    B, T, _, d = q.shape
    want_hk = kv_heads if kv_heads is not None else k_depth.shape[3]
    for name, x in (("k_depth", k_depth), ("v_depth", v_depth)):
        b, t, _, hk, dd = x.shape
        if b != B or t != T or hk != want_hk or dd != d:
            raise ValueError(
                f"{name} must have shape [B={B}, T={T}, L, Hk={want_hk}, d={d}] "
                f"(depth slots belong to the query tokens), got {tuple(x.shape)}"
            )
    if k_depth.shape[2] != v_depth.shape[2]:
        raise ValueError(
            f"k_depth and v_depth must have the same number of depth slots L, "
            f"got {k_depth.shape[2]} and {v_depth.shape[2]}"
        )
    return k_depth.shape[2]


def check_moda_inputs(q, k, v, k_depth, v_depth, causal: bool) -> AttentionDims:
    """Validate MoDA inputs; returns the problem dimensions."""
    check_tensor("q", q, 4, "[B, Tq, Hq, d]")
    check_tensor("k", k, 4, "[B, Tk, Hk, d]")
    check_tensor("v", v, 4, "[B, Tk, Hk, d]")
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    check_bools(causal=causal)
    B, Tq, Hq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k must have shape [B={B}, Tk, Hk, d={d}], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    Tk, Hk = k.shape[1], k.shape[2]
    if Hq % Hk != 0:
        raise ValueError(f"the query heads Hq={Hq} must be a multiple of the key/value heads Hk={Hk}")
    if causal and Tk < Tq:
        raise ValueError(
            f"causal attention needs at least as many keys as queries (queries are the last Tq "
            f"tokens of the sequence), got Tq={Tq} and Tk={Tk}"
        )
    L = check_depth_pair(q, k_depth, v_depth, Hk)
    return AttentionDims(B, Tq, Tk, Hq, Hk, d, L)


def check_depth_inputs(q, k_depth, v_depth) -> AttentionDims:
    """Validate Flash Depth Attention inputs; returns the problem dimensions."""
    check_tensor("q", q, 4, "[B, T, Hq, d]")
    if k_depth is None or v_depth is None:
        raise ValueError("depth_attention needs both k_depth and v_depth [B, T, L, Hk, d], got None")
    L = check_depth_pair(q, k_depth, v_depth, None)
    B, T, Hq, d = q.shape
    Hk = k_depth.shape[3]
    if Hq % Hk != 0:
        raise ValueError(f"the query heads Hq={Hq} must be a multiple of the depth key/value heads Hk={Hk}")
    return AttentionDims(B, T, 0, Hq, Hk, d, L)


# The last cu_seqlens whose values passed (weak reference, version counter, total, max_seqlen). A
# model hands every layer the same tensor; checking its values needs a device sync, and a sync
# per layer would stall the host behind the GPU, so one check per tensor (until it is modified).
_checked_cu_seqlens: tuple | None = None


def check_cu_seqlens(cu_seqlens, max_seqlen, q: torch.Tensor, kv_len: int | None) -> None:
    """Validate packed-sequence inputs (flash-attn convention): cu_seqlens int32 ``[num_docs + 1]``
    (0, len_0, len_0 + len_1, ..., total), max_seqlen an int >= the longest document, q
    ``[1, total, Hq, d]`` and, when there is a sequence part, as many keys as queries."""
    global _checked_cu_seqlens
    if (cu_seqlens is None) != (max_seqlen is None):
        missing = "max_seqlen" if max_seqlen is None else "cu_seqlens"
        raise ValueError(f"cu_seqlens and max_seqlen must be given together, {missing} is None")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 torch.Tensor [num_docs + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (the flash-attn convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [num_docs + 1] with at least 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; all inputs need one device")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    B, total = q.shape[0], q.shape[1]
    if B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need q of shape [1, total, Hq, d] (the documents "
                         f"concatenated on dim 1), got batch size {B}")
    if kv_len is not None and kv_len != total:
        raise ValueError(f"packed sequences need as many keys as queries (one token set), got Tq={total} "
                         f"and Tk={kv_len}")
    seen = _checked_cu_seqlens
    if seen is not None and seen[0]() is cu_seqlens and seen[1:] == (cu_seqlens._version, total, max_seqlen):
        return
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if last != total:
        raise ValueError(f"cu_seqlens must end at the total token count {total}, got {last}")
    if shortest < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing (document lengths >= 0), got "
                         f"{cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen must be at least the longest document ({longest} tokens), got {max_seqlen}")
    _checked_cu_seqlens = (weakref.ref(cu_seqlens), cu_seqlens._version, total, max_seqlen)


def check_kv_start(kv_start, q: torch.Tensor) -> None:
    """kv_start int32 ``[B]``: keys before kv_start[b] of batch row b are padding (any value is
    valid: <= 0 masks nothing, >= Tk masks every key)."""
    if not isinstance(kv_start, torch.Tensor):
        raise TypeError(f"kv_start must be an int32 torch.Tensor [B], got {type(kv_start).__name__}")
    if kv_start.dtype != torch.int32:
        raise TypeError(f"kv_start must be int32, got {kv_start.dtype}")
    if kv_start.shape != (q.shape[0],):
        raise ValueError(f"kv_start must have shape [B={q.shape[0]}], got {tuple(kv_start.shape)}")
    if kv_start.device != q.device:
        raise ValueError(f"kv_start is on {kv_start.device} but q is on {q.device}; all inputs need one device")
