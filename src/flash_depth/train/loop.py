"""The training loop: one process or torchrun (DDP / FSDP2), checkpoints that lose nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from flash_depth._device import resolve_device
from flash_depth.data.pipeline import build_token_splits, document_positions, sample_batch
from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

from .config import ConfigError, RunConfig
from .cuda_graph import GraphedStep, prepare_for_capture, set_lr

CHECKPOINT = "checkpoint"


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


# ---------------------------------------------------------------- checkpoints
def _atomic_checkpoint(out: Path, model: FlashDepthForCausalLM, model_state, opt_state, trainer_state, tokenizer,
                       run_cfg: RunConfig) -> None:
    """Write everything into a temporary folder, then swap it in with renames, so a process killed
    at any moment leaves either the previous or the new checkpoint whole."""
    tmp = out / f".{CHECKPOINT}-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
    tokenizer.save(tmp / "tokenizer.json")
    torch.save({"optimizer": opt_state, **trainer_state}, tmp / "trainer_state.pt")
    (tmp / "run_config.yaml").write_text(yaml.safe_dump(run_cfg.to_dict(), sort_keys=False))
    final, old = out / CHECKPOINT, out / f".{CHECKPOINT}-old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def find_checkpoint(out: Path) -> Path | None:
    """The run's checkpoint; the previous one if a swap was interrupted between its renames."""
    for name in (CHECKPOINT, f".{CHECKPOINT}-old"):
        if (out / name / "trainer_state.pt").exists():
            return out / name
    return None


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
    """Train per ``cfg`` into ``out``; returns the summary (also written to out/summary.json)."""
    t = cfg.train
    rank, world, dev = _dist_setup(device)
    out = Path(out)
    if max_steps is not None:
        t.max_steps = max_steps
    if t.cuda_graph:  # checked before anything is written
        blockers = [what for what, present in ((f"device {dev}", dev.type != "cuda"), (f"{world} processes", world > 1),
                                               ("train.activation_checkpointing=true", t.activation_checkpointing))
                    if present]
        if blockers:
            raise ConfigError(f"train.cuda_graph=true needs one CUDA GPU, one process and no activation "
                              f"checkpointing; got {', '.join(blockers)}")
    ckpt = find_checkpoint(out) if out.exists() else None
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint in {out}")
    if not resume and out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar: ours
    splits = build_token_splits(cfg.data, tokenizer_path=ckpt / "tokenizer.json" if ckpt else None)
    model_fields = dict(cfg.model)
    preset = model_fields.pop("preset", "tiny")
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
    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    opt_state = None
    if ckpt is None:
        model = FlashDepthForCausalLM(model_cfg)
    else:
        saved = FlashDepthConfig.from_pretrained(ckpt)
        for key in ("depth_mechanism", "norm_position", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "ffn_kv", "attn_kv_proj", "attnres_blocks"):
            if getattr(saved, key) != getattr(model_cfg, key):
                raise TrainingError(f"checkpoint {ckpt} has {key}={getattr(saved, key)!r} but the config asks for "
                                    f"{getattr(model_cfg, key)!r}; resume with the run's own config")
        model = FlashDepthForCausalLM.from_pretrained(ckpt)
        trainer = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        opt_state = trainer.pop("optimizer")
        state.update({k: trainer[k] for k in ("step", "tokens", "elapsed")})
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
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95),
                                  fused=dev.type == "cuda")
    if opt_state is not None:
        if world > 1 and t.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(wrapped, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(opt_state)
    prepare_for_capture(optimizer, dev if t.cuda_graph else None)
    # no autocast weight cache: a captured step must not keep casts from its capture
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if dev.type == "cuda"
                else nullcontext())

    metrics = (out / "metrics.jsonl").open("a") if rank == 0 else None
    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(out / "tensorboard")
        except ImportError:
            writer = None

    def log(record):
        if rank == 0:
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
        if rank == 0:
            trainer_state = {**state, "torch_rng": torch.get_rng_state()}
            _atomic_checkpoint(out, model, model_state, optim_state, trainer_state, splits.tokenizer, cfg)
        if world > 1:
            torch.distributed.barrier()

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world
    bar = None
    if rank == 0 and progress:
        import sys

        from tqdm.auto import tqdm

        # in a log file (no terminal) redraw rarely instead of flooding it
        bar = tqdm(total=t.max_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 15.0)
    def optimizer_step(x):
        """x ``[grad_accum, batch, seq]``: forward/backward passes, clipping, AdamW. No host sync
        (train.cuda_graph replays it from a graph): returns the loss and the gradient norm as tensors."""
        total = torch.zeros((), device=dev)
        for micro in range(t.grad_accum):
            sync = nullcontext() if micro == t.grad_accum - 1 or world == 1 or t.distributed == "fsdp" else wrapped.no_sync()
            with sync, autocast:
                loss = wrapped(x[micro], labels=x[micro], **documents(x[micro])).loss / t.grad_accum
            loss.backward()
            total += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    run_step = GraphedStep(optimizer_step) if t.cuda_graph else optimizer_step
    last_val = None
    wrapped.train()
    while state["step"] < t.max_steps:
        step = state["step"]
        t0 = time.perf_counter()
        set_lr(optimizer, lr_at(step, t))
        x = torch.stack([torch.from_numpy(sample_batch(splits.train, t.batch_size, t.seq_len,
                                                       (t.seed, step, micro, rank)))
                         for micro in range(t.grad_accum)]).to(dev)
        total, grad_norm = run_step(x)
        # checked after the update (so the step needs no sync midway); a bad step is never saved
        total, grad_norm = float(total), float(grad_norm)
        if not math.isfinite(total):
            last = find_checkpoint(out)
            raise TrainingError(f"loss became {total} at step {step}; stopped without saving, "
                                f"the last good checkpoint is {last or 'none (no checkpoint yet)'}")
        dt = time.perf_counter() - t0
        state["step"] += 1
        state["tokens"] += tokens_per_step
        state["elapsed"] += dt
        step = state["step"]
        if step % t.log_every == 0 or step == t.max_steps:
            log({"step": step, "loss": total, "lr": lr_at(step - 1, t), "grad_norm": grad_norm,
                 "tokens": state["tokens"], "tokens_per_s": tokens_per_step / dt})
        if step % t.eval_every == 0 or step == t.max_steps:
            last_val = evaluate()
            log({"step": step, "val_loss": last_val, "tokens": state["tokens"]})
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            save()
        if bar is not None:
            bar.set_postfix(loss=f"{total:.3f}", val=f"{last_val:.3f}" if last_val is not None else "-",
                            tok_s=f"{tokens_per_step / dt:,.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = {"steps": state["step"], "tokens": state["tokens"], "final_val_loss": last_val,
               "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9), "params": model.num_parameters(),
               "depth_mechanism": model_cfg.depth_mechanism, "norm_position": model_cfg.norm_position,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "world_size": world,
               "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
               "layers": model_cfg.num_hidden_layers}
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics.close()
        if writer is not None:
            writer.close()
        from .plots import plot_runs

        plot_runs([out], out / "loss.png")
    if world > 1:
        torch.distributed.destroy_process_group()
    return summary
