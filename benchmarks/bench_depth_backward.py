"""The depth backward of one training step at a model's shapes: bytes, time, fraction of copy bandwidth.

    python benchmarks/bench_depth_backward.py                      # 700m and small-48, T=4096
    python benchmarks/bench_depth_backward.py --old PATH/old_depth_triton.py   # + the pre-deferral kernel
    python benchmarks/bench_depth_backward.py --presets 700m --fp8  # + the same kernels on fp8 slots

Readers are the layers whose attention reads the depth stream (MoDA + FFN KV: block l reads the
2l slots of blocks 0..l-1). Deferred path (what the model runs): one dq-only kernel per reader,
then one slot-gradient kernel per producer block (its two slots formed together). ``--old``
times the kernel it replaced in the same run: each reader adds its dK/dV into a float32 buffer.
Bytes are the minimum each kernel must move; fraction = bytes / time / copy bandwidth measured
in the same run. Writes benchmarks/results/depth_backward_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
from pathlib import Path

import torch
from common import bench, copy_bandwidth, device_slug, save_results

from flash_depth.ops import depth_triton
from flash_depth.ops.fp8 import quantize_fp8

SHAPES = {  # preset: (B, T, Hq, Hk, d, blocks)
    "700m": (2, 4096, 16, 8, 64, 36),
    "small-48": (4, 4096, 6, 2, 64, 48),
}


def run(preset: str, old_module, block_ts, fp8: bool = False) -> list[dict]:
    B, T, Hq, Hk, d, blocks = SHAPES[preset]
    slots = 2 * (blocks - 1)
    readers = blocks - 1  # blocks 1..blocks-1
    dt, dev = torch.bfloat16, "cuda"
    e = 2  # bytes per bf16 element
    kd = torch.randn(B, T, slots, Hk, d, device=dev, dtype=dt)
    vd = torch.randn_like(kd)
    q = torch.randn(readers, B, T, Hq, d, device=dev, dtype=dt)
    do = torch.randn_like(q)
    o = torch.randn(B, T, Hq, d, device=dev, dtype=dt)
    lse = torch.randn(readers, B, Hq, T, device=dev) + 5
    delta = torch.randn_like(lse)
    dq_in = torch.randn(B, T, Hq, d, device=dev, dtype=dt)
    scale = d ** -0.5
    q_bytes = B * T * Hq * d * e
    slot_bytes = B * T * Hk * d * e  # one slot of K (or V)
    rows = []
    # fp8 slots: 1 byte per element and a float32 scale per row of d (ops/fp8.py); gradients stay bf16
    layouts = [("", kd, vd, None, slot_bytes)]
    if fp8:
        (kd8, ks), (vd8, vs) = quantize_fp8(kd), quantize_fp8(vd)
        layouts.append(("fp8 slots: ", kd8, vd8, (ks, vs), slot_bytes // e + B * T * Hk * 4))
    for label, kd_, vd_, scales, read_bytes in layouts:
        def sliced(n, kd_=kd_, vd_=vd_, scales=scales):
            return (kd_[:, :, :n], vd_[:, :, :n], scales and tuple(x[:, :, :n] for x in scales))

        def reader_pass(sliced=sliced):
            for r in range(readers):
                k_, v_, sc = sliced(2 * (r + 1))
                depth_triton.depth_backward(q[r], k_, v_, o, lse[r], do[r], scale, dq_in=dq_in,
                                            slot_grads=False, delta_out=delta[r], slot_scales=sc)

        # dq-only: K, V of n slots; q, dO, o, dq_in read, dq written; lse read, rowsum written
        reader_bytes = sum(2 * 2 * (r + 1) * read_bytes + 5 * q_bytes + 2 * B * Hq * T * 4 for r in range(readers))
        rows.append({"kernel": f"{label}dq only (per reader)", "launches": readers,
                     "ms": bench(reader_pass, rep_ms=300), "bytes": reader_bytes})

        def producer_pass(block_t, warps, stages=None, kd_=kd_, vd_=vd_, scales=scales):
            for blk in range(blocks - 1):
                depth_triton.depth_slot_backward(q, do, lse, delta, kd_, vd_, 2 * blk, 2, (blk, readers), scale,
                                                 block_t=block_t, num_warps=warps, num_stages=stages,
                                                 slot_scales=scales)

        # per producer block: K, V of 2 slots read, dK, dV of 2 slots written (bf16), each later reader's
        # q, dO, lse, rowsum
        producer_bytes = sum(2 * 2 * (read_bytes + slot_bytes) + (readers - blk) * (2 * q_bytes + 2 * B * Hq * T * 4)
                             for blk in range(blocks - 1))
        for tile in block_ts:
            stages = "" if len(tile) < 3 else ", unpipelined" if tile[2] == 1 else f", {tile[2]} stages"
            name = f"slot gradients (per producer block, BLOCK_T={tile[0]}, {tile[1]} warps{stages})"
            rows.append({"kernel": label + name,
                         "launches": blocks - 1, "ms": bench(lambda: producer_pass(*tile), rep_ms=300),
                         "bytes": producer_bytes})
    if old_module is not None:
        gk = torch.zeros(kd.shape, device=dev, dtype=torch.float32)
        gv = torch.zeros_like(gk)

        def old_pass():
            for r in range(readers):
                n = 2 * (r + 1)
                old_module.depth_backward(q[r], kd[:, :, :n], vd[:, :, :n], o, lse[r], do[r], scale, dq_in=dq_in,
                                          accumulate_into=(gk[:, :, :n], gv[:, :, :n]))

        # K, V read, float32 dK, dV read and written, q, dO, o, dq_in read, dq written
        old_bytes = sum(2 * 2 * (r + 1) * slot_bytes * (1 + 4) + 5 * q_bytes for r in range(readers))
        rows.append({"kernel": "before: dq + float32 dK/dV read-modify-write (per reader)", "launches": readers,
                     "ms": bench(old_pass, rep_ms=300), "bytes": old_bytes})
    for row in rows:
        row.update(preset=preset, shape=f"B={B} T={T} Hq={Hq} Hk={Hk} d={d} slots={slots} readers={readers}")
    return rows


def to_markdown(rows, meta) -> str:
    lines = [f"# Depth backward of one training step on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; {meta['date']}; bf16; copy bandwidth "
             f"{meta['copy_gb_s']:.0f} GB/s (read + write) in the same run. Bytes: the least each kernel must move.",
             "Reproduce: `python benchmarks/bench_depth_backward.py --old <pre-deferral depth_triton.py>`.", "",
             "| preset | kernel | launches | ms (sum) | GB moved | GB/s | of copy bandwidth |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs = r["bytes"] / (r["ms"] * 1e-3) / 1e9
        lines.append(f"| {r['preset']} | {r['kernel']} | {r['launches']} | {r['ms']:.2f} | {r['bytes'] / 1e9:.2f} "
                     f"| {gbs:.0f} | {gbs / meta['copy_gb_s']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--old", help="the pre-deferral depth_triton.py, to time its backward in the same run")
    parser.add_argument("--tiles", nargs="*", default=["16x4x3"],
                        help="slot-gradient tiles to time, BLOCK_Txwarps[xstages] (the default is what the model runs)")
    parser.add_argument("--fp8", action="store_true", help="also time the kernels on fp8 slots (depth_stream_dtype='fp8')")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("old_depth_triton", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    import triton

    device, slug = device_slug()
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "copy_gb_s": copy_bandwidth()}
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles]
    rows = [r for preset in args.presets for r in run(preset, old, tiles, args.fp8)]
    md = save_results(Path(args.out), f"depth_backward_{slug}", meta, rows, key=lambda r: (r["preset"], r["kernel"]),
                      order=lambda r: (r["preset"], r["kernel"]), markdown=to_markdown)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
