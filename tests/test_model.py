"""The decoder LM: every depth mechanism and norm placement, caching, save/load, bad input."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from flash_depth.models import DEPTH_MECHANISMS, FlashDepthConfig, FlashDepthForCausalLM
from flash_depth.models.accounting import flops_per_token, parameter_count
from flash_depth.nn.depth_stream import DepthStream, read_depth, read_moda
from flash_depth.ops import depth_attention, moda_attention
from oracle import rel_err

PRE_NORM_ONLY = ("attnres_full", "attnres_block", "mhc", "hc", "mudd")  # they read each sublayer's input themselves

VARIANTS = [(m, n) for m in DEPTH_MECHANISMS for n in ("pre", "post") if n == "pre" or m not in PRE_NORM_ONLY]
VARIANTS += [("moda", "pre", {"ffn_kv": False}), ("moda", "post", {"attn_kv_proj": True}),
             ("moda", "pre", {"depth_window": 2, "depth_anchors": 1}), ("depth_attention", "pre", {"depth_window": 3})]


def _model(mech, norm="pre", **kw):
    cfg = FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, norm_position=norm, attnres_blocks=4, **kw)
    model = FlashDepthForCausalLM(cfg)
    if model.model.attnres is not None:  # zero queries give the key norms no gradient: move off init
        with torch.no_grad():
            model.model.attnres.queries.normal_(0, 0.5)
    if model.model.hyper is not None:  # zero gates give mHC's projections no gradient: move off init
        with torch.no_grad():
            for hc in model.model.hyper:
                for name, p in hc.named_parameters():
                    if name.startswith("alpha"):
                        p.fill_(0.1)
    if model.model.mudd is not None:  # W2 = 0 gives W1 no gradient and every way the latest output: move off init
        with torch.no_grad():
            for weights in model.model.mudd.weights:
                weights.w2.weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v[:2]) + ("+" + ",".join(v[2]) if len(v) > 2 else ""))
def test_forward_backward_reaches_every_parameter(variant):
    mech, norm, *kw = variant
    model = _model(mech, norm, **(kw[0] if kw else {}))
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 19, model.config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]
    assert not dead, dead


@pytest.mark.parametrize("mech", DEPTH_MECHANISMS)
def test_bf16_autocast_forward_backward(mech):
    """Mixed precision as training runs it: float32 weights, bf16 autocast. Every op on the way
    (norms, depth reads) must accept what the layer before hands it."""
    model = _model(mech)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_depth_stream_is_freed_without_garbage_collection():
    import gc
    import weakref

    model = _model("moda")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    streams = []
    original = DepthStream.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        streams.append(weakref.ref(self))

    gc.disable()
    try:
        DepthStream.__init__ = spy
        model(ids, labels=ids).loss.backward()
        assert streams and streams[0]() is None  # freed by reference counting alone
    finally:
        DepthStream.__init__ = original
        gc.enable()


@pytest.mark.parametrize("mech, extra", [(m, {}) for m in DEPTH_MECHANISMS] + [("moda", {"depth_stream_dtype": "fp8"})],
                         ids=[*DEPTH_MECHANISMS, "moda-fp8"])
def test_cached_decoding_equals_full_forward(mech, extra):
    """fp8: scales are per token, so a decoding step quantises its token's slots as the full forward does."""
    model = _model(mech, **extra).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for t in range(6, 13):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    # fp8: a step's projection differs from the full forward's in the last float32 bit, which now and then
    # moves one slot value across an fp8 rounding boundary (one step of 2^-3: ~1e-4 on the logits, seen once
    # in CI); a wrong scale or slot is > 1e-2
    assert rel_err(torch.cat(pieces, 1), full) < (1e-3 if extra else 1e-5)
    generated = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 9)
    # greedy tokens agree with the argmax of a full forward over the generated text
    with torch.no_grad():
        logits = model(generated[:, :-1]).logits
    assert torch.equal(logits[:, 3:].argmax(-1), generated[:, 4:])


@pytest.mark.parametrize("mech", DEPTH_MECHANISMS)
def test_generate_with_defaults_equals_greedy_full_forwards(mech):
    """generate() as a user calls it (KV cache on, whatever name this transformers release passes
    it under) picks, token for token, what a greedy loop of uncached full forwards picks. A cache
    dropped on the way makes each step see one token and fails here."""
    torch.manual_seed(0)
    model = _model(mech).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    generated = model.generate(prompt, max_new_tokens=8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, seq), (generated, seq)


def test_cache_is_taken_under_either_name_and_unknown_keywords_raise():
    """transformers <= 5.23 passes the cache as past_key_values, 5.24 as cache: both are used.
    A keyword the model does not know raises instead of vanishing into **kwargs."""
    from transformers.cache_utils import DynamicCache

    model = _model("moda").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = DynamicCache()
            model(ids[:, :6], use_cache=True, **{name: cache})
            step = model(ids[:, 6:], use_cache=True, position_ids=torch.tensor([[6]]), **{name: cache})
            assert rel_err(step.logits[:, -1], full) < 1e-5, name
            assert cache.get_seq_length() == 7
        keep = model(ids, logits_to_keep=torch.tensor([0, 6]), return_dict=False, token_type_ids=torch.zeros_like(ids))
        assert isinstance(keep, tuple) and torch.equal(keep[0], model(ids).logits[:, [0, 6]])
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['kv_cache'\]"):
        model(ids, kv_cache=DynamicCache())
    with pytest.raises(ValueError, match="two different KV caches"):
        model(ids, cache=DynamicCache(), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match=r"position_ids must have shape \[B=2, T=7\] or \[T=7\], got \(2, 6\)"):
        model(ids, position_ids=torch.arange(6).expand(2, 6))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, max_position_embeddings=512\), got values from"):
        model(ids, position_ids=torch.arange(600, 607))
    with pytest.raises(ValueError, match=r"cache_position must be 0..6"):
        model(ids, cache_position=torch.arange(1, 8))
    with pytest.raises(ValueError, match="output_hidden_states=True is not supported"):
        model(ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="token_type_ids must be all zeros"):
        model(ids, token_type_ids=torch.ones_like(ids))
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model(ids, logits_to_keep=-1)


def test_auto_tokenizer_and_generate_from_a_checkpoint_folder(tmp_path):
    """A checkpoint folder as training writes it (config, weights, a bare tokenizer.json) loads
    through the Auto classes, and generate() takes the tokenizer's output as it comes."""
    from flash_depth.data.tokenizer import train_bpe

    words = "depth attention layer token residual stream softmax query key value".split()
    bpe = train_bpe([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, 300)
    bpe.save(tmp_path / "tokenizer.json")
    _model("moda").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "query key value depth"
    assert tok(text)["input_ids"] == bpe.encode(text)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    inputs = tok([text, text], return_tensors="pt")  # 4.x adds token_type_ids
    out = model.generate(**inputs, max_new_tokens=4)
    assert out.shape == (2, len(bpe.encode(text)) + 4) and torch.equal(out[0], out[1])


@pytest.mark.parametrize("mech", ["residual", "moda", "attnres_block", "mudd"])
def test_save_load_round_trip(tmp_path, mech):
    model = _model(mech).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 11))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).depth_mechanism == mech
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, FlashDepthForCausalLM)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _reference_block(block, x, cos, sin):
    """A pre-norm OLMo2-style block written out by hand from the block's weights."""
    a = block.attn
    B, T, D = x.shape
    h = F.rms_norm(x, (D,), block.attn_norm.weight, 1e-6)
    q = (h @ a.q_proj.weight.T).view(B, T, a.heads, a.head_dim)
    k, v = (h @ a.kv_proj.weight.T).view(B, T, 2, a.kv_heads, a.head_dim).unbind(2)
    q = F.rms_norm(q, (a.head_dim,), a.q_norm.weight, 1e-6)
    k = F.rms_norm(k, (a.head_dim,), a.k_norm.weight, 1e-6)

    def rope(t):
        t1, t2 = t.chunk(2, -1)
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
    G = a.heads // a.kv_heads
    k, v = k.repeat_interleave(G, 1), v.transpose(1, 2).repeat_interleave(G, 1)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
    x = x + att @ a.o_proj.weight.T
    h = F.rms_norm(x, (D,), block.ffn_norm.weight, 1e-6)
    gate, up = (h @ block.ffn.gate_up.weight.T).chunk(2, -1)
    return x + (F.silu(gate) * up) @ block.ffn.down.weight.T


def test_residual_block_matches_hand_written_reference():
    model = _model("residual").double()
    block = model.model.layers[1]
    x = torch.randn(2, 9, model.config.hidden_size, dtype=torch.float64)
    cos, sin = model.model.rotary(0, 9, x.device)
    ours = block(x, cos.double(), sin.double(), None, None)
    assert rel_err(ours, _reference_block(block, x, cos.double(), sin.double())) < 1e-12


def test_rms_norm_of_bf16_activations_with_a_float32_weight():
    """Under autocast the norm sees bf16 activations and a float32 weight: the result must be
    what PyTorch's own (unfused) rms_norm gives, in bf16, and its gradients must reach the input
    and the weight."""
    from flash_depth.nn.layers import RMSNorm

    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
    x = torch.randn(3, 5, 48).to(torch.bfloat16).requires_grad_()
    out = norm(x)
    with warnings.catch_warnings():  # PyTorch warns that mixed dtypes miss its fused kernel
        warnings.simplefilter("ignore")
        want = F.rms_norm(x.detach(), (48,), norm.weight.detach(), 1e-6)
    assert out.dtype == want.dtype == torch.bfloat16 and rel_err(out.detach(), want) < 1e-2
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and norm.weight.grad.abs().sum() > 0


STREAM_CASES = [  # writes per layer, sequence part, depth window, anchors
    (1, True, None, 0), (2, True, None, 0), (3, False, None, 0),
    (1, True, 2, 0), (2, True, 3, 1), (2, True, 1, 2), (2, False, 3, 0),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("writes, sequence, window, anchors", STREAM_CASES,
                         ids=lambda x: str(x) if not isinstance(x, bool) else ("moda" if x else "depth-only"))
def test_depth_stream_gradients_match_concat(backend, writes, sequence, window, anchors):
    """The in-place stream gives the same values and gradients as re-stacking the slots each read
    takes: every written slot, or a bounded window (the last ``window`` plus the first ``anchors``).
    Reference: autograd through PyTorch; triton: fused kernels, slot gradients deferred to the
    writes, formed in pairs where two slots have the same readers (not across a window's edge)."""
    torch.manual_seed(0)
    B, T, Hq, Hk, d, layers = 2, 7, 4, 2, 16, 5
    dtype = torch.float64 if backend == "reference" else torch.float32
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    qs = [torch.randn(B, T, Hq, d, dtype=dtype, device=device, requires_grad=True) for _ in range(layers)]
    kvs = [torch.randn(B, T, Hk, d, dtype=dtype, device=device, requires_grad=True) for _ in range(2 * layers)]
    weights = torch.randn(B, T, Hq, d, dtype=dtype, device=device)

    def window_of(n):
        if window is None or window >= n:
            return list(range(n))
        return sorted(set(range(min(anchors, n - window))) | set(range(n - window, n)))

    def run(use_stream):
        stream = DepthStream(layers * writes)
        slots_k, slots_v, total = [], [], 0
        for i in range(layers):
            k, v = kvs[2 * i], kvs[2 * i + 1]
            if not sequence and i == 0:
                o = qs[0]  # depth-only reads need a written slot
            elif use_stream:
                kw = {"backend": backend, "window": window, "anchors": anchors}
                o = read_moda(stream, qs[i], k, v, **kw) if sequence else read_depth(stream, qs[i], **kw)
            else:
                keep = window_of(len(slots_k))
                kd = torch.stack([slots_k[j] for j in keep], 2) if keep else None
                vd = torch.stack([slots_v[j] for j in keep], 2) if keep else None
                if sequence:
                    o = moda_attention(qs[i], k, v, kd, vd, backend=backend)
                else:
                    o = depth_attention(qs[i], kd, vd, backend=backend)
            for w in range(writes):
                kw_, vw_ = k * (2 + w), v * (3 - w) + w
                if use_stream:
                    stream.write(kw_, vw_)
                else:
                    slots_k.append(kw_)
                    slots_v.append(vw_)
            total = total + (o * weights).sum()
        if use_stream:
            stream.close()
        # the last layer's slots (and slots no window reaches) are never read: zero gradients
        return total, torch.autograd.grad(total, qs + kvs, allow_unused=True, materialize_grads=True)

    t1, g1 = run(True)
    t2, g2 = run(False)
    assert abs(t1.item() - t2.item()) < tol * max(1.0, abs(t2.item()))
    errors = [rel_err(a, b) for a, b in zip(g1, g2)]
    assert all(e < tol for e in errors), errors


def test_depth_window_covering_every_slot_is_full_moda():
    torch.manual_seed(0)
    stream = DepthStream(4)
    for _ in range(3):
        stream.write(torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16))
    q, k, v = torch.randn(1, 6, 4, 16), torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    full = read_moda(stream, q, k, v, backend="reference")
    assert torch.equal(read_moda(stream, q, k, v, backend="reference", window=3, anchors=2), full)
    assert torch.equal(read_moda(stream, q, k, v, backend="reference", window=7), full)
    assert not torch.equal(read_moda(stream, q, k, v, backend="reference", window=2), full)
    with pytest.raises(ValueError, match="window must be None"):
        read_moda(stream, q, k, v, window=0)
    with pytest.raises(ValueError, match="anchors must be an int"):
        read_moda(stream, q, k, v, window=2, anchors=-1)


def test_depth_stream_read_whose_output_is_unused():
    """A read that feeds nothing never runs its backward; the deferred slot gradients must not
    take its (never written) q and dO: they equal those of a stream without that read."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k, v = (torch.randn(1, 5, 2, 16, device=device, requires_grad=True) for _ in range(2))
    q = torch.randn(1, 5, 4, 16, device=device)
    grads = []
    for unused_read in (False, True):
        stream = DepthStream(2)
        stream.write(k * 2, v)
        if unused_read:
            read_moda(stream, q * 5, k, v, backend="triton")
        out = read_moda(stream, q, k, v, backend="triton")
        stream.close()
        grads.append(torch.autograd.grad(out.square().sum(), (k, v)))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-6


@pytest.mark.parametrize("mech, norm, extra", [
    ("moda", "pre", {}), ("moda", "post", {}), ("moda", "pre", {"ffn_kv": False}),
    ("moda", "post", {"attn_kv_proj": True}), ("depth_attention", "pre", {}), ("depth_attention", "post", {"ffn_kv": False}),
    ("moda", "pre", {"depth_window": 1, "depth_anchors": 1}),
])
def test_fused_model_gradients_match_the_reference_path(mech, norm, extra):
    """Every parameter's gradient on the fused path (Triton kernels, deferred slot gradients; the
    interpreter on CPU) against the plain PyTorch path with the same weights, float32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    models = []
    for backend in ("triton", "reference"):
        cfg = FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, norm_position=norm,
                                           attention_backend=backend, num_hidden_layers=3, **extra)
        models.append(FlashDepthForCausalLM(cfg).to(device))
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, 512, (2, 11), device=device)
    for model in models:
        model(ids, labels=ids).loss.backward()
    for (name, p), p_ref in zip(models[0].named_parameters(), models[1].parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert rel_err(p.grad, p_ref.grad) < 1e-5, name


def test_depth_stream_saves_less_than_concat():
    """Tensors saved for backward by the fused path: the stream keeps one buffer, concat keeps
    O(L^2) stacked copies. (The CPU reference's einsums copy their operands either way.)"""
    B, T, Hk, d, layers = 1, 8, 2, 16, 16

    def saved_bytes(use_stream):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        device = "cuda" if torch.cuda.is_available() else "cpu"
        k = torch.randn(B, T, Hk, d, requires_grad=True, device=device)
        q = torch.randn(B, T, 2 * Hk, d, requires_grad=True, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stream = DepthStream(layers)
            slots = []
            for i in range(layers):
                if use_stream:
                    read_moda(stream, q, k, k, backend="triton")
                    stream.write(k * (i + 1), k * (i + 2))
                else:
                    kd = torch.stack(slots, 2) if slots else None
                    moda_attention(q, k, k, kd, kd, backend="triton")
                    slots.append(k * (i + 1))
        depth_bytes_stream = 2 * B * T * layers * Hk * d * 4
        return sum(storages.values()), depth_bytes_stream

    stream_bytes, buffer = saved_bytes(True)
    concat_bytes, _ = saved_bytes(False)
    # concat: sum over layers of i slots = L(L-1)/2 slot copies; stream: the 2L-slot buffers once
    assert concat_bytes > stream_bytes + 2 * buffer, (stream_bytes, concat_bytes)


def test_presets_and_accounting():
    sizes = {}
    for name in ("tiny", "small-24", "small-48", "700m"):
        cfg = FlashDepthConfig.from_preset(name)
        sizes[name] = parameter_count(cfg)["total"]
    assert sizes["tiny"] < sizes["small-24"] < sizes["small-48"] < sizes["700m"]
    assert 5.5e8 < sizes["700m"] < 8e8
    base = FlashDepthConfig.from_preset("small-48")
    moda = FlashDepthConfig.from_preset("small-48", depth_mechanism="moda", ffn_kv=False)
    assert parameter_count(moda)["total"] == parameter_count(base)["total"]  # reuses attention K/V
    assert flops_per_token(base, 4096) < flops_per_token(moda, 4096) < 1.01 * flops_per_token(base, 4096)
    # MUDD: four mixes of the i + 2 kept outputs after block i (one after the last), 2 FLOPs per value
    tiny, mudd = FlashDepthConfig.from_preset("tiny"), FlashDepthConfig.from_preset("tiny", depth_mechanism="mudd")
    mudd_params = parameter_count(mudd)
    D, L = 64, 4
    mlp = sum(D * h + h * o + o for h, o in [(64, 8), (64, 12), (64, 16), (64, 5)])  # widths rounded to 64
    assert mudd_params["depth"] == mlp + 2 * (L - 1) * D  # + the key and value input norms of blocks 1..3
    assert mudd_params["total"] == parameter_count(tiny)["total"] + mudd_params["depth"]
    mixes = 2 * D * (4 * (2 + 3 + 4) + 5)
    assert flops_per_token(mudd, 64) == pytest.approx(flops_per_token(tiny, 64) + 3 * (2 * mudd_params["depth"] + mixes))
    assert FlashDepthConfig.from_preset("small-24", num_hidden_layers=3).num_hidden_layers == 3


BAD_CONFIGS = [
    ({"depth_mechanism": "moda2"}, "depth_mechanism must be one of"),
    ({"norm_position": "middle"}, "norm_position must be one of"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "must be a multiple of"),
    ({"depth_mechanism": "attnres_block", "attnres_blocks": 3}, "must divide the 8 sublayers"),
    ({"depth_mechanism": "attnres_full", "norm_position": "post"}, "norm_position must be 'pre'"),
    ({"hidden_size": 0}, "hidden_size must be a positive int"),
    ({"depth_window": 0}, "depth_window must be None"),
    ({"depth_mechanism": "mudd", "norm_position": "post"}, "mudd feeds each block .* norm_position must be 'pre'"),
    ({"depth_window": 4, "depth_anchors": -1}, "depth_anchors must be an int >= 0"),
    ({"rope_theta": 0.0}, r"rope_theta must be a finite number > 0, got 0.0"),
    ({"rms_norm_eps": float("nan")}, r"rms_norm_eps must be a finite number > 0, got nan"),
    ({"initializer_range": -1.0}, r"initializer_range must be a finite number >= 0"),
    ({"qk_norm": "no"}, "qk_norm must be a bool, got 'no'"),
    ({"ffn_kv": "no"}, "ffn_kv must be a bool"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings must be a bool"),
    ({"depth_mechanism": "attnres_block", "attnres_blocks": True}, "attnres_blocks=True must divide"),
    ({"num_hiden_layers": 3}, r"unknown FlashDepthConfig fields \['num_hiden_layers'\]"),
]


@pytest.mark.parametrize("overrides,msg", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        FlashDepthConfig.from_preset("tiny", **overrides)


def test_bad_calls():
    with pytest.raises(ValueError, match="unknown preset"):
        FlashDepthConfig.from_preset("huge")
    model = _model("moda")
    with pytest.raises(TypeError, match="input_ids must be an int64/int32 tensor"):
        model(torch.rand(1, 5))
    with pytest.raises(ValueError, match="rotary limit"):
        model(torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"left-padded .* row 1 is \[0, 1, 0, 1\]"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask must be a 2-D tensor \[B=2, cached \+ new tokens=4\]"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an int64 tensor"):
        model(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 4))
    ids = torch.zeros(2, 5, dtype=torch.long)
    # an additive mask (0: token, -inf: padding) would read inverted as 1/0
    with pytest.raises(ValueError, match=r"attention_mask must hold 1 \(token\) and 0 \(padding\) only, got values "
                                         r"such as \[-1000000000.0\]"):
        model(ids, attention_mask=torch.tensor([[-1e9, 0, 0, 0, 0], [0, 0, 0, 0, 0.0]]))
    with pytest.raises(ValueError, match=r"attention_mask must hold 1 .* such as \[0.5"):
        model(ids, attention_mask=torch.full((2, 5), 0.5))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor .* got torch.bool"):
        model(ids, position_ids=torch.ones(5, dtype=torch.bool))
    for bad in (model.config.vocab_size, -1):
        with pytest.raises(ValueError, match=rf"input_ids must be in \[0, vocab_size={model.config.vocab_size}\), "
                                             rf"got {bad}"):
            model(torch.full((2, 5), bad))
    D = model.config.hidden_size
    with pytest.raises(ValueError, match=rf"inputs_embeds must have shape \[B, T, D={D}\] with B, T >= 1, got \(5, {D}\)"):
        model(inputs_embeds=torch.randn(5, D))
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        model(inputs_embeds=torch.randn(2, 5, D // 2))
    with pytest.raises(TypeError, match="inputs_embeds must be a torch.float32 tensor .* got torch.float16"):
        model(inputs_embeds=torch.randn(2, 5, D).half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an autocast projector's embeddings
        assert model(inputs_embeds=torch.randn(2, 5, D, dtype=torch.bfloat16)).logits.shape == (2, 5, 512)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\] with B, T >= 1, got \(0, 5\)"):
        model(ids[:0])
    embeds = model.get_input_embeddings()(ids)  # the documented way in: the same logits as the ids
    assert torch.equal(model(inputs_embeds=embeds).logits, model(ids).logits)


@pytest.mark.parametrize("mech", ["residual", "attnres_block", "denseformer"])
def test_activation_checkpointing_gives_the_same_gradients(mech):
    model = _model(mech).double()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    grads = []
    for enabled in (False, True):
        model.model.set_activation_checkpointing(enabled)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(*grads))


def test_activation_checkpointing_refused_for_the_depth_stream():
    with pytest.raises(ValueError, match="not supported for depth_mechanism='moda'"):
        _model("moda").model.set_activation_checkpointing(True)


@pytest.mark.parametrize("mech", DEPTH_MECHANISMS)
def test_torch_compile_gives_the_same_gradients(mech):
    """train.compile: the depth streams' in-place reads and writes run eagerly (graph breaks),
    the rest is traced. aot_eager checks the tracing without a C++ toolchain. Whole-model and
    per-block compilation both match eager."""
    model = _model(mech, "pre")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, backend="aot_eager")(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, eager[name]) < 1e-5, name
    model.zero_grad()
    model.model.compile_blocks(backend="aot_eager")
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, eager[name]) < 1e-5, name


@pytest.mark.parametrize("mech", ["moda", "depth_attention", "attnres_full", "mhc", "mudd"])
def test_compiled_blocks_share_their_graphs_across_layers(mech):
    """Regional compilation must not specialise per layer (an int attribute or the slot count
    read inside a block would): past torch's recompile limit the other layers run eagerly.
    A 12-layer model must need no more graphs than a 4-layer one (first, middle, last layers)."""
    from torch._dynamo.utils import counters

    graphs = []
    for layers in (4, 12):
        torch._dynamo.reset()
        counters.clear()
        model = _model(mech, "pre", num_hidden_layers=layers)
        model.model.compile_blocks(backend="eager")
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        model(ids, labels=ids).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs


def test_mudd_starts_as_the_residual_model():
    """At init (W2 = 0, one-hot biases on the latest output) every way is the last block's output
    and the extra key/value norms are ones: a MUDD model with a residual model's weights gives its
    logits; once W2 moves it differs."""
    torch.manual_seed(0)
    residual = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny")).eval()
    model = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny", depth_mechanism="mudd")).eval()
    missing, unexpected = model.load_state_dict(residual.state_dict(), strict=False)
    assert not unexpected and all(n.startswith("model.mudd.") or ".attn_norm_" in n for n in missing)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids).logits, residual(ids).logits) < 1e-6
        model.model.mudd.weights[1].w2.weight.normal_(0, 0.3)
        assert rel_err(model(ids).logits, residual(ids).logits) > 1e-3


@pytest.mark.parametrize("mech", ["mhc", "hc"])
def test_hyper_connections_start_as_the_residual_model(mech):
    """At init (zero gates: every stream equal; HC: one-hot reads, identity mixing) a hyper-connected
    model with a residual model's weights gives that model's logits; once the gates move it differs."""
    torch.manual_seed(0)
    residual = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny")).eval()
    model = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny", depth_mechanism=mech)).eval()
    missing, unexpected = model.load_state_dict(residual.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("model.hyper.") for name in missing)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids).logits, residual(ids).logits) < 1e-5
        for name, p in model.model.hyper.named_parameters():
            if name.endswith(("alpha_post", "alpha_res", "h_res")):
                p.add_(0.3)
        assert rel_err(model(ids).logits, residual(ids).logits) > 1e-3


def test_package_imports_and_trains_without_triton(tmp_path):
    """Triton installs on Linux only: elsewhere the package must import and every path run in plain
    PyTorch (a module importing triton at load time broke this once)."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        "import sys\n"
        "sys.modules['triton'] = None  # import triton raises ImportError, as where it is not installed\n"
        "import torch\n"
        "import flash_depth.analysis, flash_depth.eval, flash_depth.nn, flash_depth.ops, flash_depth.train\n"
        "from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM\n"
        "for mech in ('moda', 'mhc', 'hc', 'mudd', 'attnres_full'):\n"
        "    model = FlashDepthForCausalLM(FlashDepthConfig.from_preset('tiny', depth_mechanism=mech))\n"
        "    ids = torch.randint(0, 100, (2, 9))\n"
        "    model(ids, labels=ids).loss.backward()\n"
        "print('trained')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]
