"""Fast generation: a fixed-length (static) KV cache and compiled decoding steps give, for every
depth mechanism, the greedy tokens of the dynamic cache and of a plain greedy loop, with
left-padded batches; a step has no graph break, no recompile and no host sync. Runs on
transformers 4.46 (their StaticCache takes cache_position) and 5.x (it keeps its own length)."""

import pytest
import torch
import transformers
from transformers.cache_utils import StaticCache

from flash_depth.eval.generation import GENERATE_COMPILES, compiled_decoding
from flash_depth.models import DEPTH_MECHANISMS, FlashDepthConfig, FlashDepthForCausalLM
from flash_depth.models.modeling_flash_depth import static_cache_mask
from flash_depth.ops import decode_attention, depth_attention, moda_attention
from oracle import naive_moda, rel_err

NEW = 5


def _model(mech, **kw):
    torch.manual_seed(0)
    cfg = FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, attnres_blocks=4, **kw)
    model = FlashDepthForCausalLM(cfg).eval()
    with torch.no_grad():  # off the identity-like init, where AttnRes and HC read as a residual stack
        if model.model.attnres is not None:
            model.model.attnres.queries.normal_(0, 0.5)
        for hc in model.model.hyper or ():
            for name, p in hc.named_parameters():
                if name.startswith("alpha"):
                    p.fill_(0.1)
    return model


def _prompts(*lengths, vocab=512):
    """Left-padded ids and mask [B, max length] of random prompts of these lengths."""
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def _static_cache(model, length: int, batch: int = 2):
    """A fixed-length cache: transformers 5.x sizes it at the first write, 4.x up front."""
    return StaticCache(config=model.config, max_cache_len=length, **({} if GENERATE_COMPILES else
                                                                     {"batch_size": batch, "dtype": torch.float32}))


def _zero_kept_ffn_inputs(monkeypatch):
    """Every refresh of the stacked FFN weights leaves them zero: a step reading them is seen."""
    from flash_depth.models.modeling_flash_depth import _DecodeState

    refresh = _DecodeState.refresh_ffn_inputs

    def refresh_then_zero(self, *args, **kwargs):
        refresh(self, *args, **kwargs)
        for weight in self.ffn_inputs.values():
            weight.zero_()

    monkeypatch.setattr(_DecodeState, "refresh_ffn_inputs", refresh_then_zero)


def _greedy_loop(model, ids, mask):
    """Each prompt alone (its padding dropped), NEW greedy tokens from full uncached forwards."""
    rows = []
    with torch.no_grad():
        for row in range(ids.shape[0]):
            seq = ids[row : row + 1, mask[row].bool()]
            for _ in range(NEW):
                seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
            rows.append(seq[0, -NEW:])
    return torch.stack(rows)


def _generate(model, ids, mask, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


@pytest.fixture()
def count_decode_steps(monkeypatch):
    """How many sequence attentions went through decode_attention (the static decoding path)."""
    import flash_depth.nn.moda as moda

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("key_mask") is not None)
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(moda, "decode_attention", spy)
    return calls


@pytest.mark.parametrize("mech", DEPTH_MECHANISMS)
def test_static_cache_greedy_tokens_equal_dynamic_and_a_plain_loop(mech, count_decode_steps):
    model = _model(mech)
    ids, mask = _prompts(6, 3, 5)
    want = _greedy_loop(model, ids, mask)
    assert torch.equal(_generate(model, ids, mask), want)
    assert not count_decode_steps
    assert torch.equal(_generate(model, ids, mask, cache_implementation="static"), want)
    # every layer of every step after the prefill took the static decoding path
    assert sum(count_decode_steps) == (NEW - 1) * model.config.num_hidden_layers


def test_static_cache_decoding_of_an_fp8_depth_stream_equals_a_plain_loop(count_decode_steps):
    """A decoding step keeps its token's slots as the fp8 round trip, the values the fp8 stream of
    a full forward reads (fp8 scales are per token)."""
    model = _model("moda", depth_stream_dtype="fp8")
    ids, mask = _prompts(6, 3, 5)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    assert sum(count_decode_steps) == (NEW - 1) * model.config.num_hidden_layers
    with torch.no_grad():
        full = model(out.sequences, attention_mask=torch.cat([mask, torch.ones_like(mask[:, :NEW])], 1)).logits
    for step, logits in enumerate(out.logits):
        assert rel_err(logits, full[:, ids.shape[1] - 1 + step]) < 1e-5, step


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 4.x's StaticCache holds the model's float32 and refuses bf16 keys "
                           "(index_copy_), its own models' too")
@pytest.mark.parametrize("mech", DEPTH_MECHANISMS)
def test_static_cache_decoding_under_bf16_autocast(mech, count_decode_steps):
    """float32 weights under bf16 autocast (mixed precision as training leaves a model): the
    cache, the depth slots and the queries meet in one dtype in every decoding step, whose logits
    miss the float32 forward of the same tokens by no more than twice what the autocast full
    forward misses it by, plus 1e-2 (bf16 rounding, 0.6e-2 to 3e-2 here; a wrong slot or mask is O(1))."""
    model = _model(mech)
    ids, mask = _prompts(6, 3, 5)
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :NEW])], 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             cache_implementation="static", output_logits=True, return_dict_in_generate=True)
        full_bf16 = model(out.sequences, attention_mask=full_mask).logits.float()
    assert sum(count_decode_steps) == (NEW - 1) * model.config.num_hidden_layers
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask).logits
    for step, logits in enumerate(out.logits):
        at = ids.shape[1] - 1 + step
        assert rel_err(logits.float(), full[:, at]) <= 2 * rel_err(full_bf16[:, at], full[:, at]) + 1e-2, step


@pytest.mark.parametrize("mech", ["moda", "attnres_block", "mhc"])
def test_compiled_decoding_has_no_graph_break_or_recompile(mech):
    """Every step through torch.compile(fullgraph=True) (a graph break would raise) compiled once
    (a recompile raises): ours on any release, transformers' own where its generate compiles."""
    model = _model(mech, **({"depth_window": 2, "depth_anchors": 1} if mech == "moda" else {}))
    ids, mask = _prompts(4, 6)
    want = _generate(model, ids, mask)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with compiled_decoding(model, backend="eager", fullgraph=True):
            assert torch.equal(_generate(model, ids, mask, cache_implementation="static"), want)
        assert "forward" not in model.__dict__
        if GENERATE_COMPILES:
            from transformers import CompileConfig

            torch._dynamo.reset()
            config = CompileConfig(backend="eager", fullgraph=True)
            config._compile_all_devices = True  # transformers compiles on CUDA only; CI has a CPU
            assert torch.equal(_generate(model, ids, mask, cache_implementation="static", compile_config=config),
                               want)
            assert hasattr(model, "_compiled_call")
    torch._dynamo.reset()


def test_a_decoding_step_makes_no_host_sync():
    """A step on a static cache reads nothing back to the host (CUDA graphs could not replay it):
    Tensor.item / tolist / __bool__ raise while it runs."""
    model = _model("moda")
    ids, mask = _prompts(5, 3)
    cache = _static_cache(model, 8)
    step_mask = static_cache_mask(torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), 8)
    with torch.no_grad():
        first = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(5)).logits[:, -1:].argmax(-1)
        full = model(torch.cat([ids, first], 1), attention_mask=step_mask[:, :6]).logits[:, -1]
        with pytest.MonkeyPatch.context() as patch:
            for name in ("item", "tolist", "__bool__"):
                patch.setattr(torch.Tensor, name, lambda *a, name=name: pytest.fail(f"host sync ({name}) in a decoding step"))
            step = model(first, attention_mask=step_mask, past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([5])).logits[:, -1]
    assert rel_err(step, full) < 1e-5


@pytest.mark.parametrize("tq", [1, 3], ids=["one-token", "three-tokens"])
@pytest.mark.parametrize("depth", [True, False], ids=["moda", "sequence-only"])
def test_decode_attention_is_moda_over_the_kept_keys(tq, depth, monkeypatch):
    """Each query token attends every kept key (no causal mask) and its own depth slots; one token
    (or no depth slots) goes through one fused attention call with its slots among the keys,
    several tokens with depth slots through einsums."""
    import flash_depth.ops.moda as moda_ops

    sdpa_calls = []
    sdpa = moda_ops.F.scaled_dot_product_attention
    monkeypatch.setattr(moda_ops.F, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa_calls.append(a[1].shape) or sdpa(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, tq, 4, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 2, 8, generator=g).unbind(1)
    kd, vd = torch.randn(2, 2, tq, 3, 2, 8, generator=g).unbind(1) if depth else (None, None)
    key_mask = torch.zeros(2, 9, dtype=torch.bool)
    key_mask[0, :6] = True  # row 0: six tokens cached, three unwritten slots
    key_mask[1, 2:7] = True  # row 1: two padding slots, five tokens, two unwritten
    out = decode_attention(q, k, v, kd, vd, key_mask=key_mask)
    fused = tq == 1 or not depth
    assert sdpa_calls == ([(2, 2, 9 + (3 if depth else 0), 8)] if fused else [])  # [B, Hk, keys + slots, d]
    monkeypatch.undo()
    for row, (a, b) in enumerate(((0, 6), (2, 7))):
        for t in range(tq):  # moda_attention's causal=False: the token sees all the row's keys
            one = slice(row, row + 1)
            slots = (kd[one, t:t + 1], vd[one, t:t + 1]) if depth else ()
            want = moda_attention(q[one, t:t + 1], k[one, a:b], v[one, a:b], *slots, causal=False,
                                  backend="reference")
            assert rel_err(out[row, t], want[0, 0]) < 1e-6, (row, t)
    if depth:
        want = depth_attention(q, kd, vd, backend="reference")
        assert rel_err(decode_attention(q, None, None, kd, vd), want) < 1e-6
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor \[B=2, Tk=9\] with k, got torch.int64"):
        decode_attention(q, k, v, key_mask=key_mask.long())
    with pytest.raises(ValueError, match="needs sequence keys .* or depth slots"):
        decode_attention(q, None, None)
    bad = torch.zeros(2, tq, 3, 1, 8)
    with pytest.raises(ValueError, match=rf"k_depth and v_depth must be \[B=2, Tq={tq}, L, Hk=2 \(k's heads\), d=8\]"):
        decode_attention(q, k, v, bad, bad, key_mask=key_mask)
    if depth:
        with pytest.raises(TypeError, match="k_depth has dtype torch.float16 but q has torch.float32"):
            decode_attention(q, k, v, kd.half(), vd.half(), key_mask=key_mask)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64, got torch.int64"):
        decode_attention(q.long(), k.long(), v.long(), key_mask=key_mask)
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor of shape \[B, Tk, Hk, d\], got list"):
        decode_attention(q, [1], [1], key_mask=key_mask)
    with pytest.raises(ValueError, match="q must not be empty"):
        decode_attention(q[..., :0], k[..., :0], v[..., :0], key_mask=key_mask)


# (B, Hq, Hk, d, Tk, L): GQA, G=3 (padded to 4 query rows), G=1, d not a power of two, no depth
# slots, no cache (depth only), a cache of several chunks per KV head
KERNEL_SHAPES = [(2, 4, 2, 16, 37, 3), (3, 6, 2, 24, 130, 5), (1, 4, 4, 16, 9, 0), (2, 8, 1, 32, 0, 4),
                 (1, 2, 1, 16, 300, 1)]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture()
def decode_kernel(monkeypatch):
    """decode_attention takes the Triton decoding kernel for one query token, on the CPU too
    (TRITON_INTERPRET=1, set by conftest): the tests run on DEVICE."""
    import flash_depth.ops.moda as moda_ops

    monkeypatch.setattr(moda_ops, "_decode_kernel_applies", lambda q, *a: q.shape[1] == 1)


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_decode_kernel_is_moda_over_the_kept_keys(shape, decode_kernel, monkeypatch):
    """The Triton decoding kernel reads a transposed cache and a slice of a slot buffer in place (V
    and the V slots laid out unlike K and the K slots) and equals the float64 formula over the kept
    keys and the slots."""
    from flash_depth.ops import decode_triton

    calls = []
    kernel = decode_triton.decode_forward
    monkeypatch.setattr(decode_triton, "decode_forward", lambda *a: calls.append(a[1].shape) or kernel(*a))
    B, Hq, Hk, d, Tk, L = shape
    q = torch.randn(B, 1, Hq, d)
    k = torch.randn(B, Hk, Tk, d).transpose(1, 2)  # transformers' cache layout
    v = torch.randn(B, Tk, Hk, d)
    slots = torch.randn(B, 1, L + 2, Hk, d)  # two slots past the read: a slice, as DepthSlots.read
    kd, vd = (slots[:, :, :L], torch.randn(B, 1, L, Hk, d)) if L else (None, None)
    key_mask = torch.rand(B, Tk) < 0.6
    key_mask[:, 3 * Tk // 4:] = False  # unwritten slots: Tk=300 leaves a chunk with no key kept
    key_mask[:, Tk // 2:Tk // 2 + 1] = True  # every row keeps a key
    seq = (k, v) if Tk else (None, None)
    on = [None if x is None else x.to(DEVICE) for x in (q, *seq, kd, vd, key_mask if Tk else None)]
    out = decode_attention(*on[:5], key_mask=on[5])
    assert calls == [(B, Tk, Hk, d)] and out.shape == q.shape
    want, _ = naive_moda(q, *seq, kd, vd, causal=False, key_mask=key_mask[:, None] if Tk else None)
    assert rel_err(out.cpu(), want) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA: generate() compiles by itself; test_gpu.py covers it")
def test_compiled_decoding_through_the_decode_kernel_equals_the_dynamic_cache(decode_kernel):
    """The kernel is one opaque op per layer in the compiled step: no graph break, no recompile,
    the greedy tokens of the dynamic cache (with left padding)."""
    model = _model("moda")
    ids, mask = _prompts(4, 6)
    want = _generate(model, ids, mask)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with compiled_decoding(model, backend=backend, fullgraph=True):
            assert torch.equal(_generate(model, ids, mask, cache_implementation="static"), want)
    torch._dynamo.reset()
    ops = [n for n in graphs[0].graph.nodes if n.target is torch.ops.flash_depth.decode_attention.default]
    assert len(graphs) == 1 and len(ops) == model.config.num_hidden_layers


def test_static_cache_refuses_right_padding_and_overflow():
    model = _model("moda")
    ids, mask = _prompts(5, 5)
    mask[1, 3:] = 0  # right padding: decoding would leave a gap the steps cannot see
    with pytest.raises(ValueError, match="takes left-padded rows only"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    with pytest.raises(ValueError, match=r"attention_mask has 9 columns, more than the cache's 8 slots"):
        static_cache_mask(torch.ones(1, 9), 8)
    with pytest.raises(ValueError, match="compiled_decoding|forward is not already replaced"):
        with compiled_decoding(model):
            with compiled_decoding(model):
                pass


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-slots", "fp8-round-trip"])
def test_decoding_steps_write_the_slot_buffers_the_prefill_kept(fp8, monkeypatch):
    """A prefill into a fixed-length cache keeps one k and one v slot buffer on the cache; every
    decoding step writes into those (in place: made inside a compiled step, every read gathered
    its slots anew), and the step's logits are the uncached model's."""
    from flash_depth.nn.depth_stream import DepthSlots

    if fp8 and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 dtype")
    model = _model("moda", **({"depth_stream_dtype": "fp8"} if fp8 else {}))
    ids, mask = _prompts(5, 3)
    cache = _static_cache(model, 8)
    used = []
    write = DepthSlots.write

    def spy(self, k, v):
        write(self, k, v)
        used.append(self.k is cache._flash_depth_decode.slots[0] and self.v is cache._flash_depth_decode.slots[1])

    monkeypatch.setattr(DepthSlots, "write", spy)
    seq, full_mask = ids, mask
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, cache_position=torch.arange(5))
        kept = cache._flash_depth_decode.slots
        assert [tuple(b.shape) for b in kept] == [(2, 1, model.config.depth_slots, 2, 16)] * 2
        for step in range(2):
            token = torch.randint(1, 512, (2, 1))
            seq, full_mask = torch.cat([seq, token], 1), torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits = model(token, attention_mask=static_cache_mask(full_mask, 8), past_key_values=cache,
                           use_cache=True, cache_position=torch.tensor([5 + step])).logits[:, -1]
            assert rel_err(logits, model(seq, attention_mask=full_mask).logits[:, -1]) < 1e-5
        assert cache._flash_depth_decode.slots is kept  # reused, not made again
    assert used and all(used) and len(used) == 2 * model.config.depth_slots


def test_inductor_compiled_decoding_equals_eager_with_the_kept_slot_buffers():
    """Inductor's code for the steps (the CPU's here; test_gpu runs the GPU's with CUDA graphs),
    which mutates the kept slot buffers in place and reads views of them (that the steps use the
    kept buffers is the eager test above) and computes the FFN input in one GEMM, gives the eager
    tokens, also in a second generate."""
    model = _model("moda", depth_window=2, depth_anchors=1)
    ids, mask = _prompts(4, 6)
    want = _generate(model, ids, mask)
    torch._dynamo.reset()
    with compiled_decoding(model, fullgraph=True):
        for _ in range(2):
            assert torch.equal(_generate(model, ids, mask, cache_implementation="static"), want)
    torch._dynamo.reset()


def test_compiled_steps_compute_the_ffn_input_in_one_gemm_from_fresh_weights(monkeypatch):
    """Compiled steps take the FFN's gate/up and depth K/V from one stacked copy of their weights,
    kept with the cache (zeroing that copy changes their logits; eager steps never read it); after
    an in-place change of the parameters (as an optimizer step makes) the next generate refreshes
    it: the logits equal the eager model's before and after."""
    model = _model("moda")
    ids, mask = _prompts(4, 6)
    caches = []
    prepare = type(model).prepare_decoding

    def prepare_spy(self, cache):  # called eagerly, before each compiled step
        caches.append(cache)
        prepare(self, cache)

    def logits(compiled):
        torch._dynamo.reset()
        with compiled_decoding(model, backend="eager", fullgraph=True) if compiled else torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                 cache_implementation="static", output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits)

    monkeypatch.setattr(type(model), "prepare_decoding", prepare_spy)
    want = logits(compiled=False)
    assert not caches
    assert rel_err(logits(compiled=True), want) < 1e-6
    state = caches[-1]._flash_depth_decode
    writers = [block for block in model.model.layers if block.ffn_kv is not None]
    for block in writers:
        assert torch.equal(state.ffn_inputs[block.layer_idx],
                           torch.cat([block.ffn.gate_up.weight, block.ffn_kv.proj.weight]))
    with monkeypatch.context() as patch:
        _zero_kept_ffn_inputs(patch)
        assert rel_err(logits(compiled=True)[1:], want[1:]) > 1e-2  # the steps after the prefill read it
    with torch.no_grad():
        for block in writers:
            block.ffn.gate_up.weight.mul_(1.5)
            block.ffn_kv.proj.weight.neg_()
    want = logits(compiled=False)
    assert rel_err(logits(compiled=True), want) < 1e-6
    torch._dynamo.reset()


def test_prepare_decoding_refreshes_the_stacked_weights_where_parameters_changed():
    """On one cache: the stacked copy follows in-place changes of either source (their version
    counters), is left alone when nothing changed, and is made for moda only."""
    model = _model("moda")
    cache = _static_cache(model, 8)
    model.prepare_decoding(cache)
    state = cache._flash_depth_decode
    block = model.model.layers[1]
    kept = state.ffn_inputs[1]
    split = block.ffn.gate_up.out_features
    assert sorted(state.ffn_inputs) == [i for i, b in enumerate(model.model.layers) if b.ffn_kv is not None]
    with torch.no_grad():
        block.ffn_kv.proj.weight.add_(1.0)
    model.prepare_decoding(cache)
    assert state.ffn_inputs[1] is kept and torch.equal(kept[split:], block.ffn_kv.proj.weight)
    kept.zero_()
    model.prepare_decoding(cache)  # nothing changed: no copy
    assert not kept.any()
    with torch.no_grad():
        block.ffn.gate_up.weight.mul_(2.0)
    model.prepare_decoding(cache)
    assert torch.equal(kept, torch.cat([block.ffn.gate_up.weight, block.ffn_kv.proj.weight]))
    residual = _model("residual")
    other = _static_cache(residual, 8)
    residual.prepare_decoding(other)
    assert not hasattr(other, "_flash_depth_decode")


def _decode_by_hand(model, forward, steps, between=None):
    """Prefill and ``steps`` greedy steps on one fixed-length cache through ``forward`` (the
    prefill too: a compiled one refreshes the stacked weights in its graph); ``between(cache)``
    runs before each step. Returns the steps' last logits."""
    ids, mask = _prompts(5, 3)
    cache = _static_cache(model, 12)
    model.prepare_decoding(cache)  # on the CPU only this makes the stacked copy
    out = forward(ids, attention_mask=mask, past_key_values=cache, use_cache=True, cache_position=torch.arange(5))
    full_mask, logits = mask, []
    for step in range(steps):
        if between is not None:
            between(cache)
        full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], 1)
        out = forward(out.logits[:, -1:].argmax(-1), attention_mask=static_cache_mask(full_mask, 12),
                      past_key_values=cache, use_cache=True, cache_position=torch.tensor([5 + step]))
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


def test_stacked_ffn_weights_follow_changes_between_steps_and_in_a_compiled_prefill():
    """Weights changed in place between two steps of one decode are seen once prepare_decoding runs
    (what compiled_decoding does before each step), and a compiled prefill copies them in its graph:
    compiled steps give the eager steps' logits under the same changes."""
    model = _model("moda")
    writer = model.model.layers[0]
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def change(cache):
        with torch.no_grad():
            writer.ffn_kv.proj.weight.mul_(-1.5)
            writer.ffn.gate_up.weight.mul_(1.25)
        model.prepare_decoding(cache)

    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="eager")
    with torch.no_grad():
        want = _decode_by_hand(model, model.forward, 3, between=change)
        model.load_state_dict(start)
        assert rel_err(_decode_by_hand(model, compiled, 3, between=change), want) < 1e-5
        writer.ffn_kv.proj.weight.mul_(0.5)  # then a whole compiled decode, prefill included
        assert rel_err(_decode_by_hand(model, compiled, 2), _decode_by_hand(model, model.forward, 2)) < 1e-5
    torch._dynamo.reset()


def test_stacked_ffn_weights_are_not_used_with_autograd_or_hooks(monkeypatch):
    """A compiled step that records gradients, or whose FFN Linear has a hook, reads the parameters:
    with the stacked copy zeroed its logits stay the eager steps', and the hook runs every step."""
    model = _model("moda")
    _zero_kept_ffn_inputs(monkeypatch)
    torch._dynamo.reset()
    with torch.no_grad():
        want = _decode_by_hand(model, model.forward, 2)
        assert rel_err(_decode_by_hand(model, torch.compile(model.forward, backend="eager"), 2), want) > 1e-2
    torch._dynamo.reset()
    assert rel_err(_decode_by_hand(model, torch.compile(model.forward, backend="eager"), 2), want) < 1e-5
    calls, writers = [], [block for block in model.model.layers if block.ffn_kv is not None]
    for block in writers:
        block.ffn.gate_up.register_forward_hook(lambda module, args, out: calls.append(1))
    torch._dynamo.reset()
    with torch.no_grad():
        assert rel_err(_decode_by_hand(model, torch.compile(model.forward, backend="eager"), 2), want) < 1e-5
    assert len(calls) == 3 * len(writers)  # the prefill and both steps
    torch._dynamo.reset()
