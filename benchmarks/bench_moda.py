"""MoDA speed against the best attention on this GPU, all measured in one run.

    python benchmarks/bench_moda.py                 # full sweep, writes benchmarks/results/moda_<gpu>.{json,md}
    python benchmarks/bench_moda.py --quick         # T=4096 and T=16384 only

Rows: B=1, Hk=8, bf16, causal. Columns (ms, median of triton.testing.do_bench):
- cudnn / fa2: sequence-only SDPA (cuDNN, FlashAttention-2 backends): what attention costs without depth;
- flex: FlexAttention computing MoDA over concat(seq KV, depth KV) with the mask
  ``kv < T ? kv <= q : (kv - T) // L == q``;
- ours: flash_depth.moda_attention (backend auto: cuDNN sequence + Triton depth, lse merge);
- ours_triton: the all-Triton path;
- reference: the plain PyTorch path (small T only).
Ratios are to cudnn in the same run. Every candidate is timed in 5 interleaved rounds and each column is the
median over rounds (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import bench, bench_interleaved, device_slug, fwd_bwd, save_results

from flash_depth import moda_attention
from flash_depth.ops import depth_triton

FULL = [  # (T, G, L, d)
    (4096, 8, 64, 64), (8192, 8, 64, 64), (16384, 8, 64, 64), (32768, 8, 64, 64),
    (16384, 2, 64, 64), (16384, 4, 64, 64),
    (16384, 8, 128, 64), (16384, 8, 256, 64),
    (16384, 8, 64, 128),
]
QUICK = [(4096, 8, 64, 64), (16384, 8, 64, 64)]
HK = 8


def make_flex(T, L):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per shape: past dynamo's recompile limit create_block_mask falls back to
    # eager and materialises the whole [T, T*(L+1)] mask.
    torch._dynamo.reset()
    def mask_mod(b, h, q_idx, kv_idx):
        seq = (kv_idx < T) & (kv_idx <= q_idx)
        depth = (kv_idx >= T) & ((kv_idx - T) // L == q_idx)
        return seq | depth

    block_mask = torch.compile(create_block_mask)(mask_mod, 1, None, T, T * (L + 1), device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, kd, vd):
        # [B, T, L, Hk, d] -> [B, Hk, T*L, d]: depth entries of token t at T + t*L + l
        kk = torch.cat([k.transpose(1, 2), kd.flatten(1, 2).transpose(1, 2)], dim=2)
        vv = torch.cat([v.transpose(1, 2), vd.flatten(1, 2).transpose(1, 2)], dim=2)
        return flex(q.transpose(1, 2), kk, vv, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

    return run


def run_config(T, G, L, d, with_reference: bool) -> dict:
    Hq = HK * G
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, T, Hq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, T, HK, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, T, HK, d, device=dev, dtype=dt, requires_grad=True)
    kd = torch.randn(1, T, L, HK, d, device=dev, dtype=dt, requires_grad=True)
    vd = torch.randn(1, T, L, HK, d, device=dev, dtype=dt, requires_grad=True)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    row = {"T": T, "G": G, "Hq": Hq, "Hk": HK, "L": L, "d": d}

    def sdpa(backend):
        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        return f

    candidates = {
        "cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), [qt, kt, vt]),
        "fa2": (sdpa(SDPBackend.FLASH_ATTENTION), [qt, kt, vt]),
        "ours": (lambda: moda_attention(q, k, v, kd, vd), [q, k, v, kd, vd]),
        "ours_triton": (lambda: moda_attention(q, k, v, kd, vd, backend="triton"), [q, k, v, kd, vd]),
    }
    try:
        flex = make_flex(T, L)
        candidates["flex"] = (lambda: flex(q, k, v, kd, vd), [q, k, v, kd, vd])
    except Exception as err:  # noqa: BLE001 - report, keep benchmarking the rest
        row["flex_error"] = repr(err)[:200]
    if with_reference:
        candidates["reference"] = (lambda: moda_attention(q, k, v, kd, vd, backend="reference"), [q, k, v, kd, vd])

    runnable = {}
    for name, (forward, inputs) in candidates.items():
        try:  # a candidate that fails (out of memory, no kernel) is reported, not fatal
            with torch.no_grad():
                forward()
            runnable[name] = (forward, inputs)
        except Exception as err:  # noqa: BLE001
            row[f"{name}_error"] = repr(err)[:300]
        torch.cuda.empty_cache()
    slow = {"reference"}  # seconds per call: timed once, not in rounds
    for name in slow & runnable.keys():
        forward, inputs = runnable.pop(name)
        with torch.no_grad():
            row[f"{name}_fwd"] = bench(forward, rep_ms=500)
        row[f"{name}_fwdbwd"] = bench(fwd_bwd(forward, inputs), rep_ms=500)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    fwd_times = bench_interleaved({name: no_grad(f) for name, (f, _) in runnable.items()})
    both_times = bench_interleaved({name: fwd_bwd(f, inputs) for name, (f, inputs) in runnable.items()})
    for name in runnable:
        row[f"{name}_fwd"], row[f"{name}_fwdbwd"] = fwd_times[name], both_times[name]

    # Parts of ours, to see where the time goes.
    with torch.no_grad():
        o, lse = moda_attention(q, k, v, kd, vd, return_lse=True)
        row["depth_fwd"] = bench(lambda: depth_triton.depth_forward(q, kd, vd, d**-0.5, o_seq=o, lse_seq=lse))
        do = torch.randn_like(o)
        row["depth_bwd"] = bench(lambda: depth_triton.depth_backward(q, kd, vd, o, lse, do, d**-0.5))
    for name in ("fa2", "flex", "ours", "ours_triton", "reference"):
        for phase in ("fwd", "fwdbwd"):
            key = f"{name}_{phase}"
            if key in row and f"cudnn_{phase}" in row:
                row[f"{key}_ratio"] = row[key] / row[f"cudnn_{phase}"]
    return row


def to_markdown(rows, device: str, meta: dict) -> str:
    def cell(row, key):
        if key not in row:
            return "-"
        ratio = row.get(f"{key}_ratio")
        return f"{row[key]:.2f}" + (f" ({ratio:.2f}x)" if ratio is not None else "")

    lines = [
        f"# MoDA benchmark on {device}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}.",
        "B=1, Hk=8, bf16, causal; ms (median, triton.testing.do_bench); (ratio to cuDNN sequence-only SDPA, same run).",
        "cudnn/fa2 compute sequence attention only; flex, ours, ours_triton and reference compute full MoDA.",
        "Each row's candidates were timed in the same run, in interleaved rounds (median over rounds).",
        "Reproduce: `python benchmarks/bench_moda.py` (a subset: `--rows 6 7 8`; the file keeps other rows).",
        "",
    ]
    for phase, title in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
        lines += [f"## {title}", "", "| T | G | L | d | cudnn | fa2 | flex | ours | ours_triton | reference |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = [cell(r, f"{n}_{phase}") for n in ("cudnn", "fa2", "flex", "ours", "ours_triton", "reference")]
            lines.append(f"| {r['T']} | {r['G']} | {r['L']} | {r['d']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Depth kernel alone (ours)", "", "| T | G | L | d | depth fwd (merge fused) | depth bwd | run |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['G']} | {r['L']} | {r['d']} | {r['depth_fwd']:.3f} | {r['depth_bwd']:.3f} "
                     f"| {r.get('date', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only T=4096 and T=16384 at G=8, L=64, d=64")
    parser.add_argument("--rows", type=int, nargs="*", help="indices into the full sweep to run (default: all); "
                        "rows already in the results file for other configurations are kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for json/md results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moda.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device, slug = device_slug()
    out = Path(args.out)
    name = f"moda_{slug}" + ("_quick" if args.quick else "")
    configs = QUICK if args.quick else [FULL[i] for i in (args.rows if args.rows else range(len(FULL)))]
    rows = []
    for T, G, L, d in configs:
        t0 = time.time()
        row = run_config(T, G, L, d, with_reference=T <= 4096)
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        rows.append(row)
        print(f"T={T} G={G} L={L} d={d} ({time.time() - t0:.0f}s): "
              + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        errors = {k: v for k, v in row.items() if k.endswith("error")}
        if errors:
            print("  errors:", errors, flush=True)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    order = {c: i for i, c in enumerate(FULL)}

    def config_of(r):
        return r["T"], r["G"], r["L"], r["d"]

    md = save_results(out, name, meta, rows, key=config_of, order=lambda r: order.get(config_of(r), len(order)),
                      markdown=lambda rows, meta: to_markdown(rows, device, meta))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
