"""GPU checks at the benchmark shapes (bf16, every backend), run on the GPU machine.

    python -m pytest -m gpu tests/test_gpu.py
"""

import pytest
import torch

from flash_depth import depth_attention, moda_attention
from flash_depth.ops import attention_reference
from oracle import rel_err

pytestmark = pytest.mark.gpu

# (T, Hq, Hk, d, L)
BENCH_SHAPES = [
    (4096, 64, 8, 64, 64),
    (16384, 64, 8, 64, 64),
    (16384, 16, 8, 64, 64),  # G=2
    (4096, 64, 8, 64, 256),
    (4096, 64, 8, 128, 64),
    (2048, 16, 8, 32, 64),
    (1000, 16, 2, 256, 7),  # d=256 (Triton only), odd T and L
]


def _inputs(T, Hq, Hk, d, L, dtype=torch.bfloat16, Tk=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Tk = T if Tk is None else Tk
    shapes = [(1, T, Hq, d), (1, Tk, Hk, d), (1, Tk, Hk, d), (1, T, L, Hk, d), (1, T, L, Hk, d)]
    return [torch.randn(s, device="cuda", dtype=dtype, generator=g).requires_grad_() for s in shapes]


def _reference_grads(inputs, do, causal, chunk=256):
    ref = [x.detach().double().requires_grad_() for x in inputs]
    o, lse = attention_reference(*ref, causal=causal, scale=ref[0].shape[-1] ** -0.5, chunk_size=chunk)
    grads = torch.autograd.grad(o, ref, do.double())
    return o, lse, grads


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "T{}-Hq{}-Hk{}-d{}-L{}".format(*s))
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bf16_matches_float64(shape, backend):
    T, Hq, Hk, d, L = shape
    inputs = _inputs(*shape)
    o, lse = moda_attention(*inputs, return_lse=True, backend=backend)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)
    o_ref, lse_ref, grads_ref = _reference_grads(inputs, do, causal=True)
    errs = {"o": rel_err(o, o_ref), "lse": rel_err(lse, lse_ref)}
    for name, g, gr in zip(["dq", "dk", "dv", "dk_depth", "dv_depth"], grads, grads_ref):
        errs[name] = rel_err(g, gr)
    print(shape, backend, {k: f"{v:.2e}" for k, v in errs.items()})
    assert all(v < 1e-2 for v in errs.values()), errs


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    inputs = _inputs(3001, 8, 2, 64, 5, dtype=dtype)
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    for backend in ("auto", "triton"):
        o = moda_attention(*inputs, backend=backend)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, inputs, do)
        o_ref, _, grads_ref = _reference_grads(inputs, do, causal=True)
        assert rel_err(o, o_ref) < tol
        assert all(rel_err(g, gr) < tol for g, gr in zip(grads, grads_ref))


def test_decoding_and_noncausal():
    q, k, v, kd, vd = _inputs(300, 16, 4, 64, 9, Tk=1300)
    for causal in (True, False):
        inputs = [q[:, -37:].detach().requires_grad_(), k, v, kd[:, :37].detach(), vd[:, :37].detach()]
        o = moda_attention(*inputs, causal=causal)
        do = torch.randn_like(o)
        o_ref, _, grads_ref = _reference_grads(inputs, do, causal=causal)
        assert rel_err(o, o_ref) < 1e-2
        grads = torch.autograd.grad(o, [inputs[0], k, v], do)
        assert all(rel_err(g, gr) < 1e-2 for g, gr in zip(grads, grads_ref[:3]))


def test_depth_attention_bf16():
    q, _, _, kd, vd = _inputs(4096, 64, 8, 64, 64)
    o = depth_attention(q, kd, vd)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, [q, kd, vd], do)
    ref = [x.detach().double().requires_grad_() for x in (q, kd, vd)]
    o_ref, _ = attention_reference(ref[0], None, None, ref[1], ref[2], causal=False, scale=64**-0.5)
    grads_ref = torch.autograd.grad(o_ref, ref, do.double())
    assert rel_err(o, o_ref) < 1e-2
    assert all(rel_err(g, gr) < 1e-2 for g, gr in zip(grads, grads_ref))


def test_more_than_2_31_depth_elements():
    """Depth K/V with 2^31+ elements (T=16384, L=256, Hk=8, d=64): the last tokens' rows, whose
    offsets only 64-bit arithmetic reaches, match the reference."""
    T, Hq, Hk, d, L = 16384, 64, 8, 64, 256
    q, k, v, kd, vd = _inputs(T, Hq, Hk, d, L)
    assert kd.numel() >= 2**31
    o = moda_attention(q, k, v, kd, vd)
    do = torch.randn_like(o)
    dkd, dvd = torch.autograd.grad(o, [kd, vd], do)
    tail = 64
    ref = [q[:, -tail:], k, v, kd[:, -tail:], vd[:, -tail:]]
    o_ref, _, g_ref = _reference_grads(ref, do[:, -tail:], causal=True, chunk=64)
    assert rel_err(o[:, -tail:], o_ref) < 1e-2
    assert rel_err(dkd[:, -tail:], g_ref[3]) < 1e-2
    assert rel_err(dvd[:, -tail:], g_ref[4]) < 1e-2
    assert torch.isfinite(o).all() and torch.isfinite(dkd).all()


@pytest.mark.parametrize("mech", ["moda", "depth_attention", "attnres_block", "residual"])
def test_model_fused_path_matches_reference_path(mech):
    """The model on CUDA (fused kernels, strided q/k/v views, the depth stream) against the same
    weights on the plain PyTorch attention path, fp32: loss and every gradient."""
    from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

    torch.manual_seed(0)
    cfg = FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, attnres_blocks=4)
    fused = FlashDepthForCausalLM(cfg).cuda()
    cfg_ref = FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, attnres_blocks=4, attention_backend="reference")
    ref = FlashDepthForCausalLM(cfg_ref).cuda()
    ref.load_state_dict(fused.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 300), device="cuda")
    losses = []
    for model in (fused, ref):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-3, name


@pytest.mark.parametrize("mech, autocast, backend", [
    ("hc", False, "reference"), ("mudd", False, "reference"), ("hc", True, "auto"), ("mudd", True, "auto"),
    # float32 on the fused path: it failed to compile on torch 2.11 until the kernels cast the softmax
    # scale to float32, then trained with wrong gradients until moda's forward stopped returning a
    # no-op .contiguous() (benchmarks/results/logs/s11_compiled_fp32_h200.log)
    ("residual", False, "auto"), ("moda", False, "auto"), ("moda", True, "auto"),
    # mHC compiles its blocks only: compiled together with its stream read and write (torch 2.11,
    # H200) it missed eager by 3x on the embedding (docs/model.md, "Compiled mHC")
    ("mhc", False, "reference"), ("mhc", True, "auto"),
])
def test_compiled_blocks_match_eager_gradients(mech, autocast, backend):
    """compile_blocks() (custom ops and autograd Functions inside torch.compile) against the same
    weights run eagerly: loss and every gradient, float32 streams, with and without bf16 autocast.
    The embedding's gradient reaches it only through every block's stream backward. The mixers run
    float32 on the plain attention, so that the compiler sees only them; the residual model takes
    the fused attention in float32."""
    from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

    torch.manual_seed(0)
    cfg = FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, attention_backend=backend)
    eager = FlashDepthForCausalLM(cfg).cuda()
    with torch.no_grad():  # off the init, where mHC's zero gates leave its projections without a gradient
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    compiled = FlashDepthForCausalLM(cfg).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.model.compile_blocks()
    ids = torch.randint(0, cfg.vocab_size, (2, 300), device="cuda")
    losses = []
    for model in (compiled, eager):
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < (2e-2 if autocast else 1e-4) * abs(losses[1]), losses
    tol = 5e-2 if autocast else 1e-3
    eager_grads = dict(eager.named_parameters())
    hyper = mech in ("mhc", "hc")
    if hyper:  # float64 gradients, for the mixes' small ones (below)
        exact = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny", depth_mechanism=mech)).cuda().double()
        exact.load_state_dict(eager.state_dict())
        exact(ids, labels=ids).loss.backward()
        exact_grads = {name: p.grad.float() for name, p in exact.named_parameters()}
    for name, p in compiled.named_parameters():
        p_eager = eager_grads[name]
        assert p.grad is not None and p.grad.norm() > 0, name
        err = rel_err(p.grad, p_eager.grad)
        if hyper and name.startswith("model.hyper.") and err >= tol:
            # The mixes' gradients that nearly vanish: H_res's (the first mixes meet identical entry
            # streams, the last cannot change the streams' mean that the model reads out), the first
            # H_pre's (the block's norm undoes the read's scale), and under autocast the gates (sums
            # over every token of bf16-rounded products). Rounding decides them, compiled and eager
            # alike: compiled must be about as close to float64 as eager is, give or take a rounding
            # error of the same HyperConnection's gradients (on the CPU, with torch 2.13: at most
            # 3.4e-6 of them in float32, 5.3e-2 under autocast). In float32 that catches H_res's or the
            # first H_pre's gradient off by 2x (checked on the CPU); under autocast they sit below
            # bf16's rounding, and only the float32 case checks them.
            module = name.rsplit(".", 1)[0] + "."
            scale = torch.cat([g.flatten() for n, g in exact_grads.items() if n.startswith(module)]).norm()
            miss, eager_miss = (p.grad - exact_grads[name]).norm(), (p_eager.grad - exact_grads[name]).norm()
            assert miss <= 2 * eager_miss + (1e-1 if autocast else 2e-5) * scale, (name, err, float(miss / scale),
                                                                                   float(eager_miss / scale))
            continue
        assert err < tol, (name, err)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("depth", [False, True])
def test_compiled_moda_attention_float32_gradients(backend, depth):
    """moda_attention inside torch.compile, float32: every gradient equals eager's (on torch 2.11 a
    no-op .contiguous() on the output made them all wrong)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 32, device="cuda", requires_grad=True) for _ in range(3))
    slots = [torch.randn(2, 300, 3, 4, 32, device="cuda", requires_grad=True) for _ in range(2)] if depth else []
    inputs = (q, k, v, *slots)
    do = torch.randn(2, 300, 4, 32, device="cuda")

    def f(*x):
        return moda_attention(*x, backend=backend)

    want = torch.autograd.grad((f(*inputs) * do).sum(), inputs)
    got = torch.autograd.grad((torch.compile(f)(*inputs) * do).sum(), inputs)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_model_bf16_autocast_trains():
    from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

    cfg = FlashDepthConfig.from_preset("small-24", depth_mechanism="moda", num_hidden_layers=4)
    model = FlashDepthForCausalLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 1000, (2, 1024), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("mech, extra", [("residual", ()), ("moda", ()), ("attnres_block", ()),
                                         ("moda", ("train.compile=true",)), ("mudd", ("train.compile=true",))])
def test_cuda_graph_training_follows_the_eager_run(tmp_path, corpus, mech, extra):
    """train.cuda_graph: the replayed steps give the un-graphed run's losses, with the learning-rate
    schedule moving (warm-up) and across a resume, whose optimizer state comes back as floats."""
    import json

    from flash_depth.cli import main as cli

    def train(out, steps, *more):
        args = ["train", "--out", str(out), "--max-steps", str(steps), "--device", "cuda", f"data.source={corpus}",
                f"data.cache_dir={tmp_path / 'cache'}", f"model.depth_mechanism={mech}", "model.attnres_blocks=2",
                "model.num_hidden_layers=4", "train.seq_len=64", "train.batch_size=4", "train.log_every=1",
                "train.warmup_steps=8", "train.eval_every=100", "train.checkpoint_every=100", "data.vocab_size=300",
                *extra, *more]
        assert cli(args) == 0
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    eager = train(tmp_path / "eager", 12)
    # without the graph, resumed with it (3 eager warm-up steps, then replays), resumed without it
    mixed = train(tmp_path / "mixed", 4)
    mixed.update(train(tmp_path / "mixed", 9, "train.cuda_graph=true", "--resume"))
    mixed.update(train(tmp_path / "mixed", 12, "train.cuda_graph=false", "--resume"))  # a resume keeps the last setting
    assert sorted(mixed) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(mixed[step] - eager[step]) < 2e-3 * abs(eager[step]), (step, mixed[step], eager[step])
    assert eager[12] < eager[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, L", [(1, 3), (1, 1), (2, 3)])
def test_tiny_sequences_and_strided_inputs_run_without_warnings(dtype, T, L):
    """T=1 (cuDNN's backward refuses it: routed to Triton before any call) and inputs whose last
    dim is strided (copied for cuDNN): forward and backward, no warning, float64-exact to 1e-2."""
    import warnings

    for B, Hq, Hk in ((1, 8, 8), (3, 16, 4)):
        g = torch.Generator(device="cuda").manual_seed(T)
        q = torch.randn(B, T, Hq, 2 * 64, device="cuda", dtype=dtype, generator=g)[..., ::2].requires_grad_()
        k, v = (torch.randn(B, T, Hk, 64, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(2))
        kd, vd = (torch.randn(B, T, L, Hk, 64, device="cuda", dtype=dtype, generator=g).requires_grad_()
                  for _ in range(2))
        inputs = [q, k, v, kd, vd]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            o = moda_attention(*inputs)
            do = torch.randn_like(o)
            grads = torch.autograd.grad(o, inputs, do)
        o_ref, _, grads_ref = _reference_grads(inputs, do, causal=True)
        assert rel_err(o, o_ref) < 1e-2
        assert all(rel_err(gr, ref) < 1e-2 for gr, ref in zip(grads, grads_ref))


def test_fp8_quantizer_on_gpu_equals_cpu():
    """The write's quantiser gives the same e4m3 codes and scales on the GPU as on the CPU (where
    tests/test_fp8.py checks its error bound)."""
    from flash_depth.ops.fp8 import quantize_fp8

    x = torch.randn(4096, 8, 64, device="cuda", dtype=torch.bfloat16) * torch.logspace(-4, 4, 64, device="cuda")
    values, scales = quantize_fp8(x)
    values_cpu, scales_cpu = quantize_fp8(x.cpu())
    assert torch.equal(values.cpu().view(torch.uint8), values_cpu.view(torch.uint8))
    assert torch.equal(scales.cpu(), scales_cpu)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("window, anchors", [(None, 0), (6, 2)], ids=["all-slots", "window"])
def test_fp8_stream_matches_its_dequantised_slots_bf16(backend, window, anchors):
    """An fp8 depth stream at 700m-like shapes (T=4096, Hq=16, Hk=8, d=64, 12 slots, bf16): the
    fused kernels (forward, dq, deferred slot gradients, two spans with a window) against float64
    on the dequantised slots within bf16's 1e-2, and against the unquantised slots within fp8's
    error: 6% for the outputs, 15% for the slot gradients (the reference path on the CPU, this
    test's data at T=256: 3.9-4.5% and 8.3%; the wider slots make the depth part dominate)."""
    from flash_depth.nn.depth_stream import DepthStream, read_moda
    from flash_depth.ops.fp8 import dequantize_fp8, quantize_fp8

    T, Hq, Hk, d, slots = 4096, 16, 8, 64, 12
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, device="cuda", generator=g) * scale).bfloat16().requires_grad_()

    kvs = [rnd(1, T, Hk, d, scale=0.5 + i / 4) for i in range(2 * slots)]
    readers = [(rnd(1, T, Hq, d), rnd(1, T, Hk, d), rnd(1, T, Hk, d)) for _ in range(2)]
    dos = [torch.randn(1, T, Hq, d, device="cuda", generator=g).bfloat16() for _ in readers]
    stream = DepthStream(slots, dtype=torch.float8_e4m3fn)
    outs = []
    for i, (q, k, v) in enumerate(readers):  # the first reads 6 slots, the second all 12 (or its window)
        for j in range(6 * i, 6 * i + 6):
            stream.write(kvs[2 * j], kvs[2 * j + 1])
        outs.append(read_moda(stream, q, k, v, backend=backend, window=window, anchors=anchors))
    stream.close()
    grads = torch.autograd.grad(outs, kvs, dos, allow_unused=True, materialize_grads=True)

    def reference(slot_value):
        values = [slot_value(x.detach().double()).requires_grad_() for x in kvs]
        total, os = 0, []
        for i, ((q, k, v), do) in enumerate(zip(readers, dos)):
            n = 6 * i + 6
            keep = list(range(n)) if window is None or window >= n else \
                sorted(set(range(min(anchors, n - window))) | set(range(n - window, n)))
            kd, vd = (torch.stack([values[2 * j + c] for j in keep], 2) for c in (0, 1))
            o, _ = attention_reference(q.double(), k.double(), v.double(), kd, vd, causal=True, scale=d**-0.5)
            os.append(o)
            total = total + (o * do.double()).sum()
        return os, torch.autograd.grad(total, values, allow_unused=True, materialize_grads=True)

    deq_outs, deq_grads = reference(lambda x: dequantize_fp8(*quantize_fp8(x), dtype=torch.float64))
    exact_outs, exact_grads = reference(lambda x: x)
    for o, o_deq, o_exact in zip(outs, deq_outs, exact_outs):
        assert rel_err(o, o_deq) < 1e-2 and rel_err(o, o_exact) < 0.06
    read = [i for i, gr in enumerate(exact_grads) if gr.abs().sum() > 0]  # slots some read reached
    assert all(rel_err(grads[i], deq_grads[i]) < 1e-2 for i in read), [rel_err(grads[i], deq_grads[i]) for i in read]
    assert all(rel_err(grads[i], exact_grads[i]) < 0.15 for i in read)


def test_fp8_depth_kernels_with_slot_gradients_bf16():
    """depth_forward / depth_backward (slot_grads=True, the op-level form) on fp8 slots with bf16
    queries, against float64 on the dequantised slots."""
    from flash_depth.ops.depth_triton import depth_backward, depth_forward
    from flash_depth.ops.fp8 import dequantize_fp8, quantize_fp8

    q, _, _, kd, vd = _inputs(2048, 16, 8, 64, 24)
    (kd8, ks), (vd8, vs) = quantize_fp8(kd), quantize_fp8(vd * 3)
    o, lse = depth_forward(q, kd8, vd8, 64**-0.5, slot_scales=(ks, vs))
    do = torch.randn_like(o)
    dq, dk, dv = depth_backward(q, kd8, vd8, o, lse, do, 64**-0.5, slot_scales=(ks, vs))
    ref = [q.detach().double().requires_grad_(), dequantize_fp8(kd8, ks, torch.float64).requires_grad_(),
           dequantize_fp8(vd8, vs, torch.float64).requires_grad_()]
    o_ref, lse_ref = attention_reference(ref[0], None, None, ref[1], ref[2], causal=False, scale=64**-0.5)
    grads_ref = torch.autograd.grad(o_ref, ref, do.double())
    assert rel_err(o, o_ref) < 1e-2 and rel_err(lse, lse_ref) < 1e-2
    assert all(rel_err(gr, r) < 1e-2 for gr, r in zip((dq, dk, dv), grads_ref))


def test_fp8_model_on_gpu():
    """The model with depth_stream_dtype='fp8' on CUDA: the fused path against the reference path
    (fp32, same weights: the same dequantised slots), and under bf16 autocast against the bf16
    stream (loss within 1e-2 relative, every gradient within fp8's 15%)."""
    from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

    def model(**kw):
        torch.manual_seed(0)
        cfg = FlashDepthConfig.from_preset("small-24", depth_mechanism="moda", num_hidden_layers=4, **kw)
        return FlashDepthForCausalLM(cfg).cuda()

    ids = torch.randint(0, 1000, (2, 512), device="cuda")
    fused, ref = model(depth_stream_dtype="fp8"), model(depth_stream_dtype="fp8", attention_backend="reference")
    for m in (fused, ref):
        m(ids, labels=ids).loss.backward()
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-3, name
    bf16, fp8 = model(), model(depth_stream_dtype="fp8")
    losses = []
    for m in (bf16, fp8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) < 1e-2 * losses[0], losses
    for (name, p), p_ref in zip(fp8.named_parameters(), bf16.parameters()):
        assert torch.isfinite(p.grad).all() and rel_err(p.grad, p_ref.grad) < 0.15, name


@pytest.mark.parametrize("backend", ["cudnn", "triton"])
def test_non_causal_at_vit_shapes(backend):
    """DeiT-Tiny's attention (197 tokens, 3 heads of 64) non-causal, with 22 depth slots, bf16."""
    inputs = _inputs(197, 3, 3, 64, 22)
    o = moda_attention(*inputs, causal=False, backend=backend)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)
    o_ref, _, grads_ref = _reference_grads(inputs, do, causal=False)
    assert rel_err(o, o_ref) < 1e-2
    assert all(rel_err(g, gr) < 1e-2 for g, gr in zip(grads, grads_ref))


@pytest.mark.parametrize("mech", ["moda", "depth_attention", "attnres_block", "residual"])
def test_vit_fused_path_matches_reference_path(mech):
    """The vision encoder at DeiT-Tiny shapes (3 blocks) on CUDA against the same weights on the
    plain PyTorch attention path, fp32: loss and every gradient."""
    from flash_depth.models import FlashDepthViTConfig, FlashDepthViTForImageClassification

    torch.manual_seed(0)
    models = [FlashDepthViTForImageClassification(FlashDepthViTConfig.from_preset(
        "deit-tiny", num_hidden_layers=3, depth_mechanism=mech, attnres_blocks=3, attention_backend=backend)).cuda()
        for backend in ("auto", "reference")]
    models[1].load_state_dict(models[0].state_dict())
    images = torch.randn(4, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (4,), device="cuda")
    losses = []
    for model in models:
        loss = model(images, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4
    for (name, p), p_ref in zip(models[0].named_parameters(), models[1].parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-3, name


# (B, Hq, Hk, d, Tk, L): the 700m decoding step (batch 1 and 8, the last layer's 70 slots), G=4 with
# d=128 and odd sizes, a cache of one chunk, depth only
@pytest.mark.parametrize("shape", [(1, 16, 8, 64, 640, 70), (8, 16, 8, 64, 640, 70), (3, 32, 8, 128, 1001, 7),
                                   (2, 6, 2, 40, 5, 1), (4, 16, 8, 64, 0, 9)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_kernel_matches_float64(shape, dtype):
    """decode_attention's Triton kernel (one CUDA token) over a transposed cache with padding and
    unwritten slots, and a slice of a slot buffer, against the float64 formula."""
    from flash_depth.ops import decode_attention
    from oracle import naive_moda

    B, Hq, Hk, d, Tk, L = shape
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*s):
        return torch.randn(s, device="cuda", dtype=dtype, generator=g)

    q = rnd(B, 1, Hq, d)
    k, v = rnd(B, Hk, Tk, d).transpose(1, 2), rnd(B, Hk, Tk, d).transpose(1, 2)
    slots = rnd(2, B, 1, L + 3, Hk, d)
    key_mask = torch.zeros(B, Tk, dtype=torch.bool, device="cuda")
    for row in range(B):
        key_mask[row, row % 4: max(row % 4 + 1, Tk - 2 * row - 1)] = True  # padding, then unwritten slots
    seq = (k, v) if Tk else (None, None)
    out = decode_attention(q, *seq, slots[0, :, :, :L], slots[1, :, :, :L], key_mask=key_mask if Tk else None)
    want, _ = naive_moda(q, *seq, slots[0, :, :, :L], slots[1, :, :, :L], causal=False,
                         key_mask=key_mask[:, None] if Tk else None)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, want) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("mech", ["moda", "residual", "depth_attention"])
def test_compiled_static_generation_on_cuda_equals_the_dynamic_cache(mech):
    """generate() on CUDA with a static cache (compiled steps, CUDA graphs, the Triton decoding
    kernel) gives the dynamic cache's greedy tokens, fp32, left-padded rows."""
    from flash_depth.eval.generation import GENERATE_COMPILES, compiled_decoding
    from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

    torch.manual_seed(0)
    model = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny", depth_mechanism=mech)).cuda().eval()
    ids = torch.randint(1, 512, (3, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        torch._dynamo.reset()
        with compiled_decoding(model, mode="reduce-overhead") if not GENERATE_COMPILES else torch.no_grad():
            for _ in range(2):  # the second replays the recorded graphs
                assert torch.equal(model.generate(ids, cache_implementation="static", **kw), want)
    torch._dynamo.reset()
