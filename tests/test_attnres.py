"""Attention Residuals: the fused Triton read (interpreted on CPU) against an independent
float64 formula, forward and every gradient; the stream and two-phase paths of the model."""

import pytest
import torch
from oracle import float64_leaves, naive_attnres, rel_err

from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM
from flash_depth.nn.attnres_stream import SourceStream
from flash_depth.ops.attnres import attention_residual, attention_residual_merge
from flash_depth.ops.attnres_triton import (
    attnres_backward,
    attnres_forward,
    attnres_source_backward,
    query_grad_partials,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the kernels on CPU


def _case(N, B, T, D, S, with_partial, dtype):
    scale = torch.rand(N + 1, 1, 1, 1) * 3 + 0.1  # sources of different norms: far from uniform weights
    sources = (torch.randn(N + 1, B, T, D) * scale).to(DEVICE, dtype)
    query, norm_weight = torch.randn(S, D, device=DEVICE), torch.rand(S, D, device=DEVICE) + 0.5
    partial = sources[N] if with_partial else None
    return sources[:N].contiguous(), query, norm_weight, partial


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,B,T,D,S,with_partial", [
    (1, 1, 3, 16, 1, False),   # one source: weights are all 1
    (3, 2, 5, 40, 1, True),    # rows not a multiple of the row block, D not a power of two
    (5, 1, 9, 33, 3, True),    # several queries at once (two-phase inference), odd D
    (4, 2, 7, 70, 2, False),
])
def test_fused_read_matches_float64_formula(N, B, T, D, S, with_partial, dtype):
    sources, query, norm_weight, partial = _case(N, B, T, D, S, with_partial, dtype)
    dout = torch.randn(S, B, T, D, device=DEVICE)
    leaves = [x.clone().requires_grad_() for x in (sources, query, norm_weight)]
    p = None if partial is None else partial.clone().requires_grad_()
    out, lse = attention_residual(*leaves, eps=1e-6, partial=p, return_lse=True, backend="triton")
    assert out.dtype == dtype and out.shape == (S, B, T, D) and lse.shape == (S, B, T)
    (out.float() * dout).sum().backward()

    ref_leaves = [x.double().requires_grad_() for x in (sources, query, norm_weight)]
    ref_p = None if partial is None else partial.double().requires_grad_()
    all_sources = ref_leaves[0] if ref_p is None else torch.cat([ref_leaves[0], ref_p[None]])
    ref_out, ref_lse = naive_attnres(all_sources, ref_leaves[1], ref_leaves[2], 1e-6)
    (ref_out * dout.double()).sum().backward()

    tol = TOL[dtype]
    assert rel_err(out, ref_out) < tol and rel_err(lse, ref_lse) < tol
    for name, got, ref in zip(("sources", "query", "norm_weight"), leaves, ref_leaves):
        # fp16: the query gradients' row terms cancel around rowsums of an fp16-rounded o (up to 2.4e-2
        # in 150 draws of the (3, 2, 5, 40) case), as the bf16 GPU test of the deferred path allows
        loose = dtype == torch.float16 and name != "sources"
        assert rel_err(got.grad, ref.grad) < (5e-2 if loose else tol), name
    if p is not None:
        assert rel_err(p.grad, ref_p.grad) < tol


@pytest.mark.parametrize("S, param_dtype", [(1, torch.float32), (3, torch.float32), (2, torch.float16)])
def test_fused_read_with_one_norm_weight_for_every_query(S, param_dtype):
    """A norm weight ``[D]`` shared by S queries gets the sum of their gradients (S = 1: the
    model's query ``[D]``); query and norm weight gradients come back in their own dtype."""
    sources, query, norm_weight, partial = _case(4, 2, 5, 40, S, True, torch.float32)
    query = query[0] if S == 1 else query
    leaves = [sources.clone().requires_grad_(), query.to(param_dtype).requires_grad_(),
              norm_weight[0].to(param_dtype).requires_grad_()]
    p = partial.clone().requires_grad_()
    out = attention_residual(*leaves, eps=1e-6, partial=p, backend="triton")
    dout = torch.randn_like(out)
    (out * dout).sum().backward()

    def formula(dtype):  # the float64 reference, and the same formula in float32 as a yardstick
        ref_leaves = [x.detach().to(dtype).requires_grad_() for x in leaves]
        ref_p = partial.to(dtype).requires_grad_()
        ref_query = ref_leaves[1].reshape(-1, 40)
        ref_out, _ = naive_attnres(torch.cat([ref_leaves[0], ref_p[None]]), ref_query,
                                   ref_leaves[2].expand_as(ref_query), 1e-6)
        (ref_out.reshape(out.shape) * dout.to(dtype)).sum().backward()
        return ref_out.reshape(out.shape), ref_leaves, ref_p

    ref_out, ref_leaves, ref_p = formula(torch.float64)
    _, plain_leaves, _ = formula(torch.float32)
    assert rel_err(out, ref_out) < 1e-5
    for name, got, ref, plain in zip(("sources", "query", "norm_weight"), leaves, ref_leaves, plain_leaves):
        # the query gradients sum every row's terms, which cancel: a draw in a few hundred leaves the
        # float32 formula itself near 1e-5 there, so the bound is 4x its error where that is larger
        tol = max(TOL[param_dtype], 4 * rel_err(plain.grad, ref.grad) if name != "sources" else 0)
        assert got.grad.dtype == got.dtype and rel_err(got.grad, ref.grad) < tol, name
    assert rel_err(p.grad, ref_p.grad) < 1e-5


def test_reference_backend_matches_float64_formula_and_returns_weights():
    sources, query, norm_weight, partial = _case(4, 2, 5, 8, 2, True, torch.float64)
    out, lse, weights = attention_residual(list(sources), query, norm_weight, partial=partial, return_lse=True,
                                           return_weights=True)
    ref_out, ref_lse = naive_attnres(torch.cat([sources, partial[None]]), query, norm_weight, 1e-6)
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    assert weights.shape == (2, 5, 2, 5) and torch.allclose(weights.sum(1), torch.ones_like(weights[:, 0]))
    one = attention_residual(sources, query[0], norm_weight[0])  # one query [D]: no S dimension
    assert one.shape == (2, 5, 8) and rel_err(one, naive_attnres(sources, query[:1], norm_weight[:1], 1e-6)[0][0]) < 1e-12


def test_backward_accumulates_into_a_gradient_buffer_and_is_deterministic():
    sources, query, norm_weight, _ = _case(3, 1, 11, 24, 1, False, torch.float32)
    rows = sources.reshape(3, -1, 24)
    out, lse, u = attnres_forward(rows, query, norm_weight, None, 1e-6)
    assert rel_err(u, query * norm_weight) < 1e-6
    dout = torch.randn_like(out)
    grads = attnres_backward(dout, rows, query, norm_weight, None, out, lse, u, 1e-6)
    again = attnres_backward(dout, rows, query, norm_weight, None, out, lse, u, 1e-6)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(grads, again))
    buffer = torch.randn(3, 11, 24, device=DEVICE)
    start = buffer.clone()
    attnres_backward(dout, rows, query, norm_weight, None, out, lse, u, 1e-6, grad_sources=buffer)
    assert rel_err(buffer, start + grads[0]) < 1e-6


def _deferred_reads(sources, queries, tiles):
    """Each query's read of every source, its backward deferred: u ``[R, D]``, dO ``[R, M, D]``,
    lse and rowsums ``[R, M]`` as the source stream keeps them, and the query gradients."""
    kept, d_queries = [], []
    for q in queries:
        out, lse, u = attnres_forward(sources, q, None, None, 1e-6)
        do = torch.randn_like(out)
        delta = torch.empty(sources.shape[1], device=DEVICE)
        grads = attnres_backward(do, sources, q, None, None, out, lse, u, 1e-6, tiles=tiles, delta_out=delta)
        assert grads[0] is None and rel_err(delta, (do[0].double() * out[0].double()).sum(-1)) < 1e-6
        kept.append((u[0], do[0], lse[0], delta))
        d_queries.append(grads[2])
    return [torch.stack(x) for x in zip(*kept)], d_queries


def _check_deferred(N, M, D, dtype, tiles, source_tiles, tol):
    """Three reads of the same sources ``[N, M, D]``, their source gradients deferred: each source's
    gradient over the readers 0..2 and 1..2, and the query gradients, both as the reads form them
    and as the source passes do (``du_partials``), against float64 autograd."""
    sources = (torch.randn(N, M, D) * (torch.rand(N, 1, 1) * 3 + 0.1)).to(DEVICE, dtype)
    queries = [torch.randn(D, device=DEVICE) * D**-0.5 for _ in range(3)]  # logits O(1): softmax not saturated
    (u, do, lse, delta), d_queries = _deferred_reads(sources, queries, tiles)
    for readers in ((0, 3), (1, 3)):
        ref_v, *ref_q = float64_leaves([sources, *queries])
        ones = torch.ones(1, D, dtype=torch.float64, device=DEVICE)
        total = sum((naive_attnres(ref_v, q[None], ones, 1e-6)[0][0] * do[r].double()).sum()
                    for r, q in enumerate(ref_q) if r >= readers[0])
        total.backward()
        du = query_grad_partials(3, D, torch.device(DEVICE))
        for j in range(N):
            got = attnres_source_backward(sources[j], u, do, lse, delta, readers, 1e-6, tiles=source_tiles,
                                          du_partials=du)
            assert got.dtype == dtype and rel_err(got, ref_v.grad[j]) < tol, (readers, j)
        du = du.sum(0)
        for r, q in enumerate(ref_q):
            if r < readers[0]:
                assert torch.equal(du[r], torch.zeros_like(du[r]))  # rows of other readers untouched
            elif N > 1:  # one source: du is 0 up to rounding, which a stream leaves to the read
                assert rel_err(du[r], q.grad) < tol, (readers, r)
        if readers[0] == 0:
            assert all(rel_err(d, q.grad) < tol for d, q in zip(d_queries, ref_q))


@pytest.mark.parametrize("N, D, tiles, source_tiles", [
    (1, 37, (1, 1), None),                  # one source; the default tiles
    (3, 37, (2, 1, 3, 20), (1, 1, 3)),      # rows (7) not a multiple of 2; stages; warps per SM
    (2, 16, (4, 2, 1), (4, 2, 1)),          # the old tiles: four rows on two warps, no pipeline
    (2, 520, None, None),                   # D > 512: the default tiles there
])
def test_deferred_source_gradients_over_readers_match_float64(N, D, tiles, source_tiles):
    _check_deferred(N, 7, D, torch.float32, tiles, source_tiles, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])  # bf16: rowsums of a rounded o
@pytest.mark.parametrize("tiles, source_tiles", [
    (None, None), ((1, 1, 1), (1, 1, 1)), ((1, 1, 4, 20), (2, 1, 4)), ((2, 1, 3), (4, 2, 1)), ((4, 2, 1), (8, 2, 3)),
])
@pytest.mark.parametrize("N", [1, 5])  # one source: fewer loop steps than pipeline stages
def test_deferred_backward_at_d384_on_cuda(N, dtype, tol, tiles, source_tiles):
    """The compiled kernels (pipelined loops, persistent grid of the GPU's size), D=384, rows not
    a multiple of any tile, readers 1..2: fewer than some tiles' stages."""
    _check_deferred(N, 3001, 384, dtype, tiles, source_tiles, tol)


@pytest.mark.parametrize("tiles", [(1, 1), (2, 1, 3), (4, 2, 1)])
def test_backward_tiles_match_float64_with_a_partial_sum(tiles):
    """The read backward's gradients written in place (not deferred), odd D, rows not a multiple of
    the tile, at the default tiles and others a sweep takes."""
    sources, query, norm_weight, partial = _case(2, 1, 7, 37, 1, True, torch.float32)
    rows, p, query = sources.reshape(2, 7, 37), partial.reshape(7, 37), query * 37**-0.5  # softmax not saturated
    out, lse, u = attnres_forward(rows, query, norm_weight, p, 1e-6)
    dout = torch.randn_like(out)
    got = attnres_backward(dout, rows, query, norm_weight, p, out, lse, u, 1e-6, tiles=tiles)
    leaves = float64_leaves([rows, query, norm_weight, p])
    ref_out, _ = naive_attnres(torch.cat([leaves[0], leaves[3][None]]), leaves[1], leaves[2], 1e-6)
    (ref_out * dout.double()).sum().backward()
    for name, g, leaf in zip(("sources", "partial", "query", "norm_weight"), got, [leaves[i] for i in (0, 3, 1, 2)]):
        assert rel_err(g, leaf.grad) < 1e-5, name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merge_of_a_partial_sum_equals_one_read(backend):
    sources, query, norm_weight, partial = _case(4, 2, 5, 24, 3, True, torch.float32)
    out, lse = attention_residual(sources, query, norm_weight, return_lse=True, backend=backend)
    one_read = attention_residual(sources, query, norm_weight, partial=partial, backend=backend)
    for s in range(3):
        merged = attention_residual_merge(out[s], lse[s], partial, query[s], norm_weight[s])
        assert rel_err(merged, one_read[s]) < 1e-5


def _attnres_model(mech, backend, seed):
    torch.manual_seed(seed)
    cfg = FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, attnres_blocks=4, attention_backend=backend)
    model = FlashDepthForCausalLM(cfg).float().to(DEVICE)
    with torch.no_grad():  # off the zero init, so the reads weigh their sources unevenly (logits' std ~1.6
        # at D = 64); sharper (std 0.5) made the model so sensitive that either float32 path missed
        # float64's gradients by up to 6e-5, and by 4x more or less than the other, by draw and CPU
        model.model.attnres.queries.normal_(0, 0.2)
        model.model.attnres.key_norms.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mech", ["attnres_full", "attnres_block"])
def test_model_fused_stream_matches_reference_path(mech, seed):
    """The fused stream in float32 (deferred source gradients) against the plain PyTorch path in
    float64: logits, and the parameter gradients, together and one by one, within 1e-5 or within
    a few times the plain PyTorch path's own float32 error (1e-6 to 6e-6 here, 8 draws)."""
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (2, 7), device=DEVICE)
    grads, logits = {}, {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32), ("plain32", torch.float32)):
        model = _attnres_model(mech, "reference" if backend == "plain32" else backend, seed=3).to(dtype)
        out = model(ids, labels=ids)
        out.loss.backward()
        logits[backend] = out.logits
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    assert rel_err(logits["triton"], logits["reference"]) < 1e-5
    flat = {k: torch.cat([g.double().flatten() for g in grads[k].values()]) for k in grads}
    assert rel_err(flat["triton"], flat["reference"]) < max(1e-5, 2 * rel_err(flat["plain32"], flat["reference"]))
    for name, ref in grads["reference"].items():
        assert ref is not None and ref.abs().sum() > 0, name
        err, plain = rel_err(grads["triton"][name], ref), rel_err(grads["plain32"][name], ref)
        assert err < max(1e-5, 4 * plain), (name, err, plain)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_two_phase_inference_equals_the_training_read(backend):
    model = _attnres_model("attnres_block", backend, seed=5)
    ids = torch.randint(0, 256, (2, 9), device=DEVICE)
    with torch.enable_grad():
        one_phase = model(ids).logits
    with torch.no_grad():
        two_phase = model(ids).logits
    assert rel_err(two_phase, one_phase) < 1e-5


def test_bad_inputs_name_the_argument():
    sources = torch.randn(3, 2, 5, 8)
    with pytest.raises(ValueError, match="query must be a tensor of shape"):
        attention_residual(sources, torch.zeros(7))
    with pytest.raises(ValueError, match=r"norm_weight must be None or a tensor of shape \[8\] or \[2, 8\]"):
        attention_residual(sources, torch.zeros(2, 8), torch.ones(3, 8))
    with pytest.raises(ValueError, match="partial must be None or a tensor of the sources' shape"):
        attention_residual(sources, torch.zeros(8), partial=torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match=r"sources\[1\] has shape"):
        attention_residual([sources[0], sources[1][:, :3]], torch.zeros(8))
    with pytest.raises(ValueError, match="non-empty"):
        attention_residual([], torch.zeros(8))
    with pytest.raises(ValueError, match="N >= 1"):
        attention_residual(sources[:0], torch.zeros(8))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        attention_residual(sources, torch.zeros(8), eps=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention_residual(sources, torch.zeros(8), backend="cuda")
    with pytest.raises(ValueError, match="return_weights=True needs backend='reference'"):
        attention_residual(sources, torch.zeros(8), return_weights=True, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        attention_residual(sources.double().to(DEVICE), torch.zeros(8, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 5\)"):
        attention_residual_merge(sources[0], torch.zeros(2), sources[1], torch.zeros(8))
    with pytest.raises(TypeError, match="norm_weight must be floating point, got torch.int64"):
        attention_residual(sources, torch.zeros(8), torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sources must have D >= 1 features, got one source's shape \(2, 5, 0\)"):
        attention_residual(sources[..., :0], torch.zeros(0))
    out, lse = attention_residual(sources, torch.zeros(8), return_lse=True)
    with pytest.raises(TypeError, match="extra must be floating point, got torch.int64"):
        attention_residual_merge(out, lse, sources[0].long(), torch.zeros(8))
    with pytest.raises(TypeError, match="lse must be floating point"):
        attention_residual_merge(out, lse.long(), sources[0], torch.zeros(8))
    with pytest.raises(TypeError, match="return_weights must be a bool"):
        attention_residual(sources, torch.zeros(8), return_weights="no")
    for eps in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            attention_residual_merge(out, lse, sources[0], torch.zeros(8), eps=eps)


def test_cached_decoding_step_equals_full_forward_on_the_fused_path():
    model = _attnres_model("attnres_block", "triton", seed=7)
    ids = torch.randint(0, 256, (2, 6), device=DEVICE)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :5], use_cache=True)
        step = model(ids[:, 5:], past_key_values=prefix.past_key_values).logits[:, -1]
    assert rel_err(step, full) < 1e-5


def test_fused_read_takes_inputs_with_any_strides():
    sources, query, norm_weight, partial = _case(3, 2, 5, 16, 1, True, torch.float32)
    strided_sources = sources.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride 5 in D
    strided_partial = partial.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = attention_residual(strided_sources, query[0], norm_weight[0], partial=strided_partial, backend="triton")
    ref, _ = naive_attnres(torch.cat([sources, partial[None]]), query, norm_weight, 1e-6)
    assert rel_err(out, ref[0]) < 1e-5


def test_source_stream_read_whose_output_is_unused():
    """A read that feeds nothing never runs its backward: the deferred source gradients equal
    those of a stream without that read."""
    torch.manual_seed(0)
    sources = [torch.randn(2, 5, 24, device=DEVICE, requires_grad=True) for _ in range(3)]
    query, g = torch.randn(24, device=DEVICE), torch.rand(24, device=DEVICE) + 0.5
    grads = []
    for unused_read in (False, True):
        stream = SourceStream(3, backend="triton")
        stream.write(sources[0] * 2)
        stream.write(sources[1])
        if unused_read:
            stream.read(query * 3, g, 1e-6)
        h = stream.read(query, g, 1e-6, partial=sources[2])
        stream.close()
        grads.append(torch.autograd.grad(h.square().sum(), sources))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-6


def _deferring_stream_grads(backend, first_source_grad, with_g, rows, no_grad_write=False, passes=1):
    """A stream given its queries: a read of one source (not deferred), an unused read, a read with a
    partial sum, a used read without one, and a read without an index; with ``no_grad_write`` a
    source written without gradients in the middle. Returns every input's gradient, ``passes``
    times over one graph (retain_graph)."""
    torch.manual_seed(0)
    sources = [torch.randn(2, 5, 24, device=DEVICE) * s for s in (1.0, 2.0, 0.5, 1.5, 0.7)]
    w, g = torch.randn(6, 24, device=DEVICE) * 0.3, torch.rand(6, 24, device=DEVICE) + 0.5
    dtype = torch.float64 if backend == "reference" else torch.float32
    leaves = [x.to(dtype).requires_grad_(0 < i < 4 or (i == 0 and first_source_grad)) for i, x in enumerate(sources)]
    wq, gq = w.to(dtype).requires_grad_(), g.to(dtype).requires_grad_() if with_g else None
    stream = SourceStream(5, backend=backend, queries=(wq, gq))

    def read(row, partial=None):
        return stream.read(wq[row], None if gq is None else gq[row], 1e-6, partial=partial, index=row)

    stream.write(leaves[0] * 1)
    h1 = read(rows[0])  # one source
    stream.write(leaves[1] + h1)
    read(rows[1])  # unused
    h2 = read(rows[2], partial=leaves[2])
    stream.write(h2 * leaves[3])
    if no_grad_write:
        with torch.no_grad():
            stream.write(leaves[4] * 3)
    h3 = read(rows[3])
    h4 = stream.read(wq[rows[4]] * 2, None if gq is None else gq[rows[4]], 1e-6)  # no index: its own terms
    assert stream.defers_queries == (backend == "triton" and not no_grad_write)
    stream.close()
    ramp = torch.linspace(-1, 1, 24, device=DEVICE, dtype=dtype)
    loss = (h4 * ramp).sum() + h2.square().sum() + (h3 * ramp.flip(0)).sum()
    inputs = [x for x in [*leaves, wq, gq] if x is not None and x.requires_grad]
    return [torch.autograd.grad(loss, inputs, retain_graph=True) for _ in range(passes)]


@pytest.mark.parametrize("first_source_grad, with_g, rows", [
    (True, True, (0, 1, 2, 3, 4)),
    (False, True, (0, 1, 2, 3, 4)),   # the embedding without a gradient: its write still runs its pass
    (True, True, (3, 0, 5, 1, 2)),    # reads take rows out of order
    (True, False, (0, 1, 2, 3, 4)),   # no key-norm weights
])
def test_source_stream_defers_query_gradients(first_source_grad, with_g, rows):
    """Every gradient of a deferring stream against the plain PyTorch stream in float64."""
    (ref,) = _deferring_stream_grads("reference", first_source_grad, with_g, rows)
    (got,) = _deferring_stream_grads("triton", first_source_grad, with_g, rows)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5, i
    dw = got[-2] if with_g else got[-1]
    assert not dw[rows[0]].any()  # a read of one source: exactly zero, as in float64


def test_source_stream_query_gradients_twice_over_one_graph_and_after_a_write_without_gradients():
    first, second = _deferring_stream_grads("triton", True, True, (0, 1, 2, 3, 4), passes=2)
    for a, b in zip(first, second):  # each backward pass sums its own partials
        assert torch.equal(a, b)
    (ref,) = _deferring_stream_grads("reference", True, True, (0, 1, 2, 3, 4), no_grad_write=True)
    (got,) = _deferring_stream_grads("triton", True, True, (0, 1, 2, 3, 4), no_grad_write=True)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) < 1e-5, i


def test_source_stream_checks_its_queries():
    with pytest.raises(ValueError, match=r"queries\[0\] must be a tensor \[Q, D\]"):
        SourceStream(2, queries=(torch.zeros(4), None))
    with pytest.raises(ValueError, match=r"queries\[1\] must be None or a tensor of the queries' shape \(3, 4\)"):
        SourceStream(2, queries=(torch.zeros(3, 4), torch.zeros(4)))
    w, g = torch.zeros(3, 4), torch.ones(3, 4)
    stream = SourceStream(2, queries=(w, g))
    stream.write(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"index must be a row of the stream's queries, in \[0, 3\), got 3"):
        stream.read(w[0], g[0], 1e-6, index=3)
    with pytest.raises(ValueError, match=r"with index=1, query must be row 1 of the stream's queries\[0\]"):
        stream.read(w[1] * 2, g[1], 1e-6, index=1)
    with pytest.raises(ValueError, match=r"with index=1, norm_weight must be row 1 of the stream's queries\[1\]"):
        stream.read(w[1], None, 1e-6, index=1)
    stream = SourceStream(2, queries=(w, None))
    stream.write(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"with index=0, norm_weight must be None"):
        stream.read(w[0], g[0], 1e-6, index=0)
    source = torch.randn(5, 4, device=DEVICE)
    one = [torch.ones(1, *shape, device=DEVICE) for shape in ((4,), (5, 4), (5,), (5,))]
    with pytest.raises(ValueError, match=r"du_partials must be a float32 tensor \[P, >= 1, 4\]"):
        attnres_source_backward(source, *one, (0, 1), 1e-6, du_partials=torch.zeros(2, 1, 3, device=DEVICE))
