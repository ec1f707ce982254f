"""A buffer of per-layer slots written in place and read without copies, with autograd.

Depth retrieval reads every earlier layer's output at every layer. Stacking those outputs
at each read costs O(L^2) copies and memory; instead a forward allocates one buffer with a
slot dimension, each layer writes its slot in place, and reads take the slice of the first
n slots (a view).

Gradients: in-place writes hide the buffer from autograd, so the stream routes them itself.
Each read adds the gradient of the slots it read into a float32 gradient buffer (the
kernels do it in place); each write hands its slot's accumulated gradient to the producer.
A subclass may instead defer the slot gradients to the write's backward
(:meth:`SlotStream.slot_grads`; the depth stream does, see nn/depth_stream.py).
Autograd runs a write's backward only after every read that depends on it: each write
returns a scalar "handle" that the next write and every later read take as input, so the
handles chain all reads after the writes they follow.
"""

from __future__ import annotations

import torch

from ._checks import check_float_dtype


def check_slots(slots) -> None:
    """ValueError unless ``slots`` (a stream's capacity) is a positive int."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive int, got {slots!r}")


def check_write_args(names: tuple[str, ...], values, stored: torch.dtype | None = None, cast: bool = False) -> None:
    """TypeError unless ``values`` are one floating-point tensor per name in ``names`` (a write's
    arguments), all of the stream's dtype: ``stored``, or the first value's when nothing is stored
    yet (a first write fixes it). ``cast``: the stream has an explicit dtype that any floating
    write is cast to."""
    if len(values) != len(names):
        raise TypeError(f"write takes {len(names)} tensor(s) ({', '.join(names)}), got {len(values)}")
    want = None if cast else stored
    for name, x in zip(names, values):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
        if cast:
            continue
        want = want or x.dtype
        if x.dtype != want:
            raise TypeError(f"{name} must have the stream's dtype {want} (set by its first write), got {x.dtype}")


class SlotStream:
    """One or more buffers that share a slot dimension ``slot_dim`` of size ``slots``."""

    def __init__(self, slots: int, slot_dim: int, names: tuple[str, ...], dtype: torch.dtype | None = None):
        # dtype None: the first write's, which every later write must have (a TypeError otherwise).
        # An explicit dtype: writes of any floating dtype are cast to it by the copy into the slot
        # (the models store float32 partial sums and outputs in an autocast-dtype stream so).
        check_slots(slots)
        check_float_dtype(dtype)
        self.slots_max, self.slot_dim, self.names, self.dtype = slots, slot_dim, names, dtype
        self.buffers: list[torch.Tensor] | None = None  # allocated at the first write
        self.grads: list[torch.Tensor] | None = None
        # deferred gradients: the slot ranges each fused read took, in order, and what its backward kept
        self.reader_spans: list[tuple[tuple[int, int], ...]] = []
        self.reader_bufs: dict[str, torch.Tensor] | None = None  # name -> [R, ...], one row per read
        self.kept: set[int] = set()  # reads whose backward ran (an unused read's never does)
        self.count = 0
        self.handle: torch.Tensor | None = None

    def write(self, *values: torch.Tensor) -> None:
        """Append one slot (the first write fixes shape, device and, without an explicit dtype, the dtype)."""
        self.check_write(values)
        self.append(values)

    @torch.compiler.disable  # in-place writes and hand-routed gradients: run eagerly under torch.compile
    def append(self, values) -> None:
        """Append one slot of ``values`` that passed :meth:`check_write` (a subclass's write calls it
        after its own bookkeeping)."""
        if self.buffers is None:
            shape = list(values[0].shape)
            shape.insert(self.slot_dim, self.slots_max)
            self.buffers = [values[0].new_empty(shape, dtype=self.dtype or values[0].dtype) for _ in self.names]
        if self.count >= self.slots_max:
            raise RuntimeError(f"stream is full ({self.slots_max} slots)")
        want = self.slot_shape()
        for name, x in zip(self.names, values):
            if x.shape != want:
                raise ValueError(f"{name} slot must be {tuple(want)}, got {tuple(x.shape)}")
            if x.device != self.buffers[0].device:
                raise ValueError(f"{name} must be on the stream's device {self.buffers[0].device}, got {x.device}")
        if self.tracks(values):
            self.handle = _Write.apply(self, self.count, self.handle, *values)
        else:
            self.store(self.count, values)
        self.count += 1

    def check_write(self, values) -> None:
        """TypeError unless ``values`` are one floating-point tensor per buffer, of the stream's
        dtype when it takes its dtype from the first write (``dtype=None``)."""
        check_write_args(self.names, values, self.buffers[0].dtype if self.buffers is not None else None,
                         cast=self.dtype is not None)

    def tracks(self, values) -> bool:
        """Whether a write of ``values`` gets an autograd node (whose backward hands over the slot's gradient)."""
        return torch.is_grad_enabled() and any(x.requires_grad for x in values)

    def store(self, slot: int, values) -> None:
        """Puts ``values`` into slot ``slot`` of the buffers (a subclass may encode or fuse the copies)."""
        for buf, x in zip(self.buffers, values):
            buf.select(self.slot_dim, slot).copy_(x)

    def slot_shape(self) -> torch.Size:
        shape = list(self.buffers[0].shape)
        del shape[self.slot_dim]
        return torch.Size(shape)

    def close(self) -> None:
        """Call once the last read is done: drops the handle, which would otherwise keep the
        stream alive in a reference cycle (stream -> handle -> its autograd node -> stream)
        until Python's garbage collector runs, holding the buffers' memory."""
        self.handle = None

    def views(self, n: int | None = None) -> list[torch.Tensor]:
        """The first n (default: all written) slots of every buffer (views, no gradient)."""
        n = self.count if n is None else n
        # .data: views with their own version counter, so later in-place writes to other slots do
        # not invalidate tensors that an earlier read saved for backward (those slots never change).
        return [buf.data.narrow(self.slot_dim, 0, n) for buf in self.buffers]

    def grad_views(self, n: int) -> list[torch.Tensor]:
        """The float32 gradient buffers' first n slots, allocated (zeroed) at the first call."""
        if self.grads is None:
            self.grads = [torch.zeros(buf.shape, dtype=self.grad_dtype(), device=buf.device) for buf in self.buffers]
        return [g.narrow(self.slot_dim, 0, n) for g in self.grads]

    def grad_dtype(self) -> torch.dtype:
        """The gradient buffers' dtype: at least float32, so the sum over every later reader stays accurate."""
        return torch.float64 if self.buffers[0].dtype == torch.float64 else torch.float32

    def slot_grads(self, slot: int, dtypes) -> tuple[torch.Tensor, ...] | None:
        """The gradients of slot ``slot`` of every buffer in ``dtypes`` (None: no read used it).
        Called by the slot's write in backward, after every read that depends on it."""
        if self.grads is None:
            return None
        return tuple(g.select(self.slot_dim, slot).to(dtype) for g, dtype in zip(self.grads, dtypes))

    def register_reader(self, spans) -> int:
        """Index of a new fused read of the slots in ``spans`` (``(start, end)`` ranges); what its
        backward keeps is stored with :meth:`keep_reader`."""
        self.reader_spans.append(tuple(spans))
        return len(self.reader_spans) - 1

    def keep_reader(self, r: int, outputs: dict[str, str], **values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stores read r's ``values`` in stacked ``[R, ...]`` buffers (allocated at the first read
        backward, when every read is known) and returns read r's rows of every buffer; ``outputs``
        names further buffers for the read to fill, each shaped like one of the values."""
        if self.reader_bufs is None:
            R = len(self.reader_spans)
            self.reader_bufs = {name: x.new_empty((R, *x.shape)) for name, x in values.items()}
            self.reader_bufs.update({name: values[like].new_empty((R, *values[like].shape))
                                     for name, like in outputs.items()})
        bufs = self.reader_bufs
        for name, x in values.items():
            if x.shape != bufs[name].shape[1:] or x.dtype != bufs[name].dtype:
                raise ValueError(f"every read of one stream needs {name} of one shape and dtype; got "
                                 f"{tuple(x.shape)} {x.dtype} after {tuple(bufs[name].shape[1:])} {bufs[name].dtype}")
            bufs[name][r].copy_(x)
        self.kept.add(r)
        return {name: buf[r] for name, buf in bufs.items()}

    def readers(self, slot: int) -> list[range]:
        """The fused reads of ``slot`` as runs of consecutive read indices (one run unless reads
        with different windows interleave); the rows of reads whose backward never ran (their
        output went unused) are zeroed, which adds nothing to any deferred gradient."""
        runs: list[range] = []
        for r, spans in enumerate(self.reader_spans):
            if any(a <= slot < b for a, b in spans):
                if runs and runs[-1].stop == r:
                    runs[-1] = range(runs[-1].start, r + 1)
                else:
                    runs.append(range(r, r + 1))
        if self.reader_bufs is None:  # no fused read's backward ran
            return []
        for r in (r for run in runs for r in run if r not in self.kept):
            for buf in self.reader_bufs.values():
                buf[r].zero_()
            self.kept.add(r)
        return runs

    def read_handle(self) -> torch.Tensor | None:
        """What a differentiable read must take as an input (None: nothing to differentiate)."""
        return self.handle if torch.is_grad_enabled() else None


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream, slot, prev_handle, *values):
        stream.store(slot, values)
        ctx.stream, ctx.slot, ctx.has_prev = stream, slot, prev_handle is not None
        ctx.dtypes = [x.dtype for x in values]  # a producer may be wider than the buffer
        return values[0].new_zeros(())

    @staticmethod
    def backward(ctx, _grad_handle):
        grads = ctx.stream.slot_grads(ctx.slot, ctx.dtypes)
        if grads is None:  # no read used this slot
            return (None, None, None) + (None,) * len(ctx.dtypes)
        prev = torch.zeros((), device=grads[0].device) if ctx.has_prev else None
        return (None, None, prev) + tuple(grads)
