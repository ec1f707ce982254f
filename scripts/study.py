"""Depth-mechanism study: train a set of models on the same tokens, write results as each finishes.

    python scripts/study.py --config configs/study/depth-mechanisms.yaml --out runs/study        # all models
    python scripts/study.py --config configs/study/depth-mechanisms.yaml --out runs/study --only small-48/moda-ffnkv-post
    python scripts/study.py --config configs/study/depth-mechanisms.yaml --out runs/study --smoke  # 2 steps each, tiny

Each model trains into OUT/PRESET/NAME-sSEED. A finished model (summary.json present) is skipped,
and an interrupted one resumes from its checkpoint, so the study can span several sessions.
After every model OUT/results.json, OUT/results.md and one validation-curve plot per preset are
rewritten; at the end the analysis pair named in the config is analysed into OUT/analysis.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import yaml

from flash_depth.models import FlashDepthConfig
from flash_depth.models.accounting import flops_per_token
from flash_depth.train.config import load_config
from flash_depth.train.loop import find_checkpoint, train
from flash_depth.train.plots import plot_runs

SMOKE = {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "attnres_blocks": 2},
         "train": {"max_steps": 2, "seq_len": 32, "batch_size": 2, "eval_every": 1, "eval_batches": 1,
                   "checkpoint_every": 1, "log_every": 1}}


def _runs(study: dict, smoke: bool):
    for entry in study["models"]:
        for seed in entry.get("seeds", [0]):
            preset = "tiny" if smoke else entry["preset"]
            yield entry["preset"], f"{entry['name']}-s{seed}", preset, seed, entry


def _overrides(common: dict, entry: dict, preset: str, seed: int, smoke: bool) -> list[str]:
    sections = copy.deepcopy(common)
    sections.setdefault("model", {}).update({"preset": preset, **entry.get("model", {})})
    sections.setdefault("train", {})["seed"] = seed
    if smoke:
        for section, values in SMOKE.items():
            sections.setdefault(section, {}).update(values)
    return [f"{section}.{key}={json.dumps(value)}" for section, values in sections.items()
            for key, value in values.items()]


def _row(run: Path, preset: str, name: str, cfg) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    model_fields = {k: v for k, v in cfg.model.items() if k != "preset"}
    model_cfg = FlashDepthConfig.from_preset(cfg.model["preset"], **model_fields)
    return {"preset": preset, "run": name, "mechanism": summary["depth_mechanism"], "norm": summary["norm_position"],
            "params": summary["params"], "gflops_per_token": flops_per_token(model_cfg, cfg.train.seq_len) / 1e9,
            "tokens": summary["tokens"], "final_val_loss": summary["final_val_loss"],
            "tokens_per_s": summary["tokens_per_s"], "peak_memory_gib": summary.get("peak_memory_gib"),
            "device": summary["device"], "finished": summary.get("finished")}


def write_results(out: Path, rows: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| preset | run | mechanism | norm | params | GFLOPs/token | tokens | final val loss | tokens/s "
             "| peak GiB | device |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["preset"], r["final_val_loss"] or 1e9)):
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        loss = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        lines.append(f"| {r['preset']} | {r['run']} | {r['mechanism']} | {r['norm']} | {r['params'] / 1e6:.1f}M "
                     f"| {r['gflops_per_token']:.3f} | {r['tokens']:,} | {loss} | {r['tokens_per_s']:,.0f} "
                     f"| {peak} | {r['device']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    for preset in sorted({r["preset"] for r in rows}):
        runs = [out / preset / r["run"] for r in rows if r["preset"] == preset]
        plot_runs(runs, out / f"val_curves_{preset}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_config = Path(__file__).parent.parent / "configs" / "study" / "depth-mechanisms.yaml"
    parser.add_argument("--config", default=str(default_config))
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="PRESET/NAME-sSEED runs to train (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 steps: checks the plumbing")
    parser.add_argument("--data", help="override common.data.source")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--analysis", nargs=2, metavar="PRESET/RUN",
                        help="the pair of finished runs to analyse (default: the config's `analysis`)")
    args = parser.parse_args(argv)
    study = yaml.safe_load(Path(args.config).read_text())
    common = study.get("common", {})
    if args.data:
        common.setdefault("data", {})["source"] = args.data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(out / group / name, group, name, load_config(None, _overrides(common, entry, preset, seed, args.smoke)))
            for group, name, preset, seed, entry in _runs(study, args.smoke)]

    def finished_rows():  # every finished run, whichever invocation trained it
        return [_row(run, group, name, cfg) for run, group, name, cfg in runs if (run / "summary.json").exists()]

    write_results(out, finished_rows())
    for run, group, name, cfg in runs:
        selected = not args.only or f"{group}/{name}" in args.only
        if selected and not (run / "summary.json").exists():
            resume = run.exists() and find_checkpoint(run) is not None
            if run.exists() and not resume:
                raise SystemExit(f"{run} holds an unfinished run without a checkpoint; remove it to retrain")
            print(f"== {group}/{name} ({'resuming' if resume else 'training'})", file=sys.stderr, flush=True)
            train(cfg, run, resume=resume, device=args.device)
            summary_file = run / "summary.json"
            summary = json.loads(summary_file.read_text())
            summary["finished"] = time.strftime("%Y-%m-%d %H:%M")
            summary_file.write_text(json.dumps(summary, indent=1))
            write_results(out, finished_rows())
    pair = [out / p for p in (args.analysis or study.get("analysis", []))]
    if not args.smoke and pair and all((p / "checkpoint").exists() for p in pair):
        from flash_depth.cli import main as cli

        cli(["analyze", *[str(p / "checkpoint") for p in pair], "--out", str(out / "analysis"),
             "--batches", "4", "--seq-len", "512"])
    print(f"results: {out / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
