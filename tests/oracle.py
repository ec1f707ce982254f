"""An independent float64 MoDA formula for the tests: full score matrix per head, no chunking."""

import torch


def naive_moda(q, k, v, k_depth, v_depth, *, causal, scale=None, key_mask=None):
    """Same contract as flash_depth.moda_attention (k=None: depth only). Returns o, lse in float64.
    key_mask ``[B, Tq, Tk]`` bool: False hides a key from a query (on top of causal); a query
    with no entry left gets o = 0 and lse = -inf."""
    q = q.double()
    B, Tq, Hq, d = q.shape
    Hk = (k if k is not None else k_depth).shape[-2]
    G = Hq // Hk
    scale = d**-0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(B):
        o_b, l_b = [], []
        for h in range(Hq):
            hk = h // G
            parts = []
            if k is not None:
                kk, vv = k[b, :, hk].double(), v[b, :, hk].double()
                s = q[b, :, h] @ kk.T * scale
                if causal:
                    Tk = kk.shape[0]
                    i = torch.arange(Tq)[:, None] + (Tk - Tq)
                    j = torch.arange(Tk)[None, :]
                    s = s.masked_fill(j > i, float("-inf"))
                if key_mask is not None:
                    s = s.masked_fill(~key_mask[b], float("-inf"))
                parts.append(s)
            if k_depth is not None:
                kd = k_depth[b, :, :, hk].double()  # [T, L, d]
                parts.append((q[b, :, h, None, :] * kd).sum(-1) * scale)
            s = torch.cat(parts, dim=1)
            lse = torch.logsumexp(s, dim=1)
            if key_mask is None:
                p = torch.softmax(s, dim=1)
            else:  # rows with nothing to attend to: p = 0 (no NaN)
                empty = torch.isinf(lse)[:, None]
                p = torch.where(empty, 0.0, torch.exp(s - torch.where(empty, 0.0, lse[:, None])))
            o = 0
            n = 0
            if k is not None:
                n = k.shape[1]
                o = p[:, :n] @ vv
            if k_depth is not None:
                o = o + (p[:, n:, None] * v_depth[b, :, :, hk].double()).sum(1)
            o_b.append(o)
            l_b.append(lse)
        outs.append(torch.stack(o_b, dim=1))
        lses.append(torch.stack(l_b, dim=0))
    return torch.stack(outs), torch.stack(lses)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (the absolute norm where ref is exactly zero);
    NaN or inf anywhere in out gives inf."""
    out = out.double()
    ref = ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    diff = (out - ref).norm()
    ref_norm = ref.norm()
    return (diff if ref_norm == 0 else diff / ref_norm).item()


def make_inputs(B, Tq, Tk, Hq, Hk, d, L, dtype, device="cpu", seed=None, with_seq=True):
    g = torch.Generator(device="cpu")
    g.manual_seed(int(torch.randint(0, 2**31, ()).item()) if seed is None else seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()

    q = rnd(B, Tq, Hq, d)
    k = rnd(B, Tk, Hk, d) if with_seq else None
    v = rnd(B, Tk, Hk, d) if with_seq else None
    kd = rnd(B, Tq, L, Hk, d) if L else None
    vd = rnd(B, Tq, L, Hk, d) if L else None
    return q, k, v, kd, vd


def naive_attnres(sources, query, norm_weight, eps):
    """Attention Residuals read in float64 from the SPEC's words: keys = RMSNorm(v_i) * g,
    logits = w . key, softmax over sources. sources ``[N, ..., D]``, query ``[S, D]``,
    norm_weight ``[S, D]``. Returns out ``[S, ..., D]`` and lse ``[S, ...]``."""
    v = sources.double()
    outs, lses = [], []
    for w, g in zip(query.double(), norm_weight.double()):
        keys = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g
        logits = keys @ w  # [N, ...]
        outs.append((torch.softmax(logits, 0)[..., None] * v).sum(0))
        lses.append(torch.logsumexp(logits, 0))
    return torch.stack(outs), torch.stack(lses)


def cu_seqlens(lengths):
    """int32 ``[len(lengths) + 1]``: the offsets of documents of these lengths packed end to end."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def float64_leaves(inputs):
    """Each tensor of ``inputs`` (None stays None) as a float64 leaf that requires grad."""
    return [None if x is None else x.detach().double().requires_grad_() for x in inputs]
