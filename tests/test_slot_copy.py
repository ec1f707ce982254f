"""ops.slot_copy.copy_into: the depth stream's one-launch slot writes, against Tensor.copy_."""

import pytest
import torch

from flash_depth.ops.slot_copy import copy_into


@pytest.fixture
def no_tensor_copy(monkeypatch):
    """Tensor.copy_ raises: the copy must be the Triton kernel's (the interpreter's, on CPU)."""
    def refuse(*_):
        raise AssertionError("copy_into fell back to Tensor.copy_")
    monkeypatch.setattr(torch.Tensor, "copy_", refuse)


def _slot_and_halves(B, T, L, H, d, slot, dtype=torch.float32, device="cpu"):
    """A slot view of a [B, T, L, H, d] buffer and the K, V halves of one projection (strided)."""
    buf = torch.full((2, B, T, L, H, d), float("nan"), dtype=dtype, device=device)
    kv = torch.randn(B, T, 2, H, d, dtype=dtype, device=device)
    k, v = kv.unbind(2)
    return [buf[0][:, :, slot], buf[1][:, :, slot]], [k, v], buf


@pytest.mark.parametrize("B,T,L,H,d,slot", [(2, 5, 3, 2, 8, 1), (1, 1, 1, 1, 3, 0), (3, 7, 4, 3, 24, 3)])
def test_pair_into_strided_slot_equals_copy(no_tensor_copy, B, T, L, H, d, slot):
    dsts, srcs, buf = _slot_and_halves(B, T, L, H, d, slot)
    copy_into(dsts, srcs)
    for dst, src in zip(dsts, srcs):
        assert torch.equal(dst, src)
    others = [buf[:, :, :, i] for i in range(L) if i != slot]
    assert all(x.isnan().all() for x in others)  # nothing written outside the slot


def test_single_tensor_cast_and_rows_past_one_tile(no_tensor_copy):
    src = torch.randn(3, 1500, 7)[:, ::2]  # rows 14 apart, more rows than one program's tile
    dst = torch.zeros(3, 750, 7, dtype=torch.float16)
    copy_into([dst], [src])
    assert torch.equal(dst, src.to(torch.float16))


def test_layouts_it_cannot_take_fall_back_to_copy():
    src = torch.randn(4, 6).t()  # last dimension not contiguous
    dst = torch.empty(6, 4)
    copy_into([dst], [src])
    assert torch.equal(dst, src)


@pytest.mark.parametrize("bad", [([], []), ([torch.zeros(2)] * 3, [torch.zeros(2)] * 3),
                                 ([torch.zeros(2)], [torch.zeros(3)]), ([torch.zeros(2)], "x")])
def test_input_checks(bad):
    with pytest.raises(ValueError, match="dsts and srcs|pair 0"):
        copy_into(*bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pair_bf16_is_bit_exact():
    dsts, srcs, _ = _slot_and_halves(2, 4096, 72, 8, 64, 37, dtype=torch.bfloat16, device="cuda")
    copy_into(dsts, srcs)
    for dst, src in zip(dsts, srcs):
        assert torch.equal(dst, src)
