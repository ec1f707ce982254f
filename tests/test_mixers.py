"""Hyper-Connections (mHC, static HC) and MUDDFormer's dense connections against float64 per-token
formulas written from the papers and SPEC 10; at init each equals a plain residual stack; every
parameter's gradient; input checks."""

import copy
import math
import os

import pytest
import torch
from torch import nn

from flash_depth.nn.hyper_connections import HyperConnection, collapse_streams, expand_streams, sinkhorn
from flash_depth.nn.mudd import MuddConnections


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def naive_sinkhorn(logits, pairs):
    """exp, then alternately divide rows and columns by their sums (``pairs`` times each)."""
    m = logits.double().exp()
    for _ in range(pairs):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


def naive_mhc(X, fn, p, pairs, eps=1e-6):
    """Per token: RMS-normalise flat X, gates times projections plus biases, read, sublayer, write."""
    B, T, n, D = X.shape
    out = torch.empty(B, T, n, D, dtype=torch.float64)
    p = {k: v.detach().double() for k, v in p.items()}
    for b in range(B):
        for t in range(T):
            Xt = X[b, t].double()
            flat = Xt.reshape(-1)
            x = flat / torch.sqrt(flat.pow(2).mean() + eps)
            h_pre = torch.sigmoid(p["alpha_pre"] * (x @ p["phi_pre"]) + p["b_pre"])
            h_post = 2 * torch.sigmoid(p["alpha_post"] * (x @ p["phi_post"]) + p["b_post"])
            h_res = naive_sinkhorn(p["alpha_res"] * (x @ p["phi_res"]).reshape(n, n) + p["b_res"], pairs)
            y = fn(sum(h_pre[i] * Xt[i] for i in range(n)))
            for i in range(n):
                out[b, t, i] = sum(h_res[i, j] * Xt[j] for j in range(n)) + h_post[i] * y
    return out


def _randomise(module, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.add_(torch.randn(prm.shape, generator=g, dtype=prm.dtype) * scale)


@pytest.mark.parametrize("n,spread", [(2, 0.1), (4, 0.3), (6, 0.3)])
def test_sinkhorn_rows_and_columns_sum_to_one(n, spread):
    # logits like the init's b_res after some learning (n=2 converges slowest)
    logits = torch.eye(n, dtype=torch.float64) - 1 + torch.randn(256, n, n, dtype=torch.float64) * spread
    m = sinkhorn(logits, iters=20)
    assert (m > 0).all()
    assert (m.sum(-2) - 1).abs().max() < 1e-12  # the last step normalises columns
    assert (m.sum(-1) - 1).abs().max() < 1e-6  # the rows' convergence residual after 20 pairs
    assert torch.allclose(m, naive_sinkhorn(logits, 20), atol=1e-12, rtol=0)


def test_sinkhorn_residual_shrinks_with_iterations():
    # wide logits converge slowly: 20 pairs leave ~1e-2 at spread 2; more pairs keep shrinking it
    logits = torch.randn(256, 4, 4, dtype=torch.float64) * 2
    res = [(sinkhorn(logits, it).sum(-1) - 1).abs().max().item() for it in (5, 20, 80)]
    assert res[0] > res[1] > res[2] and res[1] < 0.1


def test_sinkhorn_of_huge_logits_stays_finite():
    logits = torch.tensor([[1000.0, -1000.0], [0.0, 5.0]])
    m = sinkhorn(logits)
    assert torch.isfinite(m).all() and (m.sum(-2) - 1).abs().max() < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_mhc_forward_matches_formula(dtype, tol):
    torch.manual_seed(0)
    n, D = 4, 6
    hc = HyperConnection(D, n, "mhc", sinkhorn_iters=20).to(dtype)
    _randomise(hc)  # alpha != 0: the token-dependent terms count
    lin = nn.Linear(D, D).to(dtype)
    X = torch.randn(2, 3, n, D, dtype=dtype)
    out = hc(X, lin)
    assert out.shape == X.shape and out.dtype == dtype
    lin64 = copy.deepcopy(lin).double()
    ref = naive_mhc(X, lin64, dict(hc.named_parameters()), 20)
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol


def test_mhc_mixes_shapes_and_constraints():
    hc = HyperConnection(8, 4).double()
    _randomise(hc, 0.1)
    h_pre, h_post, h_res = hc.mixes(torch.randn(2, 5, 4, 8, dtype=torch.float64))
    assert h_pre.shape == (2, 5, 4) and h_post.shape == (2, 5, 4) and h_res.shape == (2, 5, 4, 4)
    assert ((h_pre > 0) & (h_pre < 1)).all() and ((h_post > 0) & (h_post < 2)).all()
    assert (h_res.sum(-1) - 1).abs().max() < 1e-6 and (h_res.sum(-2) - 1).abs().max() < 1e-12


def test_static_hc_matches_formula_without_sinkhorn():
    torch.manual_seed(1)
    n, D = 3, 5
    hc = HyperConnection(D, n, "hc").double()
    _randomise(hc)  # h_res no longer doubly stochastic: it must be used as is
    lin = nn.Linear(D, D).double()
    X = torch.randn(2, 4, n, D, dtype=torch.float64)
    out = hc(X, lin)
    h_pre, h_post, h_res = (p.detach() for p in (hc.h_pre, hc.h_post, hc.h_res))
    assert (h_res.sum(-1) - 1).abs().max() > 0.1
    for b in range(2):
        for t in range(4):
            y = lin(sum(h_pre[i] * X[b, t, i] for i in range(n)))
            for i in range(n):
                want = sum(h_res[i, j] * X[b, t, j] for j in range(n)) + h_post[i] * y
                assert torch.allclose(out[b, t, i], want, atol=1e-12, rtol=0)
    assert {k for k, _ in hc.named_parameters()} == {"h_pre", "h_post", "h_res"}


def _toy_layers(D, L, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(D, D) for _ in range(L)]


@pytest.mark.parametrize("kind", ["mhc", "hc"])
def test_hyper_connections_at_init_are_a_plain_residual(kind):
    D, n, L = 16, 4, 3
    layers = _toy_layers(D, L)
    emb = torch.randn(2, 5, D)
    plain = emb
    for f in layers:
        plain = plain + f(plain)
    hcs = [HyperConnection(D, n, kind, layer=i) for i in range(L)]
    X = expand_streams(emb, n)
    for hc, f in zip(hcs, layers):
        X = hc(X, f)
    out = collapse_streams(X)
    assert (out - plain).abs().max() / plain.abs().max() < 1e-6
    assert (X - plain[..., None, :]).abs().max() / plain.abs().max() < 1e-6  # every stream is the residual


def _mudd_stack(mudd, blocks, emb):
    """Toy blocks that use all four inputs: X_i = r + Wq q + Wk k + Wv v."""
    stream, ins = mudd.new_stream(emb), (emb, emb, emb, emb)
    for wq, wk, wv in blocks:
        q, k, v, r = ins
        ins = mudd(stream, r + wq(q) + wk(k) + wv(v))
    stream.close()
    assert len(ins) == 1
    return ins[0]


def naive_mudd_weights(m, x, eps=1e-6):
    """A [ways, sources] of one token from its output x [D]: W2 gelu(W1 rmsnorm(x)) + b, float64."""
    w1, w2, bias = (t.detach().double() for t in (m.w1.weight, m.w2.weight, m.bias))
    x = x.double()
    x = x / torch.sqrt(x.pow(2).mean() + eps)
    h = w1 @ x
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return (w2 @ h).reshape(bias.shape) + bias


def test_mudd_at_init_is_a_plain_residual():
    """W2 = 0 and one-hot biases on the latest output: every way of every block is X_i."""
    D, L = 16, 3
    torch.manual_seed(0)
    blocks = [tuple(nn.Linear(D, D) for _ in range(3)) for _ in range(L)]
    emb = torch.randn(2, 5, D)
    plain = emb
    for wq, wk, wv in blocks:
        plain = plain + wq(plain) + wk(plain) + wv(plain)
    mudd = MuddConnections(D, L)
    assert all(m.w2.weight.abs().max() == 0 for m in mudd.weights)
    assert (_mudd_stack(mudd, blocks, emb) - plain).abs().max() / plain.abs().max() < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_mudd_mixes_match_formula(dtype, tol):
    D, L = 16, 3
    mudd = MuddConnections(D, L).to(dtype)
    _randomise(mudd)
    states = [torch.randn(2, 3, D, dtype=dtype) for _ in range(3)]  # after block 2: X_0, X_1, X_2
    stream = mudd.new_stream(states[0])
    mudd(stream, states[1])
    outs = mudd(stream, states[2])
    assert len(outs) == 4 and all(o.shape == (2, 3, D) and o.dtype == dtype for o in outs)
    m = mudd.weights[1]
    assert m.w1.weight.shape[0] % 64 == 0 and m.w1.weight.shape[0] >= 4 * 3
    for b in range(2):
        for t in range(3):
            a = naive_mudd_weights(m, states[2][b, t])
            for s in range(4):
                want = sum(a[s, j] * states[j][b, t].double() for j in range(3))
                assert (outs[s][b, t].double() - want).abs().max() / want.abs().max() < tol
    last = mudd(stream, torch.randn(2, 3, D, dtype=dtype))  # after the last block: one way over X_0 .. X_3
    assert len(last) == 1 and mudd.weights[-1].w2.out_features == 1 * (L + 1)


@pytest.mark.parametrize("unused", [None, 3])
def test_mudd_gradients_match_autograd_of_the_formula(unused):
    """The stream's hand-routed backward (weights and every kept output) against autograd through
    the float64 formula written with plain tensors. ``unused``: that block ignores its inputs, so
    the mix before it never runs its backward (and the mix after it defers to no successor)."""
    D, L = 8, 3
    mudd = MuddConnections(D, L).double()
    _randomise(mudd, 0.3)
    ref = copy.deepcopy(mudd)
    xs = [torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True) for _ in range(L + 1)]
    w = torch.randn(2, 3, D, dtype=torch.float64)
    # blocks as fixed maps of the way inputs, so gradients flow through earlier mixes too
    stream, ins, loss = mudd.new_stream(xs[0]), None, 0
    states = [xs[0]]
    for i in range(1, L + 1):
        x = xs[i] if ins is None or i == unused else xs[i] + ins[0] * ins[1] + ins[2].sin() + 0.5 * ins[3]
        ins = mudd(stream, x)
        states.append(x)
    stream.close()
    loss = (ins[0] * w).sum()
    got = torch.autograd.grad(loss, xs + list(mudd.parameters()), allow_unused=True)
    ins, states = None, [xs[0]]
    for i in range(1, L + 1):
        x = xs[i] if ins is None or i == unused else xs[i] + ins[0] * ins[1] + ins[2].sin() + 0.5 * ins[3]
        states.append(x)
        a = ref.weights[i - 1](x)  # [B, T, ways, i + 1]
        ins = [sum(a[..., s, j, None] * states[j] for j in range(i + 1)) for s in range(a.shape[-2])]
    want = torch.autograd.grad((ins[0] * w).sum(), xs + list(ref.parameters()), allow_unused=True)
    assert [g is None for g in got] == [h is None for h in want] and (unused is None) == all(g is not None for g in got)
    for g, h in zip(got, want):
        assert g is None or (g - h).abs().max() <= 1e-12 * h.abs().max()


def _grads(module, loss):
    module.zero_grad()
    loss.backward()
    return {k: p.grad for k, p in module.named_parameters()}


def _nonzero(g):
    return g is not None and torch.isfinite(g).all() and g.abs().max() > 0


def test_hyper_connection_parameters_get_gradients():
    D, n = 8, 4
    lin = nn.Linear(D, D)
    emb, w = torch.randn(2, 3, D), torch.randn(2, 3, n, D)
    hc = HyperConnection(D, n, "mhc")
    grads = _grads(hc, (hc(expand_streams(emb, n), lin) * w).sum())
    # at init alpha = 0 hides phi; the gates and the pre/post biases learn from step one
    for k in ("alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post"):
        assert _nonzero(grads[k]), k
    assert all(grads[k].abs().max() == 0 for k in ("phi_pre", "phi_post", "phi_res"))
    _randomise(hc, 0.1)
    grads = _grads(hc, (hc(torch.randn(2, 3, n, D), lin) * w).sum())
    assert all(_nonzero(g) for g in grads.values()), [k for k, g in grads.items() if not _nonzero(g)]

    hc = HyperConnection(D, n, "hc", layer=1)
    grads = _grads(hc, (hc(torch.randn(2, 3, n, D), lin) * w).sum())
    assert all(_nonzero(g) for g in grads.values()), [k for k, g in grads.items() if not _nonzero(g)]


def test_mudd_parameters_get_gradients():
    D, L = 8, 3
    torch.manual_seed(0)
    blocks = [tuple(nn.Linear(D, D) for _ in range(3)) for _ in range(L)]
    emb, w = torch.randn(2, 3, D), torch.randn(2, 3, D)
    mudd = MuddConnections(D, L)
    grads = _grads(mudd, (_mudd_stack(mudd, blocks, emb) * w).sum())
    # W2 = 0 at init (as in the reference) hides W1 for one step
    assert all(_nonzero(g) for k, g in grads.items() if not k.endswith("w1.weight"))
    _randomise(mudd, 0.1)
    grads = _grads(mudd, (_mudd_stack(mudd, blocks, emb) * w).sum())
    assert all(_nonzero(g) for g in grads.values()), [k for k, g in grads.items() if not _nonzero(g)]


def test_bf16_streams_keep_their_dtype():
    hc = HyperConnection(8, 4)
    _randomise(hc, 0.1)
    X = torch.randn(2, 3, 4, 8)
    out = hc(X.bfloat16(), lambda v: v * 2)
    assert out.dtype == torch.bfloat16
    assert (out.float() - hc(X, lambda v: v * 2)).abs().max() < 0.1
    mudd = MuddConnections(8, 2)
    x0, x1 = X[:, :, 0], X[:, :, 1]
    outs = mudd(mudd.new_stream(x0, torch.bfloat16), x1)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    want = mudd(mudd.new_stream(x0), x1)
    assert all((o.float() - w).abs().max() < 0.05 for o, w in zip(outs, want))


@pytest.mark.parametrize("kwargs,name", [
    (dict(dim=0), "dim"), (dict(dim=8, streams=1), "streams"), (dict(dim=8, kind="dhc"), "kind"),
    (dict(dim=8, layer=-1), "layer"), (dict(dim=8, sinkhorn_iters=0), "sinkhorn_iters"),
    (dict(dim=8.0), "dim"),
])
def test_hyper_connection_argument_checks(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HyperConnection(**kwargs)


def test_input_checks_name_the_argument():
    hc = HyperConnection(8, 4)
    with pytest.raises(ValueError, match="X"):
        hc(torch.randn(2, 3, 3, 8), lambda v: v)
    with pytest.raises(TypeError, match="X"):
        hc(torch.zeros(2, 3, 4, 8, dtype=torch.long), lambda v: v)
    with pytest.raises(TypeError, match="fn"):
        hc(torch.randn(2, 3, 4, 8), None)
    with pytest.raises(ValueError, match="y"):
        hc(torch.randn(2, 3, 4, 8), lambda v: v[..., :4])
    with pytest.raises(TypeError, match="x"):
        expand_streams([1.0], 4)
    with pytest.raises(ValueError, match="streams"):
        expand_streams(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match="num_layers"):
        MuddConnections(8, 0)
    with pytest.raises(ValueError, match="backend"):
        MuddConnections(8, 2, backend="cuda")
    mudd = MuddConnections(8, 2)
    with pytest.raises(TypeError, match="stream"):
        mudd([torch.randn(2, 3, 8)], torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="x0"):
        mudd.new_stream(torch.randn(2, 3, 4))
    stream = mudd.new_stream(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="x must have the stream's shape"):
        mudd(stream, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="a must be a tensor"):
        stream.mix(torch.randn(2, 3, 4, 2))  # weights over 2 outputs, 1 written
    mudd(stream, torch.randn(2, 3, 8))
    mudd(stream, torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="stream must hold"):
        mudd(stream, torch.randn(2, 3, 8))  # past the last block


def test_mudd_compiled_mixing_matches_eager():
    """compile_mixing traces the fused (broadcast-and-sum) form of the mix and its backward; it
    must give the eager batched-GEMM form's outputs and gradients (aot_eager: no C++ toolchain)."""
    D, L = 8, 3
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        mudd = MuddConnections(D, L)
        _randomise(mudd, 0.3)
        if compiled:
            torch._dynamo.reset()
            mudd.compile_mixing(backend="aot_eager")
        blocks = [tuple(nn.Linear(D, D) for _ in range(3)) for _ in range(L)]
        emb = torch.randn(2, 5, D, requires_grad=True)
        out = _mudd_stack(mudd, blocks, emb)
        grads = torch.autograd.grad(out.square().sum(), [emb, *mudd.parameters()])
        results.append((out, grads))
    (out, grads), (out_c, grads_c) = results
    assert (out - out_c).abs().max() < 1e-5 * out.abs().max()
    assert all((g - h).abs().max() <= 1e-5 * g.abs().max() for g, h in zip(grads, grads_c))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="runs the Triton kernels (the interpreter on CPU)")
def test_mudd_triton_mixing_matches_reference():
    """backend="triton" (ops/dense_mix.py, as on CUDA) through the stream, its float32 gradient
    buffer and the last block's single way: the reference backend's outputs and gradients."""
    D, L = 12, 3
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the kernels on CPU
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        mudd = MuddConnections(D, L, backend=backend)
        _randomise(mudd, 0.3)
        mudd.to(device)
        blocks = [tuple(nn.Linear(D, D, device=device) for _ in range(3)) for _ in range(L)]
        emb = torch.randn(2, 5, D, device=device, requires_grad=True)
        out = _mudd_stack(mudd, blocks, emb)
        results.append((out, torch.autograd.grad(out.square().sum(), [emb, *mudd.parameters()])))
    (out, grads), (out_t, grads_t) = results
    assert (out - out_t).abs().max() < 1e-5 * out.abs().max()
    assert all((g - h).abs().max() <= 1e-5 * g.abs().max() for g, h in zip(grads, grads_t))


_X = torch.randn(2, 3, 4, 8)


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: sinkhorn(torch.randn(3)), ValueError, r"logits must be a tensor \[\.\.\., n, n\] \(square\), got \(3,\)"),
    (lambda: sinkhorn(torch.randn(3, 4)), ValueError, r"logits must be a tensor \[\.\.\., n, n\] \(square\)"),
    (lambda: sinkhorn(torch.zeros(3, 3, dtype=torch.long)), TypeError, "logits must be a floating-point tensor"),
    (lambda: sinkhorn(torch.randn(3, 3), iters=0), ValueError, "iters must be a positive int, got 0"),
    (lambda: sinkhorn(torch.randn(3, 3), iters=-1), ValueError, "iters must be a positive int, got -1"),
    (lambda: sinkhorn(torch.randn(3, 3), eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    (lambda: collapse_streams(torch.randn(2, 4, 8)), ValueError, r"X must be a tensor \[B, T, n, D\], got \(2, 4, 8\)"),
    (lambda: collapse_streams(torch.zeros(2, 3, 4, 8, dtype=torch.long)), TypeError, "X must be a floating-point"),
    (lambda: expand_streams(torch.randn(8), 4), ValueError, r"x must be a tensor \[B, T, D\], got \(8,\)"),
    (lambda: expand_streams(torch.zeros(2, 3, 8, dtype=torch.long), 4), TypeError, "x must be a floating-point"),
    (lambda: HyperConnection(8, 4, kind="hc").post(_X, _X[:, :, 0], torch.ones(2), torch.ones(3, 3)), ValueError,
     r"h_post must be a tensor \[2, 3, 4\] \(static HC: \[4\]\)"),
    (lambda: HyperConnection(8, 4, kind="hc").post(_X, _X[:, :, 0], torch.ones(4), torch.ones(3, 3)), ValueError,
     r"h_res must be a tensor \[2, 3, 4, 4\] \(static HC: \[4, 4\]\)"),
    (lambda: HyperConnection(8, 4).post(_X, _X[:, :, 0], torch.ones(4), torch.ones(2, 3, 4, 4)), ValueError,
     "h_post and h_res must both be static"),
    (lambda: HyperConnection(8, 4).post(_X[..., :4], _X[:, :, 0, :4], torch.ones(4), torch.ones(4, 4)), ValueError,
     r"X must have shape \[B, T, 4, 8\]"),
    (lambda: HyperConnection(8, 4, eps=-1.0), ValueError, "eps must be a finite number >= 0, got -1.0"),
    (lambda: MuddConnections(8, 2, eps=-1.0), ValueError, "eps must be a finite number >= 0, got -1.0"),
    (lambda: MuddConnections(8, 2).new_stream(_X[:, :, 0], dtype=torch.int32), TypeError,
     "dtype must be None or a floating-point torch.dtype, got torch.int32"),
    (lambda: MuddConnections(8, 2).new_stream(_X[:, :, 0].long()), TypeError, "x0 must be a floating-point tensor"),
    (lambda: MuddConnections(8, 2)(MuddConnections(8, 2).new_stream(_X[:, :, 0]), _X[:, :, 1].double()), TypeError,
     "states must have the stream's dtype torch.float32"),
])
def test_mixer_argument_checks_name_the_argument(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_hc_layer_index_past_the_stream_count_is_taken_mod_streams():
    """Static HC's layer is the model's layer index; its one-hot init reads stream layer mod n."""
    assert torch.equal(HyperConnection(8, 4, kind="hc", layer=7).h_pre, HyperConnection(8, 4, kind="hc", layer=3).h_pre)
