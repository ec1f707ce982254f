"""Sweep the depth kernels' tiles on this GPU; prints the fastest per shape, forward and backward.

    python benchmarks/tune_depth.py

Every configuration is checked against the default one before it is timed (a tile that
computes something else must never win), and one that fails to compile is reported.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import triton
from common import bench

from flash_depth.ops import depth_triton

SHAPES = [(16384, 8, 64, 64), (16384, 2, 64, 64), (16384, 8, 64, 128)]


def main() -> int:
    if not torch.cuda.is_available():
        print("tune_depth.py needs a CUDA GPU", file=sys.stderr)
        return 2
    results = []
    for T, G, L, d in SHAPES:
        Hk, Hq = 8, 8 * G
        q = torch.randn(1, T, Hq, d, device="cuda", dtype=torch.bfloat16)
        kd, vd = (torch.randn(1, T, L, Hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        o_seq = torch.randn_like(q)
        lse_seq = torch.randn(1, Hq, T, device="cuda")
        scale = d**-0.5
        o_ref, lse = depth_triton.depth_forward(q, kd, vd, scale, o_seq, lse_seq)
        do = torch.randn_like(q)
        bwd_ref = depth_triton.depth_backward(q, kd, vd, o_ref, lse, do, scale)
        min_m = max(16, triton.next_power_of_2(G))
        for phase in ("fwd", "bwd"):
            timings = []
            for bm, bn, nw, ns in itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (2, 3)):
                if bm < min_m or (d >= 128 and bn > 64):
                    continue
                tiles = (bm, bn, nw, ns)
                try:
                    if phase == "fwd":
                        def fn():
                            return depth_triton.depth_forward(q, kd, vd, scale, o_seq, lse_seq, tiles=tiles)
                        ok = torch.allclose(fn()[0].float(), o_ref.float(), atol=2e-2, rtol=2e-2)
                    else:
                        def fn():
                            return depth_triton.depth_backward(q, kd, vd, o_ref, lse, do, scale, tiles=tiles)
                        ok = all(torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2) for a, b in zip(fn(), bwd_ref))
                    if not ok:
                        print(f"  {phase} {tiles}: WRONG RESULT", flush=True)
                        continue
                    timings.append((bench(fn, rep_ms=40), tiles))
                except Exception as err:  # noqa: BLE001 - a tile that does not compile is data
                    print(f"  {phase} {tiles}: failed {type(err).__name__}: {str(err)[:120]}", flush=True)
            timings.sort()
            default = depth_triton._tiles(G, d, backward=phase == "bwd")
            t_default = next((t for t, c in timings if c == default), float("nan"))
            print(f"T={T} G={G} L={L} d={d} {phase}: default {default} {t_default:.3f} ms; best "
                  + ", ".join(f"{c} {t:.3f}" for t, c in timings[:4]), flush=True)
            results.append({"shape": [T, G, L, d], "phase": phase, "default": [list(default), t_default],
                            "ranked": [[list(c), t] for t, c in timings]})
    json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "tune_depth.json", "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
