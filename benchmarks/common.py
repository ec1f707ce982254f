"""Timing and naming helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
import triton


def bench(fn, rep_ms: int = 60) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench``."""
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (bytes read + written): what memory-bound kernels are
    measured against, in the same run."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / bench(lambda: dst.copy_(src), rep_ms=200) / 1e6


def bench_interleaved(fns: dict, rounds: int = 5) -> dict:
    """Median over ``rounds`` rounds, each round timing every candidate once, in turn: clocks
    drift by a few percent over a run, and interleaving spreads the drift over all columns."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # compile and warm up everything first
        fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench(fn))
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def fwd_bwd(forward, inputs):
    """A step that runs ``forward()`` and differentiates it w.r.t. ``inputs`` with a fixed
    random output gradient."""
    out = forward()
    do = torch.randn_like(out)

    def step():
        o = forward()
        torch.autograd.grad(o, inputs, do)

    return step


def time_training(loss_of, opt, inputs, steps: int, graphed: bool, warm_steps: int = 5) -> tuple[float, float]:
    """(milliseconds per training step, last loss). A step is ``loss_of(inputs)`` under bf16
    autocast, backward and ``opt.step()``; with ``graphed`` it is replayed from a CUDA graph
    (:class:`~flash_depth.train.cuda_graph.GraphedStep`: 3 eager steps, the capture, then replays,
    so ``warm_steps`` >= 5). ``warm_steps`` untimed steps, then ``steps`` timed ones: CUDA events on
    a GPU, the wall clock on a CPU."""
    from flash_depth.train.cuda_graph import GraphedStep

    device_type = inputs.device.type

    def step(x):
        with torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False):
            loss = loss_of(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if graphed:
        step = GraphedStep(step, warmup=3)
    for _ in range(warm_steps):
        step(inputs)
    if device_type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(inputs)
        return (time.perf_counter() - start) * 1e3 / steps, float(loss)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        loss = step(inputs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, float(loss)


def device_slug() -> tuple[str, str]:
    """The GPU's name and a file-name form of it (``nvidia_h100_80gb_hbm3``)."""
    device = torch.cuda.get_device_name()
    return device, re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")


def save_results(out: Path, name: str, meta: dict, rows: list[dict], key, order, markdown) -> str:
    """Write OUT/NAME.json and OUT/NAME.md: ``rows`` of this run plus the rows of earlier runs in
    the json whose ``key(row)`` this run did not measure, sorted by ``order(row)``. Rows carry
    their own dates. ``markdown(rows, meta)`` renders the table, which is returned."""
    out.mkdir(parents=True, exist_ok=True)
    result = out / f"{name}.json"
    done = {key(r) for r in rows}
    previous = json.loads(result.read_text())["rows"] if result.exists() else []
    merged = sorted(rows + [r for r in previous if key(r) not in done], key=order)
    result.write_text(json.dumps({"meta": meta, "rows": merged}, indent=1))
    md = markdown(merged, meta)
    (out / f"{name}.md").write_text(md)
    return md
