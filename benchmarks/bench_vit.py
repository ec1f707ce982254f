"""Training speed of the vision encoder at DeiT-Tiny shapes: MoDA against the plain encoder, one run.

    python benchmarks/bench_vit.py                     # 12 and 48 layers, eager
    python benchmarks/bench_vit.py --compile           # each block torch.compiled
    python benchmarks/bench_vit.py --compile --cuda-graph   # and the step replayed from a CUDA graph
    python benchmarks/bench_vit.py --smoke             # tiny shapes on the CPU: checks the script, writes nothing

DeiT-Tiny: 224x224 images, patches of 16 (196 + CLS tokens), width 192, 3 heads of 64, MLP 768,
1000 classes. A step is forward + backward + fused AdamW under bf16 autocast (fp32 master
weights), on random images and labels. Each variant runs in its own process (no memory left
over from the one before). Writes benchmarks/results/vit_<gpu>.{json,md} (rows of depths,
variants and modes not run this time are kept); ratios are images/s to `residual` of the same
depth and mode in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import device_slug, save_results, time_training

from flash_depth.models import FlashDepthViTConfig, FlashDepthViTForImageClassification
from flash_depth.train.cuda_graph import prepare_for_capture

VARIANTS = [
    ("residual", {}),
    ("moda (attn KV)", {"depth_mechanism": "moda", "ffn_kv": False}),
    ("moda + FFN KV", {"depth_mechanism": "moda"}),
    ("attnres_block (4)", {"depth_mechanism": "attnres_block", "attnres_blocks": 4}),
    ("denseformer", {"depth_mechanism": "denseformer"}),
]
DEFAULT_VARIANTS = ["residual", "moda"]
BATCH = {12: 256, 48: 256}
SHAPES = "224x224, patch 16 (196 patches + CLS), width 192, 3 heads of 64, MLP 768"  # DeiT-Tiny
# --smoke: the same layout small enough for a CPU
SMOKE = dict(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_labels=10)
SMOKE_SHAPES = "32x32, patch 8 (16 patches + CLS), width 32, 2 heads of 16, MLP 64"


def mode_name(compiled: bool, graphed: bool) -> str:
    return ("compiled" if compiled else "eager") + (" + CUDA graph" if graphed else "")


def run(layers: int, name: str, overrides: dict, batch: int, steps: int, compiled: bool, graphed: bool,
        smoke: bool = False) -> dict:
    """One variant's row: ms/step, images/s, peak memory (or the error it raised)."""
    device = torch.device("cpu" if smoke else "cuda")
    shape = SMOKE if smoke else {}
    cfg = FlashDepthViTConfig.from_preset("deit-tiny", num_hidden_layers=layers, **shape, **overrides)
    row = {"layers": layers, "variant": name, "batch": batch, "mode": mode_name(compiled, graphed)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        model = FlashDepthViTForImageClassification(cfg).to(device)
        row["params"] = sum(p.numel() for p in model.parameters())
        if compiled:
            model.vit.compile_blocks()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        if graphed:
            prepare_for_capture(opt, device)
        images = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, device=device)
        labels = torch.randint(0, cfg.num_labels, (batch,), device=device)

        ms, loss = time_training(lambda x: model(x, labels=labels).loss, opt, images, steps, graphed,
                                 warm_steps=1 if smoke else 5)
        row.update(ms_per_step=ms, images_per_s=batch / ms * 1e3, loss=loss)
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as err:  # noqa: BLE001 - an out-of-memory variant is a result too
        row["error"] = repr(err)[:300]
    return row


def add_ratios(rows: list[dict]) -> None:
    """vs_residual: images/s over `residual`'s of the same depth and mode."""
    base = {(r["layers"], r["mode"]): r["images_per_s"] for r in rows
            if r["variant"] == "residual" and "images_per_s" in r}
    for row in rows:
        if "images_per_s" in row and (row["layers"], row["mode"]) in base:
            row["vs_residual"] = row["images_per_s"] / base[(row["layers"], row["mode"])]


def to_markdown(rows, meta) -> str:
    lines = [f"# Vision encoder training speed on {meta['device']}", "",
             f"torch {meta['torch']}. {meta['shapes']}, non-causal attention. Step = forward + backward + AdamW "
             "(fused on CUDA), bf16 autocast, random "
             "images; mode: eager, compiled = every block `torch.compile`d, + CUDA graph = the whole step "
             "replayed from one graph. Reproduce: `python benchmarks/bench_vit.py [--compile] [--cuda-graph]`.", "",
             "| layers | mode | variant | params (M) | batch | ms/step | images/s | vs residual (same run, same mode) "
             "| peak GiB | date |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['layers']} | {r['mode']} | {r['variant']} | {r.get('params', 0) / 1e6:.2f} | {r['batch']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error'][:60]} | | | | {r.get('date', '-')} |")
            continue
        ratio = f"{r['vs_residual']:.3f}x" if r.get("vs_residual") else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        lines.append(head + f"| {r['ms_per_step']:.1f} | {r['images_per_s']:,.0f} | {ratio} | {peak} "
                     f"| {r.get('date', '-')} |")
    return "\n".join(lines) + "\n"


def _child(args, layers: int, index: int) -> dict:
    """Runs one variant in a fresh process; a crash or a timeout is a row with its error."""
    name = VARIANTS[index][0]
    cmd = [sys.executable, __file__, "--one", str(layers), str(index), "--steps", str(args.steps),
           "--batch", str(args.batch or BATCH[layers]), *(["--compile"] if args.compile else []),
           *(["--cuda-graph"] if args.cuda_graph else [])]
    failed = {"layers": layers, "variant": name, "batch": args.batch or BATCH[layers],
              "mode": mode_name(args.compile, args.cuda_graph)}
    try:
        child = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"ran past --timeout {args.timeout} s"}
    lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
    if lines:
        return json.loads(lines[-1][4:])
    return {**failed, "error": child.stderr.strip().splitlines()[-1][:300] if child.stderr.strip() else "no output"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="*", type=int, default=[12, 48], choices=sorted(BATCH))
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                        help="substrings of variant names to run (default: residual and both moda; "
                             f"all: {', '.join(n for n, _ in VARIANTS)})")
    parser.add_argument("--batch", type=int, help="images per step (default: 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--compile", action="store_true", help="compile every block")
    parser.add_argument("--cuda-graph", action="store_true", help="replay each step from a CUDA graph")
    parser.add_argument("--timeout", type=int, default=240, help="seconds one variant may take")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, in this process, 2 and 3 layers; prints the table, "
                             "writes nothing")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--one", nargs=2, type=int, metavar=("LAYERS", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1 or args.steps < 1:
        parser.error(f"--batch and --steps must be >= 1, got {args.batch} and {args.steps}")
    chosen = [i for i, (name, _) in enumerate(VARIANTS) if any(v in name for v in args.variants)]
    if not chosen:
        parser.error(f"--variants {args.variants} match none of {[n for n, _ in VARIANTS]}")
    if args.one:  # child process: one variant, so memory from one never leaks into the next
        name, overrides = VARIANTS[args.one[1]]
        print("ROW " + json.dumps(run(args.one[0], name, overrides, args.batch, args.steps, args.compile,
                                        args.cuda_graph)))
        return 0
    if args.smoke:
        if args.compile or args.cuda_graph:
            parser.error("--smoke runs eager on the CPU: no --compile or --cuda-graph")
        rows = [run(layers, *VARIANTS[i], args.batch or 2, min(args.steps, 2), False, False, smoke=True)
                for layers in (2, 3) for i in chosen]
        add_ratios(rows)
        print(to_markdown(rows, {"device": "CPU (smoke)", "torch": torch.__version__, "shapes": SMOKE_SHAPES}))
        return 1 if any("error" in r for r in rows) else 0
    if not torch.cuda.is_available():
        print("bench_vit.py needs a CUDA GPU (--smoke runs tiny shapes on the CPU)", file=sys.stderr)
        return 2
    device, slug = device_slug()
    rows = []
    for layers in args.layers:
        for index in chosen:
            rows.append(_child(args, layers, index))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shapes": SHAPES}
    for row in rows:
        row["date"] = meta["date"]
    add_ratios(rows)
    order = {name: i for i, (name, _) in enumerate(VARIANTS)}
    md = save_results(Path(args.out), f"vit_{slug}", meta, rows,
                      key=lambda r: (r["layers"], r["mode"], r["variant"]),
                      order=lambda r: (r["layers"], r["mode"], order.get(r["variant"], len(order))),
                      markdown=to_markdown)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
