"""A whole training step replayed from one CUDA graph.

A narrow, deep model (the small presets: width 384, 48 layers) launches thousands of small
kernels per step, and on an H100 the host cannot enqueue them as fast as the GPU runs them:
the step time is the host's (``benchmarks/profile_model.py --host``). Capturing forward,
backward, clipping and AdamW once and replaying the graph leaves one launch per step.

Contract of the step function (``step(batch) -> tensors``): static shapes, no host sync
(no ``.item()``, no ``float(tensor)``), the optimizer set up by :func:`prepare_for_capture` (its
learning rate a CUDA tensor updated in place by :func:`set_lr`), autocast with
``cache_enabled=False``. The eager steps before the capture run the same function, so they
also compile the blocks and autotune the kernels.
"""

from __future__ import annotations

import torch


class GraphedStep:
    """``GraphedStep(step, warmup)(batch)``: the first ``warmup`` calls run ``step`` eagerly (on
    a side stream, as capture wants), the next one captures it, and every call from then on
    copies ``batch`` into a static buffer and replays the graph. Returns ``step``'s outputs,
    which the replay overwrites in place: read them before the next call."""

    def __init__(self, step, warmup: int = 3):
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager steps before the capture), got {warmup!r}")
        self.step, self.warmup = step, warmup
        self.calls = 0
        self.graph = self.static_batch = self.outputs = None

    def __call__(self, batch: torch.Tensor):
        if not isinstance(batch, torch.Tensor) or not batch.is_cuda:
            raise TypeError(f"batch must be a CUDA tensor, got {type(batch).__name__}"
                            + (f" on {batch.device}" if isinstance(batch, torch.Tensor) else ""))
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step(batch)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.graph is None:
            self.static_batch = batch.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(self.static_batch)
        elif batch.shape != self.static_batch.shape or batch.dtype != self.static_batch.dtype:
            raise ValueError(f"batch has shape {tuple(batch.shape)} ({batch.dtype}); the captured step takes "
                             f"{tuple(self.static_batch.shape)} ({self.static_batch.dtype})")
        else:
            self.static_batch.copy_(batch)
        self.graph.replay()
        return self.outputs


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: in place where it is a tensor (a captured step reads it
    from that memory), by assignment otherwise."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def prepare_for_capture(optimizer: torch.optim.Optimizer, device: torch.device | None) -> None:
    """Given ``device``: every group's learning rate becomes its own tensor there and
    ``capturable=True``, what a captured step needs. ``None``: floats and ``capturable=False``.
    Run after ``load_state_dict``, which brings back the saving run's settings."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = lr if device is None else torch.tensor(lr, device=device)
        group["capturable"] = device is not None
