"""Tokenizers: a byte-level BPE trained locally with the ``tokenizers`` library, or raw bytes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"flash_depth_tokenizer": "bytes"}))


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) behind the same small interface."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))


def train_bpe(docs: list[str], vocab_size: int, cache_dir: str | Path | None = None) -> BPETokenizer:
    """Train (or load from ``cache_dir``, keyed by the text and vocab size) a byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256()
    for d in docs:
        key.update(d.encode("utf-8"))
    key.update(str(vocab_size).encode())
    cached = Path(cache_dir) / f"bpe-{vocab_size}-{key.hexdigest()[:16]}.json" if cache_dir else None
    if cached is not None and cached.exists():
        return BPETokenizer(Tokenizer.from_file(str(cached)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")  # one per process: torchrun ranks race here
        tok.save(str(tmp))
        tmp.replace(cached)
    return BPETokenizer(tok)


def load_tokenizer(path: str | Path):
    """A tokenizer saved by ``save`` (BPE json or the bytes marker)."""
    from tokenizers import Tokenizer

    text = Path(path).read_text()
    if '"flash_depth_tokenizer": "bytes"' in text:
        return ByteTokenizer()
    return BPETokenizer(Tokenizer.from_str(text))
