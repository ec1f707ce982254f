"""Where a training step's time and memory go, for one preset and depth mechanism.

    python benchmarks/profile_model.py --preset small-48 --mechanism moda --layers 12

Prints the CUDA kernels that take the most time (torch.profiler) and the memory held after the
forward (saved for backward) and at the peak. ``--host`` adds the host's side: how long the
Python side takes to enqueue a step, and the operators with the most CPU time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-48")
    parser.add_argument("--mechanism", default="moda")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value (ints/bools)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="compile every block (train.compile=true)")
    parser.add_argument("--host", action="store_true", help="also profile the host (CPU) side")
    args = parser.parse_args(argv)
    overrides = {"depth_mechanism": args.mechanism, "max_position_embeddings": args.seq_len}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    cfg = FlashDepthConfig.from_preset(args.preset, **overrides)
    model = FlashDepthForCausalLM(cfg).cuda()
    if args.compile:
        model.model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device="cuda")

    def step(report_memory=False):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        if report_memory:
            torch.cuda.synchronize()
            print(f"after forward: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    print(f"{args.preset} {cfg.depth_mechanism} layers={cfg.num_hidden_layers} B={args.batch} T={args.seq_len}")
    print(f"weights + optimizer: {base / 2**30:.2f} GiB")
    step(report_memory=True)
    print(f"peak: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    # wall time of unprofiled steps (a single step right after the profiler is not representative)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    enqueue_start = time.perf_counter()
    for _ in range(5):
        step()
    # the host returns once all launches are queued: close to the wall time means it sets the pace
    enqueue_ms = (time.perf_counter() - enqueue_start) * 1e3 / 5
    end.record()
    torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    # the GPU's busy time against the step's wall time: a gap means the host cannot keep up
    busy_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"step {wall_ms:.1f} ms wall (mean of 5), {busy_ms:.1f} ms of CUDA kernels, "
          f"{enqueue_ms:.1f} ms for the host to enqueue it")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.host:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
