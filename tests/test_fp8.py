"""The fp8 depth stream (``depth_stream_dtype="fp8"``): quantiser bounds, the kernels' fp8 loads,
the stream's reads and straight-through gradients, the model option and its refusals.

The kernels run here in Triton's interpreter with float32 queries (it loads e4m3 exactly; its
bf16 ``tl.dot`` is wrong with or without fp8, so bf16 queries are checked in tests/test_gpu.py)."""

import pytest
import torch

from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM
from flash_depth.nn.depth_stream import DepthStream, read_depth, read_moda
from flash_depth.ops import fp8
from flash_depth.ops.depth_triton import depth_backward, depth_forward, depth_slot_backward
from flash_depth.ops.fp8 import dequantize_fp8, quantize_fp8
from oracle import naive_moda, rel_err

E4M3 = torch.float8_e4m3fn
# Measured on CPU (seeds 0-2, float64, d=32, 4 slots of unit Gaussians): the fp8 stream's MoDA output is
# 2.2-2.4% off the unquantised one (norm-wise), the slots' gradients 2.9-7.6%; an element's round trip
# is 2.5% off on average. The tests allow 4% and 15%.
OUT_TOL, GRAD_TOL = 0.04, 0.15


def _straight_through(x):
    """What an fp8 slot holds, with the gradient of x (the oracle of a straight-through write)."""
    deq = dequantize_fp8(*quantize_fp8(x), dtype=x.dtype)
    return x + (deq - x).detach()


def test_round_trip_error_is_within_half_an_e4m3_step():
    """|x - deq(x)| <= 2^-4 |x| where x / scale is a normal e4m3 value, <= 2^-10 scale below it
    (subnormals); each row's largest element lands on 448 exactly; zero rows stay zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, generator=g) * torch.logspace(-6, 6, 64)[:, None, None]
    x[0, 0] = 0.0
    x[1, 1, :5] = 1e-9 * x[1, 1, 5:10]  # subnormal in e4m3 after scaling
    values, scales = quantize_fp8(x)
    assert values.dtype == E4M3 and scales.dtype == torch.float32 and scales.shape == (64, 3)
    deq = dequantize_fp8(values, scales, torch.float64)
    err = (deq - x.double()).abs()
    bound = torch.maximum(2.0**-4 * x.double().abs(), 2.0**-10 * scales.double()[..., None]) * (1 + 2**-20)
    assert (err <= bound).all(), (err / bound).max()
    amax = values.float().abs().amax(-1)
    assert torch.equal(amax[1:], torch.full_like(amax[1:], 448.0)) and amax[0, 0] == 0
    assert torch.equal(deq[0, 0], torch.zeros(32, dtype=torch.float64)) and scales[0, 0] == 1


def test_quantizer_writes_in_place_and_checks_its_arguments():
    x = torch.randn(2, 5, 3, 16, dtype=torch.bfloat16)
    buf, sbuf = torch.empty(2, 5, 4, 3, 16, dtype=E4M3), torch.zeros(2, 5, 4, 3)
    quantize_fp8(x, out=buf[:, :, 2], scale_out=sbuf[:, :, 2])
    values, scales = quantize_fp8(x)
    assert torch.equal(buf[:, :, 2].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(sbuf[:, :, 2], scales) and sbuf[:, :, :2].abs().sum() == 0
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantize_fp8(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"out must be torch.float8_e4m3fn \(2, 5, 3, 16\)"):
        quantize_fp8(x, out=torch.empty(2, 5, 3, 16))
    with pytest.raises(ValueError, match=r"scale_out must be torch.float32 \(2, 5, 3\)"):
        quantize_fp8(x, scale_out=torch.empty(2, 5, 3, 1))
    with pytest.raises(TypeError, match="values must be a float8_e4m3fn tensor"):
        dequantize_fp8(x, scales)
    with pytest.raises(ValueError, match=r"scales must be a tensor \(2, 5, 3\)"):
        dequantize_fp8(values, scales[..., :1])


def test_kernels_read_fp8_slots_as_their_dequantised_values():
    """Forward (with the sequence merge), dq backward (deferred and with slot gradients) and the
    deferred slot-gradient kernel on fp8 slots, against float64 on the dequantised slots."""
    torch.manual_seed(0)
    B, T, Hq, Hk, d, L = 2, 5, 4, 2, 16, 3
    q = torch.randn(B, T, Hq, d)
    k, v = torch.randn(B, T, Hk, d, dtype=torch.float64), torch.randn(B, T, Hk, d, dtype=torch.float64)
    kd8, ks = quantize_fp8(torch.randn(B, T, L, Hk, d) * torch.rand(1, 1, L, Hk, 1) * 4)
    vd8, vs = quantize_fp8(torch.randn(B, T, L, Hk, d))
    kd, vd = (dequantize_fp8(x, s, torch.float64).requires_grad_() for x, s in ((kd8, ks), (vd8, vs)))
    qd = q.double().requires_grad_()
    scale = d**-0.5
    o_seq, lse_seq = naive_moda(qd, k, v, None, None, causal=True)
    o_ref, lse_ref = naive_moda(qd, k, v, kd, vd, causal=True)
    o, lse = depth_forward(q, kd8, vd8, scale, o_seq=o_seq.float().detach(), lse_seq=lse_seq.float(),
                           slot_scales=(ks, vs))
    assert rel_err(o, o_ref) < 1e-5 and rel_err(lse, lse_ref) < 1e-5

    o_ref, lse_ref = naive_moda(qd, None, None, kd, vd, causal=False)  # depth only: every gradient is the kernels'
    do = torch.randn(B, T, Hq, d)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, (qd, kd, vd), do.double())
    o_ref, lse_ref = o_ref.float().detach(), lse_ref.float()
    dq, dk, dv = depth_backward(q, kd8, vd8, o_ref, lse_ref, do, scale, slot_scales=(ks, vs))
    assert rel_err(dq, dq_ref) < 1e-5 and rel_err(dk, dk_ref) < 1e-5 and rel_err(dv, dv_ref) < 1e-5
    delta = torch.empty(B, Hq, T)
    dq, no_dk, _ = depth_backward(q, kd8, vd8, o_ref, lse_ref, do, scale, slot_grads=False, delta_out=delta,
                                  slot_scales=(ks, vs))
    assert no_dk is None and rel_err(dq, dq_ref) < 1e-5
    dk, dv = depth_slot_backward(q[None], do[None], lse_ref[None], delta[None], kd8, vd8, 1, 2, (0, 1), scale,
                                 slot_scales=(ks, vs))
    assert dk.dtype == torch.float32  # q's dtype: fp8 slots do not set the gradients' dtype
    assert rel_err(dk.movedim(0, 2), dk_ref[:, :, 1:]) < 1e-5 and rel_err(dv.movedim(0, 2), dv_ref[:, :, 1:]) < 1e-5



def test_fp16_queries_keep_small_fp8_slots():
    """fp16 q/dO on fp8 slots of small values (V ~ 1e-3, dS ~ 1e-5): the scaled probability and dS
    columns (scale = amax / 448) would be fp16 subnormals; the kernels take them through bf16."""
    torch.manual_seed(0)
    B, T, Hq, Hk, d, L = 1, 6, 4, 2, 16, 5
    q = torch.randn(B, T, Hq, d).half()
    kd8, ks = quantize_fp8(torch.randn(B, T, L, Hk, d) * 1e-2)
    vd8, vs = quantize_fp8(torch.randn(B, T, L, Hk, d) * 1e-3)
    kd, vd = (dequantize_fp8(x, s, torch.float64) for x, s in ((kd8, ks), (vd8, vs)))
    qd = q.double().requires_grad_()
    o_ref, lse_ref = naive_moda(qd, None, None, kd, vd, causal=False)
    o, lse = depth_forward(q, kd8, vd8, d**-0.5, slot_scales=(ks, vs))
    assert rel_err(o, o_ref) < 1e-2
    do = torch.randn(B, T, Hq, d).half()
    (dq_ref,) = torch.autograd.grad(o_ref, qd, do.double())
    dq, _, _ = depth_backward(q, kd8, vd8, o_ref.half().detach(), lse_ref.float().detach(), do, d**-0.5,
                              slot_grads=False, delta_out=torch.empty(B, Hq, T), slot_scales=(ks, vs))
    assert rel_err(dq, dq_ref) < 1e-2

def test_kernels_refuse_fp8_slots_without_scales_and_scales_without_fp8():
    q = torch.randn(1, 3, 2, 16)
    kd8, ks = quantize_fp8(torch.randn(1, 3, 2, 1, 16))
    with pytest.raises(ValueError, match="slot_scales .* go with float8_e4m3fn k_depth and v_depth"):
        depth_forward(q, kd8, kd8, 0.25)
    with pytest.raises(ValueError, match="slot_scales .* go with float8_e4m3fn k_depth and v_depth"):
        depth_forward(q, kd8.float(), kd8.float(), 0.25, slot_scales=(ks, ks))
    with pytest.raises(ValueError, match=r"v_scale must be float32 \(1, 3, 2, 1\)"):
        depth_forward(q, kd8, kd8, 0.25, slot_scales=(ks, ks.double()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("sequence, window, anchors", [(True, None, 0), (True, 2, 1), (False, None, 0)],
                         ids=["moda", "moda-window", "depth-only"])
def test_fp8_stream_reads_and_gradients(backend, sequence, window, anchors):
    """An fp8 stream's reads equal concat of its dequantised slots, and its producers get the
    gradients of those slots (straight through), on both paths and over windowed reads (two
    spans); against the unquantised slots both are within the measured fp8 error."""
    torch.manual_seed(0)
    B, T, Hq, Hk, d, layers = 2, 6, 4, 2, 32, 4
    dtype = torch.float64 if backend == "reference" else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    qs = [torch.randn(B, T, Hq, d, dtype=dtype, requires_grad=True) for _ in range(layers)]
    kvs = [torch.randn(B, T, Hk, d, dtype=dtype, requires_grad=True) for _ in range(2 * layers)]
    weights = torch.randn(B, T, Hq, d, dtype=dtype)

    def run(mode):
        stream = DepthStream(layers, dtype=E4M3) if mode == "fp8" else None
        slots, total = [], 0
        for i in range(layers):
            k, v = kvs[2 * i], kvs[2 * i + 1]
            kw = {"window": window, "anchors": anchors}
            if i == 0 and not sequence:
                o = qs[0]
            elif stream is not None:
                o = (read_moda(stream, qs[i], k, v, backend=backend, **kw) if sequence
                     else read_depth(stream, qs[i], backend=backend, **kw))
            else:
                keep = stream_spans(len(slots), window, anchors)
                kd, vd = (torch.stack([slots[j][n] for j in keep], 2).double() if keep else None for n in (0, 1))
                o = naive_moda(qs[i], k if sequence else None, v if sequence else None, kd, vd, causal=True)[0]
            if stream is not None:
                stream.write(k, v)
            else:
                slots.append((k, v) if mode == "exact" else (_straight_through(k), _straight_through(v)))
            total = total + (o * weights).sum()
        if stream is not None:
            stream.close()
        outs = torch.autograd.grad(total, kvs, allow_unused=True, materialize_grads=True)
        return total.item(), [g.double() for g in outs]

    t8, g8 = run("fp8")
    t_deq, g_deq = run("dequantised")
    t_exact, g_exact = run("exact")
    assert abs(t8 - t_deq) < tol * abs(t_deq)
    assert max(rel_err(a, b) for a, b in zip(g8, g_deq)) < tol
    assert abs(t8 - t_exact) < OUT_TOL * abs(t_exact)
    assert max(rel_err(a, b) for a, b in zip(g8[:-2], g_exact[:-2])) < GRAD_TOL  # the last slot is never read


def stream_spans(n, window, anchors):
    """The slots a read of n written slots takes (the stream's window rule, written out)."""
    if window is None or window >= n:
        return list(range(n))
    return sorted(set(range(min(anchors, n - window))) | set(range(n - window, n)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp8_stream_read_without_gradients(backend):
    """No gradient through the stream (eval, generate): the fused kernels read the fp8 slots in
    place, the reference dequantises them; both give MoDA over the dequantised slots."""
    torch.manual_seed(0)
    stream = DepthStream(4, dtype=E4M3)
    for _ in range(4):
        stream.write(torch.randn(1, 5, 2, 16) * 3, torch.randn(1, 5, 2, 16))
    q, k, v = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    with torch.no_grad():
        plain = read_moda(stream, q, k, v, backend=backend, window=2, anchors=1)  # slots 0, 2, 3
    kd, vd = stream.slots()
    assert kd.dtype == torch.float32 and kd.shape == (1, 5, 4, 2, 16)
    want = naive_moda(q, k, v, kd[:, :, [0, 2, 3]], vd[:, :, [0, 2, 3]], causal=True)[0]
    assert rel_err(plain, want) < 1e-5


def _pair(backend="reference", layers=3, **kw):
    """Two tiny moda models with the same weights: full-precision and fp8 depth streams."""
    models = [FlashDepthForCausalLM(FlashDepthConfig.from_preset(
        "tiny", depth_mechanism="moda", attention_backend=backend, num_hidden_layers=layers,
        depth_stream_dtype=dt, **kw)) for dt in (None, "fp8")]
    models[1].load_state_dict(models[0].state_dict())
    return models


def test_fp8_model_trains_and_stays_near_the_full_precision_stream():
    """Forward and backward with the option: every parameter gets a finite, nonzero gradient, and
    loss, logits and gradients stay within the fp8 error of the unquantised stream's."""
    torch.manual_seed(1)
    exact, quant = _pair(ffn_kv=True)
    ids = torch.randint(0, 512, (2, 11))
    outs = []
    for model in (exact, quant):
        out = model(ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    assert rel_err(outs[1].logits, outs[0].logits) < OUT_TOL
    assert abs(outs[1].loss.item() - outs[0].loss.item()) < 1e-3 * outs[0].loss.item()
    for (name, p), p_ref in zip(quant.named_parameters(), exact.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        assert rel_err(p.grad, p_ref.grad) < GRAD_TOL, name


def test_fp8_model_fused_path_matches_its_reference_path():
    """The fused kernels and the reference path read the same dequantised slots: equal gradients."""
    torch.manual_seed(2)
    fused, ref = (_pair(backend)[1] for backend in ("triton", "reference"))
    ref.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 512, (2, 7))
    for model in (fused, ref):
        model(ids, labels=ids).loss.backward()
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-5, name


def test_fp8_option_round_trips_through_the_config(tmp_path):
    cfg = FlashDepthConfig.from_preset("tiny", depth_mechanism="depth_attention", depth_stream_dtype="fp8")
    cfg.save_pretrained(tmp_path)
    loaded = FlashDepthConfig.from_pretrained(tmp_path)
    assert loaded.depth_stream_dtype == "fp8" and loaded.depth_stream_torch_dtype == E4M3
    assert FlashDepthConfig.from_preset("tiny", depth_mechanism="moda").depth_stream_torch_dtype is None


@pytest.mark.parametrize("overrides, msg", [
    ({"depth_mechanism": "moda", "depth_stream_dtype": "fp16"}, r"depth_stream_dtype must be one of \(None, 'fp8'\)"),
    ({"depth_mechanism": "residual", "depth_stream_dtype": "fp8"}, "depth_mechanism='residual' has none"),
])
def test_bad_depth_stream_dtype(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        FlashDepthConfig.from_preset("tiny", **overrides)


def test_fp8_refused_without_float8_dtypes(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="needs torch.float8_e4m3fn, which torch .* lacks"):
        FlashDepthConfig.from_preset("tiny", depth_mechanism="moda", depth_stream_dtype="fp8")
    with pytest.raises(ValueError, match="dtype must be None .* or torch.float8_e4m3fn"):
        DepthStream(2, dtype=E4M3)


def test_fp8_refused_on_a_gpu_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*NVIDIA A100 has 8.0"):
        fp8.check_fp8_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_fp8_device(torch.device("cuda", 0))
    fp8.check_fp8_device(torch.device("cpu"))
    with pytest.raises(TypeError, match="device must be a torch.device"):
        fp8.check_fp8_device("cuda")


def test_depth_stream_dtype_checks():
    with pytest.raises(ValueError, match=r"dtype must be None \(the first write's dtype\) or torch.float8_e4m3fn"):
        DepthStream(2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="slots must be a positive int"):
        DepthStream(0)
