"""FlashDepthForCausalLM: an OLMo2-style decoder (RMSNorm, SwiGLU, RoPE, QK-norm, GQA) whose
depth mechanism is ``config.depth_mechanism``:

- ``residual``: x + F(x), pre- or post-norm;
- ``moda``: attention is Mixture-of-Depths Attention over the depth K/V stream that earlier
  attention layers (and, with ``ffn_kv``, FFN layers) write;
- ``depth_attention``: each block first reads the depth stream with its own depth query;
- ``attnres_full`` / ``attnres_block``: Attention Residuals, a softmax read over earlier
  sublayer outputs (or block sums) replaces the residual sum;
- ``denseformer``: after each block, a learned weighted average of all earlier block outputs;
- ``mhc`` / ``hc``: hyper-connections, parallel residual streams mixed around each sublayer;
- ``mudd``: MUDDFormer, per-token dynamic dense weights over all earlier block outputs, separate
  for the next block's query, key, value and residual inputs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from flash_depth.nn import (AttnResQueries, DenseFormerMixer, DepthKV, DepthRead, HyperConnection, MoDAAttention,
                            MuddConnections, collapse_streams, expand_streams)
from flash_depth.nn._recorder import record, record_layer
from flash_depth.nn.attnres_stream import SourceList, SourceStream
from flash_depth.nn.depth_stream import DepthSlots, DepthStream
from flash_depth.nn.layers import RMSNorm, Rotary, SwiGLU
from flash_depth.nn.mudd import DenseWeights
from flash_depth.ops._checks import check_cu_seqlens

from .configuration_flash_depth import FlashDepthConfig

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x initialises only the weights a checkpoint lacks, with torch's init
    from torch.nn import init
_init_copy = getattr(init, "copy_", torch.Tensor.copy_)  # torch.nn.init has no copy_

# transformers <= 5.23 hands generate()'s KV cache to forward as past_key_values and reads it back
# from the output field of that name; 5.24 renamed both to cache. forward takes either name on
# every release, and outputs use the field this release declares.
_CACHE_FIELD = next(f.name for f in dataclasses.fields(BaseModelOutputWithPast)
                    if f.name in ("cache", "past_key_values"))


def _resolve_cache(cache, past_key_values):
    """The KV cache passed under either name (None if neither)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got two different KV caches as cache= and past_key_values=; pass one (the same argument)")
    return cache if cache is not None else past_key_values


def is_fixed_length(cache) -> bool:
    """Whether ``cache`` (a transformers ``Cache``, or None) has a fixed number of slots, written in
    place (transformers 5.x says so with is_compileable; 4.x's StaticCache family has a max cache
    shape, DynamicCache none)."""
    if cache is None:
        return False
    if not isinstance(cache, Cache):
        raise TypeError(f"cache (or past_key_values) must be a transformers Cache, got {type(cache).__name__}: "
                        "legacy tuples of tensors are not taken")
    flag = getattr(cache, "is_compileable", None)
    return bool(flag) if flag is not None else cache.get_max_cache_shape() is not None


class _DecodeState:
    """What the decoding steps on one fixed-length cache reuse, kept on the cache (as
    ``_flash_depth_decode``) and marked as static addresses, as the cache's own tensors are, so
    that CUDA-graphed steps read and write them in place:

    - ``slots``: the k and v buffers ``[B, 1, slots, Hk, d]`` that each step's :class:`DepthSlots`
      writes (made by a prefill, reused while they fit);
    - ``ffn_inputs``: per block with an FFN depth K/V projection, that projection stacked under the
      FFN's gate/up (``[2I + 2 Hk d, D]``), which compiled steps without autograd compute in one
      GEMM. A copy of those weights (at 700m, 36 x 18 MiB in bf16): made by a prefill on CUDA or by
      ``prepare_decoding``; copied again by every prefill (compiled ones too), and before a step by
      an eager step or ``prepare_decoding`` wherever the parameters changed in place since (their
      version counters: optimizer steps, load_state_dict). Not seen: edits through ``.data`` between
      two generations whose second has no prefill (a one-token prompt) on the same cache, unless
      ``prepare_decoding`` runs after them. Eager steps never read the copy.
    """

    ATTR = "_flash_depth_decode"

    def __init__(self):
        self.slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ffn_inputs: dict[int, torch.Tensor] = {}
        self.stamps: dict[int, tuple] = {}

    @classmethod
    def of(cls, cache) -> _DecodeState:
        state = getattr(cache, cls.ATTR, None)
        if state is None:
            state = cls()
            setattr(cache, cls.ATTR, state)
        return state

    def keep_slots(self, stream: DepthStream) -> None:
        if stream.buffers is None:
            return
        B, _, slots, Hk, d = stream.buffers[0].shape
        shape, dtype, device = (B, 1, slots, Hk, d), stream.value_dtype, stream.buffers[0].device
        kept = self.slots
        if kept is None or kept[0].shape != shape or kept[0].dtype != dtype or kept[0].device != device:
            self.slots = tuple(_static_empty(shape, dtype, device) for _ in range(2))

    @torch.no_grad()
    def refresh_ffn_inputs(self, layers, force: bool, create: bool) -> None:
        """Copies the sources into the kept weights where ``force`` or they changed; ``create``
        makes those not kept yet (else only kept ones are refreshed). In a compiled forward (a
        prefill) the version counters cannot be read: every kept one is copied, in the graph."""
        compiling = torch.compiler.is_compiling()
        for block in layers:
            sources = block.ffn_input_sources()
            if sources is None or not (create or block.layer_idx in self.ffn_inputs):
                continue
            i, first = block.layer_idx, sources[0]
            shape = (sum(w.shape[0] for w in sources), first.shape[1])
            kept = self.ffn_inputs.get(i)
            if kept is None or kept.shape != shape or kept.dtype != first.dtype or kept.device != first.device:
                kept = self.ffn_inputs[i] = _static_empty(shape, first.dtype, first.device)
                self.stamps.pop(i, None)
            if compiling:
                kept.copy_(torch.cat(sources))
                continue
            stamp = tuple((w.data_ptr(), w._version) for w in sources)
            if force or self.stamps.get(i) != stamp:
                torch.cat(sources, out=kept)
                self.stamps[i] = stamp


def check_float_input(name: str, x, dtype: torch.dtype, layout: str) -> None:
    """TypeError unless ``x`` (a model's float input) has the model's ``dtype``; under autocast any
    float (what an autocast projector gives)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or (
            x.dtype != dtype and not torch.is_autocast_enabled(x.device.type)):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a {dtype} tensor {layout} (the model's dtype; any float under autocast), "
                        f"got {got}")


def _static_empty(shape, dtype, device) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    torch._dynamo.mark_static_address(buf)
    return buf


def _max_cache_len(cache) -> int:
    """The slots of a fixed-length cache: get_max_length on transformers 5.x (where
    get_max_cache_shape is deprecated, then gone), get_max_cache_shape on 4.x (4.46 deprecates
    get_max_length, 4.57 has only get_max_cache_shape)."""
    new_api = hasattr(cache, "is_compileable") and hasattr(cache, "get_max_length")
    return int(cache.get_max_length() if new_api else cache.get_max_cache_shape())


def static_cache_mask(attention_mask, width: int):
    """attention_mask ``[B, cached + T]`` (generate()'s 2-D mask, which grows by a column a step)
    -> ``[B, width]``, zero-padded on the right: one shape at every step of a fixed-length
    cache of ``width`` slots, so that a compiled or CUDA-graphed decoding step is not re-traced
    or re-recorded as the sequence grows. The forward reads only the columns up to its last
    token. None stays None (no padding)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a 2-D tensor [B, cached + new tokens], got {got}")
    if attention_mask.shape[1] > width:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns, more than the cache's {width} slots")
    return F.pad(attention_mask, (0, width - attention_mask.shape[1]))


def _check_extras(kwargs: dict) -> None:
    """Keywords forward takes only so that transformers can call it: the output flags, only off
    (no attentions or per-layer states are returned). Anything else raises TypeError, so that a
    cache or input under a name this model does not know is never dropped silently."""
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(name, None):
            raise ValueError(
                f"{name}=True is not supported: the model returns no attentions or per-layer hidden "
                "states (flash_depth.analysis records them)"
            )
    if kwargs:
        raise TypeError(
            f"forward got unexpected keyword arguments {sorted(kwargs)}; it takes input_ids, inputs_embeds, "
            "attention_mask, position_ids, cu_seqlens, max_seqlen, cache (or past_key_values), use_cache, "
            "return_dict, token_type_ids (and on FlashDepthForCausalLM labels, logits_to_keep)"
        )


def _check_cache_position(cache_position, start: int, length: int) -> None:
    """cache_position ``[T]`` (transformers 4.x generate): the cache slots of the new tokens, which
    must be start .. start+T-1 (they follow the cache; RoPE positions come from position_ids)."""
    if cache_position is None:
        return
    want = torch.arange(start, start + length, device=cache_position.device)
    if cache_position.dim() != 1 or cache_position.shape[0] != length or not bool((cache_position == want).all()):
        raise ValueError(
            f"cache_position must be {start}..{start + length - 1} (the slots after {start} cached tokens), got "
            f"shape {tuple(cache_position.shape)} starting {cache_position.flatten()[:4].tolist()}"
        )


def _check_position_ids(position_ids, batch: int, length: int) -> torch.Tensor:
    """position_ids ``[T]``, ``[1, T]`` or ``[B, T]`` (integers) -> ``[B or 1, T]``; their range is
    checked where the rotary tables are made."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or position_ids.is_complex() \
            or position_ids.dtype == torch.bool:
        got = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise TypeError(f"position_ids must be an integer tensor [B, T] or [T], got {got}")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must have shape [B={batch}, T={length}] or [T={length}], got "
                         f"{tuple(position_ids.shape)}")
    return position_ids


def _static_decode_padding(attention_mask, slot: torch.Tensor, batch: int, width: int):
    """A decoding step on a fixed-length cache, without host syncs: attention_mask ``[B, W]``
    (generate()'s, or :func:`static_cache_mask`'s ``[B, width]``; columns past the new token's
    slot are ignored) and ``slot`` (LongTensor ``[1]`` or ``[]``, the new token's slot) ->
    (key_mask bool ``[B, width]``: the slots from the row's first token to ``slot``, the new
    token's positions ``[B, 1]`` (its row's tokens before it), or None for no padding). The
    prefill checked that the rows are left-padded (:func:`_padding`); a step cannot (it would
    read the mask on the host)."""
    cols = torch.arange(width, device=slot.device)
    upto = cols <= slot.reshape(())
    if attention_mask is None:
        return upto.expand(batch, width), None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != batch \
            or attention_mask.shape[1] > width:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a 2-D tensor [B={batch}, at most {width} cache slots] of 1 (token) "
                         f"and 0 (padding), got {got}")
    mask = attention_mask.ne(0)
    kv_start = (mask.cumsum(1) == 0).sum(1)  # leading zeros: the left padding
    positions = (mask & upto[: mask.shape[1]]).sum(1, keepdim=True) - 1
    return upto & (cols >= kv_start[:, None]), positions


def _padding(attention_mask, batch: int, length: int):
    """attention_mask ``[B, past + T]`` (1: token, 0: padding; the cached tokens' columns first,
    as generate() passes it) -> (kv_start int32 ``[B]``, positions ``[B, past + T]``, padded): the
    first two None when there is nothing to mask, padded whether the mask has zeros. kv_start
    counts a row's leading zeros (left padding); positions are transformers' ``cumsum - 1``
    (padding at 0), so a row's tokens are at 0, 1, ... whatever padding precedes them. Right
    padding (zeros after the last token) changes nothing in a causal model: no token attends to
    a later one."""
    if attention_mask is None:
        return None, None, False
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch, length):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a 2-D tensor [B={batch}, cached + new tokens={length}] of 1 "
                         f"(token) and 0 (padding), got {got}")
    mask = attention_mask != 0
    # one host sync for both: an additive mask (0 and -inf for padding) would otherwise read inverted
    all_tokens, binary = torch.stack([mask.all(), ((attention_mask == 0) | (attention_mask == 1)).all()]).tolist()
    if not binary:
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)].flatten()[:3].tolist()
        raise ValueError(f"attention_mask must hold 1 (token) and 0 (padding) only, got values such as {odd} "
                         "(an additive mask of 0 and -inf is not taken: pass its == 0 as the mask)")
    if all_tokens:
        return None, None, False
    tokens = mask.sum(1)
    first = torch.where(tokens > 0, mask.int().argmax(1), length)
    cols = torch.arange(length, device=mask.device)
    bad = (mask != ((cols >= first[:, None]) & (cols < (first + tokens)[:, None]))).any(1)
    if bool(bad.any()):
        row = int(bad.int().argmax())
        raise ValueError("attention_mask rows must be left-padded (zeros, then ones) or right-padded (ones, then "
                         "zeros), with no padding between tokens (decoding after right padding makes such a gap); "
                         f"row {row} is {attention_mask[row, :32].tolist()}{' ...' if length > 32 else ''}")
    if not bool(first.any()):  # right padding only: every token keeps the position and keys it has unpadded
        return None, None, True
    return first.to(torch.int32), (mask.long().cumsum(1) - 1).clamp(min=0), True


def _documents_from_positions(positions: torch.Tensor):
    """position_ids ``[B, T]`` that restart at 0 inside a row (packed documents, as Hugging Face's
    flattening collators make them) -> (cu_seqlens int32 over the B*T flattened tokens,
    max_seqlen); None when no row restarts. Each row also starts a document."""
    if positions.shape[1] < 2:  # a decoding step: no sync for a question with one answer
        return None
    starts = positions == 0
    starts[:, 0] = True
    if not bool(starts[:, 1:].any()):
        return None
    bounds = torch.nonzero(starts.flatten()).flatten()
    cu_seqlens = torch.cat([bounds, bounds.new_tensor([positions.numel()])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _refuse_documents(docs, cache, padded: bool) -> None:
    if docs is not None and (padded or cache is not None):
        raise ValueError(
            "packed documents (cu_seqlens, or position_ids restarting at 0 inside a row) take no KV cache "
            "(later tokens would attend across documents) and no padded attention_mask; got "
            + ("a cache" if cache is not None else "an attention_mask with padding")
        )


def _writes_depth(config: FlashDepthConfig, layer_idx: int) -> bool:
    """Blocks write depth K/V only where a later block reads it (the last block's would go unread)."""
    return config.depth_mechanism in ("moda", "depth_attention") and layer_idx < config.num_hidden_layers - 1


class FlashDepthBlock(nn.Module):
    """Attention + SwiGLU FFN. For residual-stream mechanisms ``forward`` applies the residual;
    AttnRes calls ``attn_sublayer`` / ``ffn_sublayer`` on its own reads; MUDD passes the
    ``(x_q, x_k, x_v, x_r)`` inputs of every block after the first."""

    def __init__(self, config: FlashDepthConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_idx = layer_idx
        self.post_norm = config.norm_position == "post"
        D, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                        config.head_dim)
        writes = _writes_depth(config, layer_idx)
        window = {"depth_window": config.depth_window, "depth_anchors": config.depth_anchors}
        self.attn_norm = RMSNorm(D, eps)
        # MUDD: the key and value inputs differ from the query's, each gets its own pre-norm (the
        # reference's separate norms); block 0 reads the embedding for all three
        multiway = config.depth_mechanism == "mudd" and layer_idx > 0
        self.attn_norm_k = RMSNorm(D, eps) if multiway else None
        self.attn_norm_v = RMSNorm(D, eps) if multiway else None
        self.attn = MoDAAttention(D, heads, kv_heads, head_dim, qk_norm=config.qk_norm, eps=eps,
                                  reads_depth=config.depth_mechanism == "moda", writes_depth=writes,
                                  attn_kv_proj=writes and config.attn_kv_proj, layer_idx=layer_idx,
                                  backend=config.attention_backend, **window)
        self.ffn_norm = RMSNorm(D, eps)
        self.ffn = SwiGLU(D, config.intermediate_size)
        ffn_kv = writes and config.ffn_kv
        self.ffn_kv = DepthKV(D, kv_heads, head_dim, k_norm=config.qk_norm, eps=eps) if ffn_kv else None
        has_read = config.depth_mechanism == "depth_attention" and layer_idx > 0
        self.depth_read = DepthRead(D, heads, head_dim, qk_norm=config.qk_norm, eps=eps, layer_idx=layer_idx,
                                    backend=config.attention_backend, **window) if has_read else None
        self.depth_norm = RMSNorm(D, eps) if has_read else None

    def attn_sublayer(self, h, cos, sin, stream, cache, masks=None):
        return self.attn(self.attn_norm(h), cos, sin, stream, cache, masks)

    def ffn_sublayer(self, h, cos, sin, stream):
        h = self.ffn_norm(h)
        if self.ffn_kv is None:
            return self.ffn(h)
        stacked = stream.ffn_input(self.layer_idx) if isinstance(stream, DepthSlots) else None
        if stacked is None:
            stream.write(*self.ffn_kv(h, cos, sin))
            return self.ffn(h)
        gate_up, kv = F.linear(h, stacked).split([self.ffn.gate_up.out_features, self.ffn_kv.proj.out_features], -1)
        stream.write(*self.ffn_kv.from_projection(kv, cos, sin))
        return self.ffn.from_gate_up(gate_up)

    def ffn_input_sources(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The FFN's gate/up weight and its depth K/V projection's, which project the same normed
        input (what :class:`_DecodeState` stacks); None without that projection, post-norm (its
        forward does not go through ``ffn_sublayer``), or unless both are plain ``nn.Linear`` without
        bias, hooks or parametrizations (a LoRA or quantized replacement, or a hook, must run)."""
        if self.ffn_kv is None or self.post_norm:
            return None
        linears = (self.ffn.gate_up, self.ffn_kv.proj)
        if any(type(m) is not nn.Linear or m.bias is not None or m._forward_hooks or m._forward_pre_hooks
               or hasattr(m, "parametrizations") for m in linears):
            return None
        return tuple(m.weight for m in linears)

    def forward(self, x, cos, sin, stream, cache, masks=None, sublayer: str | None = None):
        """The block's output; with ``sublayer`` ("attn"/"ffn", for AttnRes) only that sublayer's
        output, without the residual. ``masks``: as :meth:`MoDAAttention.forward`. ``x`` may be
        MUDD's ``(x_q, x_k, x_v, x_r)``: the attention's three inputs (each normed) and the residual."""
        if isinstance(x, tuple):
            return self._multiway(*x, cos, sin, cache, masks)
        if sublayer == "attn":
            return self.attn_sublayer(x, cos, sin, stream, cache, masks)
        if sublayer == "ffn":
            return self.ffn_sublayer(x, cos, sin, stream)
        if self.post_norm:
            if self.depth_read is not None:
                x, x_in = self.depth_norm(x + self.depth_read(x, cos, sin, stream)), x
                record_layer(self, "sublayer", "depth_read", x_in, x)
            x, x_in = self.attn_norm(x + self.attn(x, cos, sin, stream, cache, masks)), x
            record_layer(self, "sublayer", "attn", x_in, x)
            if self.ffn_kv is not None:
                stream.write(*self.ffn_kv(x, cos, sin))
            x, x_in = self.ffn_norm(x + self.ffn(x)), x
            record_layer(self, "sublayer", "ffn", x_in, x)
            return x
        if self.depth_read is not None:
            x, x_in = x + self.depth_read(self.depth_norm(x), cos, sin, stream), x
            record_layer(self, "sublayer", "depth_read", x_in, x)
        x, x_in = x + self.attn_sublayer(x, cos, sin, stream, cache, masks), x
        record_layer(self, "sublayer", "attn", x_in, x)
        x, x_in = x + self.ffn_sublayer(x, cos, sin, stream), x
        record_layer(self, "sublayer", "ffn", x_in, x)
        return x

    def _multiway(self, x_q, x_k, x_v, x, cos, sin, cache, masks):
        if self.attn_norm_k is None:
            raise ValueError("separate query/key/value inputs need a block built for depth_mechanism='mudd' after "
                             "the first")
        attn = self.attn(self.attn_norm(x_q), cos, sin, None, cache, masks, self.attn_norm_k(x_k),
                         self.attn_norm_v(x_v))
        x, x_in = x + attn, x
        record_layer(self, "sublayer", "attn", x_in, x)
        x, x_in = x + self.ffn_sublayer(x, cos, sin, None), x
        record_layer(self, "sublayer", "ffn", x_in, x)
        return x


def _hyper_sublayer(hyper: HyperConnection, layer: FlashDepthBlock, streams, cos, sin, cache, masks, sublayer: str):
    """One sublayer of ``layer`` between ``hyper``'s read and write of the streams ``[B, T, n, D]``."""
    return hyper(streams, lambda h: layer(h, cos, sin, None, cache, masks, sublayer))


class FlashDepthPreTrainedModel(PreTrainedModel):
    config_class = FlashDepthConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["FlashDepthBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # transformers 4.x: generate() makes the cache (and passes cache_position) only for models that
    # declare Cache support, and cache_implementation="static" only for those that declare it
    _supports_cache_class = True
    _supports_static_cache = True
    # the loss is a mean over the batch's tokens; Trainer must not pass num_items_in_batch
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, AttnResQueries):
            init.zeros_(module.queries)  # zero queries: a uniform read at start (SPEC 5)
            init.ones_(module.key_norms)
        elif isinstance(module, DenseFormerMixer):
            # identity at start: each block passes on its own output
            _init_copy(module.weights, DenseFormerMixer.identity(module.weights.shape[0]).to(module.weights.device))
        elif isinstance(module, DenseWeights):  # after its linears (children first): the paper's init
            init.normal_(module.w1.weight, mean=0.0, std=module.w1.in_features**-0.5)
            init.zeros_(module.w2.weight)
            _init_copy(module.bias, DenseWeights.residual_bias(*module.bias.shape, device=module.bias.device,
                                                               dtype=module.bias.dtype))


class FlashDepthModel(FlashDepthPreTrainedModel):
    def __init__(self, config: FlashDepthConfig):
        super().__init__(config)
        config.validate_depth()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FlashDepthBlock(config, i) for i in range(config.num_hidden_layers))
        # post-norm blocks end in a norm already
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if config.norm_position == "pre" else nn.Identity()
        self.rotary = Rotary(config.head_dim, config.max_position_embeddings, config.rope_theta)
        mech = config.depth_mechanism
        n_reads = 2 * config.num_hidden_layers + 1  # one per sublayer + the final read
        attnres = mech.startswith("attnres")
        self.attnres = AttnResQueries(n_reads, config.hidden_size, config.rms_norm_eps) if attnres else None
        self.dense = DenseFormerMixer(config.num_hidden_layers) if mech == "denseformer" else None
        self.hyper = nn.ModuleList(
            HyperConnection(config.hidden_size, config.hc_streams, kind=mech, layer=i, eps=config.rms_norm_eps)
            for i in range(2 * config.num_hidden_layers)  # one per sublayer
        ) if mech in ("mhc", "hc") else None
        L = config.num_hidden_layers
        self.mudd = MuddConnections(config.hidden_size, L, eps=config.rms_norm_eps) if mech == "mudd" else None
        self.activation_checkpointing = False
        self._hyper_sublayer = _hyper_sublayer  # compile_blocks compiles it for hc
        self.post_init()

    @staticmethod
    def _prepare_4d_causal_attention_mask_with_cache_position(attention_mask, target_length: int, **_):
        """transformers 4.x's generate() hook for a mask of one shape at every step of a static
        cache: ours stays 2-D (:func:`static_cache_mask`), the attention masks the cache slots."""
        return static_cache_mask(attention_mask, target_length)

    def _check_ids(self, input_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an int64/int32 tensor [B, T], got {got}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must have shape [B, T] with B, T >= 1, got {tuple(input_ids.shape)}")

    def _check_id_range(self, input_ids):
        """An id outside the vocabulary is a device-side assert on CUDA: checked where the host sync
        it takes is cheap (CPU tensors; CUDA without autograd: evaluation, a prefill), never in
        compiled or captured code (the caller skips decoding steps: their token is the model's own)."""
        if torch.compiler.is_compiling() or (input_ids.is_cuda and (torch.is_grad_enabled()
                                                                    or torch.cuda.is_current_stream_capturing())):
            return
        low, high = input_ids.aminmax()
        if bool((low < 0) | (high >= self.config.vocab_size)):
            bad = low.item() if low < 0 else high.item()
            raise ValueError(f"input_ids must be in [0, vocab_size={self.config.vocab_size}), got {bad}")

    def _check_embeds(self, inputs_embeds):
        """inputs_embeds ``[B, T, D]`` in the embedding's dtype (under autocast: any float, as an
        autocast projector gives)."""
        D, x = self.config.hidden_size, inputs_embeds
        check_float_input("inputs_embeds", x, self.embed_tokens.weight.dtype, "[B, T, D]")
        if x.dim() != 3 or x.numel() == 0 or x.shape[2] != D:
            raise ValueError(f"inputs_embeds must have shape [B, T, D={D}] with B, T >= 1, got {tuple(x.shape)}")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, return_dict=None, token_type_ids=None, cache_position=None,
                cu_seqlens=None, max_seqlen=None, **kwargs):
        """input_ids ``[B, T]`` (or inputs_embeds ``[B, T, D]``) -> last_hidden_state ``[B, T, D]``.

        The KV cache comes in as ``cache`` (transformers >= 5.24) or ``past_key_values``; with
        ``use_cache`` a new one is made if none is given, and it is returned. ``cache_position``
        (4.x generate) is checked against the cache's length. ``token_type_ids`` (4.x tokenizers
        return them) must be zeros: there is one segment type.

        Padding: ``attention_mask`` ``[B, cached + T]`` (1 token, 0 padding; what generate()
        passes at every step) may pad rows on the left (or on the right). Padding is masked as
        keys, and a row's tokens get positions 0, 1, ... after its padding.

        Positions and packed documents: ``position_ids`` ``[B, T]`` (or ``[T]``) are the RoPE
        positions (default: after the cache, or from the padding). Where they restart at 0
        inside a row (Hugging Face's packing collators), a document starts there and attention
        stays within documents; so it does with ``cu_seqlens`` int32 ``[num_docs + 1]`` and
        ``max_seqlen`` on input_ids ``[1, total]`` (flash-attn's convention; positions then
        restart per document unless given). Neither takes a KV cache or a padded mask."""
        cache = _resolve_cache(cache, past_key_values)
        _check_extras(kwargs)
        if token_type_ids is not None and bool(token_type_ids.any()):
            got = token_type_ids.unique().tolist()
            raise ValueError(f"token_type_ids must be all zeros (one segment type), got values {got}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, D]")
        static = is_fixed_length(cache)
        if input_ids is not None:
            self._check_ids(input_ids)
            if not (input_ids.shape[1] == 1 and cache is not None):  # a decoding step's token is the model's own
                self._check_id_range(input_ids)
            x = self.embed_tokens(input_ids)
        else:
            self._check_embeds(inputs_embeds)
            x = inputs_embeds
        B, T, D = x.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        if static and T == 1:  # a decoding step on a fixed-length cache: no host syncs from here on
            masks, positions = self._static_decode_inputs(cache, cache_position, attention_mask, position_ids, B)
            cos, sin = self.rotary.tables(positions)
            _refuse_documents(self._documents(cu_seqlens, max_seqlen, None, x), cache, False)
            docs, decoding = None, True
        else:
            masks, positions, docs, start = self._inputs(cache, cache_position, attention_mask, position_ids,
                                                         cu_seqlens, max_seqlen, x)
            cos, sin = None, None
            decoding = False
        if docs is not None:
            masks = {"cu_seqlens": docs[0], "max_seqlen": docs[1]}
            if positions is None:  # each document from position 0
                tokens = torch.arange(T, device=x.device, dtype=torch.int32)
                positions = tokens - docs[0][torch.searchsorted(docs[0][1:], tokens, right=True)]
            # the rows' documents one after another on [1, B*T]: every other part is per token
            x, positions = x.reshape(1, B * T, D), positions.expand(B, T).reshape(1, B * T)
        if cos is None:
            cos, sin = self.rotary.at(positions) if positions is not None else self.rotary(start, T, x.device)
        cfg = self.config
        stream = None
        if cfg.depth_slots:
            fp8 = cfg.depth_stream_torch_dtype
            if decoding:
                if not torch.compiler.is_compiling():  # an eager step (transformers' first, or all)
                    self._keep_for_decoding(cache)
                kept = getattr(cache, _DecodeState.ATTR, None)
                stream = DepthSlots(cfg.depth_slots, fp8=fp8 is not None, buffers=None if kept is None else kept.slots,
                                    ffn_inputs=None if kept is None else kept.ffn_inputs)
            else:
                stream = DepthStream(cfg.depth_slots, dtype=fp8)
        if cfg.depth_mechanism.startswith("attnres"):
            x = self._attnres(x, cos, sin, cache, masks, decoding)
        elif self.hyper is not None:
            x = self._hyper_connections(x, cos, sin, cache, masks)
        elif self.mudd is not None:
            x = self._mudd(x, cos, sin, cache, masks)
        elif cfg.depth_mechanism == "denseformer":
            outputs = [x]
            for i, layer in enumerate(self.layers):
                outputs.append(self._run(layer, x, cos, sin, stream, cache, masks))
                x = self.dense(i, outputs)
                record(self, "hidden", i, x)
        else:
            for i, layer in enumerate(self.layers):
                x = self._run(layer, x, cos, sin, stream, cache, masks)
                record(self, "hidden", i, x)
        if isinstance(stream, DepthStream):
            if static:  # a prefill
                self._keep_for_decoding(cache, stream)
            stream.close()
        x = self.norm(x).reshape(B, T, D)
        out = BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()

    def _inputs(self, cache, cache_position, attention_mask, position_ids, cu_seqlens, max_seqlen, x):
        """Masks, RoPE positions (None: after the cache), packed documents and the cache's length
        of a forward that is not a decoding step on a fixed-length cache (host syncs allowed)."""
        B, T, _ = x.shape
        static = is_fixed_length(cache)
        start = int(cache.get_seq_length()) if cache is not None else 0
        if static:
            width = _max_cache_len(cache)
            if start + T > width:
                raise ValueError(f"the fixed-length cache has {width} slots; {start} are filled and {T} tokens came")
            if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] > start + T:
                attention_mask = attention_mask[:, : start + T]  # static_cache_mask's padding to the cache's length
        _check_cache_position(cache_position, start, T)
        kv_start, positions, padded = _padding(attention_mask, B, start + T)
        if static and padded and not bool(attention_mask[:, -1].all()):
            raise ValueError("a fixed-length cache takes left-padded rows only (its decoding steps read the padding "
                             "as leading zeros); got right padding: pad prompts on the left")
        if positions is not None:
            positions = positions[:, start:]
        if position_ids is not None:
            positions = _check_position_ids(position_ids, B, T)
        # with padding, position_ids are transformers' (padding at 0 or 1), not document starts
        docs = self._documents(cu_seqlens, max_seqlen, None if padded or position_ids is None else positions, x)
        _refuse_documents(docs, cache, padded)
        masks = {"kv_start": kv_start} if kv_start is not None else {}
        if static:
            slots = cache_position if cache_position is not None else torch.arange(start, start + T, device=x.device)
            masks.update(cache_position=slots, kv_len=start + T)
        return masks or None, positions, docs, start

    def _static_decode_inputs(self, cache, cache_position, attention_mask, position_ids, batch: int):
        """(masks, positions ``[B or 1, 1]``) of a decoding step on a fixed-length cache, from
        tensors only: the new token's slot is ``cache_position`` (transformers 4.x) or the
        cache's length (5.x keeps it on the device)."""
        width = _max_cache_len(cache)
        if width > self.rotary.max_positions:
            raise ValueError(f"the fixed-length cache has {width} slots, more than max_position_embeddings="
                             f"{self.rotary.max_positions}: a decoding step cannot check its position on the host")
        if cache_position is not None:
            if not isinstance(cache_position, torch.Tensor) or cache_position.shape != (1,):
                got = tuple(cache_position.shape) if isinstance(cache_position, torch.Tensor) else cache_position
                raise ValueError(f"cache_position of a decoding step must be a tensor [1] (its slot), got {got}")
            slot = cache_position
        else:
            slot = cache.get_seq_length()
            device = self.embed_tokens.weight.device
            slot = slot.reshape(1) if isinstance(slot, torch.Tensor) else torch.full((1,), slot, device=device)
        key_mask, positions = _static_decode_padding(attention_mask, slot, batch, width)
        if position_ids is not None:
            positions = _check_position_ids(position_ids, batch, 1)
        elif positions is None:
            positions = slot[None]
        return {"cache_position": slot, "key_mask": key_mask}, positions

    @staticmethod
    def _documents(cu_seqlens, max_seqlen, position_ids, x):
        """(cu_seqlens, max_seqlen) of packed documents, given or found where position_ids restart;
        None for unpacked rows."""
        if cu_seqlens is None and max_seqlen is None:
            return None if position_ids is None else _documents_from_positions(position_ids.expand(x.shape[:2]))
        if x.shape[0] != 1:
            raise ValueError(f"cu_seqlens (packed documents) needs input_ids of shape [1, total tokens] (the documents "
                             f"one after another), got batch size {x.shape[0]}")
        check_cu_seqlens(cu_seqlens, max_seqlen, x, None)
        return cu_seqlens, max_seqlen

    def _run(self, fn, *args):
        """fn(*args), recomputed in backward instead of stored when activation checkpointing is on."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def prepare_decoding(self, cache) -> None:
        """Keeps on the fixed-length ``cache`` a copy of each block's stacked FFN input weights
        (``_DecodeState``), which compiled decoding steps compute in one GEMM, or refreshes it
        where parameters changed in place since. :func:`~flash_depth.eval.generation.compiled_decoding`
        calls it before each compiled step (a compiled step cannot); a prefill makes the copy on
        CUDA. Nothing for mechanisms without depth slots, or for a cache of growing length."""
        if not isinstance(cache, Cache):
            raise TypeError(f"cache must be a transformers Cache, got {type(cache).__name__}")
        if self.config.depth_slots and is_fixed_length(cache):
            _DecodeState.of(cache).refresh_ffn_inputs(self.layers, force=False, create=True)

    def _keep_for_decoding(self, cache, stream: DepthStream | None = None) -> None:
        """A forward on a fixed-length cache. A prefill (``stream``, its depth stream): keep the
        slot buffers and copy the stacked FFN inputs, made if missing on CUDA, where generate
        compiles the steps (compiled: copy those kept, in the graph). An eager step: refresh the
        kept copies whose parameters changed."""
        if stream is None or torch.compiler.is_compiling():
            state = getattr(cache, _DecodeState.ATTR, None)
            if state is not None:
                state.refresh_ffn_inputs(self.layers, force=stream is not None, create=False)
        else:
            state = _DecodeState.of(cache)
            state.keep_slots(stream)
            state.refresh_ffn_inputs(self.layers, force=True, create=self.embed_tokens.weight.is_cuda)

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block in place (regional compilation, as torchtitan does): the
        blocks share their traced graphs (one per variant, such as AttnRes's or mHC's attention and
        FFN sublayers), compiled once whatever the depth; the stream reads and writes run eagerly
        between graphs. HC compiles each sublayer together with its
        stream read and write instead: those are n-fold residual-stream passes that the compiler
        fuses (eager, they cost more than the sublayer at small widths). mHC compiles the blocks
        only: compiled together with its read and write on CUDA (torch 2.11's Inductor), its
        gradients came out wrong, by 3x on the embedding (docs/model.md, "Compiled mHC"); its
        read and write run as the fused Triton ops between graphs. ``options`` go to
        ``torch.compile``."""
        if self.config.depth_mechanism == "hc":
            self._hyper_sublayer = torch.compile(_hyper_sublayer, **options)
            return
        for layer in self.layers:
            layer.compile(**options)
        if self.mudd is not None:
            self.mudd.compile_mixing(**options)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block (AttnRes: each sublayer) in backward. Not for ``moda`` and
        ``depth_attention``: their depth stream is written in place, which recomputation would repeat."""
        if enabled and self.config.depth_slots:
            raise ValueError(
                f"activation checkpointing is not supported for depth_mechanism={self.config.depth_mechanism!r} "
                "yet: the depth stream is written in place during the forward"
            )
        self.activation_checkpointing = enabled

    def attnres_block_size(self) -> int:
        sublayers = 2 * self.config.num_hidden_layers
        return 1 if self.config.depth_mechanism == "attnres_full" else sublayers // self.config.attnres_blocks

    def _hyper_connections(self, emb, cos, sin, cache, masks):
        """mHC / HC: ``hc_streams`` copies of the embedding; each sublayer reads its input from the
        streams and writes its output back with the mixing of :class:`HyperConnection`; the model's
        output is the streams' mean."""
        recording = self.__dict__.get("_recorder") is not None
        streams = expand_streams(emb, self.config.hc_streams)
        for i, layer in enumerate(self.layers):
            for j, sub in enumerate(("attn", "ffn")):
                hyper = self.hyper[2 * i + j]
                if not recording:
                    streams = self._run(self._hyper_sublayer, hyper, layer, streams, cos, sin, cache, masks, sub)
                    continue

                def sublayer(h, layer=layer, sub=sub):
                    out = layer(h, cos, sin, None, cache, masks, sub)
                    record(self, "sublayer", i, sub, h, h + out)
                    return out

                streams = hyper(streams, sublayer)
            if recording:
                record(self, "hidden", i, collapse_streams(streams))
        return collapse_streams(streams)

    def _mudd(self, emb, cos, sin, cache, masks):
        """MUDDFormer: block 0 reads the embedding; after each block its output joins the kept
        outputs and :class:`MuddConnections` mixes them into the next block's query, key, value
        and residual inputs (after the last block: the stack's output)."""
        dtype = emb.dtype
        # under autocast the kept outputs are stored and mixed in the autocast dtype: the mixes are
        # memory-bound and the states come out of the bf16 matmuls in it (as MUDDFormer trains)
        if torch.is_autocast_enabled(emb.device.type):
            dtype = torch.get_autocast_dtype(emb.device.type)
        stream = self.mudd.new_stream(emb, dtype)
        x = emb
        for i, layer in enumerate(self.layers):
            out = self._run(layer, x, cos, sin, None, cache, masks)
            record(self, "hidden", i, out)
            x = self.mudd(stream, out)
        stream.close()
        return x[0]

    def _attnres(self, emb, cos, sin, cache, masks, decoding: bool = False):
        """Attention Residuals: each sublayer's input is a softmax read over finished block sums
        (block 0 = the embedding) plus the current block's partial sum; full = blocks of one.

        Finished sources live in one :class:`SourceStream` buffer, read in place by the fused
        kernels on GPU. Without gradients, block AttnRes reads two-phase: one batched read of
        all of a block's queries over the finished blocks, then a per-sublayer merge of the
        partial sum. ``decoding``: a decoding step on a fixed-length cache, whose sources are a
        :class:`SourceList` (plain PyTorch reads, no graph breaks)."""
        cfg, reads = self.config, self.attnres
        size = self.attnres_block_size()
        # Sources are stored in the autocast dtype: sublayer outputs already come out of the
        # bf16 matmuls in it, and the reads are memory-bound. Partial sums stay float32.
        source_dtype = emb.dtype
        if emb.is_cuda and torch.is_autocast_enabled("cuda"):
            source_dtype = torch.get_autocast_dtype("cuda")
        partial_dtype = torch.promote_types(emb.dtype, torch.float32)
        backend = {"reference": "reference", "triton": "triton"}.get(cfg.attention_backend, "auto")
        n_sources = 1 + 2 * cfg.num_hidden_layers // size
        stream = (SourceList(n_sources, dtype=source_dtype) if decoding
                  else reads.new_stream(n_sources, backend=backend, dtype=source_dtype))
        stream.write(emb)  # cast to source_dtype by the copy into its slot
        recording = self.__dict__.get("_recorder") is not None
        two_phase = size > 1 and not torch.is_grad_enabled() and not recording
        partial, first_reads = None, None

        def read(i):
            nonlocal first_reads
            if two_phase:
                if i % size == 0:
                    first_reads = reads.read_two_phase(stream, i, size)
                out, lse = first_reads[0][i % size], first_reads[1][i % size]
                return out if partial is None else reads.merge(i, out, lse, partial)
            if not recording:
                return reads.read(stream, i, partial)
            h, alpha = reads.read(stream, i, partial, return_weights=True)
            record(self, "attnres", i, alpha)
            return h

        index = 0
        for layer_idx, layer in enumerate(self.layers):
            for sub in ("attn", "ffn"):
                h = read(index)
                if sub == "attn":
                    record(self, "hidden", layer_idx, h)
                out = self._run(layer, h, cos, sin, None, cache, masks, sub)
                if recording:
                    record(self, "sublayer", layer_idx, sub, h, h + out)
                partial = out.to(partial_dtype) if partial is None else partial + out
                index += 1
                if index % size == 0:
                    stream.write(partial)
                    partial = None
        h = read(index)
        if isinstance(stream, SourceStream):
            stream.close()
        return h


class FlashDepthForCausalLM(FlashDepthPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FlashDepthConfig):
        super().__init__(config)
        self.model = FlashDepthModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_decoding(self, cache) -> None:
        """:meth:`FlashDepthModel.prepare_decoding`."""
        self.model.prepare_decoding(cache)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def create_masks_for_generate(self, attention_mask=None, cache=None, past_key_values=None, **_):
        """transformers 5.x's generate() hook for the mask of a fixed-length cache (in place of its 4-D
        masks): the 2-D mask zero-padded to the cache's length (:func:`static_cache_mask`)."""
        cache = _resolve_cache(cache, past_key_values)
        return static_cache_mask(attention_mask, _max_cache_len(cache))

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, return_dict=None,
                token_type_ids=None, cu_seqlens=None, max_seqlen=None, **kwargs):
        """input_ids ``[B, T]`` -> logits ``[B, T, vocab]``; with labels ``[B, T]`` also the next-token loss.
        ``logits_to_keep``: an int k keeps the last k positions (0: all), a 1-D tensor the positions it
        lists. Cache, padding, packed documents and extra keywords: as :meth:`FlashDepthModel.forward`."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, past_key_values=past_key_values,
                         token_type_ids=token_type_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kwargs)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1:
            h = h[:, logits_to_keep]
        elif isinstance(logits_to_keep, int) and logits_to_keep >= 0:
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            got = logits_to_keep
            got = f"a tensor of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else repr(got)
            raise ValueError(f"logits_to_keep must be an int >= 0 or a 1-D tensor of positions, got {got}")
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
                got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise TypeError(f"labels must be an int64 tensor [B, T] (-100: no loss), got {got}")
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()
