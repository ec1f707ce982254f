"""Depth retrieval added to transformers decoders (flash_depth.models.convert) and the layers it uses."""

import copy
import io
import os

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from flash_depth.models.convert import add_depth_retrieval, from_pretrained, set_depth_retrieval
from flash_depth.nn import AttnResQueries, DepthKV, Rotary
from flash_depth.nn.attnres_stream import SourceStream
from oracle import rel_err

# Qwen3 and OLMo2 arrived after transformers 4.46: on the oldest release three families run
FAMILIES = [f for f, cfg in (("llama", "LlamaConfig"), ("mistral", "MistralConfig"), ("qwen2", "Qwen2Config"),
                             ("qwen3", "Qwen3Config"), ("olmo2", "Olmo2Config")) if hasattr(transformers, cfg)]
VARIANTS = {"moda": dict(mechanism="moda"), "moda+ffn_kv": dict(mechanism="moda", ffn_kv=True),
            "attnres_block": dict(mechanism="attnres_block", attnres_blocks=4),
            "attnres_full": dict(mechanism="attnres_full")}
CASES = [(f, v) for f in FAMILIES for v in VARIANTS]
QK_NORM_FAMILY = "qwen3" if "qwen3" in FAMILIES else "llama"


def _config(family, **overrides):
    name = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
            "olmo2": "Olmo2Config"}[family]
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return getattr(transformers, name)(**{**kw, **overrides})


def _model(family, seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(family, **overrides))


def _ids(T=12, B=2, seed=1):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def _cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values  # the field was renamed in 5.24


def _new_parameters(model):
    return {n: p for n, p in model.named_parameters() if "depth_kv" in n or "depth_attnres" in n}


def _perturb(model, scale=0.05):
    """Moves every weight off its init (zero values, zero queries, unit norms), as training would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("family,variant", CASES)
def test_switched_off_it_gives_the_original_logits(family, variant):
    """With the depth read off, the converted forward (own attention op, the family's projections,
    norms, RoPE and cache) reproduces the original model, in a full forward and a cached step."""
    model = _model(family).eval()
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
        step = model(ids[:, -1:], use_cache=True, past_key_values=_cache_of(model(ids[:, :-1], use_cache=True))).logits
        add_depth_retrieval(model, **VARIANTS[variant], backend="reference")
        set_depth_retrieval(model, enabled=False)
        assert rel_err(model(ids).logits, full) < 1e-5
        prefix = model(ids[:, :-1], use_cache=True)
        assert rel_err(model(ids[:, -1:], use_cache=True, past_key_values=_cache_of(prefix)).logits, step) < 1e-5
        set_depth_retrieval(model, enabled=True)
        assert rel_err(model(ids).logits, full) > 1e-4  # the depth read is back on


@pytest.mark.parametrize("family,variant", CASES)
def test_cached_steps_give_the_full_forward_logits(family, variant):
    """Decoding needs no depth cache: a token's depth K/V comes from earlier layers of its own step.
    A prefill, single-token steps and a two-token step all match one uncached forward."""
    model = add_depth_retrieval(_model(family).eval(), **VARIANTS[variant])
    _perturb(model)
    ids = _ids(T=11)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache()
        parts = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                 for a, b in ((0, 6), (6, 7), (7, 8), (8, 10), (10, 11))]
    assert rel_err(torch.cat(parts, 1), full) < 1e-5
    assert cache.get_seq_length() == 11


@pytest.mark.parametrize("family,variant", [(f, "moda+ffn_kv") for f in FAMILIES] + [(FAMILIES[-1], "attnres_block")])
def test_generate_equals_a_greedy_loop_of_full_forwards(family, variant):
    model = add_depth_retrieval(_model(family).eval(), **VARIANTS[variant])
    _perturb(model)
    prompt = _ids(T=5)
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, seq), (generated, seq)


TRAIN_CASES = [(f, "moda+ffn_kv") for f in FAMILIES] + [("llama", "moda"), ("llama", "attnres_block"),
                                                          (FAMILIES[-1], "attnres_block"), ("qwen2", "attnres_full")]


@pytest.mark.parametrize("family,variant", TRAIN_CASES)
def test_training_lowers_the_loss_and_reaches_every_new_parameter(family, variant):
    model = add_depth_retrieval(_model(family), **VARIANTS[variant])
    new = _new_parameters(model)
    assert bool(new) == (variant != "moda")  # plain MoDA reuses the attention's K/V: no new weights
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = _ids(T=16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, missing
        opt.step()
    # at init a zero pseudo-query gives its key norm no gradient; one step later every new weight has one
    dead = [n for n, p in new.items() if p.grad.abs().sum() == 0]
    assert not dead, dead
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_model_reloads_with_its_mechanism(tmp_path, variant):
    """Converting weights loaded with from_pretrained, training, saving and loading back with
    flash_depth.models.convert.from_pretrained gives the same model and logits."""
    family = FAMILIES[-1]
    _model(family).save_pretrained(tmp_path / "plain")
    model = add_depth_retrieval(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), **VARIANTS[variant])
    _perturb(model)
    model.save_pretrained(tmp_path / "converted")
    reloaded = from_pretrained(tmp_path / "converted")
    assert type(reloaded) is type(model) and reloaded.config.depth_retrieval == model.config.depth_retrieval
    state, loaded = model.state_dict(), reloaded.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, model.eval()(ids).logits)
    with pytest.raises(ValueError, match="no depth_retrieval entry"):
        from_pretrained(tmp_path / "plain")


@pytest.mark.parametrize("variant", ["moda+ffn_kv", "attnres_block"])
def test_copies_and_pickles_keep_the_mechanism(variant):
    """deepcopy (EMA weights, say) and torch.save of the whole module give an independent model
    that computes the same; switching the copy off leaves the original on."""
    model = add_depth_retrieval(_model(FAMILIES[-1]), **VARIANTS[variant])
    _perturb(model)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
            assert torch.equal(other(ids).logits, want)
            set_depth_retrieval(other, enabled=False)
            assert not torch.equal(other(ids).logits, want)
            assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize("variant", ["moda+ffn_kv", "attnres_block"])
def test_torch_compile_gives_the_eager_loss_and_gradients(variant):
    """The stream reads and writes run eagerly (graph breaks), the rest is traced; aot_eager checks
    the tracing without a C++ toolchain. An unconverted model of the family is compiled first:
    graphs traced for its module classes must not be reused for the converted modules."""
    ids = _ids(T=16)
    torch.compile(_model(QK_NORM_FAMILY), backend="aot_eager")(ids, labels=ids).loss.backward()
    model = add_depth_retrieval(_model(QK_NORM_FAMILY), **VARIANTS[variant])
    _perturb(model)
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = torch.compile(model, backend="aot_eager")(ids, labels=ids).loss
    loss.backward()
    assert rel_err(loss, eager_loss) < 1e-6
    for name, p in model.named_parameters():
        assert rel_err(p.grad, eager[name]) < 1e-5, name


@pytest.mark.parametrize("variant", ["moda+ffn_kv", "attnres_block"])
def test_bf16_weights_and_autocast(variant):
    """Under autocast the family's RoPE hands float32 queries and keys with bf16 values; a bf16
    model runs bf16 throughout. Both train and generate."""
    ids = _ids()
    model = add_depth_retrieval(_model(QK_NORM_FAMILY), **VARIANTS[variant])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model = add_depth_retrieval(_model(QK_NORM_FAMILY).to(torch.bfloat16), **VARIANTS[variant])
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton interpreter on CPU tensors")
def test_triton_path_gives_the_reference_gradients():
    """The fused kernels (Triton interpreter on CPU) with deferred slot gradients, against the
    PyTorch reference, through a converted model with FFN K/V writers."""
    model = add_depth_retrieval(_model(QK_NORM_FAMILY, num_hidden_layers=3), "moda", ffn_kv=True)
    _perturb(model)
    ids = _ids(T=8, B=1)
    grads, losses = {}, {}
    for backend in ("reference", "triton"):
        set_depth_retrieval(model, backend=backend)
        model.zero_grad()
        losses[backend] = model(ids, labels=ids).loss
        losses[backend].backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert rel_err(losses["triton"], losses["reference"]) < 1e-5
    for name, ref in grads["reference"].items():
        assert rel_err(grads["triton"][name], ref) < 1e-4, name


def test_bad_models_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        add_depth_retrieval(AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    with pytest.raises(ValueError, match="mechanism must be one of"):
        add_depth_retrieval(_model("llama"), "denseformer")
    with pytest.raises(ValueError, match="ffn_kv=True needs mechanism='moda'"):
        add_depth_retrieval(_model("llama"), "attnres_block", ffn_kv=True)
    with pytest.raises(ValueError, match="attnres_blocks=3 must divide the 8 sublayers"):
        add_depth_retrieval(_model("llama"), "attnres_block", attnres_blocks=3)
    with pytest.raises(ValueError, match="attention_dropout"):
        add_depth_retrieval(_model("llama", attention_dropout=0.1))
    with pytest.raises(ValueError, match="no depth retrieval"):
        set_depth_retrieval(_model("llama"), enabled=False)
    model = add_depth_retrieval(_model("llama"))
    with pytest.raises(ValueError, match="already has depth retrieval"):
        add_depth_retrieval(model)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padded batches"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="position_ids must count up by one"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]]))
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing is not supported"):
        model(ids, labels=ids)
    windowed = add_depth_retrieval(_model("mistral", sliding_window=8))
    with pytest.raises(ValueError, match="sliding window"):
        windowed(ids)
    static = getattr(transformers, "StaticCache", None)
    if static is not None:
        try:  # the constructor's keywords changed across releases
            cache = static(config=model.config, max_cache_len=32)
        except TypeError:
            cache = static(config=model.config, batch_size=2, max_cache_len=32)
        with pytest.raises(ValueError, match="must be a DynamicCache"):
            add_depth_retrieval(_model("llama")).eval()(ids, past_key_values=cache, use_cache=True)


def test_depth_kv_writes_rotated_normalised_keys():
    """The key is rotated like a query of its own position, so a depth logit (query and key of the
    same token) does not depend on the position; zero value rows write zero values."""
    writer = DepthKV(32, kv_heads=2, head_dim=8)
    x = torch.randn(1, 1, 32).expand(1, 6, 32)  # one token's input at positions 0..5
    q = torch.randn(1, 1, 2, 8).expand(1, 6, 2, 8)
    cos, sin = Rotary(8, 64, 10000.0)(0, 6, x.device)
    k, v = writer(x, cos, sin)
    assert k.shape == v.shape == (1, 6, 2, 8)
    from flash_depth.nn import apply_rotary
    logits = (apply_rotary(q, cos, sin) * k).sum(-1)
    assert torch.allclose(logits, logits[:, :1].expand_as(logits), atol=1e-5)
    unrotated, _ = writer(x)
    assert torch.allclose(unrotated.pow(2).mean(-1), torch.ones(1, 6, 2), atol=1e-4)  # RMS-normalised heads
    with pytest.raises(ValueError, match=r"x must be a tensor \[B, T, 32\], got \(1, 6, 16\)"):
        writer(torch.randn(1, 6, 16))
    with pytest.raises(ValueError, match="pass both cos and sin"):
        writer(x, cos)
    with pytest.raises(ValueError, match=r"cos must be \[T, 1, 4\]"):
        writer(x, cos[:5], sin[:5])
    with pytest.raises(ValueError, match="head_dim must be even"):
        DepthKV(32, kv_heads=2, head_dim=7)


def test_attnres_queries_start_as_a_uniform_read():
    reads = AttnResQueries(3, 16)
    stream = SourceStream(2)
    a, b = torch.randn(2, 2, 5, 16).unbind(0)
    stream.write(a)
    stream.write(b)
    partial = torch.randn(2, 5, 16)
    assert torch.allclose(reads.read(stream, 1, partial), (a + b + partial) / 3, atol=1e-6)
    with pytest.raises(ValueError, match=r"i must be a read index in \[0, 3\), got 3"):
        reads.read(stream, 3)
