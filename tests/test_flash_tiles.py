"""The Triton sequence kernels' split into unmasked and masked tiles, against the float64 formula.

Every case is long enough that each kernel (forward, dk/dv, dq) runs both kinds of tile at the
interpreter's tile sizes (forward 128 x 64, backward 64 x 64 for d <= 64): tiles below the
diagonal and inside one document unmasked; the diagonal, the ragged end of Tq and Tk, padding, and
query (key) tiles that span several documents masked. Under the interpreter each test also counts
the tiles each loop ran and checks that both loops of all three kernels ran some.
"""

import inspect

import numpy
import pytest
import torch
from oracle import cu_seqlens, float64_leaves, make_inputs, naive_moda, rel_err

from flash_depth import moda_attention
from flash_depth.ops import flash_triton

TOL = 1e-5  # fp32 against float64

# (B, Tq, Tk, Hq, Hk, d, L, causal, kv_start): T off the tile sizes, causal and not, decoding
# (Tq < Tk), Tq > Tk (non-causal), d not a power of two, left padding that is not tile-aligned
# (and a key tile that is part padding). Tk - Tq = 62 and kv_start = 66 put a tile's first query
# one key before a key tile's end: the last unmasked tile ends on its diagonal.
DENSE = [
    (1, 333, 333, 2, 1, 16, 1, True, None),
    (1, 333, 333, 4, 2, 16, 0, False, None),
    (2, 150, 333, 4, 2, 16, 2, True, None),
    (1, 200, 262, 2, 1, 16, 0, True, None),
    (1, 300, 300, 2, 1, 24, 1, True, None),
    (2, 333, 333, 2, 1, 16, 0, True, [0, 66]),
    (2, 270, 200, 2, 1, 16, 1, False, [37, 0]),
]

# (document lengths, Hq, Hk, d, L, causal): query tiles inside one document (starting off the tile
# grid, so the key tiles sit at its start + i * 64) next to tiles that span two, three or four
# documents; length-1 documents; one long document (the case a dense call would serve); documents
# that end exactly on tile boundaries; a document starting at 2, where a query tile's diagonal
# falls one key before a key tile's end.
PACKED = [
    ([200, 1, 2, 320, 1, 30], 2, 1, 16, 1, True),
    ([2, 300, 1, 40], 2, 1, 16, 1, True),
    ([200, 1, 2, 320, 1, 30], 4, 2, 16, 0, False),
    ([150, 60, 1, 330, 90], 2, 1, 16, 0, True),
    ([333], 2, 1, 16, 1, True),
    ([333], 4, 2, 16, 0, False),
    ([256, 256, 3], 2, 1, 16, 0, True),
]

LOOPS = {"fwd": "_fwd_tiles_loop", "dq": "_dq_tiles_loop", "dkdv": "_dkdv_tiles_loop"}


def _int(x):
    """A loop bound as the interpreter passes it: a Python int, a constexpr or a 1-element tensor."""
    x = getattr(x, "value", x)
    x = getattr(getattr(x, "handle", None), "data", x)
    return int(numpy.asarray(x).reshape(-1)[0])


@pytest.fixture()
def tile_counts(monkeypatch):
    """{(kernel, masked): tiles run}, counted by wrapping the kernels' loop helpers (interpreter only)."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = {(name, masked): 0 for name in LOOPS for masked in (False, True)}
    if not isinstance(flash_triton._fwd_tiles_loop, InterpretedFunction):  # compiled: no counts
        return None
    for name, attr in LOOPS.items():
        loop = getattr(flash_triton, attr)
        signature = inspect.signature(loop.fn)

        def counting(*args, _loop=loop, _signature=signature, _name=name, **kwargs):
            bound = _signature.bind(*args, **kwargs).arguments
            step = bound.get("BLOCK_N", bound.get("BLOCK_M"))
            tiles = len(range(_int(bound["start"]), _int(bound["stop"]), _int(step)))
            counts[_name, bool(_int(bound["MASKED"]))] += tiles
            return _loop(*args, **kwargs)

        monkeypatch.setattr(flash_triton, attr, counting)
    return counts


def _key_mask(B, Tq, Tk, lengths=None, kv_start=None):
    """[B, Tq, Tk]: True where a key is visible apart from causality (same document, not padding)."""
    mask = torch.ones(B, Tq, Tk, dtype=torch.bool)
    if lengths is not None:
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        mask &= doc[None, :, None] == doc[None, None, :]
    if kv_start is not None:
        mask &= torch.arange(Tk)[None, None, :] >= kv_start[:, None, None]
    return mask


def _check(inputs, causal, key_mask, tile_counts, **masks):
    o, lse = moda_attention(*inputs, causal=causal, backend="triton", return_lse=True, **masks)
    ref = float64_leaves(inputs)
    o_ref, lse_ref = naive_moda(*ref, causal=causal, key_mask=key_mask)
    assert rel_err(o, o_ref) < TOL, ("o", rel_err(o, o_ref))
    assert torch.equal(lse.isinf(), lse_ref.isinf())  # padded queries with no depth: lse = -inf
    assert rel_err(lse.nan_to_num(0, 0, 0), lse_ref.nan_to_num(0, 0, 0)) < TOL
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    names = [n for n, x in zip(("dq", "dk", "dv", "dk_depth", "dv_depth"), inputs) if x is not None]
    grads = torch.autograd.grad((o.double() * do).sum(), [x for x in inputs if x is not None])
    grads_ref = torch.autograd.grad((o_ref * do).sum(), [x for x in ref if x is not None])
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert rel_err(g, g_ref) < TOL, (name, rel_err(g, g_ref))
    if tile_counts is not None:
        assert all(tile_counts.values()), f"a loop ran no tile: {tile_counts}"


@pytest.mark.parametrize("case", DENSE, ids=lambda c: f"B{c[0]}-Tq{c[1]}-Tk{c[2]}-d{c[5]}-L{c[6]}-"
                         f"{'causal' if c[7] else 'full'}-{c[8]}")
def test_dense_and_padded(case, tile_counts):
    B, Tq, Tk, Hq, Hk, d, L, causal, starts = case
    inputs = make_inputs(B, Tq, Tk, Hq, Hk, d, L, torch.float32, seed=Tq + Tk + L)
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    masks = {} if kv_start is None else {"kv_start": kv_start}
    _check(inputs, causal, _key_mask(B, Tq, Tk, kv_start=kv_start), tile_counts, **masks)


@pytest.mark.parametrize("case", PACKED, ids=lambda c: f"{c[0]}-G{c[1] // c[2]}-L{c[4]}-{'causal' if c[5] else 'full'}")
def test_packed(case, tile_counts):
    lengths, Hq, Hk, d, L, causal = case
    total = sum(lengths)
    inputs = make_inputs(1, total, total, Hq, Hk, d, L, torch.float32, seed=total + L)
    cu = cu_seqlens(lengths)
    _check(inputs, causal, _key_mask(1, total, total, lengths=lengths), tile_counts, cu_seqlens=cu,
           max_seqlen=max(lengths))
