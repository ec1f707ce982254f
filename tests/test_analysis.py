"""Diagnostics: every figure and number, depth mass = sum of probabilities, forced cases."""

import json

import pytest
import torch

from flash_depth.analysis import Recorder, analyze_model, write_outputs
from flash_depth.analysis import diagnostics
from flash_depth.models import DEPTH_MECHANISMS, FlashDepthConfig, FlashDepthForCausalLM
from oracle import naive_moda


def _model(mech, **kw):
    torch.manual_seed(0)
    return FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, attnres_blocks=4, **kw))


def _batches(n=2, T=24, vocab=512):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, T), generator=g) for _ in range(n)]


def test_every_figure_and_number_for_each_mechanism(tmp_path):
    results = {mech: analyze_model(_model(mech), _batches()) for mech in DEPTH_MECHANISMS}
    written = write_outputs(results, tmp_path)
    names = {p.split("/")[-1] for p in written["figures"]}
    assert names == {"depth_mass.png", "attention_maps.png", "depth_slots.png", "attention_sink.png",
                     "layer_usefulness.png", "norms.png", "attnres_weights.png", "depth_distance.png",
                     "mhc_mixing.png", "mudd_weights.png"}
    assert all((tmp_path / n).stat().st_size > 5000 for n in names)
    numbers = json.loads((tmp_path / "analysis.json").read_text())
    layers = 4
    for mech, r in numbers.items():
        sublayers_per_block = 3 if mech == "depth_attention" else 2
        expected = layers * 2 + (layers - 1 if mech == "depth_attention" else 0)
        assert len(r["sublayers"]) == expected, mech
        assert len(r["grad_norm"]) == layers and all(g > 0 for g in r["grad_norm"])
        assert len(r["hidden_norm"]) == layers
        assert sublayers_per_block and 0 <= r["near_identity"] <= len(r["sublayers"])
        if mech.startswith("attnres"):
            assert len(r["attnres_weights"]) == 2 * layers + 1
            assert all(abs(sum(w) - 1) < 1e-5 for w in r["attnres_weights"])
        else:
            assert len(r["sink_first"]) == layers and all(0 < s < 1 for s in r["sink_first"])
        if mech in ("moda", "depth_attention"):
            assert r["slot_names"][:2] == ["attn0", "ffn0"]
            assert all(abs(sum(m) - 1) < 1e-5 for m in r["slot_mass"].values()) or mech == "moda"
        if mech in ("mhc", "hc"):
            n = 4
            assert [len(r["hyper"][k]) for k in ("h_pre", "h_post", "h_res")] == [2 * layers] * 3
            assert all(len(row) == n for row in r["hyper"]["h_res"][0])
        else:
            assert r["hyper"] == {}
        if mech == "mudd":  # at init every way is one-hot on the latest output
            assert [len(w) for w in r["mudd_weights"]] == [4, 4, 4, 1]
            for i, ways in enumerate(r["mudd_weights"]):
                assert all(w == [0.0] * (i + 1) + [1.0] for w in ways)
        else:
            assert r["mudd_weights"] == []
    report = (tmp_path / "report.md").read_text()
    assert "![depth_mass](depth_mass.png)" in report and "| moda | moda | pre |" in report


class _KeepInputs(Recorder):
    def __init__(self):
        super().__init__()
        self.inputs = {}

    def attention(self, layer, q, k, stream, window=None):
        super().attention(layer, q, k, stream, window)
        k_depth = stream.slots()[0].clone() if stream is not None and stream.count else None
        self.inputs.setdefault(layer, (q.detach(), k.detach(), k_depth))


def _inputs_of_a_forward(model) -> "_KeepInputs":
    """The attention inputs each layer of ``model`` saw in one forward of a validation batch."""
    rec = _KeepInputs()
    diagnostics._attach(model, rec)
    with torch.no_grad():
        model(_batches(1)[0])
    diagnostics._detach(model)
    return rec


def test_depth_mass_is_the_sum_of_the_softmax_probabilities():
    rec = _inputs_of_a_forward(_model("moda").eval())
    for layer in range(1, 4):
        q, k, kd = rec.inputs[layer]
        B, T, Hq, d = q.shape
        Hk = k.shape[2]
        _, lse = naive_moda(q, k, k, kd, kd, causal=True)  # [B, Hq, T], float64, independent formula
        kd_h = kd.double().repeat_interleave(Hq // Hk, dim=3)  # [B, T, L, Hq, d]
        logits = torch.einsum("bthd,btlhd->bhtl", q.double(), kd_h) * d**-0.5
        expected = torch.exp(logits - lse[..., None]).sum(-1).mean(dim=(0, 2))  # [Hq]
        reported = rec.depth_mass[layer][0].double()
        assert torch.allclose(reported, expected, atol=1e-5), (layer, reported, expected)


def test_forced_large_depth_logits_give_depth_mass_near_one():
    """Hand-built: the stream keeps a constant feature (dim 0 = 1 in every embedding, no sublayer
    writes dim 0); queries and depth keys read only that feature with weight 100 (positive), the
    sequence keys are zero. Every depth logit is then large and positive, every sequence logit 0."""
    model = _model("moda", qk_norm=False, attn_kv_proj=True, ffn_kv=False).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = 1.0
        for layer in model.model.layers:
            attn = layer.attn
            attn.o_proj.weight[0] = 0
            layer.ffn.down.weight[0] = 0
            attn.q_proj.weight.zero_()
            attn.q_proj.weight[:, 0] = 100.0
            half = attn.kv_proj.weight.shape[0] // 2
            attn.kv_proj.weight[:half] = 0
            if attn.depth_kv is not None:
                w = attn.depth_kv.proj.weight
                w[:half] = 0
                w[:half, 0] = 100.0
    result = analyze_model(model, _batches(1))
    assert result["depth_mass"][0] == [0.0] * 4  # block 0 has no depth slots to read
    for layer in range(1, 4):
        assert min(result["depth_mass"][layer]) > 0.999, result["depth_mass"][layer]


def test_sink_free_model_spreads_attention_uniformly():
    """All attention logits 0 (zero query projection): token 0 gets 1/(i+1) from query i."""
    model = _model("residual").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.q_proj.weight.zero_()
    T = 24
    result = analyze_model(model, _batches(1, T=T))
    uniform = sum(1 / (i + 1) for i in range(T)) / T
    assert all(abs(s - uniform) < 1e-5 for s in result["sink_first"]), (result["sink_first"], uniform)


def test_analyze_cli(tmp_path, corpus):
    from test_train import _train  # the tiny training setup

    run = tmp_path / "run"
    assert _train(run, corpus, steps=2) == 0
    from flash_depth.cli import main as cli

    out = tmp_path / "analysis"
    assert cli(["analyze", str(run / "checkpoint"), "--out", str(out), "--batches", "1", "--seq-len", "32"]) == 0
    assert (out / "depth_mass.png").exists() and (out / "report.md").exists()
    assert cli(["analyze", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("threshold,expect_all", [(10.0, True), (0.0, False)])
def test_near_identity_threshold(threshold, expect_all):
    result = analyze_model(_model("residual"), _batches(1), threshold=threshold)
    assert (result["near_identity"] == len(result["sublayers"])) == expect_all


def test_windowed_depth_mass_counts_only_the_read_slots():
    """depth_window=2, depth_anchors=1 (tiny, ffn_kv: layer 3 has 6 slots, reads slots 0, 4, 5): the
    reported depth mass is the float64 softmax over the sequence keys and the read slots only, the
    per-slot mass is 0 on skipped slots, and by distance it sits at 1, 2 and the anchor's 6."""
    model = _model("moda", depth_window=2, depth_anchors=1).eval()
    rec = _inputs_of_a_forward(model)
    q, k, kd = rec.inputs[3]
    read = kd[:, :, [0, 4, 5]]
    B, T, Hq, d = q.shape
    _, lse = naive_moda(q, k, k, read, read, causal=True)
    kd_h = read.double().repeat_interleave(Hq // k.shape[2], dim=3)
    p = torch.exp(torch.einsum("bthd,btlhd->bhtl", q.double(), kd_h) * d**-0.5 - lse[..., None])  # [B, H, T, 3]
    assert torch.allclose(rec.depth_mass[3][0].double(), p.sum(-1).mean(dim=(0, 2)), atol=1e-5)
    per_slot = rec.slot_mass[3][0].double()
    assert per_slot.shape == (6,) and torch.equal(per_slot[1:4], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(per_slot[[0, 4, 5]], p.mean(dim=(0, 1, 2)), atol=1e-5)
    distance = rec.distance_mass[3][0]
    assert torch.equal(distance, rec.slot_mass[3][0].flip(0)) and (distance[[0, 1, 5]] > 0).all()
    result = analyze_model(model, _batches(1))
    assert result["distance_mass"][3][2:5] == [0.0] * 3 and result["depth_window"] == {"window": 2, "anchors": 1}


def test_mudd_and_mhc_records_are_the_token_means_of_their_mixes():
    """The recorded MUDD weights and mHC mixes are the token means of what the layers compute."""
    model = _model("mudd")
    with torch.no_grad():
        for w in model.model.mudd.weights:
            w.w2.weight.normal_(0, 0.5)
    ids = _batches(1)[0]
    result = analyze_model(model, [ids])
    seen = []
    model.model.mudd.weights[2].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(ids)
    want = seen[0].double().mean(dim=(0, 1))  # [4 ways, 4 sources] after block 2
    assert torch.allclose(torch.tensor(result["mudd_weights"][2], dtype=torch.float64), want, atol=1e-6)

    model = _model("mhc")
    with torch.no_grad():
        for hc in model.model.hyper:
            hc.alpha_res.fill_(0.5)
    result = analyze_model(model, [ids])
    mixes = []
    model.model.hyper[5].register_forward_hook(lambda m, i, o: mixes.append(m.mixes(i[0])))
    with torch.no_grad():
        model(ids)
    h_res = mixes[0][2].double().mean(dim=(0, 1))
    assert torch.allclose(torch.tensor(result["hyper"]["h_res"][5], dtype=torch.float64), h_res, atol=1e-6)


def test_depth_mass_of_an_fp8_stream_is_that_of_its_dequantised_slots():
    """The diagnostics read an fp8 stream's slots dequantised (its raw e4m3 codes, each row scaled to
    a maximum of 448, would put nearly all the mass on depth): within fp8's error of the same weights
    with a full-precision stream."""
    full = _model("moda").eval()
    fp8 = _model("moda", depth_stream_dtype="fp8").eval()
    fp8.load_state_dict(full.state_dict())
    batches = _batches(1)
    want, got = (torch.tensor(analyze_model(m, batches)["depth_mass"]) for m in (full, fp8))
    assert got.shape == want.shape and got.numel() > 0
    assert (got - want).abs().max() < 0.05, (got, want)
