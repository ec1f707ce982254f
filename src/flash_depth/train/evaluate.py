"""Held-out perplexity and bits per byte of a checkpoint."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch

from flash_depth._device import resolve_device
from flash_depth.data.pipeline import build_token_splits, document_positions

from .checkpoint import CheckpointError, load_model, resolve_checkpoint, run_config
from .config import DataConfig

SEQ_LEN = 512  # for a checkpoint saved without a run_config.yaml


def evaluate_checkpoint(checkpoint: str | Path, data: DataConfig | None = None, *, seq_len: int | None = None,
                        max_tokens: int = 200_000, batch_size: int = 8, device: str = "auto") -> dict:
    """Mean next-token loss over non-overlapping windows of ``seq_len`` tokens of the held-out split.

    ``checkpoint``: a checkpoint folder or the run folder holding it. ``data`` and ``seq_len``
    default to the run's own (its run_config.yaml; 512 tokens without one), so the loss compares
    with the run's validation loss. ``seq_len`` is capped at the model's max_position_embeddings;
    the result names the one used. A run trained with ``data.document_masking`` is scored with it."""
    checkpoint = resolve_checkpoint(checkpoint, arg="checkpoint")
    run = run_config(checkpoint)
    data = data or DataConfig(**run.get("data", {}))
    seq_len = seq_len or run.get("train", {}).get("seq_len", SEQ_LEN)
    dev = resolve_device(device)
    model = load_model(checkpoint).to(dev).eval()
    splits = build_token_splits(data, tokenizer_path=checkpoint / "tokenizer.json")
    seq_len = min(seq_len, model.config.max_position_embeddings)
    tokens = torch.from_numpy(splits.val[:max_tokens].astype("int64"))
    n_windows = len(tokens) // seq_len
    if n_windows == 0:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}")
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    eos_id = splits.tokenizer.eos_id
    masked = data.document_masking and eos_id is not None
    nll, count, n_bytes = 0.0, 0, 0
    with torch.no_grad(), autocast:
        for i in range(0, n_windows, batch_size):
            x = windows[i : i + batch_size].to(dev)
            kw = {"position_ids": document_positions(x, eos_id)} if masked else {}
            logits = model(x, **kw).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            nll += loss.item()
            count += x[:, 1:].numel()
            n_bytes += sum(len(splits.tokenizer.decode(row[1:].tolist()).encode("utf-8")) for row in x.cpu())
    loss = nll / count
    if not math.isfinite(loss):  # finite weights can still overflow (bf16 on a GPU)
        raise CheckpointError(f"the held-out loss of {checkpoint} is {loss}; try --device cpu (float32)")
    return {"checkpoint": str(checkpoint), "source": splits.source, "seq_len": seq_len, "tokens": count,
            "loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nll / math.log(2) / max(1, n_bytes)}
