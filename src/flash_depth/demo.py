"""Run MoDA on random tensors: error against a float64 reference, and speed.

    flash-depth-demo            # or: python -m flash_depth.demo
    flash-depth-demo --T 8192   # on a GPU

On CPU it runs the plain PyTorch path at a small shape; on CUDA the fused path in bf16,
timed against cuDNN sequence-only attention of the same shape.
"""

from __future__ import annotations

import argparse
import time

import torch

from flash_depth import moda_attention
from flash_depth.ops import attention_reference


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _time_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
    fn()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return sorted(runs)[1]


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description="MoDA on random tensors: accuracy and speed.")
    parser.add_argument("--T", type=int, default=4096 if cuda else 512, help="sequence length")
    parser.add_argument("--q-heads", type=int, default=64 if cuda else 8)
    parser.add_argument("--kv-heads", type=int, default=8 if cuda else 2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=64 if cuda else 16, help="L, depth slots per token")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, T, Hq, Hk, d, L = 1, args.T, args.q_heads, args.kv_heads, args.head_dim, args.depth
    print(f"MoDA: B={B} T={T} Hq={Hq} Hk={Hk} d={d} L={L} {dtype} on {device}")

    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(B, T, Hq, d), (B, T, Hk, d), (B, T, Hk, d), (B, T, L, Hk, d), (B, T, L, Hk, d)]
    inputs = [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]
    o = moda_attention(*inputs)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)

    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    o_ref, _ = attention_reference(*ref_inputs, causal=True, scale=d**-0.5)
    grads_ref = torch.autograd.grad(o_ref, ref_inputs, do.double())
    print("relative error vs float64 reference:")
    print(f"  o         {_rel_err(o, o_ref):.2e}")
    for name, a, b in zip(["dq", "dk", "dv", "dk_depth", "dv_depth"], grads, grads_ref):
        print(f"  {name:<9} {_rel_err(a, b):.2e}")

    def step():
        torch.autograd.grad(moda_attention(*inputs), inputs, do)

    ours = _time_ms(step, device)
    print(f"forward+backward: {ours:.2f} ms")
    if device == "cuda":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in inputs[:3])

        def cudnn_step():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            torch.autograd.grad(out, [qt, kt, vt], do.transpose(1, 2))

        base = _time_ms(cudnn_step, device)
        print(f"cuDNN sequence-only attention: {base:.2f} ms -> MoDA costs {ours / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
