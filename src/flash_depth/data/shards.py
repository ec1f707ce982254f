"""Pre-tokenized ``.bin`` shards (uint16/uint32 token ids) for large runs, read memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_token_shards(tokens: np.ndarray, out_dir: str | Path, tokenizer, *, shard_tokens: int = 50_000_000) -> list[Path]:
    """Write ``tokens`` as ``shard_00000.bin``... plus ``meta.json`` and ``tokenizer.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    paths = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        path = out / f"shard_{i:05d}.bin"
        tmp = path.with_suffix(".tmp")
        np.asarray(tokens[start : start + shard_tokens], dtype=dtype).tofile(tmp)
        tmp.replace(path)
        paths.append(path)
    tokenizer.save(out / "tokenizer.json")
    meta = {"dtype": np.dtype(dtype).name, "tokenizer": "tokenizer.json", "tokens": int(len(tokens)),
            "vocab_size": tokenizer.vocab_size, "shards": [p.name for p in paths]}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return paths
