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
medians of --reps rounds after a warm-up generate of each length (which compiles). The variants of
one batch size are all built and warmed up first, then timed in rounds, one generate of each length
per variant per round: a step is host-bound, and the host's pace drifts within a run (residual's
step measured 3.47 to 4.19 ms at batch 8 in three runs when each variant was timed in turn). Ratios:
decode tok/s over Olmo2's and over our residual's, same rounds, same batch. Writes
benchmarks/results/generate_<gpu>.{json,md} (rows of other variants/batches are kept).

A full run compiles every variant at both batch sizes (about a minute each); split it with
--variants / --batches to keep each run short.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
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


class Clock:
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


def prepare(name: str, batch: int, preset: str, prompt: int, new: int, device: str, stack: ExitStack) -> dict:
    """Build one variant at one batch size and run a warm-up generate of each length (which
    compiles the step and records its CUDA graphs). Returns its row, with ``generate(n)`` (a
    closure, removed before saving) for the timing rounds; ``stack`` holds it ready until those end."""
    model = build(name, preset, device, torch.bfloat16 if device == "cuda" else torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    static = name != "residual (dynamic)"
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  **({"cache_implementation": "static"} if static else {}))
    ours = isinstance(model, FlashDepthForCausalLM)
    if device == "cuda" and static and ours and not GENERATE_COMPILES:
        stack.enter_context(compiled_decoding(model, mode="reduce-overhead"))

    def generate(n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

    row = {"variant": name, "batch": batch, "prompt": prompt, "new_tokens": new, "preset": preset,
           "cache": "static" if static else "dynamic", "timing": "interleaved rounds",
           "compiled": device == "cuda" and static and (ours or GENERATE_COMPILES),
           "generate": generate, "times": {1: [], new: []}}
    with torch.no_grad():
        for n in (1, new):
            start = time.time()
            out = generate(n)
            if n == new:
                row["compile_s"] = round(time.time() - start, 1)
                if out.shape[1] != prompt + new:
                    raise RuntimeError(f"{name} generated {out.shape[1] - prompt} tokens, not {new}")
    return row


def time_round(rows: list[dict], clock) -> None:
    """One timed generate of each length for every prepared variant, one variant after another:
    rounds interleave the variants, so that a drift of the host's pace (decoding steps are
    host-bound) reaches them all alike instead of whichever ran first or last. A variant that
    fails is printed and dropped from ``rows``; the others go on."""
    with torch.no_grad():
        for row in list(rows):
            try:
                for n, times in row["times"].items():
                    times.append(clock(lambda n=n: row["generate"](n)))
            except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the others' rows
                print(f"{row['variant']} batch {row['batch']} failed while timed: {err!r}"[:600], flush=True)
                rows.remove(row)


def finish(row: dict) -> dict:
    """Prefill and decode tokens/s from the median times of the rounds."""
    (short, t_short), (new, t_new) = sorted((n, statistics.median(t)) for n, t in row.pop("times").items())
    del row["generate"]
    row["prefill_tok_s"] = row["batch"] * row["prompt"] / t_short
    decode_s = t_new - t_short
    if decode_s <= 0:  # only a noisy, shared CPU (the smoke run) gets here: no number rather than a wrong one
        decode_s = float("nan")
    row["decode_tok_s"] = row["batch"] * (new - short) / decode_s
    row["decode_ms_per_step"] = 1e3 * decode_s / (new - short)
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
        "and run (rows of different runs carry different dates). Run: `rounds`, the variants of the batch size were "
        "timed in interleaved rounds; `in turn`, one after another (earlier runs).",
        "Reproduce: `python benchmarks/bench_generate.py` (`--quick`: olmo2, residual, moda + FFN KV, attnres_block).",
        "",
        "| variant | batch | cache | prefill tok/s | decode tok/s | ms / step | vs olmo2 | vs residual | "
        "warm-up s | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['cache']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['decode_ms_per_step']:.2f} | {ratio(r, 'decode_vs_olmo2')} | "
                     f"{ratio(r, 'decode_vs_residual')} | {r.get('compile_s', '-')} | {r.get('date', '-')} "
                     f"({'rounds' if 'timing' in r else 'in turn'}) |")
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
    clock = Clock(where == "cuda")
    rows, md = [], ""
    # every variant of a batch size stays compiled at once, and all share torch's Module.__call__ code,
    # whose compiled entries count against one recompile limit (8 by default; past it: eager steps)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(names))
    for batch in args.batches:
        ready = []
        with ExitStack() as stack:
            for name in names:
                t0 = time.time()
                try:
                    ready.append(prepare(name, batch, preset, prompt, new, where, stack))
                except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the others' rows
                    print(f"{name} batch {batch} failed: {err!r}"[:600], flush=True)
                    continue
                print(f"{name} batch {batch}: ready in {time.time() - t0:.0f}s", flush=True)
            for _ in range(args.reps):
                time_round(ready, clock)
            date = time.strftime("%Y-%m-%d %H:%M")
            for row in ready:
                rows.append(finish(row) | {"date": date})
                print(f"{row['variant']} batch {batch}: prefill {row['prefill_tok_s']:.0f} tok/s, "
                      f"decode {row['decode_tok_s']:.1f} tok/s", flush=True)
            ready.clear()
        # the models are freed only by a collection (transformers keeps each one's compiled call on
        # it: a reference cycle), before the next batch size builds its own
        gc.collect()
        torch._dynamo.reset()
        if where == "cuda":
            torch.cuda.empty_cache()
        add_ratios(rows)
        # written after every batch size: a run cut off by a time limit keeps what it measured
        md = save_results(out, f"generate_{slug}", meta, rows, key=lambda r: (r["variant"], r["batch"]),
                          order=lambda r: (r["batch"], order.get(r["variant"], len(order))),
                          markdown=lambda rows, meta: to_markdown(rows, device, meta))
    print(md)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
