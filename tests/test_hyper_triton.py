"""The Hyper-Connection kernels (ops/hyper_triton.py) against float64: the fused Sinkhorn's forward
and its gradient through every iteration (clamp included), the token-sum kernel of static HC's
gradients, and a GPU check at the benchmark shape."""

import pytest
import torch
from oracle import rel_err

from flash_depth.nn.hyper_connections import HyperConnection, sinkhorn
from flash_depth.ops.hyper_triton import (fused_sinkhorn, projection_fusable, rms_projection, stream_gram,
                                         read_fusable, stream_read, stream_write, write_backward, write_fusable)


@pytest.fixture(autouse=True)
def _device():
    # tensors made in a test live on the GPU where there is one (else the kernels run in the interpreter)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        yield


def _logits(shape, n, spread=0.7, device=None):
    # around the init's b_res (0 on the diagonal, -1 off it)
    eye = torch.eye(n, device=device) - 1
    return eye + torch.randn(*shape, n, n, device=device) * spread


def _check_sinkhorn(logits, iters, eps, tol):
    x = logits.detach().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    out, ref = fused_sinkhorn(x, iters, eps), sinkhorn(x64, iters, eps)
    assert out.dtype == x.dtype and out.shape == x.shape
    g = torch.randn_like(ref)
    (dx,), (dx64,) = torch.autograd.grad(out, x, g.to(x.dtype)), torch.autograd.grad(ref, x64, g)
    assert rel_err(out, ref) < tol
    assert rel_err(dx, dx64) < tol
    return out


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("iters", [1, 20])
def test_fused_sinkhorn_matches_float64(n, iters):
    out = _check_sinkhorn(_logits((3, 13), n), iters, 1e-12, 1e-5)  # 39 tokens: a partial block
    # the last step normalises columns; how far the rows are from 1 after 20 pairs depends on the draw
    # (test_mixers checks the convergence at the model's spreads), and the kernel equals float64 above
    assert torch.allclose(out.sum(-2), torch.ones(()), atol=1e-5)


def test_fused_sinkhorn_clamp_semantics():
    # eps large enough that some sums are clamped (no gradient through them) and some are not
    logits = torch.randn(71, 3, 3) * 2
    first_sums = logits.softmax(-1).sum(-2)
    assert (first_sums < 0.4).any() and (first_sums > 0.4).any()
    _check_sinkhorn(logits, 3, 0.4, 1e-5)


def test_fused_sinkhorn_of_huge_logits_stays_finite():
    # against float32 PyTorch: exp underflows the same way (float64 keeps exp(-2000)); the gradient
    # is NaN here in the reference too (empty columns divide by eps every pair)
    x = torch.randn(5, 4, 4) * 1e4
    out = fused_sinkhorn(x)
    assert torch.isfinite(out).all() and rel_err(out, sinkhorn(x)) < 1e-5


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_stream_gram_matches_float64(dtypes):
    a = torch.randn(41, 3, 24)[:, :, ::1].to(dtypes[0])
    b = torch.randn(41, 5, 24).to(dtypes[1]).transpose(0, 1).contiguous().transpose(0, 1)  # strided tokens
    ref = torch.einsum("mid,mjd->ij", a.double(), b.double())
    out = stream_gram(a, b)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    bcast = b[:, :1].expand(41, 4, 24)  # a stride-0 stream dimension (expand_streams' entry)
    assert rel_err(stream_gram(a, bcast), torch.einsum("mid,mjd->ij", a.double(), bcast.double())) < 1e-5


@pytest.mark.parametrize("bad", [dict(a=torch.randn(4, 2)), dict(b=torch.randn(5, 2, 8)), dict(b=torch.ones(4, 2, 8,
                                 dtype=torch.int32))])
def test_stream_gram_argument_checks(bad):
    args = dict(a=torch.randn(4, 2, 8), b=torch.randn(4, 3, 8)) | bad
    with pytest.raises((ValueError, TypeError), match="^a |^b |a and b"):
        stream_gram(**args)


@pytest.mark.parametrize("kind", ["mhc", "hc"])
def test_hyper_connection_gradients_match_float64(kind):
    D, n = 12, 3
    lin = torch.nn.Linear(D, D)
    hc = HyperConnection(D, n, kind, layer=2)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hc64, lin64 = HyperConnection(D, n, kind, layer=2).double(), torch.nn.Linear(D, D).double()
    hc64.load_state_dict(hc.state_dict())
    lin64.load_state_dict(lin.state_dict())
    X = torch.randn(2, 7, n, D)
    X64 = X.double().requires_grad_()
    X.requires_grad_()
    out, ref = hc(X, lin), hc64(X64, lin64)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [X, *hc.parameters()], g.float())
    want = torch.autograd.grad(ref, [X64, *hc64.parameters()], g)
    assert rel_err(out, ref) < 1e-5
    for (name, _), a, b in zip([("X", None), *hc.named_parameters()], got, want):
        # A scalar gate's gradient is one sum over every token and entry whose terms largely cancel:
        # float32 rounding of the terms, relative to that small sum, reached 2e-5 in 1 of 8 fresh draws.
        # A wrong formula is off by O(1).
        assert rel_err(a, b) < (1e-5 if a.dim() else 1e-4), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hyper_kernels_on_gpu(dtype):
    # the benchmark shape: 16384 tokens, n = 4, D = 384
    M, n, D = 16384, 4, 384
    _check_sinkhorn(_logits((M,), n, device="cuda"), 20, 1e-12, 1e-5)
    a = torch.randn(M, n, D, device="cuda").to(dtype)
    b = torch.randn(M, 1, D, device="cuda").to(dtype).expand(M, n, D)
    assert rel_err(stream_gram(a, b), torch.einsum("mid,mjd->ij", a.double(), b.double())) < 1e-5
    y, h_post, h_res = b[:, 0], torch.rand(M, n, device="cuda"), torch.rand(M, n, n, device="cuda")
    dX, dy, dh_post, dh_res = write_backward(a, b, y, h_post, h_res)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(dX, torch.einsum("mij,mid->mjd", h_res.double(), a.double())) < tol
    assert rel_err(dh_res, torch.einsum("mid,mjd->mij", a.double(), b.double())) < 1e-5
    assert rel_err(dh_post, torch.einsum("mid,md->mi", a.double(), y.double())) < 1e-5
    h_pre = torch.rand(M, n, device="cuda")
    assert rel_err(stream_read(a, h_pre), torch.einsum("mi,mid->md", h_pre.double(), a.double())) < tol
    want = torch.einsum("mji,mid->mjd", h_res.double(), b.double()) + h_post.double()[..., None] * y.double()[:, None]
    assert rel_err(stream_write(b, y, h_post, h_res), want) < tol
    phi = (torch.randn(n * D, n * (n + 2), device="cuda") * (n * D) ** -0.5).requires_grad_()
    X = a.detach().requires_grad_()
    out = rms_projection(X, phi, 1e-6)
    X64, phi64 = X.detach().double().requires_grad_(), phi.detach().double().requires_grad_()
    ref = torch.nn.functional.rms_norm(X64.flatten(-2), (n * D,), None, 1e-6) @ phi64
    g = torch.randn_like(ref)
    got, want = torch.autograd.grad(out, (X, phi), g.float()), torch.autograd.grad(ref, (X64, phi64), g)
    assert rel_err(out, ref) < 1e-5 and rel_err(got[1], want[1]) < 1e-5 and rel_err(got[0], want[0]) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mhc", "hc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_hyper_connection_on_gpu(kind, dtype):
    """The custom ops inside torch.compile against the float64 module: in float32 every gradient to
    1e-5; under bf16 autocast (a bf16 sublayer) the output to 2e-2 and X's and the tensor
    parameters' gradients to 5e-2. The scalar gates' (alpha) gradients are one sum over every
    token of bf16-rounded products: the plain PyTorch module itself misses float64 by up to 0.1
    there (CPU, 2 x 499 tokens), so under bf16 they are only checked to be finite."""
    D, n = 384, 4
    lin = torch.nn.Linear(D, D, device="cuda")
    hc = HyperConnection(D, n, kind, layer=1, device="cuda")
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hc64, lin64 = HyperConnection(D, n, kind, layer=1).double().cuda(), torch.nn.Linear(D, D).double().cuda()
    hc64.load_state_dict(hc.state_dict())
    lin64.load_state_dict(lin.state_dict())
    X = torch.randn(2, 199, n, D, device="cuda", dtype=dtype, requires_grad=True)
    X64 = X.detach().double().requires_grad_()
    step = torch.compile(lambda x: hc(x, lin), fullgraph=True)
    with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = step(X)
    ref = hc64(X64, lin64)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [X, *hc.parameters()], g.to(out.dtype))
    want = torch.autograd.grad(ref, [X64, *hc64.parameters()], g)
    exact = dtype == torch.float32
    assert rel_err(out, ref) < (1e-5 if exact else 2e-2)
    for (name, _), a, b in zip([("X", None), *hc.named_parameters()], got, want):
        if exact or a.dim() > 0:
            assert rel_err(a, b) < (1e-5 if exact else 5e-2), name
        else:
            assert torch.isfinite(a), name


@pytest.mark.parametrize("n,dtype", [(3, torch.float32), (4, torch.bfloat16)])
def test_write_backward_matches_float64(n, dtype):
    M, D = 23, 70  # a partial token block and a partial D chunk
    X = torch.randn(M, 1, D).to(dtype).expand(M, n, D)  # expand_streams' stride-0 entry
    y, g = torch.randn(M, D).to(dtype), torch.randn(M, n, D).to(dtype)
    h_post, h_res = torch.rand(M, n) * 2, torch.rand(M, n, n)
    assert write_fusable(X, y, h_post, h_res)
    dX, dy, dh_post, dh_res = write_backward(g, X, y, h_post, h_res)
    X64, y64, hp64, hr64 = (t.double() for t in (X, y, h_post, h_res))
    assert dX.dtype == dtype and dy.dtype == dtype and dh_res.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # dX and dy are rounded to bfloat16
    assert rel_err(dX, torch.einsum("mij,mid->mjd", hr64, g.double())) < tol
    assert rel_err(dy, torch.einsum("mi,mid->md", hp64, g.double())) < tol
    assert rel_err(dh_post, torch.einsum("mid,md->mi", g.double(), y64)) < 1e-5
    assert rel_err(dh_res, torch.einsum("mid,mjd->mij", g.double(), X64)) < 1e-5


@pytest.mark.parametrize("n,dtype,expand,D", [(2, torch.float32, False, 20), (3, torch.bfloat16, True, 20),
                                              (4, torch.float32, True, 20), (3, torch.float32, False, 70)])
def test_rms_projection_matches_float64(n, dtype, expand, D):
    # three token blocks (one partial), three splits of the phi sums; D = 20: one partial D chunk,
    # D = 70: two chunks (the second partial) in the kernels' flat (stream, chunk) loops
    M, eps = 70, 1e-6
    X = torch.randn(M, 1 if expand else n, D).to(dtype).expand(M, n, D)  # expand: the entry's stride-0 streams
    phi = torch.randn(n * D, n * (n + 2)) * (n * D) ** -0.5
    Xl, phil = X.detach().requires_grad_(), phi.requires_grad_()
    X64, phi64 = X.detach().double().requires_grad_(), phi.detach().double().requires_grad_()
    assert projection_fusable(Xl, phil)
    out = rms_projection(Xl, phil, eps)
    ref = torch.nn.functional.rms_norm(X64.flatten(-2), (n * D,), None, eps) @ phi64
    g = torch.randn_like(ref)
    got, want = torch.autograd.grad(out, (Xl, phil), g.float()), torch.autograd.grad(ref, (X64, phi64), g)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    assert rel_err(got[1], want[1]) < 1e-5
    assert rel_err(got[0], want[0]) < (1e-5 if dtype == torch.float32 else 1e-2)  # dX rounded to X's dtype


@pytest.mark.parametrize("n,dtype,expand,D", [(2, torch.float32, False, 200), (3, torch.bfloat16, True, 70),
                                              (4, torch.float32, True, 70), (4, torch.bfloat16, False, 1)])
def test_stream_read_and_write_match_float64(n, dtype, expand, D):
    # M = 23: a partial token block; D = 200: two D tiles of the forwards, four chunks of the read's
    # backward (the last partial); expand: the entry's stride-0 streams
    M = 23
    X = torch.randn(M, 1 if expand else n, D).to(dtype).expand(M, n, D).requires_grad_()
    y = torch.randn(M, D).to(dtype).requires_grad_()
    h_pre, h_post = torch.rand(M, n, requires_grad=True), (torch.rand(M, n) * 2).requires_grad_()
    h_res = torch.rand(M, n, n, requires_grad=True)
    leaves = (X, y, h_pre, h_post, h_res)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    X64, y64, hpre64, hpost64, hres64 = leaves64
    assert write_fusable(X, y, h_post, h_res) and read_fusable(X, h_pre)
    x_in, X_new = stream_read(X, h_pre), stream_write(X, y, h_post, h_res)
    ref_in = torch.einsum("mi,mid->md", hpre64, X64)
    ref_new = torch.einsum("mji,mid->mjd", hres64, X64) + hpost64[..., None] * y64[:, None]
    assert x_in.dtype == X_new.dtype == dtype and x_in.shape == (M, D) and X_new.shape == (M, n, D)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # outputs and dX, dy are rounded to X's dtype
    assert rel_err(x_in, ref_in) < tol and rel_err(X_new, ref_new) < tol
    # gradients in X's dtype, as autograd passes them; float64 gets the same rounded values
    g_in, g_new = torch.randn(M, D).to(dtype), torch.randn(M, n, D).to(dtype)
    got = torch.autograd.grad((x_in, X_new), leaves, (g_in, g_new))
    want = torch.autograd.grad((ref_in, ref_new), leaves64, (g_in.double(), g_new.double()))
    # the mixes' gradients are float32 sums of exact products: float32 accuracy in any stream dtype
    for name, a, b in zip(("X", "y", "h_pre", "h_post", "h_res"), got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < (tol if name in ("X", "y") else 1e-5), name


@pytest.mark.parametrize("call,match", [
    (lambda X, y, h, H: stream_read(X, h[:, :2]), "h_pre must be a tensor \\[5, 3\\]"),
    (lambda X, y, h, H: stream_read(X, h[:-1]), "h_pre must be a tensor"),
    (lambda X, y, h, H: stream_read(X, h.double()), "h_pre must be float32"),
    (lambda X, y, h, H: stream_read(X[0], h), "X must be a floating-point tensor \\[M, n, D\\]"),
    (lambda X, y, h, H: stream_write(X, y[:, :-1], h, H), "y must be a tensor \\[5, 7\\]"),
    (lambda X, y, h, H: stream_write(X, y, h, H[..., :2]), "h_res must be a tensor \\[5, 3, 3\\]"),
    (lambda X, y, h, H: stream_write(X, y.long(), h, H), "y must be floating point"),
    (lambda X, y, h, H: write_backward(X[:, :2], X, y, h, H), "g must be a tensor \\[5, 3, 7\\]"),
])
def test_stream_ops_name_the_bad_argument(call, match):
    X, y = torch.randn(5, 3, 7), torch.randn(5, 7)
    h, H = torch.rand(5, 3), torch.rand(5, 3, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        call(X, y, h, H)
