"""FlashDepthViTForImageClassification: a DeiT-style vision encoder (patch embedding, a CLS token,
learned position embeddings, pre-norm LayerNorm blocks, GELU MLP, non-causal attention) built
from the decoder's layers, whose depth mechanism is ``config.depth_mechanism``:

- ``residual``: the plain encoder, x + F(x);
- ``moda``: attention is non-causal Mixture-of-Depths Attention: one softmax over every patch's
  K/V and the depth K/V that earlier attention layers (and, with ``ffn_kv``, MLPs) wrote for the
  same token;
- ``depth_attention``: each block but the first first reads the depth stream with its own query;
- ``attnres_full`` / ``attnres_block``: Attention Residuals replace the residual sum;
- ``denseformer``: after each block, a learned weighted average of all earlier block outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from flash_depth.nn import MLP, AttnResQueries, DenseFormerMixer, DepthKV, DepthRead, MoDAAttention, RMSNorm
from flash_depth.nn.depth_stream import DepthStream

from .configuration_flash_depth import check_fields
from .modeling_flash_depth import _init_copy, check_float_input, init

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

VIT_MECHANISMS = ("residual", "moda", "depth_attention", "attnres_full", "attnres_block", "denseformer")

VIT_PRESETS = {
    # scikit-learn's 8x8 digits: patches of 2x2 pixels, 16 patches + CLS; trains in seconds on a CPU.
    # QK-norm on: without it both residual and moda needed twice the epochs to pass 90% test accuracy.
    "digits": dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                   num_attention_heads=4, intermediate_size=128, num_labels=10, qk_norm=True),
    # DeiT-Tiny (Touvron et al. 2021): 224x224, 196 patches + CLS, width 192, 3 heads of 64
    "deit-tiny": dict(image_size=224, patch_size=16, num_channels=3, hidden_size=192, num_hidden_layers=12,
                      num_attention_heads=3, intermediate_size=768, num_labels=1000),
}


class FlashDepthViTConfig(PreTrainedConfig):
    """Configuration of :class:`FlashDepthViTForImageClassification`.

    Image fields: ``image_size`` (square, pixels), ``patch_size`` (dividing it), ``num_channels``,
    ``num_labels`` (classes). Encoder fields as in DeiT: ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads`` (``num_key_value_heads``: GQA, default the same), ``intermediate_size``
    (the MLP), ``layer_norm_eps``, ``qkv_bias`` (biases on the attention projections),
    ``qk_norm`` (per-head RMSNorm of queries and keys; off in DeiT).

    Depth fields, as in :class:`~flash_depth.models.FlashDepthConfig`: ``depth_mechanism`` (one of
    ``VIT_MECHANISMS``), ``ffn_kv``, ``attn_kv_proj``, ``attnres_blocks`` (dividing 2 x layers),
    ``depth_window``, ``depth_anchors``, ``attention_backend``. Blocks are pre-norm.
    """

    model_type = "flash_depth_vit"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 192,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 3,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 768,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        initializer_range: float = 0.02,
        depth_mechanism: str = "residual",
        ffn_kv: bool = True,
        attn_kv_proj: bool = False,
        attnres_blocks: int = 4,
        depth_window: int | None = None,
        depth_anchors: int = 0,
        attention_backend: str = "auto",
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(1, num_attention_heads)
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.initializer_range = initializer_range
        self.depth_mechanism = depth_mechanism
        self.ffn_kv = ffn_kv
        self.attn_kv_proj = attn_kv_proj
        self.attnres_blocks = attnres_blocks
        self.depth_window = depth_window
        self.depth_anchors = depth_anchors
        self.attention_backend = attention_backend
        super().__init__(**kwargs)
        self.validate_depth()

    def validate_depth(self) -> None:
        """Raise ValueError on a configuration that cannot be built."""
        check_fields(self, positive_ints=("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                                          "num_labels"),
                     bools=("qkv_bias", "qk_norm", "ffn_kv", "attn_kv_proj"),
                     non_negative=("initializer_range",), positive=("layer_norm_eps",))
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.depth_mechanism not in VIT_MECHANISMS:
            raise ValueError(f"depth_mechanism must be one of {VIT_MECHANISMS}, got {self.depth_mechanism!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        sublayers = 2 * self.num_hidden_layers
        blocks = self.attnres_blocks
        if self.depth_mechanism == "attnres_block" and (
                not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1 or sublayers % blocks):
            raise ValueError(f"attnres_blocks={blocks!r} must divide the {sublayers} sublayers "
                             f"(2 x num_hidden_layers={self.num_hidden_layers})")
        window, anchors = self.depth_window, self.depth_anchors
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"depth_window must be None (every earlier slot) or an int >= 1, got {window!r}")
        if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 0:
            raise ValueError(f"depth_anchors must be an int >= 0, got {anchors!r}")
        if self.attention_backend not in ("auto", "reference", "triton", "cudnn"):
            raise ValueError(f"attention_backend must be auto/reference/triton/cudnn, got {self.attention_backend!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def depth_slots(self) -> int:
        """Depth K/V slots the stream holds (moda, depth_attention): one per writing sublayer of
        every block but the last."""
        if self.depth_mechanism not in ("moda", "depth_attention"):
            return 0
        return (self.num_hidden_layers - 1) * (2 if self.ffn_kv else 1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FlashDepthViTConfig":
        """A named preset (``digits``, ``deit-tiny``) with fields overridden."""
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(VIT_PRESETS)}")
        return cls(**{**VIT_PRESETS[name], **overrides})


class FlashDepthViTBlock(nn.Module):
    """Pre-norm LayerNorm block: non-causal attention + GELU MLP. For residual-stream mechanisms
    ``forward`` applies the residual; AttnRes calls ``attn_sublayer`` / ``ffn_sublayer`` on its reads."""

    def __init__(self, config: FlashDepthViTConfig, layer_idx: int):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        mech = config.depth_mechanism
        # block 0 has nothing to read; the last block's slots would go unread (with one block: no stream)
        writes = mech in ("moda", "depth_attention") and layer_idx < config.num_hidden_layers - 1
        window = {"depth_window": config.depth_window, "depth_anchors": config.depth_anchors}
        self.attn_norm = nn.LayerNorm(D, eps=eps)
        self.attn = MoDAAttention(D, heads, kv_heads, head_dim, qk_norm=config.qk_norm, eps=eps,
                                  reads_depth=mech == "moda" and layer_idx > 0, writes_depth=writes,
                                  attn_kv_proj=writes and config.attn_kv_proj, layer_idx=layer_idx,
                                  backend=config.attention_backend, causal=False, bias=config.qkv_bias, **window)
        self.ffn_norm = nn.LayerNorm(D, eps=eps)
        self.ffn = MLP(D, config.intermediate_size)
        self.ffn_kv = (DepthKV(D, kv_heads, head_dim, k_norm=config.qk_norm, eps=eps, bias=config.qkv_bias)
                       if writes and config.ffn_kv else None)
        has_read = mech == "depth_attention" and layer_idx > 0
        self.depth_norm = nn.LayerNorm(D, eps=eps) if has_read else None
        self.depth_read = DepthRead(D, heads, head_dim, qk_norm=config.qk_norm, eps=eps, layer_idx=layer_idx,
                                    backend=config.attention_backend, **window) if has_read else None

    def attn_sublayer(self, h: torch.Tensor, stream: DepthStream | None) -> torch.Tensor:
        return self.attn(self.attn_norm(h), stream=stream)

    def ffn_sublayer(self, h: torch.Tensor, stream: DepthStream | None) -> torch.Tensor:
        h = self.ffn_norm(h)
        if self.ffn_kv is not None:
            stream.write(*self.ffn_kv(h))
        return self.ffn(h)

    def forward(self, x: torch.Tensor, stream: DepthStream | None, sublayer: str | None = None) -> torch.Tensor:
        """x ``[B, 1 + patches, D]`` -> the block's output; with ``sublayer`` ("attn"/"ffn", for
        AttnRes) only that sublayer's output, without the residual."""
        if sublayer == "attn":
            return self.attn_sublayer(x, stream)
        if sublayer == "ffn":
            return self.ffn_sublayer(x, stream)
        if self.depth_read is not None:
            x = x + self.depth_read(self.depth_norm(x), stream=stream)
        x = x + self.attn_sublayer(x, stream)
        return x + self.ffn_sublayer(x, stream)


class FlashDepthViTPreTrainedModel(PreTrainedModel):
    config_class = FlashDepthViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _no_split_modules = ["FlashDepthViTBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, FlashDepthViTModel):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
        elif isinstance(module, AttnResQueries):
            init.zeros_(module.queries)  # zero queries: a uniform read at start (SPEC 5)
            init.ones_(module.key_norms)
        elif isinstance(module, DenseFormerMixer):
            # identity at start: each block passes on its own output
            _init_copy(module.weights, DenseFormerMixer.identity(module.weights.shape[0]).to(module.weights.device))


class FlashDepthViTModel(FlashDepthViTPreTrainedModel):
    """Patches + CLS through the blocks: ``pixel_values [B, C, H, W]`` -> last_hidden_state
    ``[B, 1 + patches, D]`` (CLS first) and pooler_output ``[B, D]`` (the normed CLS)."""

    def __init__(self, config: FlashDepthViTConfig):
        super().__init__(config)
        config.validate_depth()
        D, layers = config.hidden_size, config.num_hidden_layers
        self.patch_embed = nn.Conv2d(config.num_channels, D, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, D))
        self.layers = nn.ModuleList(FlashDepthViTBlock(config, i) for i in range(layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        mech = config.depth_mechanism
        attnres = mech.startswith("attnres")
        self.attnres = AttnResQueries(2 * layers + 1, D, config.layer_norm_eps) if attnres else None
        self.dense = DenseFormerMixer(layers) if mech == "denseformer" else None
        self.post_init()

    def _check_pixels(self, pixel_values) -> None:
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        check_float_input("pixel_values", pixel_values, self.patch_embed.weight.dtype,
                          f"[B, {', '.join(map(str, want))}]")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want or pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values must have shape [B >= 1, {', '.join(map(str, want))}] (the config's "
                             f"num_channels, image_size), got {tuple(pixel_values.shape)}")

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None):
        """pixel_values ``[B, num_channels, image_size, image_size]`` -> BaseModelOutputWithPooling."""
        self._check_pixels(pixel_values)
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, patches, D], row-major
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1) + self.pos_embed
        cfg = self.config
        if self.attnres is not None:
            x = self._attnres(x)
        else:
            stream = DepthStream(cfg.depth_slots) if cfg.depth_slots else None
            states = [x] if self.dense is not None else None  # DenseFormer mixes all of them
            for i, layer in enumerate(self.layers):
                x = layer(x, stream)
                if states is not None:
                    states.append(x)
                    x = self.dense(i, states)
            if stream is not None:
                stream.close()
        x = self.norm(x)
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0])
        return out if return_dict is not False else out.to_tuple()

    def _attnres(self, emb: torch.Tensor) -> torch.Tensor:
        """Attention Residuals as in the decoder: each sublayer's input is a softmax read over the
        embedding and the finished block sums plus the running partial sum; full = blocks of one."""
        cfg, reads = self.config, self.attnres
        sublayers = 2 * cfg.num_hidden_layers
        size = 1 if cfg.depth_mechanism == "attnres_full" else sublayers // cfg.attnres_blocks
        # sources in the autocast dtype (the reads are memory-bound), partial sums in float32
        source_dtype = emb.dtype
        if emb.is_cuda and torch.is_autocast_enabled("cuda"):
            source_dtype = torch.get_autocast_dtype("cuda")
        backend = {"reference": "reference", "triton": "triton"}.get(cfg.attention_backend, "auto")
        stream = reads.new_stream(1 + sublayers // size, backend=backend, dtype=source_dtype)
        stream.write(emb)
        partial = None
        for index in range(sublayers):
            out = self.layers[index // 2](reads.read(stream, index, partial), None, ("attn", "ffn")[index % 2])
            partial = out.to(torch.promote_types(emb.dtype, torch.float32)) if partial is None else partial + out
            if (index + 1) % size == 0:
                stream.write(partial)
                partial = None
        h = reads.read(stream, sublayers, partial)
        stream.close()
        return h

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block in place (the stream reads and writes stay eager), as
        :meth:`FlashDepthModel.compile_blocks`. ``options`` go to ``torch.compile``."""
        for layer in self.layers:
            layer.compile(**options)


class FlashDepthViTForImageClassification(FlashDepthViTPreTrainedModel):
    """The encoder and a linear head on the CLS token: ``pixel_values [B, C, H, W]`` -> logits
    ``[B, num_labels]``; with labels ``[B]`` (class indices) also the cross-entropy loss."""

    def __init__(self, config: FlashDepthViTConfig):
        super().__init__(config)
        self.vit = FlashDepthViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None):
        """Returns ImageClassifierOutput(loss, logits). Label values are not read on the host
        (a captured CUDA graph step allows no sync): out of range, cross-entropy raises."""
        self.vit._check_pixels(pixel_values)  # before labels are compared with its batch size
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.is_floating_point()
                                   or labels.dim() != 1 or labels.shape[0] != pixel_values.shape[0]):
            got = (f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                   else type(labels).__name__)
            raise ValueError(f"labels must be an integer tensor [B={pixel_values.shape[0]}] of class indices, "
                             f"got {got}")
        pooled = self.vit(pixel_values).pooler_output
        logits = self.classifier(pooled)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()
