"""The training loop: one process or torchrun (DDP / FSDP2), checkpoints that lose nothing."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from flash_depth._device import resolve_device
from flash_depth.data.pipeline import build_token_splits, document_positions, sample_batch
from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

from .checkpoint import (CheckpointError, check_checkpoint_files, find_checkpoint, load_model, load_trainer_state,
                         write_atomic, write_checkpoint, writing)
from .config import DEFAULT_PRESET, ConfigError, RunConfig, load_config, resume_config, setting_keys
from .cuda_graph import GraphedStep, prepare_for_capture, set_lr


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says what)."""


# ---------------------------------------------------------------- distributed
def _dist_setup(device_arg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (shared hosts)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _wrap(model, cfg: RunConfig, world: int, device):
    if world == 1:
        return model
    if cfg.train.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _full_state(model, optimizer, world: int, fsdp: bool):
    """Full (unsharded) model and optimizer state, on CPU, identical on every rank's call."""
    if world > 1 and fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    inner = model.module if hasattr(model, "module") else model
    return inner.state_dict(), optimizer.state_dict()


# ---------------------------------------------------------------- resuming
def run_checkpoint(out: Path) -> Path:
    """The checkpoint a resume of the run in ``out`` starts from; a TrainingError if there is none."""
    ckpt = find_checkpoint(out) if out.is_dir() else None
    if ckpt is None:
        hint = " (the run stopped before its first checkpoint: remove the folder to start again)" if out.is_dir() else ""
        raise TrainingError(f"--resume: no checkpoint in {out}{hint}")
    return ckpt


def saved_run_config(ckpt: Path) -> tuple[RunConfig, dict, str]:
    """The config a resume continues with: the checkpoint's copy of the run's config (with the
    changes earlier resumes made), the checkpoint's model config.json as a dict, and the file read."""
    check_checkpoint_files(ckpt)
    path = ckpt / "run_config.yaml"
    if not path.exists():
        raise CheckpointError(f"{path} is missing; {ckpt} is not a whole checkpoint")
    return load_config(path), json.loads((ckpt / "config.json").read_text()), str(path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps past ``step`` (logged after the checkpoint a resume starts from,
    or cut short by a kill), so that the resumed run logs each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line a kill cut short
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


class _Progress:
    """Progress on stderr: a tqdm bar on a terminal; elsewhere (a log file, where a bar prints
    every redraw) a plain line every ``every`` seconds."""

    def __init__(self, total: int, initial: int, every: float):
        self.total, self.every, self.last = total, every, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, fields: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.print(f"train: step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()))

    def print(self, line: str) -> None:
        """A line that the bar does not overdraw."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------- schedule
def lr_at(step: int, t) -> float:
    """Linear warmup to t.lr, cosine decay to t.min_lr at t.max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- main entry
def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, device: str = "auto",
          max_steps: int | None = None, progress: bool = True) -> dict:
    """Train per ``cfg`` into ``out``; returns the summary (also written to out/summary.json).
    With ``resume``, the run's saved config holds: ``cfg`` may differ from it only in
    ``config.RESUMABLE`` keys."""
    out = Path(out)
    if max_steps is not None:
        if max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
        cfg.train.max_steps = max_steps
    rank, world, dev = _dist_setup(device)
    if cfg.train.cuda_graph:  # checked before anything is written
        blockers = [what for what, present in ((f"device {dev}", dev.type != "cuda"), (f"{world} processes", world > 1),
                                               ("train.activation_checkpointing=true", cfg.train.activation_checkpointing))
                    if present]
        if blockers:
            raise ConfigError(f"train.cuda_graph=true needs one CUDA GPU, one process and no activation "
                              f"checkpointing; got {', '.join(blockers)}")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a run folder")
    ckpt = trainer = None
    changes = {}
    if resume:
        ckpt = run_checkpoint(out)
        saved, model_defaults, where = saved_run_config(ckpt)
        cfg, changes = resume_config(saved, cfg, [*setting_keys(saved), *setting_keys(cfg)], model_defaults, where)
        trainer = load_trainer_state(ckpt)
        if trainer["step"] >= cfg.train.max_steps:
            raise TrainingError(f"the run in {out} is at step {trainer['step']} of train.max_steps="
                                f"{cfg.train.max_steps}; pass --max-steps N (N > {trainer['step']}) to train it further")
    elif out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    t = cfg.train

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar: ours
    splits = build_token_splits(cfg.data, tokenizer_path=ckpt / "tokenizer.json" if ckpt else None)
    for name, tokens in (("training", splits.train), ("held-out", splits.val)):
        if len(tokens) < t.seq_len + 1:
            raise ConfigError(f"train.seq_len={t.seq_len} needs {t.seq_len + 1} tokens per window, but the {name} "
                              f"split of {cfg.data.source} has {len(tokens)}")
    model_fields = dict(cfg.model)
    preset = model_fields.pop("preset", DEFAULT_PRESET)
    model_fields.setdefault("vocab_size", splits.tokenizer.vocab_size)
    if model_fields["vocab_size"] < splits.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_fields['vocab_size']} < tokenizer vocabulary {splits.tokenizer.vocab_size}")
    model_fields.setdefault("max_position_embeddings", max(t.seq_len, 512))
    model_cfg = FlashDepthConfig.from_preset(preset, **model_fields, **splits.tokenizer.special_ids())
    eos_id = splits.tokenizer.eos_id
    if cfg.data.document_masking and eos_id is None:
        raise ConfigError("data.document_masking=true needs <|endoftext|> between documents; this run's tokenizer "
                          "predates it")

    def documents(x):
        """Keywords that keep attention within documents under data.document_masking."""
        return {"position_ids": document_positions(x, eos_id)} if cfg.data.document_masking else {}

    torch.manual_seed(t.seed)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "skipped": 0}
    if ckpt is None:
        model = FlashDepthForCausalLM(model_cfg)
    else:
        saved_arch = FlashDepthConfig.from_pretrained(ckpt)
        for key in ("depth_mechanism", "norm_position", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "ffn_kv", "attn_kv_proj", "attnres_blocks"):
            if getattr(saved_arch, key) != getattr(model_cfg, key):
                raise TrainingError(f"checkpoint {ckpt} has {key}={getattr(saved_arch, key)!r} but its run config "
                                    f"gives {getattr(model_cfg, key)!r}; the checkpoint does not belong to this run")
        model = load_model(ckpt)
        state.update({k: trainer[k] for k in state if k in trainer})
        torch.set_rng_state(trainer["torch_rng"])
    model.to(dev)
    if t.compile:
        model.model.compile_blocks()
    if t.activation_checkpointing:
        try:
            model.model.set_activation_checkpointing(True)
        except ValueError as err:
            raise ConfigError(f"train.activation_checkpointing: {err}") from None
    wrapped = _wrap(model, cfg, world, dev)
    decay, no_decay = [], []
    for name, p in wrapped.named_parameters():  # weight decay on matrices, not on embeddings, norms, scalars
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    # fused: the AdamW that takes found_inf, which turns a non-finite step into a no-op on the device
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95), fused=True)
    if trainer is not None:
        if world > 1 and t.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(wrapped, optimizer, trainer["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(trainer["optimizer"])
        for group in optimizer.param_groups:  # checkpoints of unfused CPU steps (earlier versions) say otherwise
            group["fused"] = True
    prepare_for_capture(optimizer, dev if t.cuda_graph else None)
    # no autocast weight cache: a captured step must not keep casts from its capture
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if dev.type == "cuda"
                else nullcontext())

    metrics = writer = None
    if rank == 0:  # the run folder is written from here on: every check above came first
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            write_atomic(out / "run_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        else:
            _truncate_metrics(out / "metrics.jsonl", state["step"])
            with writing(out / "resumes.jsonl"), (out / "resumes.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": state["step"], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "changes": changes}) + "\n")
        with writing(out / "metrics.jsonl"):
            metrics = (out / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events logged past its checkpoint, as in metrics.jsonl
            writer = SummaryWriter(out / "tensorboard", purge_step=state["step"] + 1 if ckpt else None)
        except ImportError:
            writer = None

    def log(record):
        if rank == 0:
            with writing(out / "metrics.jsonl"):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if writer is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, record["step"])

    def evaluate() -> float:
        wrapped.eval()
        losses = []
        with torch.no_grad(), autocast:
            for i in range(t.eval_batches):
                x = torch.from_numpy(sample_batch(splits.val, t.batch_size, t.seq_len, (t.seed, 10**9, i))).to(dev)
                losses.append(wrapped(x, labels=x, **documents(x)).loss.float())
        wrapped.train()
        loss = torch.stack(losses).mean()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        return loss.item()

    def save():
        model_state, optim_state = _full_state(wrapped, optimizer, world, t.distributed == "fsdp")
        failure = None
        if rank == 0:
            try:
                write_checkpoint(out, model, model_state, optim_state, {**state, "torch_rng": torch.get_rng_state()},
                                 splits.tokenizer, cfg.to_dict())
            except CheckpointError as err:
                failure = err
        if world > 1:  # every rank stops when rank 0 could not save, rather than wait for it
            failed = torch.tensor(float(failure is not None), device=dev)
            torch.distributed.broadcast(failed, 0)
            if failed.item() and failure is None:
                raise TrainingError("rank 0 could not write the checkpoint (its error says why)")
        if failure is not None:
            raise failure

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world

    def optimizer_step(x):
        """x ``[grad_accum, batch, seq]``: forward/backward passes, clipping, AdamW. No host sync
        (train.cuda_graph replays it from a graph): returns the loss, the gradient norm and 1.0
        where the update was skipped as non-finite, as tensors."""
        total = torch.zeros((), device=dev)
        for micro in range(t.grad_accum):
            sync = nullcontext() if micro == t.grad_accum - 1 or world == 1 or t.distributed == "fsdp" else wrapped.no_sync()
            with sync, autocast:
                loss = wrapped(x[micro], labels=x[micro], **documents(x[micro])).loss / t.grad_accum
            loss.backward()
            total += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), t.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 gives a DTensor
            grad_norm = grad_norm.full_tensor()
        # The norm is non-finite iff some gradient is. found_inf makes fused AdamW leave weights,
        # moments and step count as they are, decided on the device; the host reads it afterwards.
        skipped = (~(torch.isfinite(grad_norm) & torch.isfinite(total))).float()
        if world > 1:  # every rank skips alike, whichever rank's loss overflowed
            torch.distributed.all_reduce(skipped, op=torch.distributed.ReduceOp.MAX)
        optimizer.found_inf = skipped  # the attribute torch.amp.GradScaler sets for fused optimizers
        optimizer.step()
        del optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)
        return total, grad_norm, skipped

    run_step = GraphedStep(optimizer_step) if t.cuda_graph else optimizer_step
    last_val, in_a_row = None, 0
    bar = _Progress(t.max_steps, state["step"], t.progress_every) if rank == 0 and progress else None
    wrapped.train()
    try:
        while state["step"] < t.max_steps:
            step = state["step"] + 1  # 1-based, as logged and saved
            t0 = time.perf_counter()
            set_lr(optimizer, lr_at(step - 1, t))
            x = torch.stack([torch.from_numpy(sample_batch(splits.train, t.batch_size, t.seq_len,
                                                           (t.seed, step - 1, micro, rank)))
                             for micro in range(t.grad_accum)]).to(dev)
            total, grad_norm, skipped = torch.stack([v.float() for v in run_step(x)]).tolist()  # one host sync
            if skipped:
                in_a_row += 1
                what = (f"step {step} had a non-finite {'loss' if not math.isfinite(total) else 'gradient'} "
                        f"(loss {total:.4g}, gradient norm {grad_norm:.4g})")
                last = f"the last good checkpoint is {find_checkpoint(out) or 'none (no checkpoint yet)'}"
                if t.nonfinite == "stop":
                    raise TrainingError(f"{what}; its update was not applied and the run stopped, {last} "
                                        "(train.nonfinite=skip skips such steps)")
                if in_a_row >= t.max_skips:
                    raise TrainingError(f"{what}; the run stopped after {in_a_row} skipped steps in a row "
                                        f"(train.max_skips={t.max_skips}), {last}")
                if bar is not None:
                    bar.print(f"{what}; update skipped")
            else:
                in_a_row = 0
            dt = time.perf_counter() - t0
            state["step"] = step
            state["tokens"] += tokens_per_step
            state["elapsed"] += dt
            state["skipped"] += int(skipped)
            if not skipped and (step % t.log_every == 0 or step == t.max_steps):
                log({"step": step, "loss": total, "lr": lr_at(step - 1, t), "grad_norm": grad_norm,
                     "tokens": state["tokens"], "tokens_per_s": tokens_per_step / dt, "skipped_steps": state["skipped"]})
            if step % t.eval_every == 0 or step == t.max_steps:
                last_val = evaluate()
                log({"step": step, "val_loss": last_val, "tokens": state["tokens"]})
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                save()
            if bar is not None:
                bar.update(step, {"loss": f"{total:.3f}", "val": f"{last_val:.3f}" if last_val is not None else "-",
                                  "tok_s": f"{tokens_per_step / dt:,.0f}"})
    finally:  # an error after this point prints below a closed bar
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()
    summary = {"steps": state["step"], "tokens": state["tokens"], "final_val_loss": last_val,
               "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9), "params": model.num_parameters(),
               "depth_mechanism": model_cfg.depth_mechanism, "norm_position": model_cfg.norm_position,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "world_size": world,
               "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
               "layers": model_cfg.num_hidden_layers, "skipped_steps": state["skipped"]}
    if rank == 0:
        write_atomic(out / "summary.json", json.dumps(summary, indent=1))
        from .plots import plot_runs

        with writing(out / "loss.png"):
            plot_runs([out], out / "loss.png")
    if world > 1:
        # Every rank waits here (the GIL released) until the others are done: a gloo worker still
        # freeing the last collective's tensors needs the GIL, and tearing the group down while it
        # waits for it deadlocks (seen on CPU runs, ~1 in 3, in ProcessGroupGloo's destructor).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary
