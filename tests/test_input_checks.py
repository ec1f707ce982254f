"""Bad inputs raise a clear ValueError/TypeError naming the argument; never a wrong answer."""

import math

import pytest
import torch

from flash_depth import depth_attention, moda_attention


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _ok():
    return _t(1, 8, 4, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 8, 3, 2, 16), _t(1, 8, 3, 2, 16)


CASES = [
    ("q rank", lambda q, k, v, kd, vd: (q[0], k, v, kd, vd), {}, ValueError, "q must have 4 dimensions"),
    ("k batch", lambda q, k, v, kd, vd: (q, _t(2, 8, 2, 16), v, kd, vd), {}, ValueError, "k must have shape"),
    ("k head dim", lambda q, k, v, kd, vd: (q, _t(1, 8, 2, 8), v, kd, vd), {}, ValueError, "d=16"),
    ("v shape", lambda q, k, v, kd, vd: (q, k, _t(1, 7, 2, 16), kd, vd), {}, ValueError, "v must have the same shape"),
    ("heads", lambda q, k, v, kd, vd: (q, _t(1, 8, 3, 16), _t(1, 8, 3, 16), kd, vd), {}, ValueError, "multiple"),
    ("depth T", lambda q, k, v, kd, vd: (q, k, v, _t(1, 7, 3, 2, 16), vd), {}, ValueError, "k_depth must have shape"),
    ("depth Hk", lambda q, k, v, kd, vd: (q, k, v, _t(1, 8, 3, 1, 16), vd), {}, ValueError, "Hk=2"),
    ("depth L", lambda q, k, v, kd, vd: (q, k, v, kd, _t(1, 8, 4, 2, 16)), {}, ValueError, "same number of depth slots"),
    ("v_depth missing", lambda q, k, v, kd, vd: (q, k, v, kd, None), {}, ValueError, "v_depth is None"),
    ("k_depth missing", lambda q, k, v, kd, vd: (q, k, v, None, vd), {}, ValueError, "k_depth is None"),
    ("mixed dtype", lambda q, k, v, kd, vd: (q, k.half(), v, kd, vd), {}, TypeError, "dtype"),
    ("int dtype", lambda q, k, v, kd, vd: (q.long(), k, v, kd, vd), {}, TypeError, "q must be float16"),
    ("not a tensor", lambda q, k, v, kd, vd: (q, k.tolist(), v, kd, vd), {}, TypeError, "k must be a torch.Tensor"),
    ("nan scale", lambda *a: a, {"scale": math.nan}, ValueError, "scale must be finite"),
    ("inf scale", lambda *a: a, {"scale": math.inf}, ValueError, "scale must be finite"),
    ("str scale", lambda *a: a, {"scale": "0.1"}, TypeError, "scale must be a float"),
    ("causal type", lambda *a: a, {"causal": 1}, TypeError, "causal must be a bool"),
    ("return_lse type", lambda *a: a, {"return_lse": "yes"}, TypeError, "return_lse must be a bool, got str 'yes'"),
    ("backend", lambda *a: a, {"backend": "flash"}, ValueError, "backend must be one of"),
    ("causal Tk<Tq", lambda q, k, v, kd, vd: (q, k[:, :4], v[:, :4], kd, vd), {}, ValueError, "Tq=8 and Tk=4"),
    ("empty", lambda q, k, v, kd, vd: (q[:, :0], k, v, kd[:, :0], vd[:, :0]), {}, ValueError, "must not be empty"),
]


@pytest.mark.parametrize("name,mutate,kwargs,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_moda_rejects(name, mutate, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        moda_attention(*mutate(*_ok()), **kwargs)


def test_mixed_devices_rejected():
    q, k, v, kd, vd = _ok()
    with pytest.raises(ValueError, match="device"):
        moda_attention(q, k.to("meta"), v, kd, vd)


def test_depth_attention_rejects():
    q, _, _, kd, vd = _ok()
    with pytest.raises(ValueError, match="needs both k_depth and v_depth"):
        depth_attention(q, kd, None)
    with pytest.raises(ValueError, match="multiple"):
        depth_attention(_t(1, 8, 3, 16), kd, vd)
    with pytest.raises(ValueError, match="k_depth must have shape"):
        depth_attention(q, _t(1, 8, 3, 2, 32), vd)
    with pytest.raises(ValueError, match="no depth-only kernel"):
        depth_attention(q, kd, vd, backend="cudnn")
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        depth_attention(q, kd, vd, return_lse=1)


def test_fused_backends_need_a_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        moda_attention(*_ok(), backend="triton")
    with pytest.raises(ValueError, match="backend='cudnn' needs CUDA"):
        moda_attention(*_ok(), backend="cudnn")


@pytest.mark.parametrize("q_len, kv_len, head_dim, causal, want", [
    (64, 64, 64, True, True),
    (1, 1, 64, True, False),  # cuDNN's backward refuses one query against one key
    (1, 1, 64, False, False),
    (1, 7, 64, False, True),
    (2, 2, 64, True, True),
    (5, 9, 64, True, False),  # decoding: the causal mask must sit at the end, cuDNN puts it at the top
    (64, 64, 72, True, True),
    (64, 64, 36, True, False),  # not a multiple of 8
    (64, 64, 256, True, False),  # Triton covers d > 128
])
def test_cudnn_routing_is_decided_from_the_shape(q_len, kv_len, head_dim, causal, want):
    from flash_depth.ops import cudnn_sdpa

    assert cudnn_sdpa.shape_supported(q_len, kv_len, head_dim, causal) is want


def test_cudnn_inputs_are_conformed_not_refused():
    from flash_depth.ops import cudnn_sdpa

    x = torch.randn(2, 5, 4, 16)
    assert cudnn_sdpa.conform(x) is x
    strided = torch.randn(2, 5, 4, 32)[..., ::2]  # last dim not contiguous
    fixed = cudnn_sdpa.conform(strided)
    assert fixed.stride(-1) == 1 and torch.equal(fixed, strided)
    odd = torch.randn(2, 5, 3, 16 + 3)[..., :16]  # row stride 19 elements: misaligned
    assert cudnn_sdpa.conform(odd).stride()[:-1] == (5 * 3 * 16, 3 * 16, 16)


def test_numpy_scale_is_a_number():
    import numpy

    q, k, v, kd, vd = _ok()
    want = moda_attention(q, k, v, kd, vd, scale=0.25, backend="reference")
    assert torch.equal(moda_attention(q, k, v, kd, vd, scale=numpy.float32(0.25), backend="reference"), want)
