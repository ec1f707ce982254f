"""Sweep the mHC kernels' settings (ops/hyper_triton.py) at small-48's shape on this GPU.

    python benchmarks/tune_hyper.py

16384 tokens, n = 4 streams of D = 384 in float32 (the model's streams under bf16 autocast), a bf16
sublayer output. Times the projection (forward, backward), the write backward at each pipeline depth
of their stream loops, and the Sinkhorn forward and backward (20 iterations) at each tokens-per-program
and warps setting, against the device's copy rate. It repeats the sweep of
benchmarks/results/logs/s10_tune_mhc_h200.log (H200; run then from the script beside that log) with
the constants' current names; not run on a GPU itself yet.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from common import copy_bandwidth
from flash_depth.ops import hyper_triton as ht

M, N, D, ITERS = 16384, 4, 384, 20


def us(fn) -> float:
    return do_bench(fn, rep=100) * 1e3


def main() -> None:
    torch.manual_seed(0)
    X = torch.randn(M, N, D, device="cuda")
    phi = torch.randn(N * D, N * (N + 2), device="cuda") * (N * D) ** -0.5
    g = torch.randn_like(X)
    y = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    h_post, h_res = torch.rand(M, N, device="cuda"), torch.rand(M, N, N, device="cuda")
    logits, g_logits = torch.randn(M, N, N, device="cuda"), torch.randn(M, N, N, device="cuda")
    proj, rstd = ht._projection_op(X, phi, 1e-6)
    dproj = torch.randn_like(proj)
    copy = copy_bandwidth()  # GB/s, read + write
    print(f"copy {copy:.0f} GB/s: the {X.numel() * 4 / 1e6:.0f} MB of streams move once in "
          f"{X.numel() * 4 / copy / 1e3:.1f} us at that rate", flush=True)
    default_stages, default_tile = ht._STREAM_STAGES, (ht._SINKHORN_BLOCK, ht._SINKHORN_WARPS)
    try:
        for stages in (1, 2, 3, 4):
            ht._STREAM_STAGES = stages
            fwd = us(lambda: ht._projection_op(X, phi, 1e-6))
            bwd = us(lambda: ht._projection_backward_op(dproj, X, phi, proj, rstd))
            write = us(lambda: ht._write_backward_op(g, X, y, h_post, h_res))
            tag = " (default)" if stages == default_stages else ""
            print(f"stages {stages}{tag}: projection forward {fwd:.1f} us, backward (dX + dphi) {bwd:.1f} us, "
                  f"write backward {write:.1f} us", flush=True)
        ht._STREAM_STAGES = default_stages
        for block in (16, 32, 64, 128):
            for warps in (1, 2, 4):
                ht._SINKHORN_BLOCK, ht._SINKHORN_WARPS = block, warps
                fwd = us(lambda: ht._sinkhorn_launch(logits, ITERS, 1e-12))
                bwd = us(lambda: ht._sinkhorn_launch(logits, ITERS, 1e-12, g_logits))
                tag = " (default)" if (block, warps) == default_tile else ""
                print(f"sinkhorn {block} tokens, {warps} warps{tag}: forward {fwd:.1f} us, backward {bwd:.1f} us",
                      flush=True)
    finally:
        ht._STREAM_STAGES = default_stages
        ht._SINKHORN_BLOCK, ht._SINKHORN_WARPS = default_tile


if __name__ == "__main__":
    main()
