"""Parameter counts and training FLOPs per token, per depth mechanism (MoDA paper Table 3 style)."""

from __future__ import annotations

import torch

from .configuration_flash_depth import FlashDepthConfig


def parameter_count(config: FlashDepthConfig) -> dict:
    """{"total", "embedding", "non_embedding", "depth"} parameter counts; builds on the meta device."""
    from .modeling_flash_depth import FlashDepthForCausalLM

    with torch.device("meta"):
        model = FlashDepthForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel() + (
        0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    )
    depth_names = ("depth_kv", "ffn_kv", "depth_read", "depth_norm", "attnres", "dense", "hyper", "mudd",
                   "attn_norm_k", "attn_norm_v")
    depth = sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in depth_names))
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "depth": depth}


def flops_per_token(config: FlashDepthConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) at causal length ``seq_len``.

    Matmuls: 2 FLOPs per weight (embedding lookup excluded, LM head included). Attention:
    2 * 2 * Hq * d per key, averaging (seq_len + 1) / 2 keys; depth reads add their slots.
    """
    params = parameter_count(config)
    matmul = 2 * (params["non_embedding"] + config.vocab_size * config.hidden_size)
    per_key = 4 * config.num_attention_heads * config.head_dim
    attention = config.num_hidden_layers * per_key * (seq_len + 1) / 2
    written = [l * (2 if config.ffn_kv else 1) for l in range(config.num_hidden_layers)]
    window = config.depth_window
    slots_read = sum(n if window is None else min(n, window + config.depth_anchors) for n in written)
    mech = config.depth_mechanism
    depth = per_key * slots_read if mech in ("moda", "depth_attention") else 0.0
    if mech.startswith("attnres"):  # each read: a dot and a weighted sum per source
        size = 1 if mech == "attnres_full" else 2 * config.num_hidden_layers // config.attnres_blocks
        sublayers = 2 * config.num_hidden_layers
        sources = sum(1 + i // size + (i % size > 0) for i in range(sublayers + 1))
        depth = 4 * config.hidden_size * sources
    if mech == "denseformer":
        depth = 2 * config.hidden_size * sum(i + 2 for i in range(config.num_hidden_layers))
    if mech in ("mhc", "hc"):  # per sublayer: H_res @ X, the read and the write (the projections are matmuls above)
        n = config.hc_streams
        depth = 2 * config.num_hidden_layers * 2 * config.hidden_size * (n * n + 2 * n)
    if mech == "mudd":  # after block i: 4 mixes of the i + 2 kept outputs (one after the last block; its MLPs: above)
        L = config.num_hidden_layers
        depth = 2 * config.hidden_size * sum((1 if i == L - 1 else 4) * (i + 2) for i in range(L))
    return 3 * (matmul + attention + depth)
