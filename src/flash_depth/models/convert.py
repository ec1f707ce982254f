"""Give a transformers decoder (Llama, Mistral, Qwen2, Qwen3, OLMo2) depth retrieval in one call.

    model = AutoModelForCausalLM.from_pretrained(...)
    add_depth_retrieval(model, "moda", ffn_kv=True)     # then train as usual
    model.save_pretrained(path)                         # config.depth_retrieval records the call
    model = from_pretrained(path)                       # the same model back, mechanism included

Mechanisms:
- ``moda``: each attention layer's queries read, under one softmax with the sequence K/V, the
  depth K/V that earlier layers' attention wrote for the same token: their post-norm, post-RoPE
  keys and values (SPEC 2). No new parameters. ``ffn_kv=True`` adds a :class:`DepthKV` per FFN
  that writes one more slot from the FFN's input. The attention modules get a forward that keeps
  the model's own projections, q/k norms, RoPE and KV cache and swaps only the attention op.
- ``attnres_block`` / ``attnres_full``: each sublayer's input is an Attention Residuals read over
  the embedding and the finished block sums (plus the running partial sum), and the final norm
  reads once more (SPEC 5). The module that takes a sublayer's input (its pre-norm; OLMo2: the
  sublayer itself) reads, the module that gives its output (the sublayer; OLMo2: its post-norm)
  records; the decoder layer's own residual sums are still computed but feed nothing.

Each converted module becomes an instance of a subclass of its own class whose forward adds the
depth step. Per forward, the base model's forward creates the depth stream and checks the inputs (no
padding, a dynamic KV cache), and closes the stream after. A generation step needs no depth
cache: a token's depth K/V comes from earlier layers of the same step (SPEC 2).
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from transformers import AutoConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from flash_depth.nn.attnres import AttnResQueries
from flash_depth.nn.attnres_stream import SourceStream
from flash_depth.nn.depth_stream import DepthStream, read_moda
from flash_depth.nn.moda import DepthKV
from flash_depth.ops import moda_attention

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")
MECHANISMS = ("moda", "attnres_block", "attnres_full")
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")  # 5.24+, 4.56-5.23, earlier


class _State:
    """What a converted model's modules share (no weights)."""

    def __init__(self, mechanism: str, num_layers: int, ffn_kv: bool, block: int, backend: str):
        self.mechanism, self.block, self.backend = mechanism, block, backend
        self.sublayers = 2 * num_layers
        self.enabled = True
        self.slots = (num_layers - 1) * (2 if ffn_kv else 1) if mechanism == "moda" else 0
        self.stream: DepthStream | None = None  # moda, per forward
        self.rope = None  # cos, sin [B, T, 1, d/2] of this forward, for the FFN writers (moda)
        self.reads: AttnResQueries | None = None  # attnres
        self.sources: SourceStream | None = None  # attnres, per forward
        self.partial: torch.Tensor | None = None


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if not hasattr(base, "layers"):
        raise TypeError(f"expected a transformers decoder with .layers (e.g. LlamaForCausalLM), "
                        f"got {type(model).__name__}")
    return base


def add_depth_retrieval(model: nn.Module, mechanism: str = "moda", *, ffn_kv: bool = False, attnres_blocks: int = 8,
                        backend: str = "auto") -> nn.Module:
    """Give ``model`` (a Llama, Mistral, Qwen2, Qwen3 or OLMo2 decoder from transformers, with or
    without its LM head) a depth mechanism, in place; returns it.

    Args:
        mechanism: ``"moda"``, ``"attnres_block"`` or ``"attnres_full"`` (see the module doc).
        ffn_kv: (moda) each FFN but the last writes a depth K/V slot through a new :class:`DepthKV`
            from its input. Its value half starts at zero: the new slot adds nothing to the
            attention output at first, only a softmax entry, and the key gets the model's normal
            init so the slots' logits, and so their gradients, differ from the start. (A zero key
            would sit where RMSNorm's gradient is 1/sqrt(eps).)
        attnres_blocks: (attnres_block) number of blocks; must divide 2 x num_hidden_layers.
            Pseudo-queries start at zero, so each read starts as the average of its sources.
        backend: attention / AttnRes kernels, as in :func:`~flash_depth.moda_attention`.

    The call is recorded in ``model.config.depth_retrieval``; :func:`from_pretrained` reads it back.
    """
    config = model.config
    if config.model_type not in FAMILIES:
        raise ValueError(f"model_type {config.model_type!r} is not supported; supported: {FAMILIES}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if backend not in ("auto", "reference", "triton", "cudnn"):
        raise ValueError(f"backend must be auto/reference/triton/cudnn, got {backend!r}")
    if ffn_kv and mechanism != "moda":
        raise ValueError(f"ffn_kv=True needs mechanism='moda', got {mechanism!r}")
    base = _base(model)
    if "_flash_depth" in base.__dict__:
        raise ValueError("model already has depth retrieval; convert a model once")
    layers = list(base.layers)
    L = len(layers)
    if mechanism == "attnres_full":
        attnres_blocks = 2 * L
    if mechanism != "moda" and (not isinstance(attnres_blocks, int) or attnres_blocks < 1 or (2 * L) % attnres_blocks):
        raise ValueError(f"attnres_blocks={attnres_blocks!r} must divide the {2 * L} sublayers (2 x {L} layers)")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"attention_dropout={config.attention_dropout} is not supported (the depth read has none)")
    qk_norms = [_qk_norm_kind(layer.self_attn) for layer in layers]  # every check before the first change
    state = _State(mechanism, L, ffn_kv, 2 * L // attnres_blocks if mechanism != "moda" else 1,
                   "auto" if mechanism != "moda" and backend == "cudnn" else backend)
    ref = layers[0].self_attn.q_proj.weight
    if mechanism == "moda":
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            _swap(attn, _MoDAAttention, state, _qk_norm=qk_norms[i], _window=_sliding_window(attn), _writes=i < L - 1)
            if ffn_kv and i < L - 1:
                writer = DepthKV(config.hidden_size, config.num_key_value_heads, attn.head_dim,
                                 k_norm=qk_norms[i] != "none", eps=config.rms_norm_eps,
                                 device=ref.device, dtype=ref.dtype)
                with torch.no_grad():
                    writer.proj.weight.normal_(0.0, config.initializer_range)
                    writer.proj.weight[writer.kv_heads * writer.head_dim:].zero_()
                layer.mlp.depth_kv = writer
                _swap(layer.mlp, _FFNWriter, state)
    else:
        base.depth_attnres = state.reads = AttnResQueries(2 * L + 1, config.hidden_size, config.rms_norm_eps,
                                                          device=ref.device, dtype=ref.dtype)
        for idx, layer in enumerate(layers):
            if hasattr(layer, "input_layernorm"):  # pre-norm: Norm(h) -> sublayer
                pairs = ((layer.input_layernorm, layer.self_attn), (layer.post_attention_layernorm, layer.mlp))
            else:  # OLMo2: sublayer -> Norm
                pairs = ((layer.self_attn, layer.post_attention_layernorm),
                         (layer.mlp, layer.post_feedforward_layernorm))
            for j, (reader, writer) in enumerate(pairs):
                _swap(reader, _AttnResReader, state, _flash_depth_index=2 * idx + j)
                _swap(writer, _AttnResWriter, state, _flash_depth_index=2 * idx + j)
        _swap(base.norm, _AttnResReader, state, _flash_depth_index=2 * L)
    _swap(base, _DepthModel, state)
    config.depth_retrieval = {"mechanism": mechanism, **({"ffn_kv": ffn_kv} if mechanism == "moda" else {}),
                              **({"attnres_blocks": attnres_blocks} if mechanism == "attnres_block" else {})}
    return model


def set_depth_retrieval(model: nn.Module, enabled: bool | None = None, *, backend: str | None = None) -> None:
    """Switch a converted model's depth mechanism off (``enabled=False``: the original model's
    computation, its new parameters unused) or back on, and/or change its kernel ``backend``."""
    state = _base(model).__dict__.get("_flash_depth")
    if state is None:
        raise ValueError("model has no depth retrieval; call add_depth_retrieval first")
    if enabled is not None:
        state.enabled = bool(enabled)
    if backend is not None:
        if backend not in ("auto", "reference", "triton", "cudnn"):
            raise ValueError(f"backend must be auto/reference/triton/cudnn, got {backend!r}")
        state.backend = "auto" if state.mechanism != "moda" and backend == "cudnn" else backend


def from_pretrained(path, **kwargs) -> nn.Module:
    """Load a checkpoint saved from a converted model, mechanism and new weights included.

    The mechanism comes from the checkpoint config's ``depth_retrieval``. The model is converted
    inside its constructor, before transformers loads the weights, so the new parameters load
    like any other. ``kwargs`` go to ``from_pretrained`` of the model's transformers class."""
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    spec = getattr(config, "depth_retrieval", None)
    if not isinstance(spec, dict):
        raise ValueError(f"the config at {path} has no depth_retrieval entry: it was not saved from a model that "
                         "add_depth_retrieval converted")
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def __init__(self, config, *args, **kw):
        cls.__init__(self, config, *args, **kw)
        add_depth_retrieval(self, **spec)

    # a subclass only for loading: its constructor converts; the model gets its own class back
    model = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__}).from_pretrained(
        path, config=config, **kwargs)
    model.__class__ = cls
    return model


# --- module classes ------------------------------------------------------------------------
# A converted module gets a subclass of its own class (one per class, made once) whose forward
# adds the depth step around the original. Hooks would do the same, but torch.compile does not
# guard on hooks: a graph traced for a module class before conversion would run without them.

_subclasses: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, cls: type) -> type:
    if (mixin, cls) not in _subclasses:
        extra = mixin.class_attrs(cls) if hasattr(mixin, "class_attrs") else {}
        _subclasses[mixin, cls] = type(mixin.prefix + cls.__name__, (mixin, cls), {"__module__": __name__, **extra})
    return _subclasses[mixin, cls]


def _swap(module: nn.Module, mixin: type, state: _State, **attrs) -> None:
    module.__dict__.update(_flash_depth=state, **attrs)
    module.__class__ = _subclass(mixin, type(module))


def _rebuild(mixin: type, cls: type) -> nn.Module:
    module = cls.__new__(cls)
    module.__class__ = _subclass(mixin, cls)
    return module


class _Converted:
    def __reduce_ex__(self, protocol):
        # pickled as (mixin, original class): the subclass is made anew where it is unpickled
        return _rebuild, type(self).__bases__, self.__dict__


class _DepthModel(_Converted):
    """The decoder's base model: checks the inputs, creates the depth stream, closes it after."""

    prefix = "DepthRetrieval"

    def forward(self, *args, **kwargs):
        _begin(self, args, kwargs)
        try:
            return super().forward(*args, **kwargs)
        finally:
            _end(self)


class _MoDAAttention(_Converted):
    """An attention layer reading MoDA: the family's projections, q/k norms, RoPE and cache
    update, then one softmax over the sequence K/V and the depth stream instead of the family's
    attention op. Returns what the family's forward returns (4.x: with the cache)."""

    prefix = "MoDA"

    @staticmethod
    def class_attrs(cls: type) -> dict:
        family = sys.modules[cls.__module__]
        params = inspect.signature(cls.forward).parameters.values()
        return {
            "_rope": staticmethod(family.apply_rotary_pos_emb),
            # positional arguments after hidden_states, by name
            "_arg_names": tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)[2:],
            # refactored attention (module-level eager_attention_forward, transformers >= 4.48)
            # returns (out, weights); before, (out, weights, cache)
            "_returns_cache": not hasattr(family, "eager_attention_forward"),
        }

    def forward(self, hidden_states, *args, **kwargs):
        kwargs.update(zip(self._arg_names, args))
        cache = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        B, T, _ = hidden_states.shape
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self._qk_norm == "proj":  # OLMo2: over all heads at once
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self._qk_norm == "head":  # Qwen3: per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # the family's layout [B, H, T, d]
        rope = kwargs.get("position_embeddings")
        cos, sin = rope if rope is not None else self.rotary_emb(v, kwargs.get("position_ids"))  # 4.x Mistral
        q, k = self._rope(q, k, cos, sin)
        past = cache.get_seq_length(self.layer_idx) if cache is not None and self._window is not None else 0
        if self._window is not None and past + T > self._window:
            raise ValueError(f"sequences longer than the sliding window ({self._window} tokens) are not supported "
                             "with depth retrieval: the depth read attends causally over all keys")
        k_all, v_all = k, v
        if cache is not None:  # the dict is what 4.x caches take; 5.x caches ignore extra arguments
            k_all, v_all = cache.update(k, v, self.layer_idx,
                                        {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")})
        o = _attend(self, *(t.transpose(1, 2) for t in (q, k_all, v_all, k, v)), cos, sin)
        out = self.o_proj(o.reshape(B, T, -1))
        return (out, None, cache) if self._returns_cache else (out, None)


class _FFNWriter(_Converted):
    """An FFN that first writes a depth K/V slot from its input (its ``depth_kv``)."""

    prefix = "DepthKV"

    def forward(self, x, *args, **kwargs):
        _ffn_write(self, x)
        return super().forward(x, *args, **kwargs)


class _AttnResReader(_Converted):
    """A module whose input (the residual stream) is replaced by an AttnRes read."""

    prefix = "AttnResRead"

    def forward(self, *args, **kwargs):
        args, kwargs = _attnres_read(self, args, kwargs)
        return super().forward(*args, **kwargs)


class _AttnResWriter(_Converted):
    """A module whose output is a sublayer's output: added to the block's partial sum."""

    prefix = "AttnResWrite"

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        _attnres_record(self, out)
        return out


def _qk_norm_kind(attn: nn.Module) -> str:
    """Where the family normalises q and k: "none", "proj" (OLMo2: the whole projection) or "head"
    (Qwen3: each head). Raises on an attention module this conversion does not know."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), nn.Module):  # nn.Linear, or an adapter around one
            raise TypeError(f"{type(attn).__name__} has no {name} module; supported families: {FAMILIES}")
    d, hq = attn.head_dim, attn.config.num_attention_heads
    scaling = getattr(attn, "scaling", d**-0.5)
    if abs(scaling - d**-0.5) > 1e-12 * scaling:
        raise ValueError(f"attention scaling {scaling} is not head_dim**-0.5; the depth read uses head_dim**-0.5")
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is None:
        return "none"
    if q_norm.weight.numel() == hq * d:
        return "proj"
    if q_norm.weight.numel() == d:
        return "head"
    raise ValueError(f"q_norm of {q_norm.weight.numel()} weights matches neither head_dim={d} nor heads x head_dim")


def _sliding_window(attn: nn.Module) -> int | None:
    if hasattr(attn, "sliding_window"):  # 5.x Qwen2 / Qwen3: None on full-attention layers
        return attn.sliding_window
    if getattr(attn.config, "use_sliding_window", True) is False:  # 4.x Qwen2
        return None
    return getattr(attn.config, "sliding_window", None)  # Mistral


# --- the depth steps, run eagerly ------------------------------------------------------------
# Under torch.compile these are graph breaks: the streams route gradients by hand, a new stream
# per forward would be a new object to guard on, and a layer's index read in a graph would
# specialise the graph per layer.

@torch.compiler.disable
def _attend(attn, q, k_all, v_all, k, v, cos, sin):
    """MoDA of q ``[B, T, Hq, d]`` over k_all/v_all ``[B, Tk, Hk, d]`` and the stream; then the
    layer's own k/v ``[B, T, Hk, d]`` join the stream."""
    state = attn._flash_depth
    # under autocast the family's RoPE promotes q and k to float32; v is in the autocast dtype
    q, k_all, k = q.to(v.dtype), k_all.to(v.dtype), k.to(v.dtype)
    stream = state.stream
    if stream is None:
        return moda_attention(q, k_all, v_all, causal=True, backend=state.backend)
    o = read_moda(stream, q, k_all, v_all, backend=state.backend)
    if attn._writes:
        stream.write(k, v)
        # the family's tables hold the half-dim frequencies twice; DepthKV takes one half
        half = cos.shape[-1] // 2
        state.rope = cos[..., :half].unsqueeze(-2), sin[..., :half].unsqueeze(-2)
    return o


@torch.compiler.disable
def _ffn_write(mlp, x):
    state = mlp._flash_depth
    if state.stream is not None:
        state.stream.write(*mlp.depth_kv(x, *state.rope))


@torch.compiler.disable
def _attnres_read(module, args, kwargs):
    """The module's arguments with its input (the residual stream) replaced by its AttnRes read."""
    state, i = module._flash_depth, module._flash_depth_index
    if not state.enabled:
        return args, kwargs
    x = args[0] if args else kwargs["hidden_states"]
    if i == 0:  # the embedding: source 0
        dtype = x.dtype
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        state.sources = state.reads.new_stream(1 + state.sublayers // state.block, backend=state.backend, dtype=dtype)
        state.sources.write(x)
        state.partial = None
    h = state.reads.read(state.sources, i, state.partial).to(x.dtype)
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@torch.compiler.disable
def _attnres_record(module, output) -> None:
    """Adds sublayer i's output to the block's partial sum; a finished block becomes a source."""
    state, i = module._flash_depth, module._flash_depth_index
    if not state.enabled:
        return
    out = output[0] if isinstance(output, tuple) else output
    partial = out.to(torch.promote_types(out.dtype, torch.float32)) if state.partial is None else state.partial + out
    if (i + 1) % state.block == 0:
        state.sources.write(partial)
        partial = None
    state.partial = partial


@torch.compiler.disable
def _begin(base, args, kwargs) -> None:
    state = base._flash_depth
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and (mask.dim() != 2 or not bool(mask.all())):
        raise ValueError("padded batches (attention_mask with zeros) are not supported with depth retrieval; pass "
                         f"unpadded sequences and an attention_mask [B, T] of ones or none, got {tuple(mask.shape)}")
    positions = kwargs.get("position_ids")
    if positions is not None and positions.shape[-1] > 1 and bool((positions.diff(dim=-1) != 1).any()):
        raise ValueError("position_ids must count up by one in each row (no packed or padded sequences)")
    cache = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
    if isinstance(cache, Cache) and not isinstance(cache, DynamicCache):
        raise ValueError(f"the KV cache must be a DynamicCache, got {type(cache).__name__} (a fixed-size cache "
                         "would hand the attention its unwritten slots)")
    if base.training and torch.is_grad_enabled() and (
            getattr(base, "gradient_checkpointing", False)
            or any(getattr(layer, "gradient_checkpointing", False) for layer in base.layers)):
        raise ValueError("gradient checkpointing is not supported with depth retrieval: the depth stream is written in "
                         "place, and recomputing a layer would write it again")
    state.stream = DepthStream(state.slots) if state.enabled and state.slots else None


@torch.compiler.disable
def _end(base) -> None:
    state = base._flash_depth
    for stream in (state.stream, state.sources):
        if stream is not None:
            stream.close()  # drops the handle cycle that would keep the buffers alive until gc
    state.stream = state.sources = state.partial = state.rope = None
