"""Sweep the AttnRes kernels' tiles (and pipeline stages) at small-48's shape on this GPU.

    python benchmarks/tune_attnres.py [--only forward backward source]

D=384, M = B*T = 16384 rows, 48 sources (a read halfway through a 48-layer attnres_full model),
48 readers of one source for the deferred source gradient. Prints every setting's bandwidth as a
fraction of a 2 GiB device-to-device copy measured in the same run, fastest first, marking the
defaults and the settings before the backward kernels were pipelined ("old": tl.range stages 1,
4 rows on 2 warps, 8 programs an SM in the read backward; 4 rows on 2 warps in the source gradient).
Log of an H200 run: benchmarks/results/logs/tune_attnres_d384_h200.log.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench

from common import copy_bandwidth
from flash_depth.ops import attnres_triton as at

D, M, N, READERS, EPS = 384, 16384, 48, 48, 1e-6
BLOCK_D = 512  # D padded


def sweep(name: str, launch, configs, nbytes: int, copy: float, marks: dict) -> None:
    """Time ``launch(*config)`` for each config; print them all, fastest first (``marks``: config -> tag)."""
    results = []
    for config in configs:
        try:
            results.append((do_bench(lambda: launch(*config), rep=40), config))
        except Exception as err:  # noqa: BLE001 - a tile that does not fit: skip it
            print(f"{name} {config}: {type(err).__name__}")
    for ms, config in sorted(results):
        tag = f" ({marks[config]})" if config in marks else ""
        print(f"{name} {config}{tag}: {ms * 1e3:.1f} us, "
              f"{nbytes / ms / 1e6:.0f} GB/s = {nbytes / ms / 1e6 / copy:.0%} of copy", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=("forward", "backward", "source"),
                        default=["forward", "backward", "source"])
    args = parser.parse_args()
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"copy {copy:.0f} GB/s", flush=True)
    V = torch.randn(N, M, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1, D, device="cuda") * 0.05
    g = torch.rand(1, D, device="cuda") + 0.5
    out, lse, u = at.attnres_forward(V, w, g, None, EPS)
    do = torch.randn_like(out)

    def forward(block_m, warps, stages):
        at.attnres_forward(V, w, g, None, EPS, tiles=(block_m, warps, stages))

    tiles = [(m, w_) for m, w_ in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)) if m * BLOCK_D <= 8192]
    if "forward" in args.only:
        fwd = at._tiles(D, backward=False)
        configs = [(m, w_, 1) for m, w_ in tiles] + [(1, w_, s) for w_, s in itertools.product((1, 2), (2, 3, 4))]
        sweep("forward BLOCK_M, warps, stages", forward, configs, (N + 1) * M * D * 2, copy,
              {(fwd[0], fwd[2], at.FWD_STAGES): "default"})

    delta = torch.empty(M, device="cuda")  # the model's read: source gradients deferred

    def backward(block_m, warps, stages, warps_per_sm):
        at.attnres_backward(do, V, w, g, None, out, lse, u, EPS, tiles=(block_m, warps, stages, warps_per_sm),
                            delta_out=delta)

    if "backward" in args.only:
        bwd = at._tiles(D, backward=True)
        configs = [(m, w_, s, wps) for (m, w_), s, wps in itertools.product(
            [(1, 1), (2, 1), (2, 2), (1, 2)], (1, 2, 3, 4), (12, 16, 20))]
        configs += [(m, 2, s, 16) for m, s in itertools.product((4, 8), (1, 3))]
        sweep("backward (deferred) BLOCK_M, warps, stages, warps/SM", backward, configs, (N + 2) * M * D * 2, copy,
              {(bwd[0], bwd[2], at.BWD_STAGES, at.WARPS_PER_SM): "default", (4, 2, 1, 16): "old"})

    u_r = torch.randn(READERS, D, device="cuda") * 0.05
    do_r = torch.randn(READERS, M, D, device="cuda", dtype=torch.bfloat16)
    lse_r = torch.randn(READERS, M, device="cuda").abs() + 3
    delta_r = torch.randn(READERS, M, device="cuda")

    def source_grad(block_m, warps, stages):
        at.attnres_source_backward(V[0], u_r, do_r, lse_r, delta_r, (0, READERS), EPS, tiles=(block_m, warps, stages))

    if "source" in args.only:
        src = at._source_tiles(D)
        configs = [(m, w_, s) for (m, w_), s in itertools.product(
            [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (4, 4), (8, 2)], (1, 2, 3, 4))]
        sweep("source gradient BLOCK_M, warps, stages", source_grad, configs, (READERS + 2) * M * D * 2, copy,
              {(src[0], src[2], at.BWD_STAGES): "default", (4, 2, 1): "old"})


if __name__ == "__main__":
    main()
