"""FlashDepthConfig: an OLMo2-style decoder whose depth mechanism is one field."""

from __future__ import annotations

import functools
import inspect

import torch

from flash_depth.ops._checks import check_int, check_number
from flash_depth.ops.fp8 import fp8_dtype

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

DEPTH_MECHANISMS = ("residual", "moda", "depth_attention", "attnres_full", "attnres_block", "denseformer", "mhc", "hc",
                    "mudd")
NORM_POSITIONS = ("pre", "post")
DEPTH_STREAM_DTYPES = (None, "fp8")

PRESETS = {
    # a CPU-sized model for tests and demos
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192, vocab_size=512, max_position_embeddings=512),
    # the MoDA paper's small setting (their Table 6): width 384, 6 query heads, 2 KV heads
    "small-24": dict(hidden_size=384, num_hidden_layers=24, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=1024, vocab_size=32768, max_position_embeddings=4096),
    "small-48": dict(hidden_size=384, num_hidden_layers=48, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=1024, vocab_size=32768, max_position_embeddings=4096),
    # ~700M OLMo2-like: width 1024, GQA group 2, 36 layers
    "700m": dict(hidden_size=1024, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=4096, vocab_size=50304, max_position_embeddings=4096),
}


@functools.cache
def _general_fields() -> frozenset:
    """The fields every transformers config takes (5.x keeps the token ids off the base class)."""
    return frozenset({*inspect.signature(PreTrainedConfig.__init__).parameters, *vars(PreTrainedConfig()),
                      "bos_token_id", "eos_token_id", "pad_token_id"})


def check_fields(config, *, positive_ints=(), bools=(), non_negative=(), positive=()) -> None:
    """ValueError naming the first field of ``config`` that is not what its group needs: a positive
    int, a bool, or a finite number >= 0 / > 0 (ValueError for all: a config's faults are values)."""
    for name in positive_ints:
        check_int(name, getattr(config, name))
    for name in bools:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(config, name)!r}")
    for name in (*non_negative, *positive):
        check_number(name, getattr(config, name), positive=name in positive)


class FlashDepthConfig(PreTrainedConfig):
    """Configuration of :class:`FlashDepthForCausalLM`.

    Depth fields:
        depth_mechanism: one of ``residual``, ``moda``, ``depth_attention``, ``attnres_full``,
            ``attnres_block``, ``denseformer``, ``mhc`` (manifold-constrained hyper-connections:
            ``hc_streams`` residual streams mixed per token, the stream mix made doubly stochastic
            by Sinkhorn), ``hc`` (static hyper-connections) or ``mudd`` (MUDDFormer: after each block,
            per-token weights from a small MLP of its output mix all earlier block outputs into the
            next block's query, key, value and residual inputs).
        norm_position: ``pre`` or ``post`` (residual-stream mechanisms; ``pre`` only for attnres,
            mhc, hc and mudd).
        ffn_kv: (moda, depth_attention) each FFN also writes a depth K/V slot, projected from its input.
        attn_kv_proj: (moda, depth_attention) attention layers write depth K/V from their own
            projections instead of reusing their sequence K/V.
        attnres_blocks: number of blocks for ``attnres_block``; must divide 2 * num_hidden_layers.
        depth_window: (moda, depth_attention) None reads every earlier slot; an int S reads only the
            last S slots (plus the first ``depth_anchors``): O(S) per token and layer instead of O(L).
        depth_anchors: slots from the start that a windowed read keeps (the embedding-side layers).
        depth_stream_dtype: (moda, depth_attention) None stores the depth K/V slots in the dtype they
            are computed in (the autocast dtype under autocast); ``"fp8"`` stores them as float8 e4m3
            with a float32 scale per token and KV head (about half the bytes of bf16; gradients
            straight through; needs a GPU of compute capability >= 8.9, or the CPU). Opt-in: slower
            than bf16 at 700m today (its writes quantise in PyTorch; docs/model.md, "fp8 depth stream").
        hc_streams: parallel residual streams of ``mhc`` / ``hc``.
    """

    model_type = "flash_depth"

    def __init__(
        self,
        vocab_size: int = 32768,
        hidden_size: int = 384,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 6,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        intermediate_size: int = 1024,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        qk_norm: bool = True,
        initializer_range: float = 0.02,
        depth_mechanism: str = "residual",
        norm_position: str = "pre",
        ffn_kv: bool = True,
        attn_kv_proj: bool = False,
        attnres_blocks: int = 8,
        depth_window: int | None = None,
        depth_anchors: int = 0,
        depth_stream_dtype: str | None = None,
        hc_streams: int = 4,
        attention_backend: str = "auto",
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(1, num_attention_heads)
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm = qk_norm
        self.initializer_range = initializer_range
        self.depth_mechanism = depth_mechanism
        self.norm_position = norm_position
        self.ffn_kv = ffn_kv
        self.attn_kv_proj = attn_kv_proj
        self.attnres_blocks = attnres_blocks
        self.depth_window = depth_window
        self.depth_anchors = depth_anchors
        self.depth_stream_dtype = depth_stream_dtype
        self.hc_streams = hc_streams
        self.attention_backend = attention_backend
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_depth()

    def validate_depth(self) -> None:
        """Raise ValueError on a configuration that cannot be built."""
        check_fields(self, positive_ints=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                                          "head_dim"),
                     bools=("qk_norm", "ffn_kv", "attn_kv_proj", "tie_word_embeddings"),
                     non_negative=("initializer_range",), positive=("rms_norm_eps", "rope_theta"))
        if self.depth_mechanism not in DEPTH_MECHANISMS:
            raise ValueError(f"depth_mechanism must be one of {DEPTH_MECHANISMS}, got {self.depth_mechanism!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if self.depth_mechanism.startswith("attnres") and self.norm_position != "pre":
            raise ValueError("attnres mechanisms normalise each sublayer's input themselves: norm_position must be 'pre'")
        if self.depth_mechanism == "mudd" and self.norm_position != "pre":
            # the paper's models are pre-norm; a post-norm block would normalise its residual input,
            # which the dense weights then mix (not defined by the paper or its code)
            raise ValueError("mudd feeds each block separately normed query/key/value inputs and a residual input: "
                             "norm_position must be 'pre'")
        if self.depth_mechanism in ("mhc", "hc"):
            if self.norm_position != "pre":
                raise ValueError(f"{self.depth_mechanism} reads each sublayer's input from its streams: norm_position "
                                 "must be 'pre'")
            if isinstance(self.hc_streams, bool) or not isinstance(self.hc_streams, int) or self.hc_streams < 2:
                raise ValueError(f"hc_streams must be an int >= 2, got {self.hc_streams!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        sublayers = 2 * self.num_hidden_layers
        if self.depth_mechanism == "attnres_block":
            blocks = self.attnres_blocks
            if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1 or sublayers % blocks:
                raise ValueError(
                    f"attnres_blocks={self.attnres_blocks!r} must divide the {sublayers} sublayers "
                    f"(2 x num_hidden_layers={self.num_hidden_layers})"
                )
        window, anchors = self.depth_window, self.depth_anchors
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"depth_window must be None (every earlier slot) or an int >= 1, got {window!r}")
        if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 0:
            raise ValueError(f"depth_anchors must be an int >= 0, got {anchors!r}")
        if self.depth_stream_dtype not in DEPTH_STREAM_DTYPES:
            raise ValueError(f"depth_stream_dtype must be one of {DEPTH_STREAM_DTYPES}, got {self.depth_stream_dtype!r}")
        if self.depth_stream_dtype is not None:
            if self.depth_mechanism not in ("moda", "depth_attention"):
                raise ValueError(f"depth_stream_dtype={self.depth_stream_dtype!r} sets how the depth K/V stream is "
                                 f"stored; depth_mechanism={self.depth_mechanism!r} has none (moda and "
                                 "depth_attention do)")
            fp8_dtype()  # ValueError where this torch has no float8 dtypes
        if self.attention_backend not in ("auto", "reference", "triton", "cudnn"):
            raise ValueError(f"attention_backend must be auto/reference/triton/cudnn, got {self.attention_backend!r}")

    @property
    def depth_stream_torch_dtype(self) -> torch.dtype | None:
        """What ``DepthStream`` takes for ``depth_stream_dtype``: None, or torch.float8_e4m3fn."""
        if self.depth_stream_dtype is None:
            return None
        return fp8_dtype()

    @property
    def depth_slots(self) -> int:
        """Depth K/V slots the stream holds (moda, depth_attention): one per writing sublayer of
        every block but the last (block l reads the 2l slots of blocks 0..l-1 with ffn_kv)."""
        if self.depth_mechanism not in ("moda", "depth_attention"):
            return 0
        return (self.num_hidden_layers - 1) * (2 if self.ffn_kv else 1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FlashDepthConfig":
        """A named preset (``tiny``, ``small-24``, ``small-48``, ``700m``) with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        # the constructor keeps unknown keywords as attributes (transformers' configs do, for the
        # fields of other versions); here a misspelt field would be dropped silently
        fields = inspect.signature(cls.__init__).parameters
        unknown = sorted(k for k in overrides if k not in fields and k not in _general_fields())
        if unknown:
            raise ValueError(f"unknown FlashDepthConfig fields {unknown}; the depth and shape fields are "
                             f"{[k for k in fields if k not in ('self', 'kwargs')]}")
        return cls(**{**PRESETS[name], **overrides})
