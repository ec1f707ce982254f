"""Text from a checkpoint: a prompt in, ``model.generate`` samples, the text streamed out as it comes."""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TextIO

from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

# transformers >= 4.48: generate() with a fixed-length cache compiles the decoding steps itself (on
# CUDA, GenerationConfig.compile_config); earlier releases leave that to compiled_decoding
GENERATE_COMPILES = hasattr(GenerationConfig(), "compile_config")


class TextStream(BaseStreamer):
    """Writes ``prompt`` (the text as given, once ``generate`` has started: it checked its inputs)
    and then the text of the generated tokens to ``out`` as ``generate`` produces them.

    Each call decodes all generated ids and writes what is new: a byte-level token may carry
    half of a character's UTF-8 bytes, so a tail that decodes to U+FFFD is held back until the
    next token completes it (or the stream ends)."""

    def __init__(self, tokenizer, out: TextIO, prompt: str = ""):
        self.tokenizer, self.out, self.prompt = tokenizer, out, prompt
        self.ids: list[int] = []
        self.written = 0
        self.prompt_written = False

    def put(self, value) -> None:
        """``value``: the prompt ids ``[1, T]`` first (the prompt's text is written instead), then
        each new token ``[1]``."""
        if not self.prompt_written:
            self.prompt_written = True
            self.out.write(self.prompt)
            self.out.flush()
            return
        self.ids.extend(value.flatten().tolist())
        self._write(final=False)

    def end(self) -> None:
        self._write(final=True)

    def _write(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if final or not text.endswith("\ufffd"):
            self.out.write(text[self.written :])
            self.out.flush()
            self.written = len(text)


def load_for_generation(checkpoint: str | Path, device: str = "auto"):
    """(model in eval mode on ``device``, the run's tokenizer) of a checkpoint or run folder."""
    from flash_depth._device import resolve_device
    from flash_depth.data.tokenizer import load_tokenizer
    from flash_depth.train.checkpoint import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint, arg="checkpoint")
    model = load_model(checkpoint).to(resolve_device(device)).eval()  # a damaged file: one CheckpointError
    return model, load_tokenizer(checkpoint / "tokenizer.json")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids, after ``<|endoftext|>`` as BOS when the tokenizer has it: training streams
    put it before every document but the first, so the prompt reads as a document's start."""
    ids = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty and this checkpoint's tokenizer has no BOS token to start from "
                         "(it predates <|endoftext|>); give some text")
    return ids


@contextmanager
def compiled_decoding(model, **options):
    """Within the block, ``model``'s decoding steps on a fixed-length cache (one new token per
    row) run through ``torch.compile(model.forward, **options)`` and every other call eagerly:
    what transformers >= 4.48's ``generate(cache_implementation="static")`` does by itself on
    CUDA, for the releases before it. The prefill stays eager (its fused kernels, and no
    compile per prompt length); the steps have one shape each, so they compile once (and with
    ``mode="reduce-overhead"`` replay from CUDA graphs)."""
    import torch

    from flash_depth.models.modeling_flash_depth import is_fixed_length

    if not isinstance(model, torch.nn.Module) or "forward" in model.__dict__:
        raise ValueError(f"model must be a torch.nn.Module whose forward is not already replaced, got "
                         f"{type(model).__name__}")
    eager = model.forward
    compiled = torch.compile(eager, **options)

    @functools.wraps(eager)  # generate() reads the forward's signature
    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        step = ids is not None and ids.shape[1] == 1 and is_fixed_length(cache)
        if step and hasattr(model, "prepare_decoding"):
            model.prepare_decoding(cache)  # what the compiled step reuses, fresh (eager: it cannot)
        return (compiled if step else eager)(*args, **kwargs)

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward


def generate_ids(model, tokenizer, ids: list[int], *, max_new_tokens: int = 200, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, streamer: BaseStreamer | None = None,
                 fast: bool | None = None) -> list[int]:
    """New token ids after ``ids`` from ``model.generate``: greedy at ``temperature`` 0, else sampled
    from the softmax at that temperature, cut to the ``top_k`` most likely (0: all) and to the
    smallest set of probability >= ``top_p``. Stops at the tokenizer's EOS (included in the
    result) or after ``max_new_tokens``, fewer where the model's max_position_embeddings ends.
    Sampling draws from torch's global generator: seed it with ``torch.manual_seed``.

    ``fast``: a static (fixed-length) KV cache, and on CUDA each decoding step compiled and
    replayed from a CUDA graph (by transformers' generate, or :func:`compiled_decoding` on
    releases before 4.48); the greedy tokens are those of the dynamic cache. None: on CUDA."""
    import torch

    if fast is not None and not isinstance(fast, bool):
        raise TypeError(f"fast must be a bool or None (on CUDA), got {type(fast).__name__}")
    fast = model.device.type == "cuda" if fast is None else fast
    limit = model.config.max_position_embeddings
    if len(ids) >= limit:
        bos = " with BOS" if tokenizer.eos_id is not None else ""
        raise ValueError(f"prompt is {len(ids)} tokens{bos}; it must be shorter than the model's "
                         f"max_position_embeddings={limit} to leave room for generated tokens")
    sampling = (dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0
                else dict(do_sample=False))
    input_ids = torch.tensor([ids], device=model.device)
    compiling = fast and model.device.type == "cuda" and not GENERATE_COMPILES
    with compiled_decoding(model, mode="reduce-overhead") if compiling else nullcontext():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=min(max_new_tokens, limit - len(ids)),
                             eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id, streamer=streamer,
                             **sampling, **({"cache_implementation": "static"} if fast else {}))
    return out[0, len(ids) :].tolist()
