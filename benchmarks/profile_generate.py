"""Where a decoding step's time goes: the GPU's busy time and kernels per step against the step's
wall time, for bench_generate's variants (700m, bf16, static cache, compiled steps).

    python benchmarks/profile_generate.py --variants olmo2 residual "moda + FFN KV" --batch 1

Per variant: generate(512-token prompt, 128 new tokens) once to compile, twice more timed without
the profiler (the step's wall time: the faster of the two), then once under torch.profiler. A
decoding step's numbers are those of the 128-token generate less the prefill's (a 1-token
generate, timed and profiled the same way), over 127 steps. Busy time well below the wall time
means the host sets the pace (Python, guards, generate's own loop); the top kernels and host
operators show which.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_generate import SHAPE, VARIANTS, Clock, build


def _profile(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return wall, kernels, prof


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    static = [name for name in VARIANTS if name != "residual (dynamic)"]  # every generate here is static
    parser.add_argument("--variants", nargs="+", choices=static, default=["olmo2", "residual"],
                        metavar="NAME", help=f"from: {', '.join(static)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    preset, prompt, new = SHAPE["gpu"]
    for name in args.variants:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        model = build(name, preset, "cuda", torch.bfloat16)
        ids = torch.randint(1, model.config.vocab_size, (args.batch, prompt), device="cuda")
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                      cache_implementation="static")
        with torch.no_grad():
            def generate(n, model=model):
                return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

            for n in (1, new):
                generate(n)()  # compile, record graphs
            plain = [Clock(True)(generate(n)) for n in (1, new, 1, new)]
            wall1, kernels1, _ = _profile(generate(1))
            wall, kernels, prof = _profile(generate(new))
        steps = new - 1
        busy = (sum(k.device_time for k in kernels) - sum(k.device_time for k in kernels1)) / 1e3 / steps
        count = (len(kernels) - len(kernels1)) / steps
        step = (min(plain[1], plain[3]) - min(plain[0], plain[2])) * 1e3 / steps
        print(f"\n== {name}, batch {args.batch}: decode step wall {step:.3f} ms unprofiled; under the profiler "
              f"{(wall - wall1) * 1e3 / steps:.3f} ms, GPU busy {busy:.3f} ms, {count:.0f} kernels per step")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=90))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=90))
        del model, generate
        gc.collect()  # transformers keeps each model's compiled call on it: a reference cycle
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
