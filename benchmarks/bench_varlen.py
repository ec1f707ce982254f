"""Packed documents (varlen) against dense MoDA at the same total tokens, op level, one run.

    python benchmarks/bench_varlen.py            # writes benchmarks/results/varlen_<gpu>.{json,md}
    python benchmarks/bench_varlen.py --smoke    # CPU, tiny shapes, reference path: the script runs end to end

Each row holds N documents of length T/N packed on ``[1, T]`` (``cu_seqlens``, the Triton
sequence kernels), bf16, Hk=8, d=64, with L depth slots per token, forward and forward +
backward (ms, median of triton.testing.do_bench, candidates interleaved in rounds). Columns:
- varlen: ``moda_attention(..., cu_seqlens=...)`` over ``[1, T]``;
- batched_triton / batched_auto: the same documents as a dense batch ``[N, T/N]`` (the same
  attention work), on the Triton kernels and on what ``backend="auto"`` picks (cuDNN sequence);
- one_doc: one dense document ``[1, T]``: the same tokens, N times the causal work.
The target: varlen within 5% of batched_triton (packing costs no more than padding-free batching).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from flash_depth import moda_attention

FULL = [  # (total tokens T, documents N, G, L, d)
    (16384, 8, 8, 64, 64), (16384, 1, 8, 64, 64), (16384, 32, 8, 64, 64), (32768, 16, 8, 64, 64),
    (16384, 8, 8, 128, 64), (16384, 8, 4, 64, 128),
]
SMOKE = [(64, 4, 2, 3, 16), (64, 1, 2, 3, 16)]
HK = 8


def _inputs(B, T, G, L, d, device, dtype, hk):
    shapes = [(B, T, hk * G, d), (B, T, hk, d), (B, T, hk, d), (B, T, L, hk, d), (B, T, L, hk, d)]
    return [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]


def run_config(T, N, G, L, d, smoke: bool) -> dict:
    """Times of the candidates at one shape (ms); ratios to batched_triton."""
    from common import bench_interleaved, fwd_bwd

    device, dtype, hk = ("cpu", torch.float32, 2) if smoke else ("cuda", torch.bfloat16, HK)
    triton_backend = "reference" if smoke else "triton"
    packed = _inputs(1, T, G, L, d, device, dtype, hk)
    batched = [x.detach().reshape(N, T // N, *x.shape[2:]).requires_grad_() for x in packed]
    cu_seqlens = torch.arange(0, T + 1, T // N, device=device, dtype=torch.int32)
    candidates = {
        "varlen": (lambda: moda_attention(*packed, backend=triton_backend, cu_seqlens=cu_seqlens,
                                          max_seqlen=T // N), packed),
        "batched_triton": (lambda: moda_attention(*batched, backend=triton_backend), batched),
        "batched_auto": (lambda: moda_attention(*batched), batched),
        "one_doc": (lambda: moda_attention(*packed, backend="auto"), packed),
    }

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    timer = _cpu_interleaved if smoke else bench_interleaved
    fwd = timer({name: no_grad(f) for name, (f, _) in candidates.items()})
    both = timer({name: fwd_bwd(f, inputs) for name, (f, inputs) in candidates.items()})
    row = {"T": T, "N": N, "G": G, "L": L, "d": d, "Hk": hk}
    for name in candidates:
        row[f"{name}_fwd"], row[f"{name}_fwdbwd"] = fwd[name], both[name]
    for phase in ("fwd", "fwdbwd"):
        row[f"varlen_{phase}_ratio"] = row[f"varlen_{phase}"] / row[f"batched_triton_{phase}"]
    return row


def _cpu_interleaved(fns: dict) -> dict:
    """Milliseconds of one call of each candidate after a warm-up call (the smoke run's timer)."""
    times = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        times[name] = 1e3 * (time.perf_counter() - start)
    return times


def to_markdown(rows, device: str, meta: dict) -> str:
    lines = [
        f"# Packed documents (varlen) vs dense MoDA on {device}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}. bf16, causal, Hk={HK}; ms (median, triton.testing.do_bench, "
        "interleaved rounds, one run). varlen: N documents of T/N packed on [1, T] (cu_seqlens); batched: the "
        "same documents as a dense batch [N, T/N] (Triton kernels, or backend auto = cuDNN sequence); one_doc: "
        "one dense [1, T] document (N times the causal work). Ratio: varlen / batched_triton (target <= 1.05).",
        "Reproduce: `python benchmarks/bench_varlen.py`.",
        "",
    ]
    for phase, title in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
        lines += [f"## {title}", "", "| T | N | G | L | d | varlen | batched_triton | batched_auto | one_doc | "
                  "varlen / batched_triton | run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = [f"{r[f'{n}_{phase}']:.3f}" for n in ("varlen", "batched_triton", "batched_auto", "one_doc")]
            lines.append(f"| {r['T']} | {r['N']} | {r['G']} | {r['L']} | {r['d']} | " + " | ".join(cells)
                         + f" | {r[f'varlen_{phase}_ratio']:.3f}x | {r.get('date', '-')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", help="indices into the sweep to run (default: all); rows of "
                        "other configurations already in the results file are kept")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, the reference path; results go to a "
                        "temporary folder unless --out is given")
    parser.add_argument("--out", help="folder for json/md results (default: benchmarks/results)")
    args = parser.parse_args(argv)
    from common import device_slug, save_results

    if args.smoke:
        device, slug, configs = "cpu (smoke)", "cpu_smoke", SMOKE
        out = Path(args.out or tempfile.mkdtemp(prefix="bench_varlen_"))
    else:
        if not torch.cuda.is_available():
            print("bench_varlen.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        device, slug = device_slug()
        configs = [FULL[i] for i in (args.rows if args.rows else range(len(FULL)))]
        out = Path(args.out) if args.out else Path(__file__).parent / "results"
    rows = []
    for T, N, G, L, d in configs:
        t0 = time.time()
        row = run_config(T, N, G, L, d, args.smoke)
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        rows.append(row)
        if not args.smoke:
            torch.cuda.empty_cache()
        print(f"T={T} N={N} G={G} L={L} d={d} ({time.time() - t0:.0f}s): "
              f"varlen/batched_triton fwd {row['varlen_fwd_ratio']:.3f}x, fwd+bwd {row['varlen_fwdbwd_ratio']:.3f}x",
              flush=True)
    import triton

    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    order = {c: i for i, c in enumerate(FULL + SMOKE)}

    def config_of(r):
        return r["T"], r["N"], r["G"], r["L"], r["d"]

    md = save_results(out, f"varlen_{slug}", meta, rows, key=config_of,
                      order=lambda r: order.get(config_of(r), len(order)),
                      markdown=lambda rows, meta: to_markdown(rows, device, meta))
    print(md)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
