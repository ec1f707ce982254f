"""Tokenizers: a byte-level BPE trained locally with the ``tokenizers`` library, or raw bytes.

Both carry one special token, ``<|endoftext|>``, that serves as BOS, EOS and padding (as in
GPT-2). Training streams put it between documents, so one token both ends a document and tells
the model that a new one starts: prefixing a prompt with it asks for the start of a document,
and generation stops when the model emits it. Separate BOS and EOS tokens would always stand
side by side in such a stream and cost a token more per document for no information.

Tokenizers saved before this token existed load without it (``eos_id`` is None).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

EOT = "<|endoftext|>"
# part of the cache keys of trained tokenizers and token arrays: bump when either changes meaning
TOKENIZER_VERSION = 2


def _byte_chars() -> list[str]:
    """The printable character ByteLevel writes for each byte 0..255 (GPT-2's byte-to-unicode
    map): printable Latin-1 bytes stand for themselves, the others take code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, spare = [], 256
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(spare))
            spare += 1
    return chars


def _sidecar_files(folder: Path, has_eot: bool) -> None:
    """tokenizer_config.json and special_tokens_map.json, so ``transformers.AutoTokenizer`` loads
    the folder's tokenizer.json with its BOS/EOS/PAD set."""
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT} if has_eot else {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))


class _Tokenizer:
    """The interface the pipeline, training and generation use: ``vocab_size``, ``eos_id``
    (the ``<|endoftext|>`` id, or None for tokenizers saved before it existed), ``encode``,
    ``decode`` (special tokens left out), ``save`` and ``to_hf``."""

    vocab_size: int
    eos_id: int | None

    def backend(self):
        """The ``tokenizers.Tokenizer`` that ``save`` and ``to_hf`` write and wrap."""
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """The tokenizer as ``path`` (tokenizers JSON) plus the transformers files beside it."""
        path = Path(path)
        self.backend().save(str(path))
        _sidecar_files(path.parent, self.eos_id is not None)

    def to_hf(self):
        """A ``transformers.PreTrainedTokenizerFast`` with BOS/EOS/PAD set (when there is an EOT)."""
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT} if self.eos_id is not None else {}
        # a copy: the wrapper sets padding and truncation on the object it is given
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(self.backend().to_str()),
                                       clean_up_tokenization_spaces=False, **special)

    def special_ids(self) -> dict:
        """``bos_token_id``/``eos_token_id``/``pad_token_id`` for a model config ({} without an EOT)."""
        if self.eos_id is None:
            return {}
        return {"bos_token_id": self.eos_id, "eos_token_id": self.eos_id, "pad_token_id": self.eos_id}


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes as ids 0..255 and ``<|endoftext|>`` as 256 (vocabulary 257). ``eot=False``:
    the 256-id vocabulary of checkpoints saved before the special token."""

    def __init__(self, eot: bool = True):
        self.eos_id = 256 if eot else None
        self.vocab_size = 257 if eot else 256

    def encode(self, text: str) -> list[int]:
        if self.eos_id is None:
            return list(text.encode("utf-8"))
        ids = []
        for i, piece in enumerate(text.split(EOT)):  # a literal <|endoftext|> is the special token, as in BPE
            if i:
                ids.append(self.eos_id)
            ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def backend(self):
        # encoding runs in Python (100x faster than a merge-free BPE on long texts); the
        # tokenizers object exists for the saved file and the transformers wrapper
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_byte_chars())}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if self.eos_id is not None:
            tok.add_special_tokens([AddedToken(EOT, special=True)])
        return tok


class BPETokenizer(_Tokenizer):
    """A ``tokenizers.Tokenizer`` (byte-level BPE) behind the same small interface."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def backend(self):
        return self.tok


def train_bpe(docs: list[str], vocab_size: int, cache_dir: str | Path | None = None) -> BPETokenizer:
    """Train (or load from ``cache_dir``, keyed by the text and vocab size) a byte-level BPE whose
    ``vocab_size`` ids include ``<|endoftext|>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256()
    for d in docs:
        key.update(d.encode("utf-8"))
    key.update(f"{vocab_size} {EOT} v{TOKENIZER_VERSION}".encode())
    name = f"bpe-v{TOKENIZER_VERSION}-{vocab_size}-{key.hexdigest()[:16]}.json"
    cached = Path(cache_dir) / name if cache_dir else None
    if cached is not None and cached.exists():
        return BPETokenizer(Tokenizer.from_file(str(cached)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[EOT], show_progress=False)
    tok.train_from_iterator(docs, trainer)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")  # one per process: torchrun ranks race here
        tok.save(str(tmp))
        tmp.replace(cached)
    return BPETokenizer(tok)


def load_tokenizer(path: str | Path) -> ByteTokenizer | BPETokenizer:
    """A tokenizer saved by ``save``, or the bytes marker file of older checkpoints."""
    from tokenizers import Tokenizer

    text = Path(path).read_text()
    if '"flash_depth_tokenizer": "bytes"' in text:
        return ByteTokenizer(eot=False)
    spec = json.loads(text)
    model = spec.get("model") or {}
    if not model.get("merges") and model.get("vocab") == {c: b for b, c in enumerate(_byte_chars())}:
        return ByteTokenizer(eot=any(t.get("content") == EOT for t in spec.get("added_tokens") or []))
    return BPETokenizer(Tokenizer.from_str(text))
