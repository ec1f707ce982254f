"""From a data config to tokenizer + train/validation token arrays (cached on disk)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .sources import DataError, is_token_shards, load_documents, load_token_shards
from .tokenizer import EOT, TOKENIZER_VERSION, ByteTokenizer, load_tokenizer, train_bpe

if TYPE_CHECKING:  # the data room imports torch only where it is used
    import torch


@dataclass
class TokenSplits:
    tokenizer: object
    train: np.ndarray  # 1-D token ids
    val: np.ndarray
    source: str


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "flash-depth"


def _split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    if len(docs) == 1:  # one long text: hold out its tail
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    n_val = max(1, round(len(docs) * val_fraction))
    return docs[:-n_val], docs[-n_val:]


def _encode(tokenizer, docs: list[str]) -> np.ndarray:
    """Documents -> one 1-D id stream, ``<|endoftext|>`` between documents (a blank line with
    tokenizers saved before it existed, the stream those checkpoints were trained on)."""
    ids = tokenizer.encode((EOT if tokenizer.eos_id is not None else "\n\n").join(docs))
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    return np.asarray(ids, dtype=dtype)


def build_token_splits(data, tokenizer_path: str | Path | None = None) -> TokenSplits:
    """``data`` is a DataConfig. ``tokenizer_path`` (a checkpoint's tokenizer.json) overrides
    ``data.tokenizer`` so a resumed or evaluated run encodes text exactly as it was trained."""
    cache = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    if is_token_shards(data.source):
        tokens, meta = load_token_shards(data.source)
        tok_file = tokenizer_path or meta.get("tokenizer")
        if tok_file is None:
            raise DataError(f"{data.source}: meta.json names no tokenizer file")
        tok_file = Path(tok_file)
        if not tok_file.is_absolute() and tokenizer_path is None:
            base = Path(data.source) if Path(data.source).is_dir() else Path(data.source).parent
            tok_file = base / tok_file
        cut = int(len(tokens) * (1 - data.val_fraction))
        return TokenSplits(load_tokenizer(tok_file), tokens[:cut], tokens[cut:], data.source)
    docs = load_documents(data.source, text_field=data.text_field, split=data.split,
                          max_documents=data.max_documents)
    train_docs, val_docs = _split_documents(docs, data.val_fraction)
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    elif data.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    elif data.tokenizer == "bpe":
        tokenizer = train_bpe(train_docs, data.vocab_size, cache_dir=cache / "tokenizers")
    elif Path(data.tokenizer).exists():
        tokenizer = load_tokenizer(data.tokenizer)
    else:
        raise DataError(f"data.tokenizer must be 'bpe', 'bytes' or a tokenizer file, got {data.tokenizer!r}")
    key = hashlib.sha256()
    for d in docs:
        key.update(d.encode("utf-8"))
    key.update(repr((TOKENIZER_VERSION, tokenizer.vocab_size, tokenizer.eos_id, data.val_fraction,
                     tokenizer.encode("The quick brown fox"))).encode())
    cached = cache / "tokens" / f"{key.hexdigest()[:20]}.npz"
    if cached.exists():
        arrays = np.load(cached)
        return TokenSplits(tokenizer, arrays["train"], arrays["val"], data.source)
    train, val = _encode(tokenizer, train_docs), _encode(tokenizer, val_docs)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")  # one per process: torchrun ranks race here
    np.savez(tmp, train=train, val=val)
    tmp.replace(cached)
    return TokenSplits(tokenizer, train, val, data.source)


def sample_batch(tokens: np.ndarray, batch: int, seq_len: int, seed: tuple) -> np.ndarray:
    """``batch`` windows of ``seq_len`` tokens at positions drawn from ``seed`` (deterministic,
    so a resumed run sees exactly the batches it would have seen)."""
    if len(tokens) < seq_len + 1:
        raise DataError(f"only {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    rng = np.random.default_rng(list(seed))
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    return np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts])


def document_positions(windows: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-document positions of token windows ``[..., T]`` cut from an ``<|endoftext|>``-separated
    stream: 0 at the window's first token and at every ``eos_id`` (which opens the next document,
    as it opens a prompt in generation), counting up in between. Passed to the model as
    ``position_ids``, these make attention stay within documents (``data.document_masking``).
    Tensor ops only (no host sync), on the windows' device."""
    import torch

    if not isinstance(windows, torch.Tensor) or windows.is_floating_point() or windows.dim() < 1:
        got = (f"{windows.dtype} of shape {tuple(windows.shape)}" if isinstance(windows, torch.Tensor)
               else type(windows).__name__)
        raise TypeError(f"windows must be an integer tensor [..., T] of token ids, got {got}")
    if isinstance(eos_id, bool) or not isinstance(eos_id, int):
        raise TypeError(f"eos_id must be an int (the tokenizer's <|endoftext|> id), got {type(eos_id).__name__}")
    index = torch.arange(windows.shape[-1], device=windows.device).expand(windows.shape)
    # the latest document start at or before each token (the window's start counts as one)
    start = torch.where(windows == eos_id, index, torch.zeros_like(index)).cummax(-1).values
    return index - start
