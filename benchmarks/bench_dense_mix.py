"""MUDD's dense mix (ops/dense_mix.py) at the small presets' training shape, on one GPU.

    python benchmarks/bench_dense_mix.py           # every depth of small-48, and the step total
    python benchmarks/bench_dense_mix.py --tune    # also sweeps the kernels' tiles at n = 24, 25

Shape: B*T = 16384 (B=4, T=4096), D=384, bf16 states, float32 weights (the model under autocast).
A 48-layer MUDD step runs, after block i = 1..48, one forward and one backward of the mix over
n = i+1 outputs with S = 4 ways (S = 1 after the last block). The backwards run as the stream
runs them (nn/mudd.py ``MuddStream.read_backward``), newest first: n = 49, 47, .. add only their
newest output's gradient and defer the rest; n = 48, 46, .. add their own and the deferred terms
in one pass. Per depth: milliseconds (median of ``triton.testing.do_bench``) of the Triton
kernels and of the reference compiled as the model did before them (``torch.compile(dynamic=True)``,
no deferral: every backward adds all n gradients), and the Triton kernels' GB/s over the bytes
they must move per token: forward n*D*2 (read each state once) + S*D*2 (write the outputs);
backward n*D*2 (read each state) + S*D*2 (read dout) + D*8 (the newest output's float32
gradient, read and written) when deferring, or n*D*8 (every gradient) + S2*D*2 (the deferred
dout) when pairing; plus the weights and their gradients. The copy bandwidth of the same GPU is
printed beside them.
"""

from __future__ import annotations

import argparse

import torch
from common import bench, copy_bandwidth

from flash_depth.ops import dense_mix_triton
from flash_depth.ops.dense_mix import mix_reference, mix_reference_backward

B, T, D, LAYERS = 4, 4096, 384, 48


def inputs(S: int, n: int):
    states = torch.randn(LAYERS + 1, B, T, D, device="cuda", dtype=torch.bfloat16)[:n]
    a = torch.randn(B, T, S, n, device="cuda")
    dout = torch.randn(S, B, T, D, device="cuda", dtype=torch.bfloat16)
    return a, states, dout, torch.zeros(states.shape, device="cuda")


def ways(n: int) -> int:
    return 1 if n == LAYERS + 1 else 4


def gigabytes(S: int, n: int, backward: bool) -> float:
    """The bytes the mix over n outputs must move (see the module docstring)."""
    if not backward:
        return B * T * (n * D * 2 + S * D * 2 + S * n * 4) / 1e9
    paired = (LAYERS + 1 - n) % 2 == 1
    grads = n * D * 8 + ways(n + 1) * D * 2 + ways(n + 1) * n * 4 if paired else D * 8
    return B * T * (n * D * 2 + S * D * 2 + S * n * 8 + grads) / 1e9


def time_depth(S: int, n: int, compiled, tiles=(None, None)) -> dict:
    a, states, dout, grad = inputs(S, n)
    paired = (LAYERS + 1 - n) % 2 == 1
    pending = (torch.randn(B, T, ways(n + 1), n + 1, device="cuda"),
               torch.randn(ways(n + 1), B, T, D, device="cuda", dtype=torch.bfloat16)) if paired else None
    grad_from = 0 if paired else n - 1
    row = {"S": S, "n": n,
           "fwd_ms": bench(lambda: dense_mix_triton.mix_forward(a, states, torch.bfloat16, tiles[0])),
           "bwd_ms": bench(lambda: dense_mix_triton.mix_backward(a, states, dout, grad, pending, grad_from, tiles[1]))}
    if compiled is not None:
        row["ref_fwd_ms"] = bench(lambda: compiled[0](a, states, torch.bfloat16))
        row["ref_bwd_ms"] = bench(lambda: compiled[1](a, states, dout, grad))
    row["fwd_GBps"] = gigabytes(S, n, False) / row["fwd_ms"] * 1e3
    row["bwd_GBps"] = gigabytes(S, n, True) / row["bwd_ms"] * 1e3
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="sweep the tiles at n = 24 and 25, S = 4")
    parser.add_argument("--no-reference", action="store_true", help="skip the compiled reference")
    args = parser.parse_args(argv)
    print(f"copy bandwidth {copy_bandwidth():.0f} GB/s")
    compiled = None if args.no_reference else tuple(
        torch.compile(fn, dynamic=True) for fn in (mix_reference, mix_reference_backward))
    depths = [(ways(n), n) for n in range(2, LAYERS + 2)]
    rows = [time_depth(S, n, compiled) for S, n in depths]
    keys = [k for k in rows[0] if k not in ("S", "n")]
    print("| S | n | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 2))
    for r in rows:
        if r["n"] in (2, 3, 9, 17, 25, 33, 41, 48, 49):
            cells = [f"{r[k]:.3f}" if "ms" in k else f"{r[k]:.0f}" for k in keys]
            print(f"| {r['S']} | {r['n']} | " + " | ".join(cells) + " |")
    total = {k: sum(r[k] for r in rows) for k in keys if "ms" in k}
    ideal = sum(gigabytes(S, n, False) + gigabytes(S, n, True) for S, n in depths)
    print(f"step total (ms): {', '.join(f'{k} {v:.1f}' for k, v in total.items())}; "
          f"{ideal:.1f} GB moved at least per step")
    if args.tune:
        for block_m in (1, 2, 4, 8, 16):
            for block_d in (128, 256, 512):
                for warps in (1, 2, 4, 8):
                    if block_m * block_d < 32 * warps or block_m * block_d > 8192:
                        continue
                    r = time_depth(4, 25, None, ((block_m, block_d, warps), None))
                    print(f"fwd n=25 BLOCK_M={block_m} BLOCK_D={block_d} warps={warps}: {r['fwd_ms']:.3f} ms "
                          f"{r['fwd_GBps']:.0f} GB/s")
        for n in (24, 25):  # pairing with the deferred n = 25, deferring
            for block_m in (1, 2, 4, 8):
                for warps in (1, 2, 4, 8):
                    if block_m * 512 >= 32 * warps:
                        r = time_depth(4, n, None, (None, (block_m, 512, warps)))
                        print(f"bwd n={n} BLOCK_M={block_m} warps={warps}: {r['bwd_ms']:.3f} ms "
                              f"{r['bwd_GBps']:.0f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
