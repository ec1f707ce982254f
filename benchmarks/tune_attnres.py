"""Sweep the AttnRes kernels' tiles (and pipeline stages) at small-48's shape on this GPU.

    python benchmarks/tune_attnres.py

D=384, M = B*T = 16384 rows, 48 sources (a read halfway through a 48-layer attnres_full model),
48 readers of one source for the deferred source gradient. Prints each kernel's fastest settings
with their bandwidth as a fraction of a 2 GiB device-to-device copy measured in the same run.
Log of an H200 run: benchmarks/results/logs/tune_attnres_d384_h200.log.
"""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench

from common import copy_bandwidth
from flash_depth.ops import attnres_triton as at
from flash_depth.ops._triton_common import cdiv

D, M, N, READERS, EPS = 384, 16384, 48, 48, 1e-6
BLOCK_D = 512


def sweep(name: str, launch, configs, nbytes: int, copy: float, default=None) -> None:
    """Time ``launch(block_m, warps, stages)`` for each config; print the six fastest (and the default)."""
    results = []
    for config in configs:
        try:
            results.append((do_bench(lambda: launch(*config), rep=40), config))
        except Exception as err:  # noqa: BLE001 - a tile that does not fit: skip it
            print(f"{name} {config}: {type(err).__name__}")
    results.sort()
    shown = results[:6] + [r for r in results[6:] if r[1] == default]
    for ms, (block_m, warps, stages) in shown:
        tag = " (default)" if (block_m, warps, stages) == default else ""
        print(f"{name} BLOCK_M={block_m} warps={warps} stages={stages}{tag}: {ms * 1e3:.1f} us, "
              f"{nbytes / ms / 1e6:.0f} GB/s = {nbytes / ms / 1e6 / copy:.0%} of copy", flush=True)


def main() -> None:
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"copy {copy:.0f} GB/s", flush=True)
    V = torch.randn(N, M, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1, D, device="cuda") * 0.05
    g = torch.rand(1, D, device="cuda") + 0.5
    out, lse, u = at.attnres_forward(V, w, g, None, EPS)
    do = torch.randn_like(out)
    o, lse_o, u_o = torch.empty_like(out), torch.empty_like(lse), torch.empty_like(u)

    def forward(block_m, warps, stages):
        at._attnres_fwd_kernel[(cdiv(M, block_m), 1)](
            V, V, w, g, u_o, o, lse_o, V.stride(0), V.stride(1), V.stride(1), w.stride(0), 0, o.stride(0),
            o.stride(1), lse_o.stride(0), M, N, D, EPS, HAS_PARTIAL=False, HAS_NORM_WEIGHT=True,
            BLOCK_M=block_m, BLOCK_D=BLOCK_D, num_warps=warps, num_stages=stages)

    tiles = [(m, w_) for m, w_ in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)) if m * BLOCK_D <= 8192]
    fwd_default = at._tiles(D, backward=False)
    sweep("forward", forward, [(m, w_, s) for (m, w_), s in itertools.product(tiles, (1, 2, 3, 4))],
          (N + 1) * M * D * 2, copy, (fwd_default[0], fwd_default[2], 3))

    delta = torch.empty(M, device="cuda")  # the model's read: source gradients deferred

    def backward(block_m, warps, stages):
        at.attnres_backward(do, V, w, g, None, out, lse, u, EPS, tiles=(block_m, warps), delta_out=delta)

    bwd_default = at._tiles(D, backward=True)
    sweep("backward (deferred)", backward, [(m, w_, 3) for m, w_ in tiles], (N + 2) * M * D * 2, copy,
          (bwd_default[0], bwd_default[2], 3))

    u_r = torch.randn(READERS, D, device="cuda") * 0.05
    do_r = torch.randn(READERS, M, D, device="cuda", dtype=torch.bfloat16)
    lse_r = torch.randn(READERS, M, device="cuda").abs() + 3
    delta_r = torch.randn(READERS, M, device="cuda")
    dv = torch.empty(M, D, dtype=torch.bfloat16, device="cuda")
    source = V[0]

    def source_grad(block_m, warps, stages):
        at._attnres_source_grad_kernel[(cdiv(M, block_m),)](
            source, u_r, do_r, lse_r, delta_r, dv, source.stride(0), u_r.stride(0), do_r.stride(0), do_r.stride(1),
            lse_r.stride(0), delta_r.stride(0), dv.stride(0), M, D, EPS, 0, READERS,
            BLOCK_M=block_m, BLOCK_D=BLOCK_D, num_warps=warps, num_stages=stages)

    tiles16 = tiles + [(16, w_) for w_ in (1, 2, 4, 8) if 16 * BLOCK_D <= 8192]
    sweep("source gradient", source_grad, [(m, w_, s) for (m, w_), s in itertools.product(tiles16, (1, 2, 3, 4))],
          (READERS + 2) * M * D * 2, copy, (bwd_default[0], bwd_default[2], 3))


if __name__ == "__main__":
    main()
