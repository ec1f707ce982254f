"""Packed documents (cu_seqlens) and left padding (kv_start) in the ops, against float64 formulas:
a packed call equals each document run alone, a padded row equals its keys without the padding."""

import pytest
import torch

from flash_depth import depth_attention, moda_attention
from oracle import cu_seqlens, float64_leaves, make_inputs, naive_moda, rel_err

BACKENDS = [("reference", torch.float64, 1e-10), ("triton", torch.float32, 1e-5)]

# (document lengths, Hq, Hk, d, L, causal): odd lengths, length-1 documents, one document,
# G = 1, 2 and 4, no depth; the last two span several kernel tiles (forward 128 rows, backward 64).
PACKED = [
    ([3, 1, 5, 7], 4, 2, 16, 3, True),
    ([1, 1, 2, 1], 4, 1, 16, 2, True),
    ([9, 4], 2, 2, 16, 1, False),
    ([11], 4, 2, 16, 2, True),
    ([6, 1, 8], 4, 2, 16, 0, True),
    ([70, 1, 33, 90], 2, 1, 16, 2, True),
    ([70, 1, 33, 90], 2, 1, 16, 0, False),
]


def _grads(out, inputs, do):
    return torch.autograd.grad((out.double() * do).sum(), [x for x in inputs if x is not None])


@pytest.mark.parametrize("case", PACKED, ids=lambda c: f"{c[0]}-G{c[1] // c[2]}-L{c[4]}-{'causal' if c[5] else 'full'}")
@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_packed_equals_each_document_alone(case, backend, dtype, tol):
    lengths, Hq, Hk, d, L, causal = case
    total = sum(lengths)
    inputs = make_inputs(1, total, total, Hq, Hk, d, L, dtype, seed=len(lengths) + total)
    cu = cu_seqlens(lengths)
    o, lse = moda_attention(*inputs, causal=causal, backend=backend, cu_seqlens=cu, max_seqlen=max(lengths),
                            return_lse=True)
    _check_against_documents_alone(inputs, cu, causal, o, lse, tol)


def _check_against_documents_alone(inputs, cu, causal, o, lse, tol):
    """o, lse and every gradient of a packed call against the float64 formula on each document."""
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(o.device)
    alone = float64_leaves([None if x is None else x.cpu() for x in inputs])
    bounds = cu.tolist()
    pieces = [naive_moda(*(None if x is None else x[:, s:e] for x in alone), causal=causal)
              for s, e in zip(bounds[:-1], bounds[1:])]
    o_ref, lse_ref = torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], -1)
    assert rel_err(o.cpu(), o_ref) < tol and rel_err(lse.cpu(), lse_ref) < tol
    names = [n for n, x in zip(("dq", "dk", "dv", "dk_depth", "dv_depth"), inputs) if x is not None]
    for name, g, g_ref in zip(names, _grads(o, inputs, do), _grads(o_ref, alone, do.cpu())):
        assert rel_err(g.cpu(), g_ref) < tol, (name, rel_err(g, g_ref))


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_one_document_is_the_dense_call(backend, dtype, tol):
    inputs = make_inputs(1, 13, 13, 4, 2, 16, 2, dtype, seed=3)
    packed = moda_attention(*inputs, backend=backend, cu_seqlens=cu_seqlens([13]), max_seqlen=13)
    dense = moda_attention(*inputs, backend=backend)
    assert rel_err(packed, dense) < tol
    q, _, _, kd, vd = inputs
    depth = depth_attention(q, kd, vd, backend=backend)
    assert torch.equal(depth_attention(q, kd, vd, backend=backend, cu_seqlens=cu_seqlens([4, 9]), max_seqlen=9), depth)


# (B, Tq, Tk, Hq, Hk, d, L, causal, kv_start): every row a different padding, a row of padding
# only, decoding (Tq < Tk), no depth (padded queries see nothing), and a tile of padding only.
PADDED = [
    (3, 9, 9, 4, 2, 16, 0, True, [0, 4, 9]),
    (3, 9, 9, 4, 2, 16, 3, True, [0, 4, 9]),
    (3, 2, 9, 4, 2, 16, 2, True, [0, 4, 8]),
    (2, 9, 9, 2, 2, 16, 0, False, [3, 0]),
    (2, 70, 70, 2, 1, 16, 0, True, [0, 66]),
]


@pytest.mark.parametrize("case", PADDED, ids=lambda c: f"B{c[0]}-Tq{c[1]}-Tk{c[2]}-L{c[6]}-{c[8]}")
@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_left_padding_masks_keys(case, backend, dtype, tol):
    B, Tq, Tk, Hq, Hk, d, L, causal, starts = case
    inputs = make_inputs(B, Tq, Tk, Hq, Hk, d, L, dtype, seed=B + Tk)
    kv_start = torch.tensor(starts, dtype=torch.int32)
    o, lse = moda_attention(*inputs, causal=causal, backend=backend, kv_start=kv_start, return_lse=True)
    assert torch.isfinite(o).all()
    mask = (torch.arange(Tk)[None, None, :] >= kv_start[:, None, None]).expand(B, Tq, Tk)
    ref = float64_leaves(inputs)
    o_ref, lse_ref = naive_moda(*ref, causal=causal, key_mask=mask)
    assert rel_err(o, o_ref) < tol
    assert torch.equal(lse.isinf(), lse_ref.isinf())  # a query with nothing to attend to: lse = -inf, o = 0
    assert rel_err(lse.nan_to_num(0, 0, 0), lse_ref.nan_to_num(0, 0, 0)) < tol
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for g, g_ref in zip(_grads(o, inputs, do), _grads(o_ref, ref, do)):
        assert torch.isfinite(g).all() and rel_err(g, g_ref) < tol


def _ok():
    q, k, v, kd, vd = make_inputs(1, 8, 8, 4, 2, 16, 3, torch.float32, seed=0)
    return (q, k, v, kd, vd), dict(cu_seqlens=cu_seqlens([3, 5]), max_seqlen=5)


BAD = [
    ("int64", dict(cu_seqlens=torch.tensor([0, 3, 8])), TypeError, "cu_seqlens must be int32"),
    ("list", dict(cu_seqlens=[0, 3, 8]), TypeError, "cu_seqlens must be an int32 torch.Tensor"),
    ("2-D", dict(cu_seqlens=cu_seqlens([3, 5])[None]), ValueError, "cu_seqlens must be 1-D"),
    ("one entry", dict(cu_seqlens=torch.zeros(1, dtype=torch.int32)), ValueError, "at least 2 entries"),
    ("start", dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "must start at 0, got 1"),
    ("end", dict(cu_seqlens=cu_seqlens([3, 4])), ValueError, "must end at the total token count 8"),
    ("decreasing", dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
    ("max_seqlen small", dict(max_seqlen=4), ValueError, r"at least the longest document \(5 tokens\), got 4"),
    ("max_seqlen type", dict(max_seqlen=5.0), TypeError, "max_seqlen must be an int"),
    ("max_seqlen missing", dict(max_seqlen=None), ValueError, "max_seqlen is None"),
    ("cu_seqlens missing", dict(cu_seqlens=None), ValueError, "cu_seqlens is None"),
    ("both masks", dict(kv_start=torch.zeros(1, dtype=torch.int32)), ValueError, "not both"),
    ("cudnn", dict(backend="cudnn"), ValueError, "backend='cudnn' takes no cu_seqlens"),
]


@pytest.mark.parametrize("name,change,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_packed_inputs_rejected(name, change, exc, msg):
    inputs, kw = _ok()
    kw.update(change)
    with pytest.raises(exc, match=msg):
        moda_attention(*inputs, **kw)


def test_bad_shapes_and_padding_rejected():
    (q, k, v, kd, vd), kw = _ok()
    with pytest.raises(ValueError, match="need q of shape \\[1, total, Hq, d\\].*got batch size 2"):
        moda_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), **kw)
    with pytest.raises(ValueError, match="as many keys as queries.*Tq=8 and Tk=11"):
        moda_attention(q, torch.cat([k, k[:, :3]], 1), torch.cat([v, v[:, :3]], 1), causal=False, **kw)
    with pytest.raises(ValueError, match="cu_seqlens must end at the total token count 8"):
        depth_attention(q, kd, vd, cu_seqlens=cu_seqlens([3, 6]), max_seqlen=6)
    with pytest.raises(TypeError, match="kv_start must be int32"):
        moda_attention(q, k, v, kv_start=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"kv_start must have shape \[B=1\], got \(2,\)"):
        moda_attention(q, k, v, kv_start=torch.zeros(2, dtype=torch.int32))


def test_cu_seqlens_changed_in_place_is_checked_again():
    """The values are checked once per tensor (a sync per layer would stall a GPU); an in-place
    change of the same tensor is seen."""
    (q, k, v, _, _), kw = _ok()
    moda_attention(q, k, v, **kw)
    kw["cu_seqlens"][1] = 9
    with pytest.raises(ValueError, match="non-decreasing"):
        moda_attention(q, k, v, **kw)


@pytest.mark.gpu
def test_masked_calls_run_on_the_triton_kernels_on_cuda():
    """On CUDA, backend "auto" sends packed and padded calls to the Triton sequence kernels (cuDNN
    takes no masks here), compiled (not interpreted), bf16, against the float64 formula."""
    from flash_depth.ops.moda import select_backend

    lengths = [70, 1, 33, 190, 2]
    total = sum(lengths)
    inputs = make_inputs(1, total, total, 8, 2, 64, 4, torch.bfloat16, device="cuda", seed=0)
    assert select_backend("auto", inputs[0], inputs[1], True, masked=True) == "triton"
    cu = cu_seqlens(lengths).cuda()
    o, lse = moda_attention(*inputs, cu_seqlens=cu, max_seqlen=190, return_lse=True)
    _check_against_documents_alone(inputs, cu.cpu(), True, o, lse, 2e-2)
    inputs = make_inputs(2, 150, 150, 8, 2, 64, 0, torch.bfloat16, device="cuda", seed=1)
    kv_start = torch.tensor([0, 77], dtype=torch.int32, device="cuda")
    o = moda_attention(*inputs, kv_start=kv_start)
    mask = (torch.arange(150)[None, None, :] >= kv_start.cpu()[:, None, None]).expand(2, 150, 150)
    ref = float64_leaves([None if x is None else x.cpu() for x in inputs])
    o_ref, _ = naive_moda(*ref, causal=True, key_mask=mask)
    assert rel_err(o.cpu(), o_ref) < 2e-2
