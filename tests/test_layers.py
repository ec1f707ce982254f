"""The layers of flash_depth.nn that the decoder is built from: checkpoint keys, shapes, input checks."""

import pytest

from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

STATE_DICT_KEYS = {  # recorded from the tiny preset before the layers moved to flash_depth.nn
    "moda+ffn_kv": ("moda", {"ffn_kv": True}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.ffn_norm.weight model.layers.0.ffn.gate_up.weight
        model.layers.0.ffn.down.weight model.layers.0.ffn_kv.proj.weight model.layers.0.ffn_kv.k_norm.weight
        model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight model.layers.1.attn.kv_proj.weight
        model.layers.1.attn.o_proj.weight model.layers.1.attn.q_norm.weight model.layers.1.attn.k_norm.weight
        model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight model.layers.1.ffn.down.weight
        model.layers.1.ffn_kv.proj.weight model.layers.1.ffn_kv.k_norm.weight model.layers.2.attn_norm.weight
        model.layers.2.attn.q_proj.weight model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight
        model.layers.2.attn.q_norm.weight model.layers.2.attn.k_norm.weight model.layers.2.ffn_norm.weight
        model.layers.2.ffn.gate_up.weight model.layers.2.ffn.down.weight model.layers.2.ffn_kv.proj.weight
        model.layers.2.ffn_kv.k_norm.weight model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight
        model.layers.3.attn.kv_proj.weight model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight
        model.layers.3.attn.k_norm.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.norm.weight lm_head.weight
    """.split()),
    "moda+attn_kv_proj": ("moda", {"ffn_kv": False, "attn_kv_proj": True}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.attn.depth_kv.proj.weight
        model.layers.0.attn.depth_kv.k_norm.weight model.layers.0.ffn_norm.weight
        model.layers.0.ffn.gate_up.weight model.layers.0.ffn.down.weight model.layers.1.attn_norm.weight
        model.layers.1.attn.q_proj.weight model.layers.1.attn.kv_proj.weight model.layers.1.attn.o_proj.weight
        model.layers.1.attn.q_norm.weight model.layers.1.attn.k_norm.weight
        model.layers.1.attn.depth_kv.proj.weight model.layers.1.attn.depth_kv.k_norm.weight
        model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight model.layers.1.ffn.down.weight
        model.layers.2.attn_norm.weight model.layers.2.attn.q_proj.weight model.layers.2.attn.kv_proj.weight
        model.layers.2.attn.o_proj.weight model.layers.2.attn.q_norm.weight model.layers.2.attn.k_norm.weight
        model.layers.2.attn.depth_kv.proj.weight model.layers.2.attn.depth_kv.k_norm.weight
        model.layers.2.ffn_norm.weight model.layers.2.ffn.gate_up.weight model.layers.2.ffn.down.weight
        model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight model.layers.3.attn.kv_proj.weight
        model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight model.layers.3.attn.k_norm.weight
        model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight model.layers.3.ffn.down.weight
        model.norm.weight lm_head.weight
    """.split()),
    "moda+no_qk_norm": ("moda", {"qk_norm": False, "attn_kv_proj": True}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight
        model.layers.0.attn.depth_kv.proj.weight model.layers.0.ffn_norm.weight
        model.layers.0.ffn.gate_up.weight model.layers.0.ffn.down.weight model.layers.0.ffn_kv.proj.weight
        model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight model.layers.1.attn.kv_proj.weight
        model.layers.1.attn.o_proj.weight model.layers.1.attn.depth_kv.proj.weight
        model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight model.layers.1.ffn.down.weight
        model.layers.1.ffn_kv.proj.weight model.layers.2.attn_norm.weight model.layers.2.attn.q_proj.weight
        model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight
        model.layers.2.attn.depth_kv.proj.weight model.layers.2.ffn_norm.weight
        model.layers.2.ffn.gate_up.weight model.layers.2.ffn.down.weight model.layers.2.ffn_kv.proj.weight
        model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight model.layers.3.attn.kv_proj.weight
        model.layers.3.attn.o_proj.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.norm.weight lm_head.weight
    """.split()),
    "depth_attention": ("depth_attention", {}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.ffn_norm.weight model.layers.0.ffn.gate_up.weight
        model.layers.0.ffn.down.weight model.layers.0.ffn_kv.proj.weight model.layers.0.ffn_kv.k_norm.weight
        model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight model.layers.1.attn.kv_proj.weight
        model.layers.1.attn.o_proj.weight model.layers.1.attn.q_norm.weight model.layers.1.attn.k_norm.weight
        model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight model.layers.1.ffn.down.weight
        model.layers.1.ffn_kv.proj.weight model.layers.1.ffn_kv.k_norm.weight
        model.layers.1.depth_read.q_proj.weight model.layers.1.depth_read.q_norm.weight
        model.layers.1.depth_read.o_proj.weight model.layers.1.depth_norm.weight model.layers.2.attn_norm.weight
        model.layers.2.attn.q_proj.weight model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight
        model.layers.2.attn.q_norm.weight model.layers.2.attn.k_norm.weight model.layers.2.ffn_norm.weight
        model.layers.2.ffn.gate_up.weight model.layers.2.ffn.down.weight model.layers.2.ffn_kv.proj.weight
        model.layers.2.ffn_kv.k_norm.weight model.layers.2.depth_read.q_proj.weight
        model.layers.2.depth_read.q_norm.weight model.layers.2.depth_read.o_proj.weight
        model.layers.2.depth_norm.weight model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight
        model.layers.3.attn.kv_proj.weight model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight
        model.layers.3.attn.k_norm.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.layers.3.depth_read.q_proj.weight
        model.layers.3.depth_read.q_norm.weight model.layers.3.depth_read.o_proj.weight
        model.layers.3.depth_norm.weight model.norm.weight lm_head.weight
    """.split()),
    "attnres_block": ("attnres_block", {}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.ffn_norm.weight model.layers.0.ffn.gate_up.weight
        model.layers.0.ffn.down.weight model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight
        model.layers.1.attn.kv_proj.weight model.layers.1.attn.o_proj.weight model.layers.1.attn.q_norm.weight
        model.layers.1.attn.k_norm.weight model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight
        model.layers.1.ffn.down.weight model.layers.2.attn_norm.weight model.layers.2.attn.q_proj.weight
        model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight model.layers.2.attn.q_norm.weight
        model.layers.2.attn.k_norm.weight model.layers.2.ffn_norm.weight model.layers.2.ffn.gate_up.weight
        model.layers.2.ffn.down.weight model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight
        model.layers.3.attn.kv_proj.weight model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight
        model.layers.3.attn.k_norm.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.norm.weight model.attnres.queries model.attnres.key_norms
        lm_head.weight
    """.split()),
    "denseformer": ("denseformer", {}, """
        model.embed_tokens.weight model.layers.0.attn_norm.weight model.layers.0.attn.q_proj.weight
        model.layers.0.attn.kv_proj.weight model.layers.0.attn.o_proj.weight model.layers.0.attn.q_norm.weight
        model.layers.0.attn.k_norm.weight model.layers.0.ffn_norm.weight model.layers.0.ffn.gate_up.weight
        model.layers.0.ffn.down.weight model.layers.1.attn_norm.weight model.layers.1.attn.q_proj.weight
        model.layers.1.attn.kv_proj.weight model.layers.1.attn.o_proj.weight model.layers.1.attn.q_norm.weight
        model.layers.1.attn.k_norm.weight model.layers.1.ffn_norm.weight model.layers.1.ffn.gate_up.weight
        model.layers.1.ffn.down.weight model.layers.2.attn_norm.weight model.layers.2.attn.q_proj.weight
        model.layers.2.attn.kv_proj.weight model.layers.2.attn.o_proj.weight model.layers.2.attn.q_norm.weight
        model.layers.2.attn.k_norm.weight model.layers.2.ffn_norm.weight model.layers.2.ffn.gate_up.weight
        model.layers.2.ffn.down.weight model.layers.3.attn_norm.weight model.layers.3.attn.q_proj.weight
        model.layers.3.attn.kv_proj.weight model.layers.3.attn.o_proj.weight model.layers.3.attn.q_norm.weight
        model.layers.3.attn.k_norm.weight model.layers.3.ffn_norm.weight model.layers.3.ffn.gate_up.weight
        model.layers.3.ffn.down.weight model.norm.weight model.dense.weights lm_head.weight
    """.split()),
}


@pytest.mark.parametrize("case", list(STATE_DICT_KEYS))
def test_state_dict_keys_are_unchanged(case):
    """Checkpoints saved before the layers moved must load: same names, same order."""
    mech, kw, keys = STATE_DICT_KEYS[case]
    model = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, **kw))
    assert list(model.state_dict()) == keys
