"""Training speed and peak memory of each depth mechanism, same shape, one GPU, one run.

    python benchmarks/bench_model.py                  # small-48 and 700m presets, T=4096
    python benchmarks/bench_model.py --presets small-48 --steps 5
    python benchmarks/bench_model.py --compile       # each block torch.compiled (train.compile=true)
    python benchmarks/bench_model.py --compile --cuda-graph   # and the step replayed from a CUDA graph
    python benchmarks/bench_model.py --presets 700m --compile --cuda-graph --variants residual "moda + FFN KV"
        # residual, MoDA + FFN KV with a bf16 and with an fp8 depth stream (and the other MoDA + FFN KV rows)

A step is forward + backward + AdamW under bf16 autocast (fp32 master weights), eager mode or
with every block compiled (``FlashDepthModel.compile_blocks``, what ``train.compile`` does),
optionally replayed from one CUDA graph (``train.cuda_graph``), which takes the host out.
Writes benchmarks/results/model_<gpu>.{json,md} (rows of presets/variants not run this time are
kept from the file); ratios are to `residual` of the same preset, so rerun `residual` with the
variants you compare: runs differ by a few percent.
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

from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM
from flash_depth.models.accounting import flops_per_token, parameter_count
from flash_depth.train.cuda_graph import prepare_for_capture

VARIANTS = [
    ("residual", {}),
    ("moda (attn KV)", {"depth_mechanism": "moda", "ffn_kv": False}),
    ("moda + FFN KV", {"depth_mechanism": "moda"}),
    ("moda + FFN KV, post-norm", {"depth_mechanism": "moda", "norm_position": "post"}),
    ("moda + FFN KV, window 16", {"depth_mechanism": "moda", "depth_window": 16}),
    ("moda + FFN KV, fp8 depth stream", {"depth_mechanism": "moda", "depth_stream_dtype": "fp8"}),
    ("depth_attention", {"depth_mechanism": "depth_attention"}),
    ("attnres_full", {"depth_mechanism": "attnres_full"}),
    ("attnres_block (8)", {"depth_mechanism": "attnres_block", "attnres_blocks": 8}),
    ("denseformer", {"depth_mechanism": "denseformer"}),
    ("mhc (4 streams)", {"depth_mechanism": "mhc", "hc_streams": 4}),
    ("hc (4 streams)", {"depth_mechanism": "hc", "hc_streams": 4}),
    ("mudd", {"depth_mechanism": "mudd"}),
]
BATCH = {"small-48": 4, "700m": 2}


def mode_name(compiled: bool, graphed: bool) -> str:
    return ("compiled" if compiled else "eager") + (" + CUDA graph" if graphed else "")


def run(preset: str, name: str, overrides: dict, seq_len: int, steps: int, compiled: bool, graphed: bool) -> dict:
    cfg = FlashDepthConfig.from_preset(preset, max_position_embeddings=seq_len, **overrides)
    row = {"preset": preset, "variant": name, "params": parameter_count(cfg)["total"],
           "gflops_per_token": flops_per_token(cfg, seq_len) / 1e9, "batch": BATCH[preset], "seq_len": seq_len,
           "mode": mode_name(compiled, graphed)}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        model = FlashDepthForCausalLM(cfg).cuda()
        if compiled:
            model.model.compile_blocks()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        if graphed:
            prepare_for_capture(opt, torch.device("cuda"))
        ids = torch.randint(0, cfg.vocab_size, (BATCH[preset], seq_len), device="cuda")

        ms, loss = time_training(lambda x: model(x, labels=x).loss, opt, ids, steps, graphed)
        row.update(ms_per_step=ms, tokens_per_s=BATCH[preset] * seq_len / ms * 1e3,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss))
    except Exception as err:  # noqa: BLE001 - an out-of-memory variant is a result too
        row["error"] = repr(err)[:300]
    torch.cuda.empty_cache()
    return row


def to_markdown(rows, meta) -> str:
    lines = [f"# Training speed by depth mechanism on {meta['device']}", "",
             f"torch {meta['torch']}; {meta['date']}. Step = forward + backward + fused AdamW, bf16 autocast; "
             "mode: eager, or compiled = every block `torch.compile`d (`train.compile=true`); + CUDA graph = "
             "the whole step replayed from one graph (`train.cuda_graph=true`).",
             f"Sequence length {rows[0]['seq_len']}; reproduce: `python benchmarks/bench_model.py`.", "",
             "| preset | mode | variant | params (M) | GFLOPs/token (train) | batch | ms/step | tokens/s "
             "| vs residual (same run, same mode) | peak GiB | date |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r.get('mode', 'eager')} | {r['variant']} | {r['params'] / 1e6:.1f} "
                         f"| {r['gflops_per_token']:.2f} | {r['batch']} | failed: {r['error'][:60]} | | | "
                         f"| {r.get('date', '-')} |")
            continue
        ratio = f"{r['vs_residual']:.3f}x" if r.get("vs_residual") else "-"
        lines.append(f"| {r['preset']} | {r.get('mode', 'eager')} | {r['variant']} | {r['params'] / 1e6:.1f} "
                     f"| {r['gflops_per_token']:.2f} "
                     f"| {r['batch']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} "
                     f"| {r['peak_gib']:.1f} | {r.get('date', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=["small-48", "700m"], choices=sorted(BATCH))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="*", help="variant names to run, each an exact name or else a substring "
                        "of names (default: all)")
    parser.add_argument("--compile", action="store_true", help="compile every block (train.compile=true)")
    parser.add_argument("--cuda-graph", action="store_true", help="replay each step from a CUDA graph "
                        "(train.cuda_graph=true)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # child process: one variant, so memory from one never leaks into the next
        name, overrides = VARIANTS[int(args.one[1])]
        print("ROW " + json.dumps(run(args.one[0], name, overrides, args.seq_len, args.steps, args.compile,
                                        args.cuda_graph)))
        return 0
    if not torch.cuda.is_available():
        print("bench_model.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device, slug = device_slug()
    rows, names = [], {name for name, _ in VARIANTS}
    for preset in args.presets:
        for index, (name, _) in enumerate(VARIANTS):
            if args.variants and not any(v == name or (v not in names and v in name) for v in args.variants):
                continue
            child = subprocess.run(
                [sys.executable, __file__, "--one", preset, str(index), "--seq-len", str(args.seq_len),
                 "--steps", str(args.steps), *(["--compile"] if args.compile else []),
                 *(["--cuda-graph"] if args.cuda_graph else [])],
                capture_output=True, text=True,
            )
            lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
            error = child.stderr.strip().splitlines()[-1][:300] if child.stderr.strip() else "no output"
            row = json.loads(lines[-1][4:]) if lines else {
                "preset": preset, "variant": name, "params": 0, "gflops_per_token": 0, "batch": BATCH[preset],
                "seq_len": args.seq_len, "mode": mode_name(args.compile, args.cuda_graph), "error": error}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    # Rows of other presets/variants from an earlier run stay, each with its own date and its
    # ratio to the residual of its own run (runs differ by a few percent).
    base = {r["preset"]: r["tokens_per_s"] for r in rows if r["variant"] == "residual" and "tokens_per_s" in r}
    for row in rows:
        row["date"] = meta["date"]
        if "tokens_per_s" in row and row["preset"] in base:
            row["vs_residual"] = row["tokens_per_s"] / base[row["preset"]]
    order = {name: i for i, (name, _) in enumerate(VARIANTS)}
    md = save_results(Path(args.out), f"model_{slug}", meta, rows,
                      key=lambda r: (r["preset"], r.get("mode", "eager"), r["variant"]),
                      order=lambda r: (r["preset"] != "small-48", r["preset"], r.get("mode", "eager"),
                                       order.get(r["variant"], len(order))),
                      markdown=to_markdown)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
