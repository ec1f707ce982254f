"""Which problem shapes torch's cuDNN SDPA ops accept, forward and backward (GPU; prints a table).

    python benchmarks/probe_cudnn.py

The routing rule in ``flash_depth.ops.cudnn_sdpa.supports`` is written from this table, so
the fused path never relies on catching a cuDNN error.
"""

import itertools
import json
import sys

import torch

aten = torch.ops.aten


def probe(B, Tq, Tk, Hq, Hk, d, causal, last_dim_stride=1, dtype=torch.bfloat16):
    q = torch.randn(B, Hq, Tq, d * last_dim_stride, device="cuda", dtype=dtype)[..., ::last_dim_stride]
    k = torch.randn(B, Hk, Tk, d, device="cuda", dtype=dtype)
    v = torch.randn(B, Hk, Tk, d, device="cuda", dtype=dtype)
    result = {"fwd": None, "bwd": None}
    try:
        res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=d ** -0.5)
        torch.cuda.synchronize()
        result["fwd"] = "ok"
    except RuntimeError as err:
        result["fwd"] = str(err).splitlines()[0][:120]
        return result
    try:
        out, lse = res[0], res[1]
        do = torch.randn_like(out)
        aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, out, lse, res[6], res[7], None, res[2], res[3], res[4], res[5], 0.0, causal, scale=d ** -0.5)
        torch.cuda.synchronize()
        result["bwd"] = "ok"
    except RuntimeError as err:
        result["bwd"] = str(err).splitlines()[0][:120]
    return result


def main():
    rows = []
    print(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name())
    cases = []
    for (Tq, Tk), causal in itertools.product([(1, 1), (1, 7), (7, 1), (2, 2), (1, 64), (64, 64), (5, 5)], [True, False]):
        if causal and Tq != Tk:
            continue
        cases.append(dict(B=2, Tq=Tq, Tk=Tk, Hq=8, Hk=8, d=64, causal=causal))
    for Hk in (1, 2, 4):
        cases.append(dict(B=2, Tq=64, Tk=64, Hq=8, Hk=Hk, d=64, causal=True))
    for d in (8, 16, 40, 72, 96, 128, 192, 256):
        cases.append(dict(B=1, Tq=64, Tk=64, Hq=4, Hk=4, d=d, causal=True))
    cases.append(dict(B=1, Tq=64, Tk=64, Hq=4, Hk=4, d=64, causal=True, last_dim_stride=2))
    for c in cases:
        r = probe(**c)
        rows.append({**c, **r})
        print(json.dumps(rows[-1]))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
