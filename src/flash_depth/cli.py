"""``flash-depth`` command line: train, eval, compare, demo.

    flash-depth train [--config FILE] [--out DIR] [--max-steps N] [--resume] [--device DEV] [key=value ...]
    flash-depth eval CHECKPOINT [--data SOURCE] [--seq-len N] [--mc-task TASK.jsonl]
    flash-depth compare RUN_DIR [RUN_DIR ...] [--out FILE.png]
    flash-depth tokenize --data SOURCE --out DIR
    flash-depth analyze CHECKPOINT [CHECKPOINT ...] [--data SOURCE] [--out DIR]
    flash-depth demo
"""

from __future__ import annotations

import argparse
import json
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


def _eval(args) -> int:
    from flash_depth.train.config import DataConfig
    from flash_depth.train.evaluate import evaluate_checkpoint

    if args.mc_task:
        import tempfile

        from flash_depth.eval.lm_harness import run_multiple_choice

        with tempfile.TemporaryDirectory() as work:
            result = run_multiple_choice(args.checkpoint, args.mc_task, work_dir=work, device=args.device)
        print(json.dumps(result, indent=1))
        return 0
    data = DataConfig(source=args.data, text_field=args.text_field) if args.data else _run_data(Path(args.checkpoint))
    result = evaluate_checkpoint(args.checkpoint, data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                 device=args.device)
    print(json.dumps(result, indent=1))
    return 0


def _compare(args) -> int:
    from flash_depth.train.plots import compare_table, plot_runs

    runs = [Path(r) for r in args.runs]
    png = Path(args.out)
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
    from flash_depth.models import FlashDepthForCausalLM
    from flash_depth.train.config import DataConfig

    results = {}
    for ckpt in map(Path, args.checkpoints):
        if not (ckpt / "config.json").exists():
            raise FileNotFoundError(f"{ckpt} is not a checkpoint folder (no config.json)")
        model = FlashDepthForCausalLM.from_pretrained(ckpt, attention_backend="reference").float()
        data = DataConfig(source=args.data) if args.data else _run_data(ckpt)
        splits = build_token_splits(data, tokenizer_path=ckpt / "tokenizer.json")
        batches = [torch.from_numpy(sample_batch(splits.val, args.batch_size, args.seq_len, (0, 7, i)))
                   for i in range(args.batches)]
        name = ckpt.parent.name if ckpt.name == "checkpoint" else ckpt.name
        results[name] = analyze_model(model, batches, threshold=args.threshold, progress=True)
    written = write_outputs(results, Path(args.out))
    print(json.dumps(written, indent=1))
    return 0


def _run_data(checkpoint: Path):
    import yaml

    from flash_depth.train.config import DataConfig

    run_cfg = checkpoint / "run_config.yaml"
    return DataConfig(**yaml.safe_load(run_cfg.read_text())["data"]) if run_cfg.exists() else DataConfig()


def _demo(args) -> int:
    from flash_depth.demo import main as demo_main

    return demo_main([])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flash-depth", description="Depth-retrieval transformers: train, evaluate, compare.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (default: tiny MoDA model on the embedded Shakespeare corpus)")
    t.add_argument("--config", help="YAML file with model/data/train sections (see configs/)")
    t.add_argument("--out", help="run folder (default runs/DATE-TIME); must be new unless --resume")
    t.add_argument("--max-steps", type=int, help="override train.max_steps")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.depth_mechanism=attnres_block")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="held-out perplexity and bits per byte of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="data source (default: the run's own)")
    e.add_argument("--text-field", default="text")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=200_000)
    e.add_argument("--device", default="auto")
    e.add_argument("--mc-task", help="instead: accuracy on a local multiple-choice JSONL through lm-evaluation-harness")
    e.set_defaults(func=_eval)
    c = sub.add_parser("compare", help="validation curves of several runs on one plot + a markdown table")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", default="compare.png")
    c.set_defaults(func=_compare)
    a = sub.add_parser("analyze", help="diagnostics and figures of one or several checkpoints (overlaid)")
    a.add_argument("checkpoints", nargs="+")
    a.add_argument("--data", help="data source (default: each run's own held-out split)")
    a.add_argument("--out", default="analysis", help="folder for the PNGs, analysis.json and report.md")
    a.add_argument("--batches", type=int, default=4)
    a.add_argument("--batch-size", type=int, default=2)
    a.add_argument("--seq-len", type=int, default=128)
    a.add_argument("--threshold", type=float, default=0.01, help="1 - cos under which a sublayer counts as identity")
    a.set_defaults(func=_analyze)
    k = sub.add_parser("tokenize", help="pre-tokenize a text source into .bin shards for large runs")
    k.add_argument("--data", required=True, help="text source (file, folder, .jsonl, hf:NAME, shakespeare)")
    k.add_argument("--out", required=True, help="folder for shard_*.bin, meta.json, tokenizer.json")
    k.add_argument("--tokenizer", default="bpe", help="bpe, bytes, or a tokenizer.json")
    k.add_argument("--vocab-size", type=int, default=32768)
    k.add_argument("--text-field", default="text")
    k.add_argument("--shard-tokens", type=int, default=50_000_000)
    k.set_defaults(func=_tokenize)
    d = sub.add_parser("demo", help="MoDA on random tensors: error and speed")
    d.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may come before and after options (train key=v --out DIR key=v): argparse leaves
    # the later ones over; anything else left over is an error.
    if rest and getattr(args, "overrides", None) is not None and all("=" in a and not a.startswith("-") for a in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
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
