"""The depth KV stream: one ``[B, T, L_max, Hk, d]`` buffer for K and one for V per forward.

Published MoDA models re-stack every earlier layer's K/V at each layer (O(L^2) copies and
memory). Here a layer writes its slot in place and later layers read the slice
``[:, :, :n]`` without a copy; :mod:`flash_depth.nn.slot_stream` routes the gradients.

On the fused path the slot gradients are deferred: a read's backward computes only its dq
and keeps its q, dO, lse and rowsum(dO * o) in stacked ``[R, ...]`` buffers; the write's
backward (which autograd runs after every read of the slot) forms the slot's dK/dV in one
kernel over all of its readers and writes it once, in the slot's dtype. Two slots written
with no read between them (a block's attention and FFN slots) have the same readers and
are formed by one launch, which reads the readers' q and dO once for both.

An fp8 stream (``DepthStream(slots, dtype=torch.float8_e4m3fn)``) stores each slot as e4m3 values
with a float32 scale per (token, KV head) row (ops/fp8.py): a write quantises, the fused kernels
dequantise in registers, and the reference path reads dequantised copies. Its gradients are
straight through: a producer gets the gradient of the dequantised slot, as if the slot held it.
"""

from __future__ import annotations

import torch

from flash_depth.ops import depth_attention, moda_attention
from flash_depth.ops.fp8 import check_fp8_device, dequantize_fp8, quantize_fp8
from flash_depth.ops._checks import check_depth_inputs, check_moda_inputs
from flash_depth.ops.moda import check_masks, fused_backward, fused_forward, select_backend
from flash_depth.ops.reference import attention_reference

from .slot_stream import SlotStream, check_slots, check_write_args


class DepthStream(SlotStream):
    """Depth K/V slots of the tokens of one forward pass: ``slots`` of them at most, stored in the
    first write's dtype (``dtype=None``) or as fp8 (``dtype=torch.float8_e4m3fn``, see module doc)."""

    def __init__(self, slots: int, dtype: torch.dtype | None = None):
        check_slots(slots)
        fp8 = getattr(torch, "float8_e4m3fn", None)
        if dtype is not None and (fp8 is None or dtype != fp8):
            raise ValueError(f"dtype must be None (the first write's dtype) or torch.float8_e4m3fn, got {dtype!r}")
        super().__init__(slots, slot_dim=2, names=("k", "v"), dtype=dtype)
        self.quantized = dtype is not None
        self.scales: list[torch.Tensor] | None = None  # fp8: k and v scales [B, T, L_max, Hk] float32
        self.value_dtype: torch.dtype | None = None  # the first write's dtype: what fp8 slots dequantise to
        # read buffers (reader_bufs): q, do [R, B, T, Hq, d]; lse, delta [R, B, Hq, T]
        self.formed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (dk, dv) formed early

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one slot: k, v ``[B, T, Hk, d]`` (the first write fixes shape and dtype: every
        later k and v must have it, also in an fp8 stream, whose slots dequantise to it)."""
        self.check_write((k, v))
        if self.buffers is None:
            if self.quantized:
                check_fp8_device(k.device)
            self.value_dtype = k.dtype
        self.append((k, v))

    def check_write(self, values) -> None:
        """TypeError unless k and v are floating-point tensors of the first write's dtype (an fp8
        stream too: its explicit dtype is the storage's, not a cast of any dtype as in other streams)."""
        check_write_args(self.names, values, self.value_dtype)

    def store(self, slot: int, values) -> None:
        """Puts k, v into slot ``slot`` (one launch on CUDA); an fp8 stream quantises them, with their scales."""
        if not self.quantized:
            if self.buffers[0].is_cuda:  # on the CPU (and the interpreter) copy_ is as fast
                from flash_depth.ops.slot_copy import copy_into  # triton: imported only where it runs

                copy_into([buf.select(self.slot_dim, slot) for buf in self.buffers], list(values))
            else:
                super().store(slot, values)
            return
        if self.scales is None:
            self.scales = [buf.new_empty(buf.shape[:-1], dtype=torch.float32) for buf in self.buffers]
        for buf, scales, x in zip(self.buffers, self.scales, values):
            quantize_fp8(x, out=buf.select(self.slot_dim, slot), scale_out=scales.select(self.slot_dim, slot))

    def grad_dtype(self) -> torch.dtype:
        """The slot gradients' dtype: float32 (float64 for float64 values), also for fp8 slots."""
        return torch.float64 if self.value_dtype == torch.float64 else torch.float32

    def span_scales(self, spans) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The fp8 scales (k, v) ``[B, T, end - start, Hk]`` of each span (views), None per span when
        the stream is not fp8."""
        if not self.quantized:
            return [None] * len(spans)
        return [tuple(s.narrow(self.slot_dim, a, b - a) for s in self.scales) for a, b in spans]

    def stacked(self, spans) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v ``[B, T, n, Hk, d]`` of the slots in ``spans``, stacked (a copy; fp8: dequantised to
        the written dtype), for the reference path."""
        pieces = self.span_views(spans)
        if self.quantized:
            pieces = [tuple(dequantize_fp8(x, sc, self.value_dtype) for x, sc in zip(p, scales))
                      for p, scales in zip(pieces, self.span_scales(spans))]
        return tuple(torch.cat([p[i] for p in pieces], 2) for i in (0, 1))

    def spans(self, window: int | None = None, anchors: int = 0) -> tuple[tuple[int, int], ...]:
        """The slot ranges ``(start, end)`` a read of the written slots takes (see :func:`window_spans`)."""
        return window_spans(self.count, window, anchors)

    def span_views(self, spans) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k, v) views ``[B, T, end - start, Hk, d]`` of each span (no copies)."""
        return [tuple(buf.data.narrow(self.slot_dim, a, b - a) for buf in self.buffers) for a, b in spans]

    def keep_reader(self, r: int, q, do, lse) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores read r's q, dO and lse; returns its dO (stacked copy) and its rowsum buffer."""
        rows = super().keep_reader(r, {"delta": "lse"}, q=q, do=do, lse=lse)
        return rows["do"], rows["delta"]

    def slot_grads(self, slot: int, dtypes):
        grads = super().slot_grads(slot, dtypes)  # reads on the reference path
        deferred = self._deferred_grads(slot)
        if deferred is None:
            return grads
        deferred = tuple(g.to(dtype) for g, dtype in zip(deferred, dtypes))
        return deferred if grads is None else tuple(a + b for a, b in zip(grads, deferred))

    def _deferred_grads(self, slot: int):
        """dk, dv ``[B, T, Hk, d]`` of ``slot`` summed over its fused readers (None: it has none)."""
        if slot in self.formed:
            return self.formed.pop(slot)
        runs = self.readers(slot)
        if not runs:
            return None
        # the slot written just before has the same readers (no read between the two writes, no
        # window edge between them): both are formed by one launch, reading q and dO once
        pair = slot > 0 and slot - 1 not in self.formed and self.readers(slot - 1) == runs
        slot0 = slot - 1 if pair else slot
        bufs = self.reader_bufs
        from flash_depth.ops.depth_triton import depth_slot_backward  # triton: imported only where it runs

        k_depth, v_depth = self.views()
        scales = self.span_scales(((0, self.count),))[0]
        dk = dv = None
        for run in runs:
            part = depth_slot_backward(bufs["q"], bufs["do"], bufs["lse"], bufs["delta"], k_depth, v_depth,
                                       slot0, 2 if pair else 1, (run.start, run.stop), bufs["q"].shape[-1] ** -0.5,
                                       slot_scales=scales)
            dk, dv = part if dk is None else (dk + part[0], dv + part[1])
        if pair:
            self.formed[slot0] = (dk[0], dv[0])
        return dk[-1], dv[-1]

    def slots(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n (default: all written) slots ``[B, T, n, Hk, d]`` (views, no gradient; an fp8
        stream's are dequantised copies in the written dtype)."""
        n = self.count if n is None else n
        if self.quantized:
            return self.stacked(((0, n),))
        k, v = self.views(n)
        return k, v


def window_spans(n: int, window: int | None = None, anchors: int = 0) -> tuple[tuple[int, int], ...]:
    """The slot ranges ``(start, end)`` a read of ``n`` written slots takes: all of them, or with
    ``window`` S the last S plus the first ``anchors`` (a bounded depth window)."""
    if window is None or window >= n:
        return ((0, n),)
    lo = n - window
    first = min(anchors, lo)
    return ((0, n),) if first == lo else (((0, first),) if first else ()) + ((lo, n),)


class DepthSlots:
    """The depth K/V of one decoding step, for ``torch.compile`` and CUDA graphs when nothing is
    differentiated (generation): one ``[B, T, L_max, Hk, d]`` buffer each for K and V, slots
    written in place and read as slices, with no hand-routed gradients, so a traced decoding
    step has no graph breaks and O(L) small copies (stacking the slots at each read would be
    O(L^2) kernels, which a CUDA-graphed step pays in full). Reads go through
    :func:`~flash_depth.ops.decode_attention`. ``fp8``: slots hold the fp8 round trip of what is
    written (the values an fp8 :class:`DepthStream` reads), kept in the written dtype.

    ``buffers``: a k and a v tensor ``[B, T, slots, Hk, d]`` kept from step to step (the model keeps
    them with a fixed-length cache), used when the first write has their shape, dtype and device
    (else new ones are made). Made inside a compiled step, the buffers are not real tensors there:
    each write becomes a new tensor and every read gathers its slots anew (two copies per read).
    Kept ones are graph inputs that the writes mutate in place and the reads take as views.

    ``ffn_inputs``: layer index -> the FFN's gate/up and depth K/V projections stacked into one
    weight (the model keeps them with the cache), for :meth:`ffn_input`."""

    def __init__(self, slots: int, fp8: bool = False, buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ffn_inputs: dict[int, torch.Tensor] | None = None):
        check_slots(slots)
        if not isinstance(fp8, bool):
            raise TypeError(f"fp8 must be a bool, got {type(fp8).__name__}")
        if buffers is not None and (not isinstance(buffers, (tuple, list)) or len(buffers) != 2
                                    or not all(isinstance(b, torch.Tensor) and b.dim() == 5 for b in buffers)):
            raise TypeError("buffers must be None or a (k, v) pair of tensors [B, T, slots, Hk, d], got "
                            f"{type(buffers).__name__}")
        if ffn_inputs is not None and (not isinstance(ffn_inputs, dict) or not all(
                isinstance(i, int) and isinstance(w, torch.Tensor) and w.dim() == 2 for i, w in ffn_inputs.items())):
            raise TypeError("ffn_inputs must be None or a dict of layer index -> weight tensor [out, in], got "
                            f"{type(ffn_inputs).__name__}")
        self.slots_max, self.count, self.fp8 = slots, 0, fp8
        self.kept, self.ffn_inputs = buffers, ffn_inputs
        self.k: torch.Tensor | None = None  # taken or allocated at the first write
        self.v: torch.Tensor | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one slot: k, v ``[B, T, Hk, d]`` (the first write fixes shape and dtype)."""
        check_write_args(("k", "v"), (k, v), None if self.k is None else self.k.dtype)
        if self.k is None:
            shape = (*k.shape[:2], self.slots_max, *k.shape[2:])
            fits = self.kept is not None and all(buf.shape == shape and buf.dtype == x.dtype and buf.device == x.device
                                                 for buf, x in zip(self.kept, (k, v)))
            self.k, self.v = self.kept if fits else (k.new_empty(shape), v.new_empty(shape))
        if self.count >= self.slots_max:
            raise RuntimeError(f"depth slots are full ({self.slots_max})")
        want = self.k[:, :, 0].shape
        if k.shape != want or v.shape != want:
            raise ValueError(f"k and v slots must be {tuple(want)}, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.device != self.k.device or v.device != self.k.device:
            raise ValueError(f"k and v must be on the slots' device {self.k.device}, got {k.device} and {v.device}")
        if self.fp8:
            k, v = (dequantize_fp8(*quantize_fp8(x), x.dtype) for x in (k, v))
        # index_copy_ as a fixed-length KV cache writes: on kept buffers (graph inputs) the compiler
        # keeps it in place and later reads stay views (slice assignment made them copies)
        slot = torch.full((1,), self.count, dtype=torch.long, device=k.device)
        self.k.index_copy_(2, slot, k.unsqueeze(2))
        self.v.index_copy_(2, slot, v.unsqueeze(2))
        self.count += 1

    def ffn_input(self, layer: int) -> torch.Tensor | None:
        """The stacked FFN input weight of ``layer`` in a compiled step without autograd (one GEMM
        instead of two, a graph node less per layer); None in eager steps and where gradients are
        recorded, which read the parameters themselves."""
        if not self.ffn_inputs or not torch.compiler.is_compiling() or torch.is_grad_enabled():
            return None
        return self.ffn_inputs.get(layer)

    def read(self, window: int | None = None, anchors: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots a read takes (``window``, ``anchors``: as :func:`read_moda`): k, v
        ``[B, T, n, Hk, d]``, views of the buffers (one span) or their spans joined."""
        if self.count == 0:
            raise ValueError("a depth read needs at least one written slot")
        check_window(window, anchors)
        spans = window_spans(self.count, window, anchors)
        if len(spans) == 1:
            (a, b), = spans
            return self.k[:, :, a:b], self.v[:, :, a:b]
        return tuple(torch.cat([buf[:, :, a:b] for a, b in spans], 2) for buf in (self.k, self.v))


class _Read(torch.autograd.Function):
    """MoDA (or depth-only attention when k is None) over the stream's slots in ``spans``. Backward:
    the fused path returns dq and keeps what the slots' writes need to form their gradients;
    the reference path adds its depth gradients into the stream's gradient buffers. ``masks``
    (packed documents or padding, as ``check_masks`` returns them) reach the sequence backward
    as the Triton kernels' state."""

    @staticmethod
    def forward(ctx, stream, handle, q, k, v, causal, backend, masks, spans):
        ctx.stream, ctx.spans, ctx.has_seq = stream, spans, k is not None
        chosen = select_backend(backend, q, k, causal, masked=bool(masks))
        if chosen == "reference":  # plain PyTorch: let autograd differentiate it
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in (q, k, v) if x is not None]
                kd, vd = (x.detach().requires_grad_() for x in stream.stacked(spans))
                o, _ = attention_reference(leaves[0], *(leaves[1:] or (None, None)), kd, vd,
                                           causal=causal, scale=q.shape[-1] ** -0.5, **masks)
            ctx.graph = (o, leaves + [kd, vd])
            return o.detach()
        ctx.graph = None
        o, lse, state, (q, k, v) = _fused_forward(stream, q, k, v, causal, chosen, masks, spans)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.fused = (state, causal, chosen)
        ctx.reader = stream.register_reader(spans)
        return o

    @staticmethod
    def backward(ctx, do):
        stream, spans = ctx.stream, ctx.spans
        if ctx.graph is not None:
            grad_k, grad_v = stream.grad_views(spans[-1][1])
            o, inputs = ctx.graph
            *grads, dkd, dvd = torch.autograd.grad(o, inputs, do)
            ctx.graph = None
            offset = 0
            for a, b in spans:
                grad_k[:, :, a:b] += dkd[:, :, offset:offset + b - a]
                grad_v[:, :, a:b] += dvd[:, :, offset:offset + b - a]
                offset += b - a
            dq, dk, dv = grads if ctx.has_seq else (grads[0], None, None)
        else:
            from flash_depth.ops.depth_triton import depth_backward

            q, k, v, o, lse = ctx.saved_tensors
            state, causal, seq_backend = ctx.fused
            scale = q.shape[-1] ** -0.5
            (kd, vd), *more = stream.span_views(spans)
            scales, *more_scales = stream.span_scales(spans)
            do, delta = stream.keep_reader(ctx.reader, q, do, lse)
            dq, dk, dv, _, _ = fused_backward(do, q, k, v, kd, vd, o, lse, state, causal, scale, seq_backend,
                                              slot_grads=False, delta_out=delta, slot_scales=scales)
            for (kd, vd), scales in zip(more, more_scales):
                dq, _, _ = depth_backward(q, kd, vd, o, lse, do, scale, dq_in=dq, slot_grads=False,
                                          slot_scales=scales)
        return None, torch.zeros((), device=do.device), dq, dk, dv, None, None, None, None


def check_window(window, anchors) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None (every written slot) or an int >= 1, got {window!r}")
    if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 0:
        raise ValueError(f"anchors must be an int >= 0, got {anchors!r}")


# The reads run eagerly under torch.compile (graph breaks): they route gradients into the in-place
# buffer by hand, and branching on the slot count inside a graph would specialise it per layer.
@torch.compiler.disable
def read_moda(stream: DepthStream, q, k, v, *, causal: bool = True, backend: str = "auto", cu_seqlens=None,
              max_seqlen: int | None = None, kv_start=None, window: int | None = None,
              anchors: int = 0) -> torch.Tensor:
    """MoDA of q ``[B, Tq, Hq, d]`` over sequence k/v and the stream's written depth slots: all of
    them, or with ``window`` S only the last S plus the first ``anchors`` (a bounded depth window:
    O(S) per token instead of O(L); S >= the slots written is full MoDA). cu_seqlens/max_seqlen
    (packed documents) and kv_start (left padding): as ``moda_attention``."""
    _check_depth_stream(stream)
    masks = check_masks(q, k, cu_seqlens, max_seqlen, kv_start)
    check_window(window, anchors)
    if stream.count == 0:
        return moda_attention(q, k, v, causal=causal, backend=backend, **masks)
    spans = stream.spans(window, anchors)
    check_moda_inputs(q, k, v, *_slots_like(stream, q, spans), causal)
    return _read(stream, q, k, v, causal, backend, masks, spans)


@torch.compiler.disable
def read_depth(stream: DepthStream, q, *, backend: str = "auto", cu_seqlens=None,
               max_seqlen: int | None = None, window: int | None = None, anchors: int = 0) -> torch.Tensor:
    """Flash Depth Attention of q ``[B, T, Hq, d]`` over the stream's written slots (window and
    anchors: as ``read_moda``; cu_seqlens, max_seqlen: as ``depth_attention``; depth is per token,
    so documents need no mask)."""
    _check_depth_stream(stream)
    if stream.count == 0:
        raise ValueError("read_depth needs at least one written depth slot")
    check_window(window, anchors)
    masks = check_masks(q, None, cu_seqlens, max_seqlen, None)
    spans = stream.spans(window, anchors)
    check_depth_inputs(q, *_slots_like(stream, q, spans))
    return _read(stream, q, None, None, False, backend, masks, spans)


def _check_depth_stream(stream) -> None:
    if not isinstance(stream, DepthStream):
        raise TypeError(f"stream must be a DepthStream, got {type(stream).__name__}")


def _slots_like(stream: DepthStream, q, spans) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins ``[B, T, n, Hk, d]`` (n: the slots in ``spans``) of the stream's slots for the ops'
    input checks, which take one tensor per operand: a broadcast of one element on the stream's
    device, in its dtype (an fp8 stream's: q's, which the slots dequantise to)."""
    buf = stream.buffers[0]
    B, T, _, Hk, d = buf.shape
    dtype = q.dtype if stream.quantized else buf.dtype
    like = buf.new_empty((), dtype=dtype).expand(B, T, sum(b - a for a, b in spans), Hk, d)
    return like, like


def _fused_forward(stream: DepthStream, q, k, v, causal: bool, chosen: str, masks: dict, spans):
    """The fused kernels over the slots in ``spans``, read in place: as ``fused_forward`` returns."""
    from flash_depth.ops.depth_triton import depth_forward  # triton: imported only where it runs

    scale = q.shape[-1] ** -0.5
    (kd, vd), *more = stream.span_views(spans)
    scales, *more_scales = stream.span_scales(spans)
    o, lse, state, (q, k, v) = fused_forward(q, k, v, kd, vd, causal, scale, chosen, masks, slot_scales=scales)
    for (kd, vd), scales in zip(more, more_scales):  # further spans resume the same online softmax
        o, lse = depth_forward(q, kd, vd, scale, o_seq=o, lse_seq=lse, slot_scales=scales)
    return o, lse, state, (q, k, v)


def _read(stream: DepthStream, q, k, v, causal: bool, backend: str, masks: dict, spans) -> torch.Tensor:
    handle = stream.read_handle()
    if handle is not None:
        return _Read.apply(stream, handle, q, k, v, causal, backend, masks, spans)
    # nothing to differentiate through the stream: the plain ops (several spans: their slots stacked)
    if stream.quantized:
        chosen = select_backend(backend, q, k, causal, masked=bool(masks))
        if chosen != "reference":  # the kernels read the fp8 slots in place
            return _fused_forward(stream, q, k, v, causal, chosen, masks, spans)[0]
        kd, vd = stream.stacked(spans)
    else:
        pieces = stream.span_views(spans)
        kd, vd = pieces[0] if len(pieces) == 1 else (torch.cat([p[i] for p in pieces], 2) for i in (0, 1))
    if k is None:
        return depth_attention(q, kd, vd, backend=backend, **masks)
    return moda_attention(q, k, v, kd, vd, causal=causal, backend=backend, **masks)
