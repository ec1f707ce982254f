"""The layers of flash_depth.nn that the decoder is built from: checkpoint keys, shapes, input checks."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM
from flash_depth.nn import (MLP, AttnResQueries, DenseFormerMixer, DepthKV, DepthRead, DepthSlots, DepthStream,
                            MoDAAttention, RMSNorm, Rotary, SourceList, apply_rotary, read_depth, read_moda)
from flash_depth.nn.attnres_stream import SourceStream
from flash_depth.nn.layers import SwiGLU
from flash_depth.ops import depth_attention, moda_attention
from oracle import rel_err

STATE_DICT_KEYS = {  # recorded from the tiny preset before the layers moved to flash_depth.nn
    "moda+ffn_kv": ("moda", {"ffn_kv": True}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.ffn_norm.weight model.layers.0.ffn.gate_up.weight
        model.layers.0.ffn.down.weight model.layers.0.ffn_kv.proj.weight model.layers.0.ffn_kv.k_norm.weight
        model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight model.layers.1.attn.kv_proj.weight
        model.layers.1.attn.o_proj.weight model.layers.1.attn.q_norm.weight model.layers.1.attn.k_norm.weight
        model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight model.layers.1.ffn.down.weight
        model.layers.1.ffn_kv.proj.weight model.layers.1.ffn_kv.k_norm.weight model.layers.2.attn_norm.weight
        model.layers.2.attn.q_proj.weight model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight
        model.layers.2.attn.q_norm.weight model.layers.2.attn.k_norm.weight model.layers.2.ffn_norm.weight
        model.layers.2.ffn.gate_up.weight model.layers.2.ffn.down.weight model.layers.2.ffn_kv.proj.weight
        model.layers.2.ffn_kv.k_norm.weight model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight
        model.layers.3.attn.kv_proj.weight model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight
        model.layers.3.attn.k_norm.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.norm.weight lm_head.weight
    """.split()),
    "moda+attn_kv_proj": ("moda", {"ffn_kv": False, "attn_kv_proj": True}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.attn.depth_kv.proj.weight
        model.layers.0.attn.depth_kv.k_norm.weight model.layers.0.ffn_norm.weight
        model.layers.0.ffn.gate_up.weight model.layers.0.ffn.down.weight model.layers.1.attn_norm.weight
        model.layers.1.attn.q_proj.weight model.layers.1.attn.kv_proj.weight model.layers.1.attn.o_proj.weight
        model.layers.1.attn.q_norm.weight model.layers.1.attn.k_norm.weight
        model.layers.1.attn.depth_kv.proj.weight model.layers.1.attn.depth_kv.k_norm.weight
        model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight model.layers.1.ffn.down.weight
        model.layers.2.attn_norm.weight model.layers.2.attn.q_proj.weight model.layers.2.attn.kv_proj.weight
        model.layers.2.attn.o_proj.weight model.layers.2.attn.q_norm.weight model.layers.2.attn.k_norm.weight
        model.layers.2.attn.depth_kv.proj.weight model.layers.2.attn.depth_kv.k_norm.weight
        model.layers.2.ffn_norm.weight model.layers.2.ffn.gate_up.weight model.layers.2.ffn.down.weight
        model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight model.layers.3.attn.kv_proj.weight
        model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight model.layers.3.attn.k_norm.weight
        model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight model.layers.3.ffn.down.weight
        model.norm.weight lm_head.weight
    """.split()),
    "moda+no_qk_norm": ("moda", {"qk_norm": False, "attn_kv_proj": True}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight
        model.layers.0.attn.depth_kv.proj.weight model.layers.0.ffn_norm.weight
        model.layers.0.ffn.gate_up.weight model.layers.0.ffn.down.weight model.layers.0.ffn_kv.proj.weight
        model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight model.layers.1.attn.kv_proj.weight
        model.layers.1.attn.o_proj.weight model.layers.1.attn.depth_kv.proj.weight
        model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight model.layers.1.ffn.down.weight
        model.layers.1.ffn_kv.proj.weight model.layers.2.attn_norm.weight model.layers.2.attn.q_proj.weight
        model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight
        model.layers.2.attn.depth_kv.proj.weight model.layers.2.ffn_norm.weight
        model.layers.2.ffn.gate_up.weight model.layers.2.ffn.down.weight model.layers.2.ffn_kv.proj.weight
        model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight model.layers.3.attn.kv_proj.weight
        model.layers.3.attn.o_proj.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.norm.weight lm_head.weight
    """.split()),
    "depth_attention": ("depth_attention", {}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.ffn_norm.weight model.layers.0.ffn.gate_up.weight
        model.layers.0.ffn.down.weight model.layers.0.ffn_kv.proj.weight model.layers.0.ffn_kv.k_norm.weight
        model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight model.layers.1.attn.kv_proj.weight
        model.layers.1.attn.o_proj.weight model.layers.1.attn.q_norm.weight model.layers.1.attn.k_norm.weight
        model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight model.layers.1.ffn.down.weight
        model.layers.1.ffn_kv.proj.weight model.layers.1.ffn_kv.k_norm.weight
        model.layers.1.depth_read.q_proj.weight model.layers.1.depth_read.q_norm.weight
        model.layers.1.depth_read.o_proj.weight model.layers.1.depth_norm.weight model.layers.2.attn_norm.weight
        model.layers.2.attn.q_proj.weight model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight
        model.layers.2.attn.q_norm.weight model.layers.2.attn.k_norm.weight model.layers.2.ffn_norm.weight
        model.layers.2.ffn.gate_up.weight model.layers.2.ffn.down.weight model.layers.2.ffn_kv.proj.weight
        model.layers.2.ffn_kv.k_norm.weight model.layers.2.depth_read.q_proj.weight
        model.layers.2.depth_read.q_norm.weight model.layers.2.depth_read.o_proj.weight
        model.layers.2.depth_norm.weight model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight
        model.layers.3.attn.kv_proj.weight model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight
        model.layers.3.attn.k_norm.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.layers.3.depth_read.q_proj.weight
        model.layers.3.depth_read.q_norm.weight model.layers.3.depth_read.o_proj.weight
        model.layers.3.depth_norm.weight model.norm.weight lm_head.weight
    """.split()),
}

# attnres_block and denseformer were recorded with the same plain blocks; only their own
# parameters (and lm_head after them) differ.
PLAIN_BLOCKS = """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.ffn_norm.weight model.layers.0.ffn.gate_up.weight
        model.layers.0.ffn.down.weight model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight
        model.layers.1.attn.kv_proj.weight model.layers.1.attn.o_proj.weight model.layers.1.attn.q_norm.weight
        model.layers.1.attn.k_norm.weight model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight
        model.layers.1.ffn.down.weight model.layers.2.attn_norm.weight model.layers.2.attn.q_proj.weight
        model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight model.layers.2.attn.q_norm.weight
        model.layers.2.attn.k_norm.weight model.layers.2.ffn_norm.weight model.layers.2.ffn.gate_up.weight
        model.layers.2.ffn.down.weight model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight
        model.layers.3.attn.kv_proj.weight model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight
        model.layers.3.attn.k_norm.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.norm.weight
""".split()
STATE_DICT_KEYS["attnres_block"] = ("attnres_block", {}, PLAIN_BLOCKS + ["model.attnres.queries",
                                                                         "model.attnres.key_norms", "lm_head.weight"])
STATE_DICT_KEYS["denseformer"] = ("denseformer", {}, PLAIN_BLOCKS + ["model.dense.weights", "lm_head.weight"])


@pytest.mark.parametrize("case", list(STATE_DICT_KEYS))
def test_state_dict_keys_are_unchanged(case):
    """Checkpoints saved before the layers moved must load: same names, same order."""
    mech, kw, keys = STATE_DICT_KEYS[case]
    model = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, **kw))
    assert list(model.state_dict()) == keys


B, T, D, HQ, HK, HD = 2, 11, 32, 4, 2, 8


def _rope(length=T):
    return Rotary(HD, 64, 10000.0)(0, length, "cpu")


def _qkv(attn, x, cos=None, sin=None):
    """The layer's q, k, v (rotated if given cos, sin), computed by hand."""
    q = attn.q_norm(attn.q_proj(x).view(B, T, HQ, HD))
    k, v = attn.kv_proj(x).view(B, T, 2, HK, HD).unbind(2)
    k = attn.k_norm(k)
    return (q, k, v) if cos is None else (apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)


def test_moda_attention_layer_reads_what_the_layer_before_wrote():
    torch.manual_seed(0)
    cos, sin = _rope()
    first = MoDAAttention(D, HQ, HK, HD, writes_depth=True)
    second = MoDAAttention(D, HQ, HK, HD, layer_idx=1)
    x0, x1 = torch.randn(B, T, D), torch.randn(B, T, D)
    stream = DepthStream(1)
    y0 = first(x0, cos, sin, stream)  # no slot yet: causal attention over the sequence
    y1 = second(x1, cos, sin, stream)
    stream.close()
    with torch.no_grad():
        q0, k0, v0 = _qkv(first, x0, cos, sin)
        q1, k1, v1 = _qkv(second, x1, cos, sin)
        want0 = first.o_proj(moda_attention(q0, k0, v0).reshape(B, T, -1))
        want1 = second.o_proj(moda_attention(q1, k1, v1, k0[:, :, None], v0[:, :, None]).reshape(B, T, -1))
    assert rel_err(y0, want0) < 1e-5 and rel_err(y1, want1) < 1e-5
    y1.sum().backward()  # the read's gradient reaches the layer that wrote the slot
    assert first.kv_proj.weight.grad is not None and first.kv_proj.weight.grad.abs().sum() > 0


def test_moda_attention_layer_with_a_kv_cache_gives_the_full_forward():
    torch.manual_seed(0)
    attn = MoDAAttention(D, HQ, HK, HD, reads_depth=False)
    x = torch.randn(B, T, D)
    cos, sin = _rope()
    full = attn(x, cos, sin)
    cache = DynamicCache()
    steps = [attn(x[:, :6], cos[:6], sin[:6], cache=cache)]
    steps += [attn(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache=cache) for t in range(6, T)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


def test_depth_read_layer_reads_the_slots_only():
    torch.manual_seed(0)
    cos, sin = _rope()
    read = DepthRead(D, HQ, HD)
    k, v = torch.randn(B, T, 3, HK, HD), torch.randn(B, T, 3, HK, HD)
    stream = DepthStream(3)
    for j in range(3):
        stream.write(k[:, :, j], v[:, :, j])
    x = torch.randn(B, T, D)
    with torch.no_grad():
        q = apply_rotary(read.q_norm(read.q_proj(x).view(B, T, HQ, HD)), cos, sin)
        want = read.o_proj(depth_attention(q, k, v).reshape(B, T, -1))
        assert rel_err(read(x, cos, sin, stream), want) < 1e-5
    with pytest.raises(ValueError, match="at least one written depth slot"):
        read(x, cos, sin, DepthStream(1))


def test_attnres_two_phase_read_equals_the_one_phase_read():
    torch.manual_seed(0)
    reads = AttnResQueries(4, D)
    with torch.no_grad():
        reads.queries.normal_()
        stream = SourceStream(2)
        stream.write(torch.randn(B, T, D))
        stream.write(torch.randn(B, T, D))
        partial = torch.randn(B, T, D)
        out, lse = reads.read_two_phase(stream, 1, 2)
        assert out.shape == (2, B, T, D) and lse.shape == (2, B, T)
        assert rel_err(out[0], reads.read(stream, 1)) < 1e-5
        assert rel_err(reads.merge(2, out[1], lse[1], partial), reads.read(stream, 2, partial)) < 1e-5
        with pytest.raises(ValueError, match=rf"partial must be a tensor of out's shape \({B}, {T}, {D}\), got"):
            reads.merge(2, out[1], lse[1], partial[:, :1])


def test_denseformer_mixer_starts_as_the_identity():
    mixer = DenseFormerMixer(3)
    states = [torch.randn(B, T, D) for _ in range(3)]
    assert torch.equal(mixer(1, states), states[2])
    with pytest.raises(ValueError, match="states must hold"):
        mixer(2, states)


@pytest.mark.parametrize("call, msg", [
    (lambda: MoDAAttention(D, 3, HK, HD), "heads must be a multiple of kv_heads"),
    (lambda: MoDAAttention(D, HQ, HK, 7), "head_dim must be even"),
    (lambda: MoDAAttention(D, HQ, HK, HD, attn_kv_proj=True), "needs writes_depth=True"),
    (lambda: MoDAAttention(D, 0, HK, HD), "heads must be a positive int"),
    (lambda: MoDAAttention(D, HQ, HK, HD)(torch.randn(B, T, D + 1), *_rope()), r"x must be a tensor \[B, T, 32\]"),
    (lambda: MoDAAttention(D, HQ, HK, HD)(torch.randn(B, T, D), *_rope()), "stream must be a DepthStream"),
    (lambda: MoDAAttention(D, HQ, HK, HD)(torch.randn(B, T, D), *_rope(T + 1), DepthStream(1)), "cos must be"),
    (lambda: MoDAAttention(D, HQ, HK, HD, reads_depth=False)(torch.randn(B, T, D), *_rope(), masks={"mask": None}),
     "masks must be None or a dict"),
    (lambda: DepthRead(D, HQ, HD)(torch.randn(B, T, D), *_rope(), None), "stream must be a DepthStream"),
    (lambda: AttnResQueries(4, D).read(SourceStream(1), 4), r"i must be a read index in \[0, 4\)"),
    (lambda: DenseFormerMixer(0), "layers must be a positive int"),
    (lambda: DepthKV(D, HK, HD).from_projection(torch.randn(B, T, 2 * HK * HD - 1)),
     rf"kv must be a tensor \[B, T, {2 * HK * HD}\]"),
    (lambda: SwiGLU(D, 8).from_gate_up(torch.randn(B, T, 15)), r"gate_up must be a tensor \[\.\.\., 16\]"),
])
def test_layer_input_checks_name_the_argument(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()



def test_moda_attention_layer_non_causal_without_rotation():
    """causal=False and no cos/sin (a ViT's learned positions are already in x): every query
    reads every key and the written slot, so an early token's output depends on a later token."""
    torch.manual_seed(0)
    first = MoDAAttention(D, HQ, HK, HD, writes_depth=True, causal=False, bias=True)
    second = MoDAAttention(D, HQ, HK, HD, layer_idx=1, causal=False, bias=True)
    x0, x1 = torch.randn(B, T, D), torch.randn(B, T, D, requires_grad=True)
    stream = DepthStream(1)
    first(x0, stream=stream)
    y1 = second(x1, stream=stream)
    stream.close()
    with torch.no_grad():
        _, k0, v0 = _qkv(first, x0)
        q1, k1, v1 = _qkv(second, x1)
        o = moda_attention(q1, k1, v1, k0[:, :, None], v0[:, :, None], causal=False)
        assert rel_err(y1, second.o_proj(o.reshape(B, T, -1))) < 1e-5
    (grad,) = torch.autograd.grad(y1[:, 0].sum(), x1)
    assert grad[:, -1].abs().sum() > 0  # token 0 attends to the last token


def test_non_causal_layers_on_the_fused_path_equal_the_reference():
    """Non-causal MoDA through the Triton kernels (the interpreter on CPU), the in-place stream and
    its deferred slot gradients, against the plain PyTorch path: output and every gradient."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(B, T, D, device=device)
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(1)
        layers = [MoDAAttention(D, HQ, HK, HD, writes_depth=i < 2, attn_kv_proj=i == 1, layer_idx=i, causal=False,
                                bias=True, backend=backend).to(device) for i in range(3)]
        xs = x.clone().requires_grad_()
        stream, h = DepthStream(2), xs
        for layer in layers:
            h = h + layer(h, stream=stream)
        stream.close()
        h.square().sum().backward()
        results.append((h, [xs.grad] + [p.grad for layer in layers for p in layer.parameters()]))
    (out, grads), (out_ref, grads_ref) = results
    assert rel_err(out, out_ref) < 1e-5
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert g is not None and g.abs().sum() > 0 and rel_err(g, g_ref) < 1e-5, i


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: MoDAAttention(D, HQ, HK, HD, causal=1), TypeError, "causal must be a bool, got int 1"),
    (lambda: MoDAAttention(D, HQ, HK, HD, bias="yes"), TypeError, "bias must be a bool"),
    (lambda: MoDAAttention(D, HQ, HK, HD, reads_depth=False)(torch.randn(B, T, D), _rope()[0]), ValueError,
     "pass both cos and sin, or neither"),
    (lambda: DepthRead(D, HQ, HD)(torch.randn(B, T, D), stream=None), ValueError, "stream must be a DepthStream"),
])
def test_causal_bias_and_rotation_checks(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def _writes(stream, *writes):
    """Each of ``writes`` (a tuple of values) written into ``stream`` in turn."""
    for values in writes:
        stream.write(*values)


_kv = torch.randn(1, T, HK, HD)
_x = torch.randn(B, T, D)
_src = torch.randn(B, T, D)


@pytest.mark.parametrize("call, exc, msg", [
    # 1: cos/sin of another batch than x's (a batch of 1 or none broadcasts)
    (lambda: DepthKV(D, HK, HD)(torch.randn(1, T, D), *(t[None].expand(3, -1, -1, -1) for t in _rope())),
     ValueError, r"cos must be .* with B=1"),
    (lambda: MoDAAttention(D, HQ, HK, HD, reads_depth=False)(_x, *(t[None].expand(3, -1, -1, -1) for t in _rope())),
     ValueError, r"cos must be .* with B=2"),
    # 3: stream writes
    (lambda: DepthStream(2).write(_kv, _kv.half()), TypeError, r"v must have the stream's dtype torch.float32"),
    (lambda: _writes(DepthStream(2), (_kv, _kv), (_kv.double(), _kv.double())), TypeError,
     r"k must have the stream's dtype torch.float32 .*got torch.float64"),
    (lambda: DepthStream(2).write([1], [1]), TypeError, "k must be a floating-point tensor, got list"),
    (lambda: DepthStream(2).write(_kv.long(), _kv.long()), TypeError, "k must be a floating-point tensor"),
    (lambda: _writes(DepthSlots(2), (_kv, _kv), (_kv.half(), _kv.half())), TypeError,
     r"k must have the stream's dtype torch.float32"),
    (lambda: DepthSlots(2).write(_kv, _kv.half()), TypeError, "v must have the stream's dtype"),
    (lambda: DepthSlots(2).write(None, _kv), TypeError, "k must be a floating-point tensor, got NoneType"),
    (lambda: _writes(SourceStream(2), (_src,), (_src.double(),)), TypeError, "sources must have the stream's dtype"),
    (lambda: SourceStream(2).write([1.0]), TypeError, "sources must be a floating-point tensor, got list"),
    (lambda: SourceStream(2).write(_src, _src), TypeError, r"write takes 1 tensor\(s\) \(sources\), got 2"),
    (lambda: SourceStream(0), ValueError, "slots must be a positive int, got 0"),
    (lambda: SourceStream(2, backend="cuda"), ValueError, "backend must be one of .*got 'cuda'"),
    (lambda: SourceStream(2, dtype=torch.int32), TypeError, "dtype must be None or a floating-point torch.dtype"),
    (lambda: _writes(SourceList(3), (_src,), (_src.half(),)), TypeError, "x must have the stream's dtype"),
    (lambda: SourceList(3).write(3), TypeError, "x must be a floating-point tensor, got int"),
    (lambda: SourceList(3, dtype=torch.long), TypeError, "dtype must be None or a floating-point"),
    (lambda: AttnResQueries(4, D).new_stream(4, dtype=torch.int32), TypeError, "dtype must be None or a floating"),
    (lambda: AttnResQueries(4, D).new_stream(0), ValueError, "slots must be a positive int"),
    # 4: eps and rotary hyperparameters
    (lambda: MoDAAttention(D, HQ, HK, HD, eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1.0"),
    (lambda: DepthRead(D, HQ, HD, eps=float("nan")), ValueError, "eps must be a finite number >= 0, got nan"),
    (lambda: DepthKV(D, HK, HD, eps=-1e-6), ValueError, "eps must be a finite number >= 0"),
    (lambda: RMSNorm(D, eps=-1), ValueError, "eps must be a finite number >= 0, got -1"),
    (lambda: RMSNorm(D, eps="1e-6"), ValueError, "eps must be a finite number >= 0"),
    (lambda: AttnResQueries(4, D, eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
    (lambda: Rotary(8, 16, 0.0), ValueError, "theta must be a finite number > 0, got 0.0"),
    (lambda: Rotary(8, 16, -1e4), ValueError, "theta must be a finite number > 0"),
    (lambda: Rotary(-2, 16, 1e4), ValueError, "head_dim must be a positive int, got -2"),
    (lambda: Rotary(0, 16, 1e4), ValueError, "head_dim must be a positive int, got 0"),
    (lambda: Rotary(8, 0, 1e4), ValueError, "max_positions must be a positive int, got 0"),
    (lambda: Rotary(8, 16, 1e4)(-3, 2, "cpu"), ValueError, "start must be an int >= 0, got -3"),
    (lambda: Rotary(8, 16, 1e4)(0, -1, "cpu"), ValueError, "length must be a positive int, got -1"),
    (lambda: Rotary(8, 16, 1e4).at(torch.zeros(0, dtype=torch.long)), ValueError, "positions must be a non-empty"),
    # 5: flags, layer_idx and backend at construction
    (lambda: MoDAAttention(D, HQ, HK, HD, reads_depth="no"), TypeError, "reads_depth must be a bool, got str 'no'"),
    (lambda: MoDAAttention(D, HQ, HK, HD, writes_depth=1), TypeError, "writes_depth must be a bool, got int 1"),
    (lambda: MoDAAttention(D, HQ, HK, HD, qk_norm="no"), TypeError, "qk_norm must be a bool"),
    (lambda: DepthKV(D, HK, HD, k_norm=0), TypeError, "k_norm must be a bool"),
    (lambda: MoDAAttention(D, HQ, HK, HD, layer_idx=-1), ValueError, "layer_idx must be an int >= 0, got -1"),
    (lambda: MoDAAttention(D, HQ, HK, HD, layer_idx="0"), ValueError, "layer_idx must be an int >= 0, got '0'"),
    (lambda: DepthRead(D, HQ, HD, layer_idx=-1), ValueError, "layer_idx must be an int >= 0"),
    (lambda: MoDAAttention(D, HQ, HK, HD, backend="cuda"), ValueError, "backend must be one of .*got 'cuda'"),
    (lambda: DepthRead(D, HQ, HD, backend="cuda"), ValueError, "backend must be one of .*got 'cuda'"),
    (lambda: MoDAAttention(D, HQ, HK, HD)(_x.long(), *_rope(), DepthStream(1)), TypeError,
     r"x must be a floating-point tensor \[B, T, 32\], got dtype torch.int64"),
    # 6: RMSNorm, SwiGLU, MLP sizes and inputs
    (lambda: RMSNorm(-3), ValueError, "dim must be a positive int, got -3"),
    (lambda: RMSNorm(8.0), ValueError, "dim must be a positive int, got 8.0"),
    (lambda: RMSNorm(0), ValueError, "dim must be a positive int, got 0"),
    (lambda: SwiGLU(8, -1), ValueError, "hidden must be a positive int, got -1"),
    (lambda: SwiGLU(0, 16), ValueError, "dim must be a positive int, got 0"),
    (lambda: RMSNorm(8)(torch.randn(2, 7)), ValueError, r"x must be a tensor \[\.\.\., 8\], got \(2, 7\)"),
    (lambda: RMSNorm(8)(torch.ones(2, 8, dtype=torch.long)), TypeError, "x must be a floating-point tensor .*int64"),
    (lambda: SwiGLU(8, 16)(torch.randn(2, 7)), ValueError, r"x must be a tensor \[\.\.\., 8\], got \(2, 7\)"),
    (lambda: MLP(8, 16)(torch.randn(2, 7)), ValueError, r"x must be a tensor \[\.\.\., 8\], got \(2, 7\)"),
    (lambda: MLP(8, 16)(torch.ones(2, 8, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
    # 7: apply_rotary
    (lambda: apply_rotary(torch.randn(B, T, HQ, HD + 2), *_rope()), ValueError, r"cos must broadcast to x's shape"),
    (lambda: apply_rotary(torch.randn(B, T + 1, HQ, HD), *_rope()), ValueError, r"cos must broadcast to x's shape"),
    (lambda: apply_rotary(torch.randn(B, T, HQ, HD), _rope()[0], _rope(T + 1)[1]), ValueError,
     r"sin must broadcast to x's shape"),
    (lambda: apply_rotary(torch.ones(B, T, HQ, HD, dtype=torch.long), *_rope()), TypeError,
     "x must be a floating-point tensor"),
    # 8: reads of a stream that is not one
    (lambda: read_moda(None, *(torch.randn(B, T, HQ, HD),) * 3), TypeError, "stream must be a DepthStream, got NoneType"),
    (lambda: read_depth(None, torch.randn(B, T, HQ, HD)), TypeError, "stream must be a DepthStream, got NoneType"),
    (lambda: AttnResQueries(4, D).read(None, 0), TypeError, "stream must be a SourceStream .*got NoneType"),
    (lambda: AttnResQueries(4, D).read_two_phase([_src], 0, 2), TypeError, "stream must be a SourceStream .*got list"),
    # 2: DenseFormerMixer states
    (lambda: DenseFormerMixer(3)(1, [_src[:1], _src, _src]), ValueError, r"states\[1\] must be a tensor like states\[0\]"),
    (lambda: DenseFormerMixer(3)(1, [_src, _src, _src.long()]), ValueError, r"states\[2\] must be a tensor like"),
    (lambda: DenseFormerMixer(3)(1, [_src.long()] * 3), TypeError, r"states\[0\] must be a floating-point tensor"),
    (lambda: DenseFormerMixer(3)(1, [_src, _src, torch.randn(B, T, D + 1)]), ValueError, r"states\[2\] must be"),
    (lambda: DenseFormerMixer(3)(True, [_src] * 3), ValueError, "i must be a block index in .*got True"),
    (lambda: DenseFormerMixer(3)(1, _src), TypeError, "states must be a list of tensors .*got Tensor"),
])
def test_nn_argument_checks_name_the_argument(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_legitimate_stream_writes_and_rotary_broadcasts_still_work():
    """What the checks must let through: an explicit stream dtype stores writes of other floating
    dtypes cast to it (the models' float32 partial sums in an autocast-dtype stream); cos/sin of
    batch 1 or none broadcast over x's batch; eps=0."""
    stream = SourceStream(2, dtype=torch.bfloat16)
    _writes(stream, (_src,), (_src.double(),))
    assert stream.sources().dtype == torch.bfloat16
    lst = SourceList(2, dtype=torch.bfloat16)
    _writes(lst, (_src,), (_src.half(),))
    assert lst.buffer.dtype == torch.bfloat16
    writer = DepthKV(D, HK, HD, eps=0.0)
    cos, sin = _rope()
    k, v = writer(_x, cos, sin)
    k1, v1 = writer(_x, cos[None], sin[None])
    assert k.shape == v.shape == (B, T, HK, HD) and torch.equal(k, k1)
    assert apply_rotary(torch.randn(B, T, HQ, HD), cos, sin).shape == (B, T, HQ, HD)
