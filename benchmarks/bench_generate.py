"""Generation speed: prefill and decode tokens/s of each depth mechanism against transformers'
Olmo2ForCausalLM of the same shape, one GPU, one run.

    python benchmarks/bench_generate.py --quick          # residual, moda + FFN KV, attnres_block, olmo2
    python benchmarks/bench_generate.py --variants depth_attention attnres_full --batches 1
    python benchmarks/bench_generate.py --smoke          # CPU, tiny preset: the script runs end to end

700m preset (Olmo2: the same widths, depth, heads and vocabulary), bf16 weights, random init,
greedy, a 512-token random prompt, 128 new tokens (min_new_tokens: no early EOS), batch 1 and 8.
Every model generates with its fastest settings, ``cache_implementation="static"``: transformers
compiles each decoding step (mode="reduce-overhead": CUDA graphs; on transformers < 4.48, ours
through flash_depth.eval.generation.compiled_decoding), the prefill stays eager. ``residual
(dynamic)`` is the dynamic-cache, eager path generation had before. Timing: CUDA events around
``generate``; prefill tok/s = B * 512 / t(1 new token); decode tok/s = B * 127 / (t(128) - t(1)),
median of --reps runs after a warm-up generate of each length (which compiles). Ratios: decode
tok/s over Olmo2's and over our residual's, same run, same batch. Writes
benchmarks/results/generate_<gpu>.{json,md} (rows of other variants/batches are kept).

A full run compiles every variant at both batch sizes (about a minute each); split it with
--variants / --batches to keep each run short.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from flash_depth.eval.generation import GENERATE_COMPILES, compiled_decoding
from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

VARIANTS = {  # name -> FlashDepthConfig overrides (None: transformers' Olmo2ForCausalLM)
    "olmo2": None,
    "residual": {},
    "residual (dynamic)": {},
    "moda (attn KV)": {"depth_mechanism": "moda", "ffn_kv": False},
    "moda + FFN KV": {"depth_mechanism": "moda"},
    "depth_attention": {"depth_mechanism": "depth_attention"},
    "attnres_full": {"depth_mechanism": "attnres_full"},
    "attnres_block (8)": {"depth_mechanism": "attnres_block", "attnres_blocks": 8},
    "denseformer": {"depth_mechanism": "denseformer"},
    "mhc": {"depth_mechanism": "mhc"},
    "hc": {"depth_mechanism": "hc"},
}
QUICK = ["olmo2", "residual", "moda + FFN KV", "attnres_block (8)"]
SHAPE = {"gpu": ("700m", 512, 128), "smoke": ("tiny", 16, 4)}  # preset, prompt tokens, new tokens


def build(name: str, preset: str, device: str, dtype: torch.dtype):
    """The model of a variant at the preset's shape, random weights, eval mode."""
    overrides = VARIANTS[name]
    cfg = FlashDepthConfig.from_preset(preset, **({} if overrides is None else overrides))
    if overrides is not None:
        return FlashDepthForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    from transformers import Olmo2Config, Olmo2ForCausalLM

    olmo = Olmo2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                       rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, pad_token_id=0, bos_token_id=None,
                       eos_token_id=None)
    return Olmo2ForCausalLM(olmo).to(device=device, dtype=dtype).eval()


class _Clock:
    """Seconds of a call: CUDA events on the GPU, perf_counter on the CPU (the smoke run)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def run(name: str, batch: int, preset: str, prompt: int, new: int, reps: int, device: str) -> dict:
    """Prefill and decode tokens/s of one variant at one batch size."""
    cuda = device == "cuda"
    torch._dynamo.reset()  # one compiled forward per model: dynamo's per-code cache limit would be shared
    if cuda:
        torch.cuda.empty_cache()  # the previous variant's model and cache
    model = build(name, preset, device, torch.bfloat16 if cuda else torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    static = name != "residual (dynamic)"
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  **({"cache_implementation": "static"} if static else {}))
    ours = isinstance(model, FlashDepthForCausalLM)
    compiling = cuda and static and ours and not GENERATE_COMPILES
    clock = _Clock(cuda)
    row = {"variant": name, "batch": batch, "prompt": prompt, "new_tokens": new, "preset": preset,
           "cache": "static" if static else "dynamic", "compiled": cuda and static}
    with torch.no_grad(), compiled_decoding(model, mode="reduce-overhead") if compiling else nullcontext():
        times = {}
        for n in (1, new):
            def generate(n=n):
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

            start = time.time()
            out = generate()  # warm-up: compiles the step, records the CUDA graphs
            if n == new:
                row["compile_s"] = round(time.time() - start, 1)
                if out.shape[1] != prompt + new:
                    raise RuntimeError(f"{name} generated {out.shape[1] - prompt} tokens, not {new}")
            times[n] = statistics.median(clock(generate) for _ in range(reps))
    row["prefill_tok_s"] = batch * prompt / times[1]
    decode_s = times[new] - times[1]
    if decode_s <= 0:  # only a noisy, shared CPU (the smoke run) gets here: no number rather than a wrong one
        decode_s = float("nan")
    row["decode_tok_s"] = batch * (new - 1) / decode_s
    row["decode_ms_per_step"] = 1e3 * decode_s / (new - 1)
    return row


def add_ratios(rows: list[dict]) -> None:
    """decode tok/s over olmo2's and residual's of the same batch (when measured in this run)."""
    by = {(r["variant"], r["batch"]): r for r in rows}
    for r in rows:
        for base in ("olmo2", "residual"):
            other = by.get((base, r["batch"]))
            if other is not None:
                r[f"decode_vs_{base}"] = r["decode_tok_s"] / other["decode_tok_s"]


def to_markdown(rows, device: str, meta: dict) -> str:
    def ratio(r, key):
        return f"{r[key]:.2f}x" if key in r else "-"

    lines = [
        f"# Generation speed on {device}",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}. {meta['shape']}; greedy, random weights. "
        "Static cache: decoding steps compiled (reduce-overhead, CUDA graphs), prefill eager; `residual (dynamic)`: "
        "dynamic cache, eager. tok/s over the batch; ratios of decode tok/s to olmo2 / residual of the same batch "
        "and run (rows of different runs carry different dates).",
        "Reproduce: `python benchmarks/bench_generate.py` (`--quick`: olmo2, residual, moda + FFN KV, attnres_block).",
        "",
        "| variant | batch | cache | prefill tok/s | decode tok/s | ms / step | vs olmo2 | vs residual | "
        "warm-up s | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['cache']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['decode_ms_per_step']:.2f} | {ratio(r, 'decode_vs_olmo2')} | "
                     f"{ratio(r, 'decode_vs_residual')} | {r.get('compile_s', '-')} | {r.get('date', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                        help=f"variants to run (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--reps", type=int, default=3, help="timed generates per length (median; default 3)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 16-token prompt, 4 new tokens, "
                        "float32, no compile; results go to a temporary folder unless --out is given")
    parser.add_argument("--out", help="folder for json/md results (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick and args.variants:
        parser.error("pass --quick or --variants, not both")
    if any(b < 1 for b in args.batches) or args.reps < 1:
        parser.error(f"--batches and --reps must be >= 1, got {args.batches} and {args.reps}")
    from common import device_slug, save_results

    preset, prompt, new = SHAPE["smoke" if args.smoke else "gpu"]
    if args.smoke:
        device, slug, where = "cpu (smoke)", "cpu_smoke", "cpu"
        out = Path(args.out or tempfile.mkdtemp(prefix="bench_generate_"))
    else:
        if not torch.cuda.is_available():
            print("bench_generate.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        (device, slug), where = device_slug(), "cuda"
        out = Path(args.out) if args.out else Path(__file__).parent / "results"
    names = QUICK if args.quick else args.variants or list(VARIANTS)
    names = sorted(names, key=list(VARIANTS).index)  # olmo2 and residual first: the ratios' bases
    import transformers

    meta = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "shape": f"{preset} preset, prompt {prompt}, {new} new tokens, {'float32' if args.smoke else 'bf16'}"}
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows, md = [], ""
    for name in names:
        for batch in args.batches:
            t0 = time.time()
            try:
                row = run(name, batch, preset, prompt, new, args.reps, where)
            except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the others' rows
                print(f"{name} batch {batch} failed: {err!r}"[:600], flush=True)
                continue
            row["date"] = time.strftime("%Y-%m-%d %H:%M")
            rows.append(row)
            print(f"{name} batch {batch} ({time.time() - t0:.0f}s): prefill {row['prefill_tok_s']:.0f} tok/s, "
                  f"decode {row['decode_tok_s']:.1f} tok/s", flush=True)
            add_ratios(rows)
            # written after every row: a run cut off by a time limit keeps what it measured
            md = save_results(out, f"generate_{slug}", meta, rows, key=lambda r: (r["variant"], r["batch"]),
                              order=lambda r: (r["batch"], order.get(r["variant"], len(order))),
                              markdown=lambda rows, meta: to_markdown(rows, device, meta))
    print(md)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
