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
                                         ("moda", ("train.compile=true",))])
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
