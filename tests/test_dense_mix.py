"""The dense mix (ops/dense_mix.py, MUDDFormer's read): the Triton kernels (interpreted on CPU)
against the float64 formula, forward and both gradients; the GPU checks are marked ``gpu``:

    python -m pytest -q -m gpu tests/test_dense_mix.py
"""

import pytest
import torch
from oracle import float64_leaves, rel_err

from flash_depth.ops import dense_mix
from flash_depth.ops.dense_mix import mix_backward, mix_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the kernels on CPU


def naive_mix(a, states):
    """out[s] = sum_j a[..., s, j] states[j], written as a loop over j."""
    return sum(a[..., j, None].movedim(2, 0) * states[j] for j in range(states.shape[0]))


def _case(S, n, B, T, D, dtype, device=DEVICE):
    """states: the first n slots of a larger buffer (read in place); a: a transposed view."""
    buffer = torch.randn(n + 2, B, T, D, device=device).to(dtype)
    a = torch.randn(B, T, n, S, device=device).transpose(2, 3)
    return a, buffer[:n]


@pytest.mark.parametrize("S,n,B,T,D", [
    (4, 1, 1, 3, 16),   # one output: every way is a scaled copy
    (4, 5, 2, 7, 33),   # odd n, odd D, 14 rows: not a multiple of the row blocks
    (1, 3, 3, 3, 40),   # one way (after the last block)
    (3, 2, 1, 5, 130),  # three ways, D over two forward column chunks
])
def test_kernels_match_float64_formula(S, n, B, T, D):
    a, states = _case(S, n, B, T, D, torch.float32)
    leaves = [a.clone().requires_grad_(), states.clone().requires_grad_()]
    out = dense_mix(*leaves, backend="triton")
    assert out.shape == (S, B, T, D) and out.dtype == torch.float32
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    ref = float64_leaves([a, states])
    want = naive_mix(*ref)
    (want * dout.double()).sum().backward()
    assert rel_err(out, want) < 1e-5
    assert rel_err(leaves[0].grad, ref[0].grad) < 1e-5 and rel_err(leaves[1].grad, ref[1].grad) < 1e-5
    # the stream's form: the states' gradient added into a float32 buffer in place
    grad = torch.randn(n, B, T, D, device=DEVICE)
    before = grad.clone()
    da = mix_backward(a, states, dout, grad, backend="triton")
    assert rel_err(da, ref[0].grad) < 1e-5 and rel_err(grad - before, ref[1].grad) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("S,S2,n", [(4, 4, 3), (4, 1, 5), (1, 4, 1)])
def test_pending_read_joins_the_gradient_pass(backend, S, S2, n):
    """grad_from = n-1 adds only the newest output's gradient; a pending read (a2 over n+1
    outputs, its own number of ways) adds its terms for the first n outputs in the next call."""
    a2, states = _case(S2, n + 1, 2, 7, 33, torch.float32)
    a, _ = _case(S, n, 2, 7, 33, torch.float32)
    dout, dout2 = torch.randn(S, 2, 7, 33, device=DEVICE), torch.randn(S2, 2, 7, 33, device=DEVICE)
    grad = torch.zeros(states.shape, device=DEVICE)
    mix_backward(a2, states, dout2, grad, backend, grad_from=n)
    da = mix_backward(a, states[:n], dout, grad[:n], backend, pending=(a2, dout2))
    ref, ref2 = float64_leaves([a, states]), float64_leaves([a2, states])
    ((naive_mix(ref[0], ref[1][:n]) * dout.double()).sum() + (naive_mix(*ref2) * dout2.double()).sum()).backward()
    assert rel_err(da, ref[0].grad) < 1e-5 and rel_err(grad, ref[1].grad + ref2[1].grad) < 1e-5


def test_half_precision_states_accumulate_in_float32():
    """fp16 states and outputs, float32 weights: out and da in their own dtypes, errors at the
    16-bit rounding of the result (not of every term)."""
    a, states = _case(4, 6, 2, 5, 24, torch.float16)
    out = mix_forward(a, states, backend="triton")
    ref = float64_leaves([a, states])
    assert out.dtype == torch.float16 and rel_err(out, naive_mix(*ref)) < 2e-3
    out32 = mix_forward(a, states, torch.float32, backend="triton")
    assert out32.dtype == torch.float32 and rel_err(out32, naive_mix(*ref)) < 1e-6
    dout = torch.randn(4, 2, 5, 24, device=DEVICE).half()
    grad = torch.zeros(6, 2, 5, 24, device=DEVICE)
    da = mix_backward(a, states, dout, grad, backend="triton")
    (naive_mix(*ref) * dout.double()).sum().backward()
    assert da.dtype == torch.float32 and rel_err(da, ref[0].grad) < 1e-6 and rel_err(grad, ref[1].grad) < 1e-6


def test_backends_agree_and_auto_picks_reference_on_cpu():
    a, states = _case(4, 3, 2, 3, 8, torch.float32, device="cpu")
    out = dense_mix(a, states)  # auto on CPU: the reference
    assert rel_err(out, naive_mix(*float64_leaves([a, states]))) < 1e-6


@pytest.mark.parametrize("call,match,error", [
    (lambda a, x: dense_mix(a[..., :2], x), "a must be", ValueError),
    (lambda a, x: dense_mix(a, x[0]), "states must be", ValueError),
    (lambda a, x: dense_mix(a.long(), x), "a must be floating", TypeError),
    (lambda a, x: dense_mix(a, x, backend="cuda"), "backend", ValueError),
    (lambda a, x: dense_mix(torch.cat([a, a], 2), x, backend="triton"), "at most 4 ways", ValueError),
    (lambda a, x: dense_mix(a, x.double(), backend="triton"), "float64", TypeError),
    (lambda a, x: mix_backward(a, x, torch.randn(4, 2, 3, 5), torch.zeros_like(x)), "dout", ValueError),
    (lambda a, x: mix_backward(a, x, torch.randn(4, 2, 3, 8), torch.zeros(2, 2, 3, 8)), "grad_states", ValueError),
    (lambda a, x: mix_backward(a, x, torch.randn(4, 2, 3, 8), x.half()), "grad_states", TypeError),
    (lambda a, x: mix_backward(a, x, torch.randn(4, 2, 3, 8), torch.zeros_like(x), grad_from=4), "grad_from",
     ValueError),
    (lambda a, x: mix_backward(a, x, torch.randn(4, 2, 3, 8), torch.zeros_like(x), pending=(a[..., :2], x[0])),
     "a2", ValueError),
    (lambda a, x: mix_backward(a, x, torch.randn(4, 2, 3, 8), torch.zeros_like(x), pending=(a, x[0])),
     "dout2", ValueError),
    (lambda a, x: mix_backward(a, x, torch.ones(4, 2, 3, 8, dtype=torch.long), torch.zeros_like(x)), "dout must",
     TypeError),
    (lambda a, x: mix_backward(a, x, torch.randn(4, 2, 3, 8, device="meta"), torch.zeros_like(x)), "dout must",
     TypeError),
    (lambda a, x: mix_backward(a, x, torch.randn(4, 2, 3, 8), torch.zeros_like(x), grad_from=1,
                               pending=(a, torch.randn(4, 2, 3, 8))), "grad_from=0", ValueError),
    (lambda a, x: dense_mix(a, x, torch.long), "out_dtype", TypeError),
])
def test_input_checks_name_the_argument(call, match, error):
    a, states = _case(4, 3, 2, 3, 8, torch.float32, device="cpu")
    with pytest.raises(error, match=match):
        call(a, states)


@pytest.mark.gpu
@pytest.mark.parametrize("S,n", [(4, 49), (1, 49), (4, 2)])
def test_cuda_kernels_match_float64_in_bf16(S, n):
    """bf16 states and gradients, float32 weights (as the model under autocast), B*T = 4 * 1000
    rows, D = 384 (the small presets' width): forward, da and the float32 gradient buffer."""
    a, states = _case(S, n, 4, 1000, 384, torch.bfloat16, device="cuda")
    out = mix_forward(a, states)
    dout = torch.randn_like(out)
    grad = torch.randn(states.shape, device="cuda")
    before = grad.clone()
    da = mix_backward(a, states, dout, grad)
    ref = float64_leaves([a, states])
    want = naive_mix(*ref)
    (want * dout.double()).sum().backward()
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 1e-2
    assert rel_err(da, ref[0].grad) < 1e-5 and rel_err(grad - before, ref[1].grad) < 1e-5
    leaves = [a.clone().requires_grad_(), states.clone().requires_grad_()]
    (dense_mix(*leaves) * dout).sum().backward()
    assert rel_err(leaves[0].grad, ref[0].grad) < 1e-5 and rel_err(leaves[1].grad, ref[1].grad) < 1e-2


@pytest.mark.gpu
def test_cuda_kernels_replay_from_a_cuda_graph():
    """No host sync in either kernel: both capture, and the replay recomputes from new inputs."""
    a, states = _case(4, 7, 2, 300, 384, torch.bfloat16, device="cuda")
    dout = torch.randn(4, 2, 300, 384, device="cuda", dtype=torch.bfloat16)
    grad = torch.zeros(states.shape, device="cuda")
    mix_forward(a, states), mix_backward(a, states, dout, grad)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mix_forward(a, states)
        grad.zero_()
        da = mix_backward(a, states, dout, grad)
    a.copy_(torch.randn_like(a))
    states.copy_(torch.randn_like(states))
    graph.replay()
    ref = float64_leaves([a, states])
    want = naive_mix(*ref)
    (want * dout.double()).sum().backward()
    assert rel_err(out, want) < 1e-2 and rel_err(da, ref[0].grad) < 1e-5 and rel_err(grad, ref[1].grad) < 1e-5
