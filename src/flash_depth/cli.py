"""``flash-depth`` command line: train, eval, compare, tokenize, analyze, generate, demo, vit-demo.

    flash-depth train [--config FILE] [--out DIR] [--max-steps N] [--resume] [--device DEV] [key=value ...]
    flash-depth eval RUN_OR_CHECKPOINT [--data SOURCE] [--seq-len N] [--mc-task TASK.jsonl]
    flash-depth compare RUN [RUN ...] [--out FILE.png | DIR]
    flash-depth tokenize --data SOURCE --out DIR
    flash-depth analyze RUN_OR_CHECKPOINT [...] [--data SOURCE] [--out DIR]
    flash-depth generate RUN_OR_CHECKPOINT [--prompt TEXT | -] [--max-new-tokens N] [--temperature T] ...
    flash-depth demo
    flash-depth vit-demo [--mechanisms M ...] [--epochs N] [--seed N]
    flash-depth --version

RUN_OR_CHECKPOINT is a run folder (holding checkpoint/) or a checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def _train(args) -> int:
    from flash_depth.train.config import ConfigError, given_keys, load_config, resume_config
    from flash_depth.train.loop import run_checkpoint, saved_run_config, train

    cfg = load_config(args.config, args.overrides)
    if args.resume:  # the run's saved config holds; the command line may change what a resume can
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR, the run to continue")
        saved, model_defaults, where = saved_run_config(run_checkpoint(Path(args.out)))
        cfg, _ = resume_config(saved, cfg, given_keys(args.config, args.overrides), model_defaults, where)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    summary = train(cfg, out, resume=args.resume, device=args.device, max_steps=args.max_steps)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(f"run folder: {out}\n" + json.dumps(summary, indent=1))
    return 0


def _no_loading_bars() -> None:
    """Keeps transformers' weight-loading progress bar off stderr (the result is what matters there)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _eval(args) -> int:
    from flash_depth.train.checkpoint import resolve_checkpoint, run_config
    from flash_depth.train.config import DataConfig
    from flash_depth.train.evaluate import evaluate_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    _no_loading_bars()
    if args.mc_task:
        import tempfile

        from flash_depth.eval.lm_harness import run_multiple_choice

        with tempfile.TemporaryDirectory() as work:
            result = run_multiple_choice(ckpt, args.mc_task, work_dir=work, device=args.device)
        print(json.dumps(result, indent=1))
        return 0
    data = DataConfig(source=args.data, text_field=args.text_field) if args.data else None
    result = evaluate_checkpoint(ckpt, data, seq_len=args.seq_len, max_tokens=args.max_tokens, device=args.device)
    origin = ("--seq-len" if args.seq_len else "the run's train.seq_len" if run_config(ckpt)
              else "no run_config.yaml beside the checkpoint")
    print(f"eval: {result['tokens']:,} tokens in windows of seq_len={result['seq_len']} ({origin})", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return 0


def _compare(args) -> int:
    from flash_depth.train.plots import compare_table, plot_runs

    runs = [Path(r) for r in args.runs]
    for run in runs:  # before anything is written
        if not (run / "metrics.jsonl").exists():
            raise FileNotFoundError(f"RUN: {run} is not a run folder (no metrics.jsonl)")
    out = Path(args.out) if args.out else runs[0]
    png = out if out.suffix else out / "compare.png"  # no suffix: a folder
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, png)
    table = compare_table(runs)
    png.with_suffix(".md").write_text(table + f"\n![validation loss]({png.name})\n")
    print(table + f"plot: {png}\ntable: {png.with_suffix('.md')}")
    return 0


def _tokenize(args) -> int:
    import numpy as np

    from flash_depth.data.pipeline import build_token_splits
    from flash_depth.data.shards import write_token_shards
    from flash_depth.train.config import DataConfig

    data = DataConfig(source=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      text_field=args.text_field, val_fraction=1e-9)
    splits = build_token_splits(data)
    tokens = np.concatenate([splits.train, splits.val])
    paths = write_token_shards(tokens, args.out, splits.tokenizer, shard_tokens=args.shard_tokens)
    print(f"{len(tokens):,} tokens in {len(paths)} shard(s) under {args.out} (vocabulary {splits.tokenizer.vocab_size})")
    return 0


def _analyze(args) -> int:
    import torch

    from flash_depth.analysis import analyze_model, write_outputs
    from flash_depth.data.pipeline import build_token_splits, sample_batch
    from flash_depth.train.checkpoint import load_model, resolve_checkpoint, run_config, run_folder
    from flash_depth.train.config import DataConfig

    checkpoints = [resolve_checkpoint(c) for c in args.checkpoints]  # all checked before the slow part
    _no_loading_bars()
    results = {}
    for ckpt in checkpoints:
        model = load_model(ckpt, attention_backend="reference").float()
        data = DataConfig(source=args.data) if args.data else DataConfig(**run_config(ckpt).get("data", {}))
        splits = build_token_splits(data, tokenizer_path=ckpt / "tokenizer.json")
        batches = [torch.from_numpy(sample_batch(splits.val, args.batch_size, args.seq_len, (0, 7, i)))
                   for i in range(args.batches)]
        results[run_folder(ckpt).name] = analyze_model(model, batches, threshold=args.threshold, progress=True)
    out = Path(args.out) if args.out else run_folder(checkpoints[0]) / "analysis"
    written = write_outputs(results, out)
    print(json.dumps(written, indent=1))
    return 0


def _generate(args) -> int:
    import random

    import torch

    from flash_depth.train.checkpoint import resolve_checkpoint
    from flash_depth.eval.generation import TextStream, generate_ids, load_for_generation, prompt_ids

    ckpt = resolve_checkpoint(args.checkpoint)
    _no_loading_bars()
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_for_generation(ckpt, args.device)
    ids = prompt_ids(tokenizer, prompt)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    torch.manual_seed(seed)
    try:
        new = generate_ids(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, streamer=TextStream(tokenizer, sys.stdout, prompt),
                           fast={"auto": None, "on": True, "off": False}[args.fast_decode])
        print()
    except BrokenPipeError:  # the reader (head, a pager) stopped reading: so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else Python's exit flush fails again
        return 0
    if new and new[-1] == tokenizer.eos_id:
        why = "stopped at <|endoftext|>"
    elif len(new) < args.max_new_tokens:
        why = f"stopped at max_position_embeddings={model.config.max_position_embeddings}"
    else:
        why = "--max-new-tokens reached"
    sampled = f", temperature {args.temperature}, seed {seed}" if args.temperature > 0 else ", greedy"
    print(f"[{len(new)} token{'' if len(new) == 1 else 's'}, {why}{sampled}]", file=sys.stderr)
    return 0


def _demo(args) -> int:
    from flash_depth.demo import main as demo_main

    return demo_main([])


def _vit_demo(args) -> int:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        return _fail(args.command, "the digits images come from scikit-learn, which is not installed: "
                                   "pip install 'flash-depth[vision]'")
    import torch

    from flash_depth.models import FlashDepthViTConfig, FlashDepthViTForImageClassification
    from flash_depth.train.vision import accuracy, load_digits_split, train_epoch

    # The matrices (17 tokens x 64) are small: on a shared 2-core machine one thread ran an epoch 5x
    # faster than two, whose second thread kept waiting for a core busy with other work.
    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = load_digits_split(seed=args.seed)
    runs = {}
    for mech in args.mechanisms:
        torch.manual_seed(args.seed)  # every mechanism's initial weights from the same seed
        cfg = FlashDepthViTConfig.from_preset("digits", depth_mechanism=mech, num_hidden_layers=args.layers)
        model = FlashDepthViTForImageClassification(cfg)
        runs[mech] = (model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05),
                      torch.Generator().manual_seed(args.seed))  # the same batches for every mechanism
    print(f"scikit-learn digits: {len(train_y)} training / {len(test_y)} test images, 8x8, patches of 2x2 "
          f"(16 + CLS); DeiT-style encoder, {args.layers} layers, width {cfg.hidden_size}, {cfg.num_attention_heads} "
          f"heads; AdamW lr {args.lr}, batch {args.batch_size}")
    print("test accuracy after each epoch:")
    print("epoch " + "".join(f"{mech:>16}" for mech in args.mechanisms))
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        row = []
        for model, opt, order in runs.values():
            loss = train_epoch(model, opt, train_x, train_y, args.batch_size, order)
            if not math.isfinite(loss):
                return _fail(args.command, f"the training loss became {loss} in epoch {epoch}; lower --lr")
            row.append(f"{accuracy(model, test_x, test_y):>16.3f}")
        print(f"{epoch:>5} " + "".join(row), flush=True)
    print(f"[{time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where its help already says it (defaults taken from
    the run) and where there is none to show (flags, required options, None)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: ``kind`` (int or float) within [low, high] ((low, high] with low_open);
    the message says what it got and what it wants."""
    want = ("an integer" if kind is int else "a number") + (
        f" in ({low}, {high}]" if low_open else f" in [{low}, {high}]" if high is not None else f" >= {low}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants {want}, got {text!r}") from None
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"wants {want}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from flash_depth import __version__

    positive = _number(int, 1)
    parser = _Parser(prog="flash-depth", formatter_class=_HelpFormatter,
                     description="Depth-retrieval transformers: train, evaluate, compare, analyze, generate.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, **kw):
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter, **kw)
        p.set_defaults(parser=p)  # a leftover argument is the command's error, naming its --help
        return p

    where = "a run folder (holding checkpoint/) or a checkpoint folder"
    device = "auto (CUDA when available, else CPU), cpu, cuda, cuda:1 ..."
    t = command("train", "train a model (default: tiny MoDA model on the embedded Shakespeare corpus)")
    t.add_argument("--config", help="YAML file with model/data/train sections, see configs/ "
                                    "(default: the built-in tiny run, as configs/tiny-shakespeare.yaml)")
    t.add_argument("--out", help="run folder, new unless --resume (default: runs/DATE-TIME)")
    t.add_argument("--max-steps", type=positive, help="override train.max_steps (default: the config's)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--device", default="auto", help=device)
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.depth_mechanism=attnres_block train.max_steps=2000")
    t.set_defaults(func=_train)

    e = command("eval", "held-out perplexity and bits per byte of a checkpoint")
    e.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help=where)
    e.add_argument("--data", help="data source: file, folder, .jsonl, hf:NAME, shards (default: the run's own "
                                  "held-out split)")
    e.add_argument("--text-field", default="text", help="JSON field holding the text, for a .jsonl or hf: --data")
    e.add_argument("--seq-len", type=positive, help="tokens per window (default: the run's train.seq_len, "
                                                    "512 without a run_config.yaml)")
    e.add_argument("--max-tokens", type=positive, default=200_000, help="held-out tokens to score at most")
    e.add_argument("--device", default="auto", help=device)
    e.add_argument("--mc-task", metavar="TASK.jsonl",
                   help="instead of perplexity: accuracy on a local multiple-choice JSONL through "
                        "lm-evaluation-harness (default: off)")
    e.set_defaults(func=_eval)

    c = command("compare", "validation curves of several runs on one plot + a markdown table")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders (holding metrics.jsonl)")
    c.add_argument("--out", help="the plot, FILE.png (the table goes beside it as FILE.md), or a folder for "
                                 "compare.png and compare.md (default: the first RUN folder)")
    c.set_defaults(func=_compare)

    a = command("analyze", "diagnostics and figures of one or several checkpoints (overlaid): depth mass (per slot "
                           "and slot distance, windows included), attention sink, layer usefulness, norms, AttnRes, "
                           "mHC/HC and MUDD mixing weights")
    a.add_argument("checkpoints", nargs="+", metavar="RUN_OR_CHECKPOINT", help=where)
    a.add_argument("--data", help="data source (default: each run's own held-out split)")
    a.add_argument("--out", help="folder for the PNGs, analysis.json and report.md (default: analysis/ in the "
                                 "first run folder)")
    a.add_argument("--batches", type=positive, default=4, help="held-out batches to run")
    a.add_argument("--batch-size", type=positive, default=2, help="sequences per batch")
    a.add_argument("--seq-len", type=positive, default=128, help="tokens per sequence")
    a.add_argument("--threshold", type=_number(float, 0), default=0.01,
                   help="1 - cos under which a sublayer counts as identity")
    a.set_defaults(func=_analyze)

    g = command("generate", "continue a prompt with a trained model: the prompt, then the new text as it comes, "
                            "on stdout")
    g.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help=where)
    g.add_argument("--prompt", default="", metavar="TEXT",
                   help="text to continue, or - to read it from stdin; the model sees it after <|endoftext|>, as "
                        "a document's start. Checkpoints from before <|endoftext|> have no such token: they need "
                        "a non-empty prompt and do not stop before --max-new-tokens (default: empty)")
    g.add_argument("--max-new-tokens", type=positive, default=200, metavar="N",
                   help="tokens to generate at most (fewer if max_position_embeddings ends first)")
    g.add_argument("--temperature", type=_number(float, 0), default=0.8, metavar="T",
                   help="softmax temperature of the sampling; 0: greedy, the most likely token every time "
                        "(--top-k, --top-p and --seed unused)")
    g.add_argument("--top-k", type=_number(int, 0), default=0, metavar="K",
                   help="sample among the k most likely tokens; 0: all")
    g.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0, metavar="P",
                   help="sample among the most likely tokens whose probabilities sum to p (nucleus); 1: all")
    g.add_argument("--seed", type=_number(int, 0), metavar="N",
                   help="random seed of the sampling, to repeat a sample (default: a fresh one, printed on stderr)")
    g.add_argument("--device", default="auto", help=device)
    g.add_argument("--fast-decode", choices=("auto", "on", "off"), default="auto",
                   help="a static KV cache, and on CUDA each decoding step compiled and replayed from a CUDA graph "
                        "(the first call compiles for a while); off: the dynamic cache, eager steps (same greedy "
                        "tokens). auto: on for CUDA")
    g.set_defaults(func=_generate)

    k = command("tokenize", "pre-tokenize a text source into .bin shards for large runs")
    k.add_argument("--data", required=True, help="text source (file, folder, .jsonl, hf:NAME, shakespeare)")
    k.add_argument("--out", required=True, help="folder for shard_*.bin, meta.json, tokenizer.json")
    k.add_argument("--tokenizer", default="bpe", help="bpe, bytes, or a tokenizer.json")
    k.add_argument("--vocab-size", type=positive, default=32768, help="BPE vocabulary, <|endoftext|> included")
    k.add_argument("--text-field", default="text", help="JSON field holding the text, for a .jsonl or hf: --data")
    k.add_argument("--shard-tokens", type=positive, default=50_000_000, help="tokens per .bin shard")
    k.set_defaults(func=_tokenize)
    d = command("demo", "MoDA on random tensors: error and speed")
    d.set_defaults(func=_demo)
    v = command("vit-demo", "train the vision encoder on scikit-learn's 8x8 digits (offline, CPU), one model per "
                            "depth mechanism on the same batches; prints test accuracy after each epoch")
    v.add_argument("--mechanisms", nargs="+", default=["residual", "moda"], metavar="M",
                   help="depth mechanisms to compare: values of the encoder's depth_mechanism (residual, moda, "
                        "depth_attention, attnres_full, attnres_block, denseformer)")
    v.add_argument("--epochs", type=positive, default=8, help="passes over the training images")
    v.add_argument("--layers", type=positive, default=4, help="encoder blocks")
    v.add_argument("--batch-size", type=positive, default=32, help="images per step")
    v.add_argument("--lr", type=_number(float, 0, 1, low_open=True), default=1e-3, help="AdamW learning rate")
    v.add_argument("--seed", type=_number(int, 0), default=0, help="data split, batch order and initial weights")
    v.set_defaults(func=_vit_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may come before and after options (train key=v --out DIR key=v): argparse leaves
    # the later ones over; anything else left over is an error.
    if rest and getattr(args, "overrides", None) is not None and all("=" in a and not a.startswith("-") for a in rest):
        args.overrides += rest
    elif rest:
        args.parser.error(f"unrecognized arguments: {' '.join(rest)}")
    import torch

    from flash_depth.data.sources import DataError
    from flash_depth.train.checkpoint import CheckpointError
    from flash_depth.train.config import ConfigError
    from flash_depth.train.loop import TrainingError

    try:
        return args.func(args)
    except (ConfigError, DataError, TrainingError, CheckpointError, ValueError) as err:
        return _fail(args.command, str(err))
    except OSError as err:
        return _fail(args.command, _os_error(err))
    except torch.cuda.OutOfMemoryError as err:
        return _fail(args.command, f"out of GPU memory ({str(err).splitlines()[0]}); lower train.batch_size or "
                                   "train.seq_len, or set train.activation_checkpointing=true")
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


def _os_error(err: OSError) -> str:
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {err.filename or 'a file'}"
    if err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def _fail(command: str, message: str) -> int:
    """A user-caused fault: one line on stderr, exit status 2."""
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"flash-depth {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
