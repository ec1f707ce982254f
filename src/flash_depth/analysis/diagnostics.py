"""What depth retrieval does, measured on a few batches of held-out text.

Numbers per checkpoint (all in ``analysis.json``):
- ``depth_mass[layer][head]``: softmax mass on depth slots (vs sequence keys), averaged over tokens;
- ``slot_mass[layer][slot]``: mass on each depth slot (which earlier layer is read; 0 on slots a
  bounded depth window skips);
- ``distance_mass[layer][d - 1]``: the same by slot distance d (1: the slot written last);
- ``sink_first`` / ``sink_first4[layer]``: mass on the first (first four) sequence positions;
- ``sublayers``: per sublayer, ``1 - cos(x_in, x_out)`` and ``|x_out - x_in| / |x_in|``;
- ``near_identity``: how many sublayers have ``1 - cos`` under the threshold;
- ``hidden_norm[layer]``: mean L2 norm of the hidden state after each block (AttnRes: each block's read);
- ``grad_norm[layer]``: L2 norm of each block's parameter gradient (one backward of the LM loss);
- ``attnres_weights[read][source]``: AttnRes softmax weights over sources, averaged over tokens;
- ``hyper``: mHC/HC mixes per sublayer averaged over tokens: ``h_pre[i][stream]``,
  ``h_post[i][stream]``, ``h_res[i][row][column]``;
- ``mudd_weights[block][way][source]``: MUDD's dense weights after each block (ways q, k, v, r;
  the last block: its one output way), averaged over tokens.
Probabilities come from ``attention_probabilities``, the same math as the kernels.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from flash_depth.ops.reference import attention_probabilities


class Recorder:
    """Collects what the model hands it (see ``modeling_flash_depth._record``) during analysis."""

    def __init__(self, example_tokens: int = 64):
        self.example_tokens = example_tokens
        self.depth_mass = defaultdict(list)
        self.slot_mass = defaultdict(list)
        self.sink_first = defaultdict(list)
        self.sink_first4 = defaultdict(list)
        self.examples: dict[int, torch.Tensor] = {}
        self.example_boundary: dict[int, int] = {}
        self.sublayers = defaultdict(list)
        self.hidden_norms = defaultdict(list)
        self.attnres_weights = defaultdict(list)
        self.distance_mass = defaultdict(list)
        self.hyper_mixes = defaultdict(list)
        self.mudd_weights = defaultdict(list)

    def _read_slots(self, stream, window):
        """The depth keys ``[B, T, L_read, Hk, d]`` a read of ``stream`` takes (its window's spans)
        and the slot index of each; None when there are none."""
        if stream is None or not stream.count:
            return None, None
        spans = stream.spans(**(window or {}))
        k_depth = stream.stacked(spans)[0]  # a copy; an fp8 stream's slots dequantised
        return k_depth, torch.cat([torch.arange(a, b) for a, b in spans])

    def _slot_mass(self, layer, mass, slots, count):
        """mass ``[L_read]`` on the read slots -> per slot and per distance ``[count]`` (0: unread)."""
        per_slot = mass.new_zeros(count).index_add_(0, slots.to(mass.device), mass)
        self.slot_mass[layer].append(per_slot)
        self.distance_mass[layer].append(per_slot.flip(0))  # distance d = count - slot at index d - 1

    def attention(self, layer, q, k, stream, window=None):
        """Sequence attention of ``layer``; ``stream`` holds its depth slots (None: no depth read),
        of which it reads the ``window`` (``{"window", "anchors"}`` as :meth:`DepthStream.spans`)."""
        k_depth, slots = self._read_slots(stream, window)
        d = q.shape[-1]
        p = attention_probabilities(q.detach(), k.detach(), None if k_depth is None else k_depth.detach(),
                                    causal=True, scale=d**-0.5)  # [B, Hq, Tq, Tk + L_read]
        Tk = k.shape[1]
        self.depth_mass[layer].append(p[..., Tk:].sum(-1).mean(dim=(0, 2)))
        if p.shape[-1] > Tk:
            self._slot_mass(layer, p[..., Tk:].mean(dim=(0, 1, 2)), slots, stream.count)
        self.sink_first[layer].append(p[..., 0].mean(dim=(0, 2)))
        self.sink_first4[layer].append(p[..., : min(4, Tk)].sum(-1).mean(dim=(0, 2)))
        if layer not in self.examples:  # one example per layer: batch 0, every head, the first tokens
            n = min(self.example_tokens, p.shape[2])
            self.examples[layer] = torch.cat([p[0, :, :n, :n], p[0, :, :n, Tk:]], dim=-1).float().cpu()
            self.example_boundary[layer] = n

    def depth_read(self, layer, q, stream, window=None):
        """``depth_attention``'s separate depth query: all its mass is on depth; record which slots."""
        k_depth, slots = self._read_slots(stream, window)
        p = attention_probabilities(q.detach(), None, k_depth.detach(), causal=False, scale=q.shape[-1] ** -0.5)
        self._slot_mass(layer, p.mean(dim=(0, 1, 2)), slots, stream.count)

    def sublayer(self, layer, kind, x_in, x_out):
        x_in, x_out = x_in.detach().float(), x_out.detach().float()
        cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).mean()
        rel = ((x_out - x_in).norm(dim=-1) / x_in.norm(dim=-1).clamp_min(1e-12)).mean()
        self.sublayers[(layer, kind)].append(torch.stack([1 - cos, rel]))

    def hidden(self, layer, x):
        self.hidden_norms[layer].append(x.detach().float().norm(dim=-1).mean())

    def attnres(self, read, alpha):
        self.attnres_weights[read].append(alpha.detach().float().mean(dim=tuple(range(1, alpha.dim()))))

    def hyper(self, sublayer, h_pre, h_post, h_res):
        """mHC/HC mixes of one sublayer: ``[B, T, n]``, ``[B, T, n]``, ``[B, T, n, n]`` (static HC: no B, T)."""
        self.hyper_mixes[sublayer].append(tuple(h.detach().float().reshape(-1, *h.shape[h.dim() - k:]).mean(0)
                                                for h, k in ((h_pre, 1), (h_post, 1), (h_res, 2))))

    def mudd(self, block, a):
        """MUDD's dense weights after ``block``: ``[B, T, ways, sources]``."""
        self.mudd_weights[block].append(a.detach().float().flatten(0, -3).mean(0))


def _attach(model, recorder):
    from flash_depth.models.modeling_flash_depth import FlashDepthBlock, FlashDepthModel
    from flash_depth.nn import DepthRead, HyperConnection, MoDAAttention, MuddConnections

    for module in model.modules():
        if isinstance(module, (MoDAAttention, DepthRead, FlashDepthBlock, FlashDepthModel, HyperConnection,
                               MuddConnections)):
            module._recorder = recorder


def _detach(model):
    for module in model.modules():
        module.__dict__.pop("_recorder", None)


def _mean(values):
    return torch.stack(values).mean(0).tolist()


def analyze_model(model, batches: list[torch.Tensor], *, threshold: float = 0.01, progress: bool = False) -> dict:
    """Run ``batches`` (token ids ``[B, T]``) through ``model`` (eval mode) and collect the numbers above."""
    recorder = Recorder()
    model.eval()
    _attach(model, recorder)
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="analyze", unit="batch")
    try:
        with torch.no_grad():
            for ids in iterator:
                model(ids)
    finally:
        _detach(model)
    # gradient norm per block: one backward of the LM loss on the first batch
    model.zero_grad(set_to_none=True)
    ids = batches[0]
    model(ids, labels=ids).loss.backward()
    grad_norm = []
    for block in model.model.layers:
        sq = sum(float(p.grad.float().pow(2).sum()) for p in block.parameters() if p.grad is not None)
        grad_norm.append(math.sqrt(sq))
    model.zero_grad(set_to_none=True)

    sublayers = [{"layer": layer, "sublayer": kind, "one_minus_cos": v[0], "relative_update": v[1]}
                 for (layer, kind), vals in sorted(recorder.sublayers.items(), key=lambda kv: (kv[0][0], _ORDER[kv[0][1]]))
                 for v in [_mean(vals)]]
    cfg = model.config
    return {
        "depth_mechanism": cfg.depth_mechanism,
        "norm_position": cfg.norm_position,
        "layers": cfg.num_hidden_layers,
        "depth_mass": [_mean(recorder.depth_mass[i]) for i in sorted(recorder.depth_mass)],
        "slot_mass": {i: _mean(v) for i, v in sorted(recorder.slot_mass.items())},
        "distance_mass": {i: _mean(v) for i, v in sorted(recorder.distance_mass.items())},
        "slot_names": depth_slot_names(cfg),
        "sink_first": [float(torch.tensor(_mean(recorder.sink_first[i])).mean()) for i in sorted(recorder.sink_first)],
        "sink_first4": [float(torch.tensor(_mean(recorder.sink_first4[i])).mean()) for i in sorted(recorder.sink_first4)],
        "sublayers": sublayers,
        "near_identity_threshold": threshold,
        "near_identity": sum(s["one_minus_cos"] < threshold for s in sublayers),
        "hidden_norm": [float(torch.stack(recorder.hidden_norms[i]).mean()) for i in sorted(recorder.hidden_norms)],
        "grad_norm": grad_norm,
        "attnres_weights": [_mean(recorder.attnres_weights[i]) for i in sorted(recorder.attnres_weights)],
        "hyper": {name: [_mean([m[k] for m in recorder.hyper_mixes[i]]) for i in sorted(recorder.hyper_mixes)]
                  for k, name in enumerate(("h_pre", "h_post", "h_res"))} if recorder.hyper_mixes else {},
        "mudd_weights": [_mean(recorder.mudd_weights[i]) for i in sorted(recorder.mudd_weights)],
        "depth_window": {"window": cfg.depth_window, "anchors": cfg.depth_anchors},
        "examples": {i: e for i, e in recorder.examples.items()},  # tensors: figures only, not JSON
        "example_boundary": recorder.example_boundary,
    }


_ORDER = {"depth_read": 0, "attn": 1, "ffn": 2}


def depth_slot_names(cfg) -> list[str]:
    """Names of the depth stream's slots in write order (``attn0``, ``ffn0``, ``attn1`` ...)."""
    if cfg.depth_mechanism not in ("moda", "depth_attention"):
        return []
    names = []
    for layer in range(cfg.num_hidden_layers - 1):
        names.append(f"attn{layer}")
        if cfg.ffn_kv:
            names.append(f"ffn{layer}")
    return names
