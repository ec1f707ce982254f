"""Timing and naming helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import triton


def bench(fn, rep_ms: int = 60) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench``."""
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


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
