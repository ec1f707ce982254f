"""The vision encoder: every depth mechanism on the fused path against the reference path, non-causal
attention, a hand-written MoDA encoder, save/load, bad input, and the digits demo."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification

from flash_depth import cli
from flash_depth.models import VIT_MECHANISMS, FlashDepthViTConfig, FlashDepthViTForImageClassification
from oracle import naive_moda, rel_err

# 8x8 images in 4x4 patches: 4 patches + CLS
TINY = dict(image_size=8, patch_size=4, num_channels=2, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=48, num_labels=3, attnres_blocks=3)
VARIANTS = [(m, {}) for m in VIT_MECHANISMS] + [
    ("moda", {"ffn_kv": False, "qk_norm": True}), ("moda", {"attn_kv_proj": True, "num_key_value_heads": 1}),
    ("moda", {"depth_window": 2, "depth_anchors": 1})]


def _model(mech, **kw):
    model = FlashDepthViTForImageClassification(FlashDepthViTConfig(**{**TINY, "depth_mechanism": mech, **kw}))
    if model.vit.attnres is not None:  # zero queries give the key norms no gradient: move off init
        with torch.no_grad():  # std 0.5 put attnres_full's fused float32 gradients 6.8e-6 (of 1e-5) off the plain path's
            model.vit.attnres.queries.normal_(0, 0.2)
    return model


def _images(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, 8, 8, generator=g), torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.parametrize("mech, kw", VARIANTS, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_fused_path_equals_the_reference_path_and_reaches_every_parameter(mech, kw):
    """The Triton kernels (the interpreter on CPU) against the plain PyTorch path with the same
    weights: logits and every parameter's gradient, which must be finite and non-zero."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    models = [_model(mech, attention_backend=backend, **kw).to(device) for backend in ("triton", "reference")]
    models[1].load_state_dict(models[0].state_dict())
    images, labels = (t.to(device) for t in _images())
    outs = []
    for model in models:
        out = model(images, labels=labels)
        out.loss.backward()
        outs.append(out.logits)
    assert outs[0].shape == (2, 3) and rel_err(outs[0], outs[1]) < 1e-5
    for (name, p), p_ref in zip(models[0].named_parameters(), models[1].parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        assert rel_err(p.grad, p_ref.grad) < 1e-5, name


@pytest.mark.parametrize("mech", ["residual", "moda", "attnres_block"])
def test_a_patch_output_depends_on_later_patches(mech):
    """Non-causal: the first patch's (and CLS's) final state changes with the last patch's pixels."""
    model = _model(mech)
    images = _images()[0].requires_grad_()
    weights = torch.randn(32)  # not a plain sum: a LayerNorm'd state sums to its bias whatever the input
    for token in (0, 1):  # a forward each: the depth streams' backward runs once
        hidden = model.vit(images).last_hidden_state  # [B, 1 + 4, D]
        (grad,) = torch.autograd.grad((hidden[:, token] @ weights).sum(), images)
        assert grad[:, :, 4:, 4:].abs().sum() > 0, token  # the last patch: bottom right


def test_moda_encoder_equals_a_hand_written_one():
    """The MoDA encoder against the paper's formula written out with re-stacked slots: block l's
    queries read every patch's K/V and, for their own token, the attention and MLP K/V of blocks
    0..l-1 (in that order) under one float64 softmax."""
    torch.manual_seed(0)
    model = _model("moda", qk_norm=True).double()
    images = _images()[0].double()
    vit, cfg = model.vit, model.config
    B, H, Hk, d = 2, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    with torch.no_grad():
        x = vit.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(B, -1, -1), x], 1) + vit.pos_embed
        T = x.shape[1]
        ks, vs = [], []
        for layer in vit.layers:
            a = layer.attn
            h = layer.attn_norm(x)
            q = a.q_norm(a.q_proj(h).view(B, T, H, d))
            k, v = a.kv_proj(h).view(B, T, 2, Hk, d).unbind(2)
            k = a.k_norm(k)
            depth = (torch.stack(ks, 2), torch.stack(vs, 2)) if ks else (None, None)
            o, _ = naive_moda(q, k, v, *depth, causal=False)
            x = x + a.o_proj(o.reshape(B, T, -1))
            ks.append(k)
            vs.append(v)
            h = layer.ffn_norm(x)
            if layer.ffn_kv is not None:
                kf, vf = layer.ffn_kv.proj(h).view(B, T, 2, Hk, d).unbind(2)
                ks.append(layer.ffn_kv.k_norm(kf))
                vs.append(vf)
            x = x + layer.ffn.fc2(F.gelu(layer.ffn.fc1(h)))
        want = model.classifier(vit.norm(x)[:, 0])
        assert rel_err(model(images).logits, want) < 1e-10


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _model("moda", attn_kv_proj=True).eval()
    images, _ = _images()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, FlashDepthViTForImageClassification) and loaded.config.depth_mechanism == "moda"
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, model(images).logits)


def test_bf16_autocast_forward_backward():
    model = _model("moda")
    images, labels = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("overrides, msg", [
    ({"depth_mechanism": "mhc"}, "depth_mechanism must be one of"),
    ({"patch_size": 3}, "patch_size=3 must divide image_size=8"),
    ({"num_labels": 0}, "num_labels must be a positive int"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads=3"),
    ({"depth_mechanism": "attnres_block", "attnres_blocks": 4}, "attnres_blocks=4 must divide the 6 sublayers"),
    ({"qk_norm": 1}, "qk_norm must be a bool"),
    ({"layer_norm_eps": -1.0}, "layer_norm_eps must be a finite number > 0, got -1.0"),
    ({"depth_window": 0}, "depth_window must be None"),
    ({"attention_backend": "flash"}, "attention_backend must be"),
])
def test_bad_config(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        FlashDepthViTConfig(**{**TINY, **overrides})


def test_bad_inputs():
    model = _model("moda")
    images, labels = _images()
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[B >= 1, 2, 8, 8\].*got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match=r"pixel_values must be a torch.float32 tensor \[B, 2, 8, 8\] .* got torch.int64"):
        model(images.long())
    with pytest.raises(TypeError, match="pixel_values must be a torch.float32 tensor .* got torch.float16"):
        model(images.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # any float under autocast
        assert model(images.bfloat16()).logits.shape[0] == 2
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \[B=2\]"):
        model(images, labels=labels[:1])
    with pytest.raises(ValueError, match="unknown preset"):
        FlashDepthViTConfig.from_preset("deit-huge")


def test_vit_demo_accuracy_rises(capsys, monkeypatch):
    """The demo on a fifth of the digits, two blocks (so the second reads the first's depth slots),
    three epochs: a row per epoch, and accuracy far above chance (0.1) on held-out images."""
    pytest.importorskip("sklearn")
    from flash_depth.train import vision

    full = vision.load_digits_split

    def fifth(**kw):
        train_x, train_y, test_x, test_y = full(**kw)
        return train_x[:400], train_y[:400], test_x[:200], test_y[:200]

    monkeypatch.setattr(vision, "load_digits_split", fifth)
    assert cli.main(["vit-demo", "--epochs", "3", "--layers", "2", "--batch-size", "16", "--mechanisms", "moda"]) == 0
    out = capsys.readouterr().out
    assert "400 training / 200 test images" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"] and float(rows[-1][1]) > 0.3, rows


def test_vit_demo_user_faults_are_one_line(capsys, monkeypatch):
    assert cli.main(["vit-demo", "--mechanisms", "mhc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "depth_mechanism must be one of" in err
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "sklearn" else object())
    assert cli.main(["vit-demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'flash-depth[vision]'" in err
